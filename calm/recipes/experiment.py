"""What the real-model recipes (code, lrl) share: their trained rows and their scoring loop.

`TrainedRows` is the base of a recipe's `Experiment`: given how the recipe trains a model on its
D_C (`train`) and scores one (`score`), it makes the row functions of the three kinds of trained
row, each also as a train-only function for `--lr-probe`:

    composed(make, dc)   a composition `make()` returns, the blocks trained at `lr_calm`
    lora(rank, dc)       LoRA on mB at `lr_lora`
    finetune(dc)         every weight of mB at `lr_finetune` (scored in the run's dtype)

`score_tasks` scores a row task by task, each task's result kept in the row's
eval/<task>.json as soon as it is scored (so an interrupted row resumes at the next task), and
resumes a task interrupted midway at its next generated batch (`calm.evaluate`'s journal), and
gathers the metrics, the per-example values of the paired table and samples.jsonl.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import calm
from calm.checkpoint import atomic_write_text
from calm.recipes.lr_probe import trained_only
from calm.recipes.pretrained import full_copy, lora_model
from calm.recipes.runner import RowContext
from calm.tasks.registry import Task

RowFunction = Callable[[RowContext], dict]


class TrainedRows:
    """The row functions of a recipe's trained rows. A subclass sets `cfg` (with `lr_calm`,
    `lr_lora`, `lr_finetune`, `seed`, `dtype`) and `models` (with `mB` and `tokenizers["mB"]`),
    and defines `train` and `score`."""

    cfg: Any
    models: Any

    def train(self, ctx: RowContext, model: Any, learning_rate: float, dc: str | None) -> dict:
        """Train `model` on D_C `dc` through `calm.train` (resuming); what the loop ended at."""
        raise NotImplementedError

    def score(self, ctx: RowContext, model: Any, tokenizer: Any) -> dict:
        """The row's metrics and per-example values (`score_tasks`)."""
        raise NotImplementedError

    def _finish(self, ctx: RowContext, model: Any, trained: dict, score: bool, **more) -> dict:
        if not score:
            return trained_only(ctx, trained)
        return self.score(ctx, model, self.models.tokenizers["mB"]) | {"train": trained, **more}

    def composed(
        self,
        make: Callable[[], calm.CALM],
        dc: str | None = None,
        lr: float | None = None,
        score: bool = True,
    ) -> RowFunction:
        """A composition row: `make()` (mB composed with some augmenting model) trained on D_C
        `dc` at `lr` (default `lr_calm`); only trained (no scoring) when not `score`."""

        def run(ctx: RowContext) -> dict:
            model = make()
            try:
                trained = self.train(ctx, model, lr or self.cfg.lr_calm, dc)
                parameters = model.num_trainable_parameters()
                return self._finish(ctx, model, trained, score, parameters=parameters)
            finally:
                model.remove()

        return run

    def lora(
        self, rank: int, dc: str | None = None, lr: float | None = None, score: bool = True
    ) -> RowFunction:
        """LoRA of `rank` on mB, trained on D_C `dc` at `lr` (default `lr_lora`)."""

        def run(ctx: RowContext) -> dict:
            torch.manual_seed(self.cfg.seed)
            model = lora_model(self.models.mB, rank)
            trained = self.train(ctx, model, lr or self.cfg.lr_lora, dc)
            parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
            return self._finish(ctx, model, trained, score, parameters=parameters, rank=rank)

        return run

    def finetune(
        self, dc: str | None = None, lr: float | None = None, score: bool = True
    ) -> RowFunction:
        """Every weight of mB trained on D_C `dc` at `lr` (default `lr_finetune`), in float32;
        scored in the run's dtype."""

        def run(ctx: RowContext) -> dict:
            model = full_copy(self.models.mB)
            trained = self.train(ctx, model, lr or self.cfg.lr_finetune, dc)
            if score:
                model = model.to(getattr(torch, self.cfg.dtype)).requires_grad_(False)
            parameters = sum(p.numel() for p in model.parameters())
            return self._finish(ctx, model, trained, score, parameters=parameters)

        return run


def evaluated(model: Any, tokenizer: Any, task: Task, **settings: Any) -> dict:
    """One task's result through `calm.evaluate`: {"metrics", "seconds", "samples"}."""
    scored = calm.evaluate(model, task, tokenizer=tokenizer, **settings)
    return {
        "metrics": scored.metrics,
        "seconds": scored.metadata["generation_seconds"],
        "samples": scored.samples,
    }


def score_tasks(
    tasks: dict[str, Task],
    directory: Path,
    compute: Callable[[str, Task, Path], dict],
    row_values: Callable[[str, dict, list[dict]], tuple[dict, dict]],
) -> dict:
    """Score a row on `tasks`: each task's result (`compute(name, task, journal)`, the shape of
    `evaluated`) read from directory/eval/<task>.json (':' as '_') or computed and written
    there; `journal` (directory/eval/<task>.partial.jsonl) is where `calm.evaluate` keeps the
    batches it has generated, so that a task interrupted midway resumes at its next batch.
    `row_values(name, metrics, samples)` names its metrics and per-example values.
    Returns {"metrics", "per_example", "examples": {task: n}, "eval_seconds"}; writes
    directory/samples.jsonl, one line a sample."""
    metrics, per_example, examples, seconds, lines = {}, {}, {}, {}, []
    for name, task in tasks.items():
        cached = directory / "eval" / f"{name.replace(':', '_')}.json"
        if cached.is_file():
            result = json.loads(cached.read_text())
        else:
            result = compute(name, task, cached.with_suffix(".partial.jsonl"))
            cached.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(cached, json.dumps(result, ensure_ascii=False))
        m, values = row_values(name, result["metrics"], result["samples"])
        metrics |= m
        per_example |= values
        examples[name] = len(result["samples"])
        seconds[name] = result["seconds"]
        lines += [json.dumps({"task": name, **s}, ensure_ascii=False) for s in result["samples"]]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "samples.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {
        "metrics": metrics,
        "per_example": per_example,
        "examples": examples,
        "eval_seconds": seconds,
    }
