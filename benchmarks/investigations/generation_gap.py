"""Where CALM.generate's time over its bound goes: generate rebuilt piece by piece, timed together.

    python -m benchmarks.investigations.generation_gap [--config mid] [--tokens 256] [--reps 7]
                                                       [--ops]

The bound of benchmarks/run.py is each model's own cached greedy loop, run alone. Timed in turn
(interleaved, one thread, the run.py generation prompt, per-rep thread CPU time):
  anchor, aug     the bound's two loops (reference.greedy_cached)
  alt_plain       the same two models' calls, alternated token by token in one loop
  L0 calls        alternated through CALM's own calls (_run_augment, _anchor_call), no blocks
  L1 +extend_kv   and the blocks' keys/values of each new augmenting state
  L2 +blocks      and the blocks' cross-attention inside the anchor (CALM._composed)
  generate        CALM.generate itself (adds eos/pad bookkeeping and the token list)
--ops also counts Python calls and ATen ops per token of each (deterministic, unlike the times).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import cProfile
import os
import pstats
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks import reference, run
from calm import CALM, CALMConfig, decoding, hf


class OpCount(TorchDispatchMode):
    """Counts the ATen ops run while active, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def variants(s: run.Setup, n: int) -> dict:
    anchor, aug = run.models(s)
    model = CALM(anchor, aug, CALMConfig(init="default"))
    prompt = run.random_ids(s, 1, s.prompt, seed=1)

    @torch.no_grad()
    def ladder(level: int) -> None:
        anchor_cache, aug_cache = hf.new_cache(anchor), hf.new_cache(aug)
        blocks = decoding.decoding_blocks(model)
        step, mask, past, kv = prompt, torch.ones_like(prompt), 0, None
        for _ in range(n):
            states = model._run_augment(0, step, mask, aug_cache, past)
            if level >= 1:
                kv = decoding.extend_kv(model, kv, states, blocks)
            composed = contextlib.nullcontext()
            if level >= 2:
                composed = model._composed(kv, model._masks([mask], mask, past), blocks)
            with composed:
                logits = model._anchor_call(step, mask, past, anchor_cache, last_only=True)
            past += step.shape[1]
            step = logits.argmax(-1, keepdim=True)  # (B, 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)

    return {
        "anchor": lambda: reference.greedy_cached(anchor, prompt, n),
        "aug": lambda: reference.greedy_cached(aug, prompt, n),
        "alt_plain": lambda: reference.alternated_greedy(anchor, aug, prompt, n),
        "L0 calls": lambda: ladder(0),
        "L1 +extend_kv": lambda: ladder(1),
        "L2 +blocks": lambda: ladder(2),
        "generate": lambda: model.generate(prompt, max_new_tokens=n, eos_token_id=[]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="mid", choices=[s.name for s in run.FULL])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--ops", action="store_true", help="count Python calls and ATen ops")
    args = parser.parse_args()
    torch.set_num_threads(1)
    n = args.tokens
    fns = variants({s.name: s for s in run.FULL}[args.config], n)
    if args.ops:
        counts = {}
        for name, fn in fns.items():
            fn()
            profile = cProfile.Profile()
            profile.runcall(fn)
            with OpCount() as c:
                fn()
            counts[name] = c.ops
            calls = pstats.Stats(profile).total_calls / n
            print(
                f"{name:14s} Python calls/token {calls:7.1f}, ATen ops/token "
                f"{sum(c.ops.values()) / n:6.1f}"
            )
        extra = counts["generate"] - (counts["anchor"] + counts["aug"])
        print(
            "generate's extra ATen ops/token:",
            {k: round(v / n, 1) for k, v in extra.most_common() if v >= n / 2},
        )
        return
    print("load", [round(x, 2) for x in os.getloadavg()], time.strftime("%H:%M:%S"))
    for fn in fns.values():
        fn()
    t: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(args.reps):
        for name, fn in fns.items():
            start = time.thread_time()
            fn()
            t[name].append((time.thread_time() - start) / n * 1e3)
    bound = [a + g for a, g in zip(t["anchor"], t["aug"])]
    print(f"{'':14s} ms/token: min   median   over bound (paired median)   bound / it")
    print(f"{'bound a+g':14s} {min(bound):8.3f} {statistics.median(bound):8.3f}")
    for name, xs in t.items():
        line = f"{name:14s} {min(xs):8.3f} {statistics.median(xs):8.3f}"
        if name not in ("anchor", "aug"):
            over = statistics.median(x - b for x, b in zip(xs, bound))
            ratio = statistics.median(b / x for x, b in zip(xs, bound))
            line += f"   {over:+.3f}   {ratio:.3f}"
        print(line)
    print("load", [round(x, 2) for x in os.getloadavg()], time.strftime("%H:%M:%S"))


if __name__ == "__main__":
    main()
