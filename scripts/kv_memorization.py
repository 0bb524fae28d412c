"""Key memorization during composition training: held-out-key vs D_C-key KV-SUBS accuracy.

Trains the headline composition of `calm reproduce kv` (D_C = substitute then compute, with the
NUM-MATH replay share, same seeding) and every `--eval-every` steps prints greedy KV-SUBS accuracy
on 150 expressions over held-out keys and on 100 over the D_C keys. A composition that copies
mA's substitution scores alike on both; one that memorizes the D_C keys' values does not.

    python scripts/kv_memorization.py --seed 2 --lr 6e-3 --dropout 0.0
    python scripts/kv_memorization.py --seed 2 --lr 6e-3 --dropout 0.1
    python scripts/kv_memorization.py --seed 5 --dropout 0.1 --connections 2:2,3:3
"""

from __future__ import annotations

import argparse
import time

import torch

import calm.kv_reproduce as kr
from calm import CALM, CALMConfig
from calm.config import Connection
from calm.tasks.kv import KVTask


def kv_subs_accuracy(model, tokenizer, examples) -> float:
    got = kr.complete(model, tokenizer, [ex.prompt for ex in examples], 14)
    return sum(kr._correct("kv_subs", g, ex) for g, ex in zip(got, examples)) / len(examples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--lr", type=float, default=6e-3)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--fake-keys", type=float, default=kr.ReproduceConfig.fake_keys)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument(
        "--connections",
        default=None,
        help="anchor:aug layer pairs, e.g. 2:2,3:3 (default: every mA layer, as calm reproduce)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)

    bases = kr.load_bases(None)
    tok, mA, mB = bases.tokenizer, bases.models["mA"], bases.models["mB"]
    task = KVTask(bases.scale)
    dc_keys, held_keys = task.split_keys(args.seed)
    cfg = kr.ReproduceConfig(
        seed=args.seed,
        learning_rate=args.lr,
        steps=args.steps,
        fake_keys=args.fake_keys,
    )
    data = kr.dc_data(task, dc_keys, "subs_math", cfg, mA, tok)
    held = kr.eval_sets(task, held_keys, 150, args.seed)["kv_subs"]
    seen = kr.eval_sets(task, dc_keys, 100, args.seed + 100)["kv_subs"]

    torch.manual_seed(args.seed)
    if args.connections:
        pairs = [tuple(map(int, p.split(":"))) for p in args.connections.split(",")]
        wiring = {"connections": tuple(Connection(b, a) for b, a in pairs)}
    else:
        wiring = {"every": 1}
    model = CALM(mB, mA, CALMConfig(rope=True, dropout=args.dropout, **wiring))
    start = time.time()

    def report(step: int, losses: list[float]) -> None:
        if (step + 1) % args.eval_every and step + 1 != args.steps:
            return
        model.eval()
        print(
            f"step {step + 1} loss {sum(losses[-20:]) / len(losses[-20:]):.4f} "
            f"held-out KV-SUBS {kv_subs_accuracy(model, tok, held):.3f} "
            f"D_C-key KV-SUBS {kv_subs_accuracy(model, tok, seen):.3f} "
            f"({time.time() - start:.0f} s)",
            flush=True,
        )

    kr.train_on(
        model,
        model.trainable_parameters(),
        tok,
        data,
        cfg,
        "compose",
        on_step=report,
    )


if __name__ == "__main__":
    main()
