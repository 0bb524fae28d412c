"""`calm pretrain`: train one key-value base model (mA, mB or vanilla_mA) from scratch."""

from __future__ import annotations

import argparse
import json

from calm.pretrain import BASE_MODELS, ModelShape, PretrainConfig, pretrain
from calm.tasks.kv import KVScale

HELP = "Train a key-value base model (mA: KV-SUBS, mB: arithmetic, vanilla_mA: another map)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d, s, k = PretrainConfig(), ModelShape(), KVScale()
    parser.add_argument("task", choices=["kv"], help="Task family (only 'kv').")
    parser.add_argument("model", choices=BASE_MODELS, help="Which base model to train.")
    parser.add_argument("--out", required=True, help="Output directory (resumes if it exists).")
    parser.add_argument("--max-steps", type=int, default=d.max_steps, help="Optimizer steps.")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="Examples per step.")
    parser.add_argument("--lr", type=float, default=d.learning_rate, help="Peak learning rate.")
    parser.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="Warmup steps.")
    parser.add_argument("--seed", type=int, default=d.seed, help="Init and data-order seed.")
    parser.add_argument("--eval-every", type=int, default=d.eval_every, help="Steps per eval.")
    parser.add_argument("--eval-size", type=int, default=d.eval_size, help="Gate set size.")
    parser.add_argument("--save-every", type=int, default=d.save_every, help="Steps per save.")
    parser.add_argument(
        "--target-accuracy", type=float, default=d.target_accuracy, help="Stop at this accuracy."
    )
    parser.add_argument(
        "--lookup-fraction",
        type=float,
        default=d.lookup_fraction,
        help="mA/vanilla_mA: share of single-key examples.",
    )
    parser.add_argument(
        "--prefix-fraction",
        type=float,
        default=d.prefix_fraction,
        help="mB: share of prompts behind a random-letter distractor (never a key).",
    )
    parser.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads.")
    parser.add_argument("--hidden-size", type=int, default=s.hidden_size, help="Model width.")
    parser.add_argument("--layers", type=int, default=s.num_layers, help="Decoder layers.")
    parser.add_argument("--heads", type=int, default=s.num_heads, help="Attention heads.")
    parser.add_argument("--num-keys", type=int, default=k.num_keys, help="Keys in the map.")
    parser.add_argument("--operands", type=int, default=k.max_operands, help="Keys per expression.")


def run(args: argparse.Namespace) -> int:
    shape = ModelShape(
        hidden_size=args.hidden_size,
        num_layers=args.layers,
        num_heads=args.heads,
        intermediate_size=4 * args.hidden_size,
    )
    scale = KVScale(num_keys=args.num_keys, min_operands=args.operands, max_operands=args.operands)
    cfg = PretrainConfig(
        model=args.model,
        out_dir=args.out,
        scale=scale,
        shape=shape,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        warmup_steps=args.warmup_steps,
        seed=args.seed,
        eval_every=args.eval_every,
        eval_size=args.eval_size,
        save_every=args.save_every,
        target_accuracy=args.target_accuracy,
        lookup_fraction=args.lookup_fraction,
        prefix_fraction=args.prefix_fraction,
        threads=args.threads,
    )
    summary = pretrain(cfg)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}))
    return 0
