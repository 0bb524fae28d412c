"""`calm eval`: score a model or a trained composition on one registered task."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from calm.errors import UserError

HELP = "Evaluate a model or a trained composition on a task (calm eval --list shows the tasks)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--list", action="store_true", help="List the tasks and exit.")
    parser.add_argument("--task", help="Task name, e.g. humaneval, mgsm:sw, translation:nah-es.")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--model", help="A Hugging Face model directory or hub id.")
    which.add_argument("--composition", help="A run directory written by `calm train`.")
    parser.add_argument(
        "--checkpoint", default="last", help="With --composition: last, best, or a path."
    )
    parser.add_argument("--anchor", help="With --composition: override the anchor's recorded path.")
    parser.add_argument(
        "--augment", action="append", help="With --composition: override augment paths (repeat)."
    )
    parser.add_argument("--limit", type=int, help="Score only the first N test examples.")
    parser.add_argument("--shots", type=int, help="In-context examples (default: the task's).")
    parser.add_argument("--out", help="Results JSON (default: results/<task>-<model>.json).")
    parser.add_argument("--data", help="A file or folder replacing the task's default data.")
    parser.add_argument("--batch-size", type=int, default=8, help="Prompts per generate call.")
    parser.add_argument(
        "--num-samples", type=int, default=1, help="Samples per problem (pass@k); >1 samples."
    )
    parser.add_argument("--temperature", type=float, default=0.8, help="Sampling temperature.")
    parser.add_argument("--top-p", type=float, default=0.95, help="Nucleus sampling mass.")
    parser.add_argument("--seed", type=int, default=0, help="Sampling seed.")
    parser.add_argument("--max-new-tokens", type=int, help="Override the task's generation length.")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's).")


def _load(args: argparse.Namespace):
    """(model, tokenizer, name) for --model, or --composition (with its TokenizerPair, if any)."""
    from calm.run import load_model, load_run, load_tokenizer, resolve_source

    if args.model:
        source = resolve_source(args.model)
        tokenizer = load_tokenizer(source)
        return load_model(source, "model"), tokenizer, Path(args.model).name or args.model
    loaded = load_run(args.composition, args.checkpoint, args.anchor, args.augment)
    return loaded.model, loaded.tokenizer, Path(args.composition).name


def run(args: argparse.Namespace) -> int:
    from calm.tasks.registry import list_tasks

    if args.list:
        for info in list_tasks():
            print(f"{info.name:14s} {info.description}")
        return 0
    if not args.task:
        raise UserError("Name a task with --task (see `calm eval --list`).")
    if not (args.model or args.composition):
        raise UserError(
            "Give the model to evaluate with --model PATH_OR_ID or --composition RUN_DIR."
        )
    import torch

    from calm.eval import evaluate
    from calm.tasks.registry import get_task

    if args.threads:
        torch.set_num_threads(args.threads)
    task = get_task(args.task, data=args.data)  # fails fast on a bad name or missing data
    model, tokenizer, name = _load(args)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    result = evaluate(
        model,
        task,
        tokenizer=tokenizer,
        shots=args.shots,
        limit=args.limit,
        batch_size=args.batch_size,
        num_samples=args.num_samples,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        model_name=name,
    )
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{args.task}-{name}")
    paths = result.write(args.out or Path("results") / f"{safe}.json")
    print(result.to_markdown(), end="")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
