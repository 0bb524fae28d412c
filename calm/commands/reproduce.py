"""`calm reproduce kv`: run the paper's key-value arithmetic experiment on the shipped models."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from calm.tasks.kv import VARIANTS

HELP = "Reproduce a paper experiment (kv: key-value arithmetic, Table 1 and Table 5 analogues)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", choices=["kv"], help="Which experiment (only 'kv').")
    parser.add_argument("--out", default="runs/kv", help="Output directory for the results.")
    parser.add_argument("--seed", type=int, default=0, help="D_C key split, init, data, eval set.")
    parser.add_argument("--ablations", action="store_true", help="Add the Table 5 ablation rows.")
    parser.add_argument("--quick", action="store_true", help="A short smoke run (fewer steps).")
    parser.add_argument(
        "--from-scratch", action="store_true", help="Retrain the base models first (slow)."
    )
    parser.add_argument(
        "--variant",
        default="subs_math",
        choices=(*VARIANTS, "all"),
        help="D_C variant of the headline row; 'all' also trains and reports the other two.",
    )
    parser.add_argument("--bases", default=None, help="Base-model directory (default: shipped).")
    parser.add_argument("--steps", type=int, default=None, help="Composition training steps.")
    parser.add_argument(
        "--no-rope",
        action="store_true",
        help="Compose without rotary positions in the blocks (the paper's plain cross-attention).",
    )
    parser.add_argument("--lr", type=float, default=None, help="Composition learning rate.")
    parser.add_argument(
        "--dropout", type=float, default=None, help="Attention dropout in the blocks (and LoRA)."
    )
    parser.add_argument(
        "--fake-keys",
        type=float,
        default=None,
        help="Share of D_C over non-keys labelled by mA (default 0.25; 0 for key examples only).",
    )
    parser.add_argument("--dc-size", type=int, default=None, help="D_C examples (default 8000).")
    parser.add_argument("--eval-size", type=int, default=None, help="Evaluation expressions.")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads.")


def run(args: argparse.Namespace) -> int:
    from calm.recipes.kv.pretrain import pretrain_bases
    from calm.recipes.kv.reproduce import ReproduceConfig, run_reproduction

    flags = {
        "steps": args.steps,
        "learning_rate": args.lr,
        "dropout": args.dropout,
        "fake_keys": args.fake_keys,
        "dc_size": args.dc_size,
        "eval_size": args.eval_size,
        "rope": False if args.no_rope else None,
    }
    make = ReproduceConfig.quick if args.quick else ReproduceConfig
    cfg = make(
        out_dir=args.out,
        seed=args.seed,
        variant="subs_math" if args.variant == "all" else args.variant,
        all_variants=args.variant == "all",
        ablations=args.ablations,
        bases_dir=args.bases,
        threads=args.threads,
        **{k: v for k, v in flags.items() if v is not None},
    )
    if args.from_scratch:
        bases_dir = Path(args.out) / "bases"
        pretrain_bases(bases_dir, quick=args.quick)
        cfg = replace(cfg, bases_dir=str(bases_dir))
    results = run_reproduction(cfg)
    print(f"wrote {Path(args.out) / 'results.json'} ({results['seconds']:.0f} s)")
    return 0
