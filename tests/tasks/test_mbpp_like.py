"""mbpp-like: task filtering, split, and output comparison with the reference in the sandbox."""

from __future__ import annotations

import gzip
import json

import pytest

from calm.tasks.mbpp_like import POOL, MBPPLike, read_tasks, split

GEN = "def generate_input(rng):\n    return {'n': rng.randint(1, 50)}\n"


def _task(i, code):
    return {
        "task_description": f"Task {i}: square n.",
        "input_output_spec": "Input: n (int). Output: return (int).",
        "code_sample": code,
        "input_generator": GEN,
    }


def _file(tmp_path, n=60):
    tasks = [_task(i, "def main_solution(n):\n    return n * n\n") for i in range(n)]
    tasks.append(_task(98, "import numpy\ndef main_solution(n):\n    return n\n"))
    tasks.append(_task(99, "import random\ndef main_solution(n):\n    return random.random()\n"))
    path = tmp_path / "codeio-hq.jsonl.gz"
    with gzip.open(path, "wt") as f:
        json.dump(tasks, f)
    return path


def test_only_stdlib_deterministic_tasks_are_kept_and_split_is_fixed(tmp_path):
    tasks = read_tasks(_file(tmp_path))
    assert len(tasks) == 60
    pool, test = split(tasks)
    assert len(pool) == POOL and len(test) == 10
    assert not {t["index"] for t in pool} & {t["index"] for t in test}
    assert split(tasks) == (pool, test)


def test_reference_passes_and_wrong_code_fails_in_the_sandbox(tmp_path):
    task = MBPPLike(path=str(_file(tmp_path)))
    examples = task.examples(3)[:2]
    assert examples[0].prompt.count("```python\n") == 4 and examples[0].prompt.endswith(
        "```python\n"
    )
    completions = [
        ["def main_solution(n):\n    return n ** 2\n"],
        ["def main_solution(n):\n    return n + n\n"],
    ]
    metrics, records = task.score(examples, completions)
    assert [r["status"] for r in records] == [["passed"], ["failed"]]
    assert metrics == {"pass@1": 0.5}


@pytest.mark.slow
def test_shipped_reference_solutions_pass():
    from calm.tasks import mbpp_like

    try:
        task = mbpp_like.make()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    examples = task.examples(3)
    assert len(examples) == 716 - POOL
    metrics, records = task.score(examples[:3], [[e.reference["code"]] for e in examples[:3]])
    assert metrics == {"pass@1": 1.0}, records
