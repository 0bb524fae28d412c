"""`calm pretrain`: train one key-value base model (mA, mB or vanilla_mA) from scratch."""

from __future__ import annotations

import argparse
import json

from calm.commands._options import Options, add_config_options, config_values
from calm.recipes.kv.settings import BASE_MODELS, ModelShape, PretrainConfig
from calm.tasks.kv import KVScale

HELP = "Train a key-value base model (mA: KV-SUBS, mB: arithmetic, vanilla_mA: another map)."

TRAINING: Options = {
    "--max-steps": ("max_steps", "Optimizer steps."),
    "--batch-size": ("batch_size", "Examples per step."),
    "--lr": ("learning_rate", "Peak learning rate."),
    "--warmup-steps": ("warmup_steps", "Warmup steps."),
    "--seed": ("seed", "Init and data-order seed."),
    "--eval-every": ("eval_every", "Steps per eval."),
    "--eval-size": ("eval_size", "Gate set size."),
    "--save-every": ("save_every", "Steps per save."),
    "--target-accuracy": ("target_accuracy", "Stop at this accuracy."),
    "--lookup-fraction": ("lookup_fraction", "mA/vanilla_mA: share of single-key examples."),
    "--prefix-fraction": (
        "prefix_fraction",
        "mB: share of prompts behind a random-letter distractor (never a key).",
    ),
    "--threads": ("threads", "torch CPU threads."),
}
SHAPE: Options = {
    "--hidden-size": ("hidden_size", "Model width."),
    "--layers": ("num_layers", "Decoder layers."),
    "--heads": ("num_heads", "Attention heads."),
}
SCALE: Options = {
    "--num-keys": ("num_keys", "Keys in the map."),
    "--operands": ("max_operands", "Keys per expression."),  # also sets min_operands
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("task", choices=["kv"], help="Task family (only 'kv').")
    parser.add_argument("model", choices=BASE_MODELS, help="Which base model to train.")
    parser.add_argument("--out", required=True, help="Output directory (resumes if it exists).")
    add_config_options(parser, PretrainConfig(), TRAINING)
    add_config_options(parser, ModelShape(), SHAPE)
    add_config_options(parser, KVScale(), SCALE)


def run(args: argparse.Namespace) -> int:
    shape = ModelShape(**config_values(args, SHAPE), intermediate_size=4 * args.hidden_size)
    scale = KVScale(num_keys=args.num_keys, min_operands=args.operands, max_operands=args.operands)
    cfg = PretrainConfig(
        model=args.model,
        out_dir=args.out,
        scale=scale,
        shape=shape,
        **config_values(args, TRAINING),
    )
    from calm.recipes.kv.pretrain import pretrain  # torch: loaded only to train

    summary = pretrain(cfg)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}))
    return 0
