"""`calm train`: compose an anchor with augmenting models and train the composition on JSONL."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from calm.cli import CLIError

HELP = "Train a composition of a frozen anchor and frozen augmenting models on a JSONL data set."
MODELS_NAME = "models.json"  # in the run directory: where the base models and tokenizers came from


def resolve_source(source: str) -> str:
    """A local model directory as an absolute path (so the run dir records where it is); a hub id
    unchanged; a path-like string that names no directory is refused."""
    if os.path.isdir(source):
        return str(Path(source).resolve())
    if os.path.exists(source) or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise CLIError(f"Model directory {source} does not exist.")
    return source


def load_model(source: str, role: str):
    """AutoModelForCausalLM.from_pretrained(source), with one-line errors."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    try:
        return AutoModelForCausalLM.from_pretrained(source)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CLIError(f"Cannot load the {role} from {source}: {first}") from None


def load_tokenizer(source: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CLIError(f"Cannot load a tokenizer from {source}: {first}") from None


def tokenizer_pair(anchor_tokenizer, aug_srcs: list[str]):
    """A `calm.TokenizerPair` of the anchor's tokenizer and those of the augmenting models at
    `aug_srcs`, or None when they all have the anchor's vocabulary (one shared token stream)."""
    from calm import TokenizerPair

    aug_tokenizers = [load_tokenizer(s) for s in aug_srcs]
    vocab = anchor_tokenizer.get_vocab()
    if all(t.get_vocab() == vocab for t in aug_tokenizers):
        return None
    try:
        return TokenizerPair(anchor_tokenizer, aug_tokenizers)
    except (TypeError, ValueError) as e:
        raise CLIError(str(e)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from calm.train import CACHE_DTYPES, CACHES, PRECISIONS, SCHEDULES, TrainConfig

    d = TrainConfig(output_dir="-", max_steps=1)
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
    opt.add_argument("--batch-size", type=int, default=d.batch_size, help="Global batch size.")
    opt.add_argument("--grad-accum", type=int, default=d.grad_accum, help="Micro-steps per step.")
    opt.add_argument("--lr", type=float, default=d.learning_rate, help="Peak learning rate.")
    opt.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="Linear warmup.")
    opt.add_argument("--schedule", choices=SCHEDULES, default=d.schedule, help="LR decay.")
    opt.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW decay.")
    opt.add_argument("--grad-clip", type=float, default=d.grad_clip, help="Max gradient norm.")
    opt.add_argument("--max-length", type=int, default=d.max_length, help="Tokens per example.")
    opt.add_argument(
        "--truncation", choices=("right", "error"), default=d.truncation, help="Long examples."
    )
    opt.add_argument("--seed", type=int, default=d.seed, help="Data order and dropout seed.")
    opt.add_argument("--precision", choices=PRECISIONS, default=d.precision, help="Autocast.")
    opt.add_argument("--aug-cache", choices=CACHES, default=d.aug_cache, help="Reuse aug states.")
    opt.add_argument(
        "--cache-dtype", choices=CACHE_DTYPES, default=d.cache_dtype, help="Cached state dtype."
    )
    opt.add_argument("--bucket-by-length", action="store_true", help="Batch similar lengths.")
    opt.add_argument(
        "--gradient-checkpointing", action="store_true", help="Recompute anchor layers."
    )
    opt.add_argument("--max-bad-steps", type=int, default=d.max_bad_steps, help="NaN limit.")
    run = parser.add_argument_group("run control")
    run.add_argument("--eval-every", type=int, help="Steps between evaluations.")
    run.add_argument("--save-every", type=int, help="Steps between checkpoints.")
    run.add_argument("--log-every", type=int, default=d.log_every, help="Steps per metrics line.")
    run.add_argument("--keep-last", type=int, default=d.keep_last, help="Checkpoints to keep.")
    run.add_argument("--resume", action="store_true", help="Continue the run in --out.")
    run.add_argument("--force", action="store_true", help="Resume despite a changed config.")
    run.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")


def run(args: argparse.Namespace) -> int:
    from calm import CALM, CALMConfig
    from calm.checkpoint import atomic_write_text
    from calm.train import NonFiniteLossError, TrainConfig, train

    for flag, path in (("--data", args.data), ("--eval-data", args.eval_data)):
        if path is not None and not os.path.isfile(path):
            raise CLIError(f"{flag} {path}: no such file.")
    config = TrainConfig(
        output_dir=args.out,
        learning_rate=args.lr,
        warmup_steps=args.warmup_steps,
        schedule=args.schedule,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_steps=args.max_steps,
        epochs=args.epochs,
        max_length=args.max_length,
        truncation=args.truncation,
        grad_clip=args.grad_clip,
        weight_decay=args.weight_decay,
        seed=args.seed,
        eval_every=args.eval_every,
        save_every=args.save_every,
        log_every=args.log_every,
        keep_last=args.keep_last,
        precision=args.precision,
        aug_cache=args.aug_cache,
        cache_dtype=args.cache_dtype,
        bucket_by_length=args.bucket_by_length,
        gradient_checkpointing=args.gradient_checkpointing,
        max_bad_steps=args.max_bad_steps,
        progress=not args.no_progress,
    )
    anchor_src = resolve_source(args.anchor)
    aug_srcs = [resolve_source(a) for a in args.augment]
    tok_src = resolve_source(args.tokenizer) if args.tokenizer else anchor_src
    tokenizer = load_tokenizer(tok_src)
    pair = tokenizer_pair(tokenizer, aug_srcs)
    anchor = load_model(anchor_src, "anchor")
    augments = [load_model(s, f"augmenting model {i}") for i, s in enumerate(aug_srcs)]
    model = CALM(
        anchor,
        augments,
        CALMConfig(every=args.every, num_heads=args.num_heads, dropout=args.dropout),
        tokenizers=pair,
    )
    models = {"anchor": anchor_src, "augments": aug_srcs, "tokenizer": tok_src}
    if pair is not None:  # each augmenting model reads the text with its own tokenizer
        models["aug_tokenizers"] = aug_srcs
    out = Path(args.out)
    saved = out / MODELS_NAME
    if args.resume and saved.is_file() and json.loads(saved.read_text()) != models:
        if not args.force:
            raise CLIError(
                f"{out} was trained with other base models ({saved}); pass the same "
                "--anchor/--augment/--tokenizer, or --force."
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
        raise CLIError(str(e)) from None
    atomic_write_text(saved, json.dumps(models, indent=2))
    print(json.dumps({k: v for k, v in vars(result).items()}))
    return 0
