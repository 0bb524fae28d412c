"""A probe of key memorization in composition training: held-out vs D_C-key KV-SUBS accuracy.

Trains the headline composition of `calm reproduce kv` (D_C = substitute then compute, with the
replay and non-key shares, same seeding) through `calm.train`, and every `--eval-every` steps
prints greedy KV-SUBS accuracy on 150 expressions over held-out keys and on 100 over the D_C
keys. A composition that copies mA's substitution scores alike on both; one that memorizes the
D_C keys' values does not.

    python -m calm.recipes.kv.memorization --seed 2 --lr 6e-3 --dropout 0.0
    python -m calm.recipes.kv.memorization --seed 2 --lr 6e-3 --dropout 0.1
    python -m calm.recipes.kv.memorization --seed 5 --dropout 0.1 --connections 2:2,3:3
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

import calm
from calm.recipes.kv.bases import load_bases
from calm.recipes.kv.data import dc_data, records
from calm.recipes.kv.reproduce import ReproduceConfig
from calm.tasks.kv import KVTask, held_out_task


def kv_subs_accuracy(model, tokenizer, task) -> float:
    result = calm.evaluate(model, task, tokenizer=tokenizer, batch_size=256, progress=False)
    return sum(r["correct"] for r in result.samples) / len(result.samples)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--lr", type=float, default=6e-3)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--fake-keys", type=float, default=ReproduceConfig.fake_keys)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument(
        "--connections",
        default=None,
        help="anchor:aug layer pairs, e.g. 2:2,3:3 (default: every mA layer, as calm reproduce)",
    )
    parser.add_argument("--out", default=None, help="Run directory (default: a temporary one).")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    bases = load_bases(None)
    tok, mA, mB = bases.tokenizer, bases.models["mA"], bases.models["mB"]
    task = KVTask(bases.scale)
    dc_keys, _ = task.split_keys(args.seed)
    cfg = ReproduceConfig(
        seed=args.seed, learning_rate=args.lr, steps=args.steps, fake_keys=args.fake_keys
    )
    data = records(dc_data(task, dc_keys, "subs_math", cfg, mA, tok))
    held = held_out_task("kv_subs", bases.scale, args.seed, 150)
    seen = held_out_task("kv_subs", bases.scale, args.seed, 100, keys="dc", draw=args.seed + 100)

    torch.manual_seed(args.seed)
    if args.connections:
        pairs = [tuple(map(int, p.split(":"))) for p in args.connections.split(",")]
        wiring = {"connections": tuple(calm.Connection(b, a) for b, a in pairs)}
    else:
        wiring = {"every": 1}
    model = calm.CALM(mB, mA, calm.CALMConfig(rope=True, dropout=args.dropout, **wiring))
    out = Path(args.out or tempfile.mkdtemp(prefix="kv-memorization-"))
    shutil.rmtree(out, ignore_errors=True)
    start, losses = time.time(), []

    def report(step: int, loss: float) -> None:
        losses.append(loss)
        if step % args.eval_every and step != args.steps:
            return
        print(
            f"step {step} loss {sum(losses[-20:]) / len(losses[-20:]):.4f} "
            f"held-out KV-SUBS {kv_subs_accuracy(model, tok, held):.3f} "
            f"D_C-key KV-SUBS {kv_subs_accuracy(model, tok, seen):.3f} "
            f"({time.time() - start:.0f} s)",
            flush=True,
        )

    config = cfg.train_config(out, aug_cache="memory")
    calm.train(model, data, config=config, tokenizer=tok, on_step=report)
    if args.out is None:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
