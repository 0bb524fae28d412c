"""How every row of the low-resource experiment is scored: per chosen language a 5-shot
translation task and held-out bits per byte, and English bits per byte, through `calm.evaluate`
on the same fixed examples for every row (greedy decoding), with per-example values for the
paired table. Per language `<src>_<tgt>` (e.g. bn_en) and `<src>` (e.g. bn):

    <src>_<tgt>_chrf   translation:<src>-<tgt>, 5-shot: the mean sentence-level chrF (beta 2,
                       0-100) of the examples, so that a paired difference is a mean over them
    <src>_<tgt>_chrf1  the same with chrF1 (beta 1, the paper's measure); the task's corpus chrF
                       and chrF1 are kept beside them as <src>_<tgt>_corpus_chrf(1)
    <src>_bpb          lrl-bpb:<src>: bits per byte on held-out low-resource text (a ratio over
                       examples: bits / bytes)
    text_bpb           text-bpb: bits per byte on held-out English prose (retention)

The floors (`copy_source`, `random_reference`) answer the translation examples without a model
and are scored by the same task. Each task's result is written to the row's eval/<task>.json as
soon as it is scored, so a row interrupted during evaluation resumes at the next task.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from calm.recipes.experiment import evaluated, score_tasks
from calm.recipes.lrl.data import LrlData
from calm.recipes.pretrained import sentence_chrf
from calm.tasks.registry import Task, get_task
from calm.tasks.translation import copy_source, random_reference

KINDS = ("translation", "lrl-bpb", "text-bpb")  # the task kinds `limits` counts examples of
SHOTS = 5
FLOORS = ("copy_source", "random_reference")


def task_names(variants: tuple[str, ...]) -> list[str]:
    """Every task of a row: per language its translation and lrl-bpb tasks, then text-bpb."""
    names = [f"translation:{v}" for v in variants]
    return names + [f"lrl-bpb:{v.split('-')[0]}" for v in variants] + ["text-bpb"]


def build_tasks(variants: tuple[str, ...], data: LrlData) -> dict[str, Task]:
    """The tasks of `task_names`, built once over this data."""
    tasks = {}
    for name in task_names(variants):
        kind, _, variant = name.partition(":")
        if kind == "translation":
            source = data.of(variant)
        elif kind == "lrl-bpb":
            source = data.of(next(v for v in variants if v.startswith(variant + "-")))
        else:
            source = data.bible
        tasks[name] = get_task(name, data=source)
    return tasks


def metric_names(variants: tuple[str, ...]) -> list[str]:
    """The metrics of the paired table, in the report's order."""
    names = [f"{v.replace('-', '_')}_{m}" for v in variants for m in ("chrf", "chrf1")]
    return names + [f"{v.split('-')[0]}_bpb" for v in variants] + ["text_bpb"]


def row_values(task: str, metrics: dict, samples: list[dict]) -> tuple[dict, dict]:
    """(metrics, per-example values) of one task's result, under the experiment's names."""
    kind, _, variant = task.partition(":")
    if kind == "translation":
        prefix = variant.replace("-", "_")
        chrf, chrf1 = sentence_chrf(samples), sentence_chrf(samples, beta=1)
        out = {
            f"{prefix}_chrf": sum(chrf) / len(chrf),
            f"{prefix}_chrf1": sum(chrf1) / len(chrf1),
            f"{prefix}_corpus_chrf": metrics["chrf"],
            f"{prefix}_corpus_chrf1": metrics["chrf1"],
        }
        return out, {f"{prefix}_chrf": chrf, f"{prefix}_chrf1": chrf1}
    prefix = variant or "text"  # lrl-bpb:<src>, text-bpb
    ratio = {"num": [s["bits"] for s in samples], "den": [s["bytes"] for s in samples]}
    out = {
        f"{prefix}_bpb": metrics["bits_per_byte"],
        f"{prefix}_tokens_per_byte": metrics["tokens_per_byte"],
    }
    return out, {f"{prefix}_bpb": ratio}


def _floor(task: Task, floor: str, limit: int | None, seed: int) -> dict:
    """A floor's answers to the first `limit` examples, scored by the task like a model's."""
    pool = task.examples(SHOTS)
    examples = pool[:limit]
    if floor == "copy_source":
        completions = copy_source(examples)
    else:
        completions = random_reference(examples, pool, seed)
    metrics, records = task.score(examples, completions)
    samples = [
        {"prompt": e.prompt, "completions": c, **r}
        for e, c, r in zip(examples, completions, records)
    ]
    return {"metrics": metrics, "seconds": 0.0, "samples": samples}


def score_row(
    model: Any,
    tokenizer: Any,
    tasks: dict[str, Task],
    limits: dict[str, int | None],
    directory: Path,
    *,
    floor: str | None = None,
    max_new_tokens: int | None = None,
    batch_size: int = 4,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Score `model` (decoding with `tokenizer`), or the floor `floor` (translation tasks only),
    on every task (`score_tasks`'s result)."""

    def compute(name: str, task: Task, journal: Path) -> dict:
        kind = name.partition(":")[0]
        if floor is not None:
            return _floor(task, floor, limits[kind], seed)
        return evaluated(
            model,
            tokenizer,
            task,
            shots=SHOTS if kind == "translation" else None,
            limit=limits[kind],
            max_new_tokens=max_new_tokens if kind == "translation" else None,
            batch_size=batch_size,
            seed=seed,
            progress=progress,
            journal=journal,
        )

    if floor is not None:
        tasks = {n: t for n, t in tasks.items() if n.startswith("translation:")}
    return score_tasks(tasks, directory, compute, row_values)
