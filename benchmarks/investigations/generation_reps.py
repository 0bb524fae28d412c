"""Generation against its bound with many reps of shorter calls: the spread of the per-rep ratio.

    python -m benchmarks.investigations.generation_reps [--config mid] [--tokens 128] [--reps 48]

run.py's generation section, alone: each model's cached greedy loop alone (the bound), the two
alternated token by token with no blocks, and `CALM.generate`, whole calls timed in turn with
the order rotated each rep (measure.interleaved), one thread. Prints the median and quartiles of
the per-rep ratios: bound / CALM, bound / alternated, alternated / CALM.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from benchmarks import measure, reference, run
from calm import CALM, CALMConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="mid", choices=[s.name for s in run.FULL])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=48)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    s = next(s for s in run.FULL if s.name == args.config)
    anchor, aug = run.models(s)
    model = CALM(anchor, aug, CALMConfig(init="default"))
    prompt = run.random_ids(s, 1, s.prompt, seed=1)
    n = args.tokens
    t = measure.interleaved(
        {
            "anchor": lambda: reference.greedy_cached(anchor, prompt, n),
            "aug": lambda: reference.greedy_cached(aug, prompt, n),
            "alternated": lambda: reference.alternated_greedy(anchor, aug, prompt, n),
            "calm": lambda: model.generate(prompt, max_new_tokens=n, eos_token_id=[]),
        },
        args.reps,
    )
    alone = [a + b for a, b in zip(t["anchor"], t["aug"], strict=True)]
    print(f"{args.config}, {n} new tokens, {args.reps} reps; ms/token (median):")
    for name, ts in t.items():
        print(f"  {name:<10} {1e3 * statistics.median(ts) / n:.2f}")
    print("per-rep ratio: median [quartiles]")
    for label, num, den in (
        ("bound / CALM", alone, t["calm"]),
        ("bound / alternated", alone, t["alternated"]),
        ("alternated / CALM", t["alternated"], t["calm"]),
    ):
        ratios = [a / b for a, b in zip(num, den, strict=True)]
        q1, q2, q3 = statistics.quantiles(ratios, n=4)
        print(f"  {label:<18} {q2:.3f} [{q1:.3f}, {q3:.3f}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
