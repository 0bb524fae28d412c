"""`calm info`: describe a training run: config, base models, parameters, last metrics."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "Show a run's training config, base models, trainable parameters and last metrics."


def summary(run_dir: str) -> dict:
    """What `calm info` prints, as a dict."""
    from calm.checkpoint import read_record
    from calm.commands.generate import base_models
    from calm.train import CONFIG_NAME, checkpoints, resolve_checkpoint

    run = Path(run_dir)
    checkpoint = resolve_checkpoint(run, "last")
    record = read_record(checkpoint)
    config_path = run / CONFIG_NAME
    metrics = run / "metrics.jsonl"
    records = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.is_file() else []
    best = run / "best" / "state.json"
    return {
        "run_dir": str(run),
        "train_config": json.loads(config_path.read_text()) if config_path.is_file() else None,
        "calm_config": record["config"],
        "connections": record["connections"],
        "base_models": base_models(run, checkpoint),
        "trainable_parameters": record["num_trainable_parameters"],
        "checkpoints": [p.name for p in checkpoints(run)],
        "last_train": next((r for r in reversed(records) if "loss" in r), None),
        "last_eval": next((r for r in reversed(records) if "eval_loss" in r), None),
        "best": json.loads(best.read_text()) if best.is_file() else None,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="Run directory written by `calm train`.")
    parser.add_argument("--json", action="store_true", help="Print one JSON object.")


def run(args: argparse.Namespace) -> int:
    info = summary(args.run_dir)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    models = info["base_models"]
    print(f"run:          {info['run_dir']}")
    print(f"anchor:       {models['anchor']}")
    for i, aug in enumerate(models["augments"]):
        print(f"augment {i}:    {aug}")
    if models.get("aug_tokenizers"):
        print("tokenizers:   paired (each augmenting model reads the text with its own)")
    print(
        f"connections:  {len(info['connections'])} (anchor_layer <- aug_layer: "
        + ", ".join(f"{c['anchor_layer']}<-{c['aug_layer']}" for c in info["connections"])
        + ")"
    )
    print(f"trainable:    {info['trainable_parameters']:,} parameters")
    print(f"checkpoints:  {', '.join(info['checkpoints'])}")
    if info["last_train"]:
        t = info["last_train"]
        print(f"last step:    {t['step']} loss {t['loss']:.4f} lr {t['lr']:.3g}")
    if info["last_eval"]:
        e = info["last_eval"]
        print(f"last eval:    step {e['step']} loss {e['eval_loss']:.4f}")
    if info["best"]:
        print(f"best eval:    step {info['best']['step']} loss {info['best']['eval_loss']:.4f}")
    if info["train_config"]:
        cfg = info["train_config"]
        keys = ("learning_rate", "batch_size", "max_steps", "epochs", "schedule", "seed")
        print("config:       " + ", ".join(f"{k}={cfg[k]}" for k in keys))
    return 0
