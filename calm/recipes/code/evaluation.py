"""How every row of the code experiment is scored: five tasks through `calm.evaluate`, the same
fixed example subsets and greedy decoding for all, and per-example values for the paired table.

    humaneval_pass1    HumanEval, 0-shot, greedy, run in the sandbox: the fraction that passes
    mbpp_like_pass1    mbpp-like (the MBPP stand-in), 3-shot, greedy, in the sandbox
    code_to_text_chrf  code-to-text, 3-shot: the mean sentence-level chrF (beta 2, 0-100) of the
                       examples, so that the paired difference is a mean over examples; the
                       task's corpus chrF and chrF1 (the paper's measure) are kept beside it
    code_bpb           bits per byte on held-out Python files (a ratio over examples: bits / bytes)
    text_bpb           bits per byte on held-out English prose (retention of general ability)

Each task's result is written to the row's eval/<task>.json as soon as it is scored, so a row
interrupted during evaluation resumes at the next task.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from calm.recipes.experiment import evaluated, score_tasks
from calm.recipes.pretrained import sentence_chrf
from calm.tasks.registry import Task, get_task

TASKS = ("humaneval", "mbpp-like", "code-to-text", "code-bpb", "text-bpb")
METRICS = ("humaneval_pass1", "mbpp_like_pass1", "code_to_text_chrf", "code_bpb", "text_bpb")
GENERATED = ("humaneval", "mbpp-like")  # the tasks whose completions `max_new_tokens` bounds


@dataclass(frozen=True)
class TaskData:
    """Where each task reads its data; None: the task's default (the installed packages and
    this Python's standard library). Tests pass tiny stand-ins."""

    humaneval: str | None = None  # a HumanEval-format .jsonl(.gz)
    mbpp_like: str | None = None  # a codeio-hq .jsonl.gz
    python_root: str | None = None  # a Python source tree: code-to-text, code-bpb and D_C
    bible: str | None = None  # BSB .tsv files (or a folder with english/*.tsv): text-bpb

    def tasks(self) -> dict[str, Task]:
        """The five tasks, built once over this data."""
        source = {
            "humaneval": self.humaneval,
            "mbpp-like": self.mbpp_like,
            "code-to-text": self.python_root,
            "code-bpb": self.python_root,
            "text-bpb": self.bible,
        }
        return {name: get_task(name, data=source[name]) for name in TASKS}


def _passed(samples: list[dict]) -> list[float]:
    return [float(s["status"][0] == "passed") for s in samples]


def _ratio(samples: list[dict]) -> dict[str, list[float]]:
    return {"num": [s["bits"] for s in samples], "den": [s["bytes"] for s in samples]}


def row_values(task: str, metrics: dict, samples: list[dict]) -> tuple[dict, dict]:
    """(metrics, per-example values) of one task's result, under the experiment's names."""
    if task in GENERATED:
        name = f"{task.replace('-', '_')}_pass1"
        passed = _passed(samples)
        return {name: sum(passed) / len(passed)}, {name: passed}
    if task == "code-to-text":
        scores = sentence_chrf(samples)
        out = {
            "code_to_text_chrf": sum(scores) / len(scores),
            "code_to_text_corpus_chrf": metrics["chrf"],
            "code_to_text_corpus_chrf1": metrics["chrf1"],
        }
        return out, {"code_to_text_chrf": scores}
    prefix = task.split("-")[0]  # code-bpb, text-bpb
    ratio = _ratio(samples)
    out = {
        f"{prefix}_bpb": metrics["bits_per_byte"],
        f"{prefix}_tokens_per_byte": metrics["tokens_per_byte"],
    }
    return out, {f"{prefix}_bpb": ratio}


def score_row(
    model: Any,
    tokenizer: Any,
    tasks: dict[str, Task],
    limits: dict[str, int | None],
    directory: Path,
    *,
    max_new_tokens: int | None,
    batch_size: int,
    seed: int,
    progress: bool,
) -> dict:
    """Score `model` (decoding with `tokenizer`) on every task (`score_tasks`'s result)."""

    def compute(name: str, task: Task, journal: Path) -> dict:
        tokens = max_new_tokens if name in GENERATED else None
        return evaluated(
            model,
            tokenizer,
            task,
            limit=limits.get(name),
            batch_size=batch_size,
            max_new_tokens=tokens,
            seed=seed,
            progress=progress,
            journal=journal,
        )

    return score_tasks(tasks, directory, compute, row_values)
