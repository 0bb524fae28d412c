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
import random
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
    cfg = kr.ReproduceConfig(seed=args.seed, learning_rate=args.lr, steps=args.steps)
    n_replay = round(cfg.replay * cfg.dc_size)
    data = task.composition_data("subs_math", cfg.dc_size - n_replay, dc_keys, args.seed)
    replay = task.sample_expressions(n_replay, dc_keys, f"replay-{args.seed}")
    data += [task.num_math(e) for e in replay]
    random.Random(args.seed).shuffle(data)
    held = kr.eval_sets(task, held_keys, 150, args.seed)["kv_subs"]
    seen = kr.eval_sets(task, dc_keys, 100, args.seed + 100)["kv_subs"]

    torch.manual_seed(args.seed)
    if args.connections:
        pairs = [tuple(map(int, p.split(":"))) for p in args.connections.split(",")]
        wiring = {"connections": tuple(Connection(b, a) for b, a in pairs)}
    else:
        wiring = {"every": 1}
    model = CALM(mB, mA, CALMConfig(rope=True, dropout=args.dropout, **wiring))
    ids, mask, labels = kr.encode_examples(tok, data)
    with torch.no_grad():
        chunks = [
            model.augment_states(ids[i : i + 512], mask[i : i + 512])
            for i in range(0, len(data), 512)
        ]
    states = {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}
    params = model.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)
    order, pos, losses, start = torch.randperm(len(data), generator=generator), 0, [], time.time()
    for step in range(args.steps):
        if pos + cfg.batch_size > len(order):
            order, pos = torch.randperm(len(data), generator=generator), 0
        idx = order[pos : pos + cfg.batch_size]
        pos += cfg.batch_size
        for group in optimizer.param_groups:
            group["lr"] = kr._lr(step, cfg)
        model.train()
        aug_states = {k: v[idx] for k, v in states.items()}
        loss = model(
            input_ids=ids[idx], attention_mask=mask[idx], labels=labels[idx], aug_states=aug_states
        ).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            model.eval()
            print(
                f"step {step + 1} loss {sum(losses[-20:]) / len(losses[-20:]):.4f} "
                f"held-out KV-SUBS {kv_subs_accuracy(model, tok, held):.3f} "
                f"D_C-key KV-SUBS {kv_subs_accuracy(model, tok, seen):.3f} "
                f"({time.time() - start:.0f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
