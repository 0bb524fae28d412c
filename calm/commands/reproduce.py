"""`calm reproduce kv|code|lrl`: run a paper experiment (key-value arithmetic; code and
low-resource languages on real models)."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from calm.errors import UserError
from calm.tasks.kv import VARIANTS

HELP = (
    "Reproduce a paper experiment (kv: key-value arithmetic, Tables 1 and 5 analogues; code: "
    "Gemma-3-270M composed with Qwen2.5-Coder-0.5B, Tables 4 and 5; lrl: Gemma-3-270M composed "
    "with SmolLM2-135M trained on low-resource languages, Tables 2 and 5)."
)
# flag -> its default: the flags of some experiments only, refused with the others when changed
KV_ONLY = {
    "ablations": False,
    "from_scratch": False,
    "variant": "subs_math",
    "bases": None,
    "no_rope": False,
    "lr": None,
    "dropout": None,
    "fake_keys": None,
    "dc_size": None,
    "eval_size": None,
}
CODE_ONLY = {  # and lrl
    "rows": None,
    "device": "cpu",
    "dtype": "float32",
    "full_eval": False,
    "lr_calm": None,
    "lr_lora": None,
    "lr_finetune": None,
    "lr_probe": None,
}
LRL_ONLY = {"lang": None, "ma_steps": None}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", choices=["kv", "code", "lrl"], help="Which experiment.")
    parser.add_argument(
        "--out", default=None, help="Output directory for the results (default runs/EXPERIMENT)."
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="kv: D_C key split, init, data, eval set; code, lrl: D_C, init, data order, "
        "random mA.",
    )
    parser.add_argument("--quick", action="store_true", help="A short smoke run (fewer steps).")
    parser.add_argument("--steps", type=int, default=None, help="Training steps of each row.")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads.")
    kv = parser.add_argument_group("kv only")
    kv.add_argument("--ablations", action="store_true", help="Add the Table 5 ablation rows.")
    kv.add_argument(
        "--from-scratch", action="store_true", help="Retrain the base models first (slow)."
    )
    kv.add_argument(
        "--variant",
        default="subs_math",
        choices=(*VARIANTS, "all"),
        help="D_C variant of the headline row; 'all' also trains and reports the other two.",
    )
    kv.add_argument("--bases", default=None, help="Base-model directory (default: shipped).")
    kv.add_argument(
        "--no-rope",
        action="store_true",
        help="Compose without rotary positions in the blocks (the paper's plain cross-attention).",
    )
    kv.add_argument("--lr", type=float, default=None, help="Composition learning rate.")
    kv.add_argument(
        "--dropout", type=float, default=None, help="Attention dropout in the blocks (and LoRA)."
    )
    kv.add_argument(
        "--fake-keys",
        type=float,
        default=None,
        help="Share of D_C over non-keys labelled by mA (default 0.25; 0 for key examples only).",
    )
    kv.add_argument("--dc-size", type=int, default=None, help="D_C examples (default 8000).")
    kv.add_argument("--eval-size", type=int, default=None, help="Evaluation expressions.")
    code = parser.add_argument_group("code and lrl only")
    code.add_argument(
        "--rows",
        default=None,
        help="Comma-separated rows to run (default: all; code: mA,mB,calm,lora,finetune,"
        "vanilla_mA,random_mA; lrl: see docs/lrl.md); finished rows are read back, not rerun.",
    )
    code.add_argument("--device", default="cpu", help="Where the models run: cpu or cuda.")
    code.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16"), help="Base-model dtype."
    )
    code.add_argument(
        "--full-eval",
        action="store_true",
        help="Score every test example of every task (all 164 HumanEval problems, every test "
        "sentence; the accelerator run) instead of the fixed CPU subsets.",
    )
    for kind, what in (
        ("calm", "the composition blocks (every composed row)"),
        ("lora", "the LoRA adapters"),
        ("finetune", "every weight of mB (finetune)"),
    ):
        code.add_argument(
            f"--lr-{kind}", type=float, default=None, help=f"Learning rate of {what}."
        )
    code.add_argument(
        "--lr-probe",
        default=None,
        metavar="LR,LR,...",
        help="Only train the rows of --rows (default code: calm,lora,finetune; lrl: calm_paper,"
        "lora_paper,finetune) at each of these learning rates, without scoring; report each "
        "one's training loss in OUT/lr_probe/lr_probe.md.",
    )
    lrl = parser.add_argument_group("lrl only")
    lrl.add_argument(
        "--ma-steps", type=int, default=None, help="Optimizer steps of mA's build (default 200)."
    )
    lrl.add_argument(
        "--lang",
        nargs="+",
        default=None,
        metavar="SRC-TGT",
        help="Translation pairs (default bn-en ur-en; also nya-en, nah-es, id-en, tr-en).",
    )


def _refuse_other(args: argparse.Namespace, other: dict, experiment: str) -> None:
    """A flag of the other experiment given with this one is refused (one line)."""
    given = [name for name, default in other.items() if getattr(args, name) != default]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise UserError(f"{flags} do{'es' if len(given) == 1 else ''} not apply to {experiment}.")


def run(args: argparse.Namespace) -> int:
    if args.experiment == "code":
        _refuse_other(args, KV_ONLY | LRL_ONLY, "calm reproduce code")
        return _run_real(args)
    if args.experiment == "lrl":
        _refuse_other(args, KV_ONLY, "calm reproduce lrl")
        return _run_real(args)
    _refuse_other(args, CODE_ONLY | LRL_ONLY, "calm reproduce kv")
    return _run_kv(args)


def _run_real(args: argparse.Namespace) -> int:
    """`calm reproduce code|lrl`: the recipe's config from the flags, then its rows (or, with
    --lr-probe, its learning-rate probe)."""
    from calm.recipes.lr_probe import parse_learning_rates
    from calm.recipes.runner import parse_rows

    if args.experiment == "code":
        from calm.recipes.code import reproduce as recipe

        make, more = recipe.CodeConfig, {}
    else:
        from calm.recipes.lrl import reproduce as recipe

        make = recipe.LrlConfig
        more = {"languages": recipe.parse_languages(args.lang), "ma_steps": args.ma_steps}
    make = make.quick if args.quick else make
    flags = {
        "steps": args.steps,
        "limits": {t: None for t in make().limits} if args.full_eval else None,
        "lr_calm": args.lr_calm,
        "lr_lora": args.lr_lora,
        "lr_finetune": args.lr_finetune,
        **more,
    }
    cfg = make(
        out_dir=args.out or f"runs/{args.experiment}",
        seed=args.seed,
        rows=parse_rows(args.rows, recipe.ROWS),
        device=args.device,
        dtype=args.dtype,
        threads=args.threads,
        **{k: v for k, v in flags.items() if v is not None},
    )
    if args.lr_probe is not None:
        report = recipe.run_lr_probe(cfg, parse_learning_rates(args.lr_probe))
        for row, entry in report.items():
            print(f"{row}: lowest training loss at lr {entry['best_lr']:g}")
        print(f"wrote {Path(cfg.out_dir) / 'lr_probe' / 'lr_probe.md'}")
        return 0
    results = getattr(recipe, f"run_{args.experiment}")(cfg)
    print(
        f"wrote {Path(cfg.out_dir) / 'results.json'} ({len(results['rows'])} rows; "
        f"{results['seconds_this_invocation']:.0f} s this invocation)"
    )
    return 0


def _run_kv(args: argparse.Namespace) -> int:
    from calm.recipes.kv.pretrain import pretrain_bases
    from calm.recipes.kv.reproduce import ReproduceConfig, run_reproduction

    out = args.out or "runs/kv"
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
        out_dir=out,
        seed=args.seed,
        variant="subs_math" if args.variant == "all" else args.variant,
        all_variants=args.variant == "all",
        ablations=args.ablations,
        bases_dir=args.bases,
        threads=args.threads,
        **{k: v for k, v in flags.items() if v is not None},
    )
    if args.from_scratch:
        bases_dir = Path(out) / "bases"
        pretrain_bases(bases_dir, quick=args.quick)
        cfg = replace(cfg, bases_dir=str(bases_dir))
    results = run_reproduction(cfg)
    print(f"wrote {Path(out) / 'results.json'} ({results['seconds']:.0f} s)")
    return 0
