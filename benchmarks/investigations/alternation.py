"""How much of generate's gap to the bound is alternating the two models: chunked lockstep.

    python -m benchmarks.investigations.alternation [--config mid] [--tokens 128] [--reps 6]
                                                    [--chunks 1,8,32,128] [--control]

CALM.generate runs with a streamer that, after every `chunk` tokens CALM makes, advances the
anchor's own greedy loop by `chunk` tokens and then the augmenting model's (each alone, with its
own cache: `reference.greedy_steps`). Printed per chunk size: the median over reps of (anchor +
aug) / CALM, each summed over the call. chunk 1 times the three token by token, so each model's
loop runs alternated with the others; chunk = --tokens is the whole-call comparison of run.py,
each model alone. --control puts the two models alternated with no blocks
(`reference.alternated_greedy`) in CALM's place: what any composed decode must do. One thread;
the chunk sizes are interleaved rep by rep.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from benchmarks import reference, run
from calm import CALM, CALMConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="mid", choices=[s.name for s in run.FULL])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--chunks", default="1,8,32,128")
    parser.add_argument("--control", action="store_true", help="alternated models, no blocks")
    args = parser.parse_args()
    torch.set_num_threads(1)
    s = {x.name: x for x in run.FULL}[args.config]
    anchor, aug = run.models(s)
    model = CALM(anchor, aug, CALMConfig(init="default"))
    prompt = run.random_ids(s, 1, s.prompt, seed=1)
    n = args.tokens
    generate = model.generate
    if args.control:

        def generate(*a, **k):
            return reference.alternated_greedy(anchor, aug, *a, **k)

    def rep(chunk: int) -> dict[str, float]:
        loops = {
            "anchor": reference.greedy_steps(anchor, prompt, n),
            "aug": reference.greedy_steps(aug, prompt, n),
        }
        timer = reference.Lockstep(loops, chunk, n)
        timer.start()
        generate(prompt, max_new_tokens=n, eos_token_id=[], streamer=timer)
        return {name: sum(ts) for name, ts in timer.times.items()}

    chunks = [int(c) for c in args.chunks.split(",")]
    for c in chunks:  # warm-up
        rep(c)
    reps: dict[int, list[dict[str, float]]] = {c: [] for c in chunks}
    print("load", [round(x, 2) for x in os.getloadavg()], time.strftime("%H:%M:%S"))
    for _ in range(args.reps):
        for c in chunks:
            reps[c].append(rep(c))
    what = "alternated models (control)" if args.control else "CALM.generate"
    print(f"{what}, {args.config}, {n} tokens, median over {args.reps} reps:")
    print("             (anchor + aug) / it   ms/token: it, anchor + aug   [per rep]")
    for c, rs in reps.items():
        ratios = [(r["anchor"] + r["aug"]) / r["calm"] for r in rs]
        it = 1e3 * statistics.median(r["calm"] for r in rs) / n
        alone = 1e3 * statistics.median(r["anchor"] + r["aug"] for r in rs) / n
        print(
            f"chunk {c:4d}: {statistics.median(ratios):.3f}   {it:8.2f} {alone:8.2f}   "
            f"[{' '.join(f'{r:.2f}' for r in ratios)}]"
        )
    print("load", [round(x, 2) for x in os.getloadavg()], time.strftime("%H:%M:%S"))


if __name__ == "__main__":
    main()
