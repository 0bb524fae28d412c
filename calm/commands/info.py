"""`calm info`: describe a training run: config, base models, parameters, last metrics."""

from __future__ import annotations

import argparse
import json

HELP = "Show a run's training config, base models, trainable parameters and last metrics."


def summary(run_dir: str) -> dict:
    """What `calm info` prints, as a dict."""
    from calm.checkpoint import read_record
    from calm.run import Run

    run = Run(run_dir)
    checkpoint = run.resolve("last")
    record = read_record(checkpoint)
    records = run.metrics()
    best = run.best_dir / "state.json"
    return {
        "run_dir": str(run.dir),
        "train_config": run.config().to_dict() if run.config_path.is_file() else None,
        "calm_config": record["config"],
        "connections": record["connections"],
        "base_models": run.base_models(checkpoint),
        "trainable_parameters": record["num_trainable_parameters"],
        "checkpoints": [p.name for p in run.checkpoints()],
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
