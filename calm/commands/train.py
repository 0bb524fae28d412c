"""`calm train`: compose an anchor with augmenting models and train the composition on JSONL."""

from __future__ import annotations

import argparse
import json
import os

from calm.commands._options import Options, add_config_options, config_values
from calm.errors import UserError

HELP = "Train a composition of a frozen anchor and frozen augmenting models on a JSONL data set."


# Options defaulting to TrainConfig's own defaults; the others are set in add_arguments.
OPTIMIZATION: Options = {
    "--batch-size": ("batch_size", "Global batch size."),
    "--grad-accum": ("grad_accum", "Micro-steps per step."),
    "--lr": ("learning_rate", "Peak learning rate."),
    "--warmup-steps": ("warmup_steps", "Linear warmup."),
    "--schedule": ("schedule", "LR decay."),
    "--weight-decay": ("weight_decay", "AdamW decay."),
    "--grad-clip": ("grad_clip", "Max gradient norm."),
    "--max-length": ("max_length", "Tokens per example."),
    "--truncation": ("truncation", "Long examples."),
    "--seed": ("seed", "Data order and dropout seed."),
    "--precision": ("precision", "Autocast."),
    "--aug-cache": ("aug_cache", "Reuse aug states."),
    "--cache-dtype": ("cache_dtype", "Cached state dtype."),
    "--bucket-by-length": ("bucket_by_length", "Batch similar lengths."),
    "--gradient-checkpointing": ("gradient_checkpointing", "Recompute anchor layers."),
    "--max-bad-steps": ("max_bad_steps", "NaN limit."),
}
RUN_CONTROL: Options = {
    "--log-every": ("log_every", "Steps per metrics line."),
    "--keep-last": ("keep_last", "Checkpoints to keep."),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from calm.config import CACHE_DTYPES, CACHES, PRECISIONS, SCHEDULES, TrainConfig

    d = TrainConfig(output_dir="-", max_steps=1)
    choices = {
        "schedule": SCHEDULES,
        "truncation": ("right", "error"),
        "precision": PRECISIONS,
        "aug_cache": CACHES,
        "cache_dtype": CACHE_DTYPES,
    }
    models = parser.add_argument_group("models and data")
    models.add_argument("--anchor", required=True, help="Anchor model directory or hub id.")
    models.add_argument(
        "--augment", action="append", required=True, help="Augmenting model (repeatable)."
    )
    models.add_argument("--tokenizer", help="Tokenizer directory or id (default: the anchor's).")
    models.add_argument("--data", required=True, help="Training JSONL file.")
    models.add_argument("--eval-data", help="Evaluation JSONL file.")
    models.add_argument("--out", required=True, help="Run directory (checkpoints, metrics).")
    comp = parser.add_argument_group("composition")
    comp.add_argument("--every", type=int, default=4, help="Connect every N-th augmenting layer.")
    comp.add_argument("--num-heads", type=int, help="Cross-attention heads (default: anchor's).")
    comp.add_argument("--dropout", type=float, default=0.0, help="Cross-attention dropout.")
    opt = parser.add_argument_group("training")
    opt.add_argument("--max-steps", type=int, help="Optimizer steps (and/or --epochs).")
    opt.add_argument("--epochs", type=float, help="Passes over the data (and/or --max-steps).")
    add_config_options(opt, d, OPTIMIZATION, choices)
    run = parser.add_argument_group("run control")
    run.add_argument("--eval-every", type=int, help="Steps between evaluations.")
    run.add_argument("--save-every", type=int, help="Steps between checkpoints.")
    add_config_options(run, d, RUN_CONTROL)
    run.add_argument("--resume", action="store_true", help="Continue the run in --out.")
    run.add_argument("--force", action="store_true", help="Resume despite a changed config.")
    run.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")


def run(args: argparse.Namespace) -> int:
    from calm import CALM, CALMConfig, TrainConfig, train
    from calm.run import Run, load_model, load_tokenizer, resolve_source, tokenizer_pair
    from calm.train import NonFiniteLossError

    for flag, path in (("--data", args.data), ("--eval-data", args.eval_data)):
        if path is not None and not os.path.isfile(path):
            raise UserError(f"{flag} {path}: no such file.")
    config = TrainConfig(
        output_dir=args.out,
        max_steps=args.max_steps,
        epochs=args.epochs,
        eval_every=args.eval_every,
        save_every=args.save_every,
        progress=not args.no_progress,
        **config_values(args, OPTIMIZATION),
        **config_values(args, RUN_CONTROL),
    )
    anchor_src = resolve_source(args.anchor)
    aug_srcs = [resolve_source(a) for a in args.augment]
    tok_src = resolve_source(args.tokenizer) if args.tokenizer else anchor_src
    tokenizer = load_tokenizer(tok_src)
    pair = tokenizer_pair(tokenizer, aug_srcs)
    models = {"anchor": anchor_src, "augments": aug_srcs, "tokenizer": tok_src}
    if pair is not None:  # each augmenting model reads the text with its own tokenizer
        models["aug_tokenizers"] = aug_srcs
    run_dir = Run(args.out)
    saved = run_dir.models()
    if args.resume and saved is not None and saved != models and not args.force:
        raise UserError(
            f"{run_dir.dir} was trained with other base models ({run_dir.models_path}); pass the "
            "same --anchor/--augment/--tokenizer, or --force."
        )
    anchor = load_model(anchor_src, "anchor")
    augments = [load_model(s, f"augmenting model {i}") for i, s in enumerate(aug_srcs)]
    model = CALM(
        anchor,
        augments,
        CALMConfig(every=args.every, num_heads=args.num_heads, dropout=args.dropout),
        tokenizers=pair,
    )
    try:
        result = train(
            model,
            args.data,
            args.eval_data,
            config=config,
            tokenizer=tokenizer,
            resume=args.resume,
            force=args.force,
        )
    except NonFiniteLossError as e:
        raise UserError(str(e)) from None
    run_dir.write_models(**models)
    print(json.dumps(dict(vars(result))))
    return 0
