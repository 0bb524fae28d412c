"""mbpp-like: write a Python function from a description, scored against reference code's outputs.

A stand-in for MBPP (which is in no package registry): the 2,750 natural-language Python tasks
with reference code and input generators of `reasoning_gym/data/codeio-hq.jsonl.gz` in PyPI
`reasoning-gym==0.1.25` (Apache-2.0). Kept: tasks whose reference imports only the standard
library and nothing nondeterministic (random, time, datetime, os, ...), so outputs are
reproducible: 716 of them. Split (deterministic, by position after a seeded shuffle): the first
50 are the pool of in-context examples, the rest the test set. 3-shot by default.

Each prompt gives the description and the input/output spec, and asks for `main_solution`
in a fenced code block. Scoring, in the sandbox: the input generator (seeded, run in the
reference's namespace, as reasoning-gym does) makes 5 inputs, the reference and the completion
are run on each, and the example passes when all outputs are equal (floats to a relative 1e-6).
Metric: pass@k, as for HumanEval.
"""

from __future__ import annotations

import ast
import gzip
import json
import random
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from calm.errors import UserError
from calm.tasks import sources
from calm.tasks.humaneval import score_in_sandbox
from calm.tasks.registry import Example, register

NONDETERMINISTIC = {"random", "time", "datetime", "os", "sys", "uuid", "secrets", "threading"}
NONDETERMINISTIC |= {"multiprocessing", "subprocess", "socket", "asyncio", "tempfile", "shutil"}
POOL = 50
NUM_INPUTS = 5

_CHECK = """
import copy, math, random

def _same(a, b):
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9) or a == b
        except (TypeError, ValueError):
            return False
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b

_ref_ns = {{"Random": random.Random}}
exec({reference!r}, _ref_ns)
exec({generator!r}, _ref_ns)  # generators use the reference's imports and helpers
_rng = random.Random({seed})
_inputs = [_ref_ns["generate_input"](_rng) for _ in range({n})]
_expected = [_ref_ns["main_solution"](**copy.deepcopy(x)) for x in _inputs]
_cand_ns = {{}}
exec({candidate!r}, _cand_ns)
for _x, _e in zip(_inputs, _expected):
    _got = _cand_ns["main_solution"](**copy.deepcopy(_x))
    assert _same(_got, _e), f"main_solution({{_x}}) returned {{_got!r}}, expected {{_e!r}}"
"""


def _imports(code: str) -> set[str]:
    mods = set()
    with warnings.catch_warnings():  # reference code has invalid escapes: not ours to report
        warnings.simplefilter("ignore", SyntaxWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        tree = ast.parse(code)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            mods.add(node.module.split(".")[0])
    return mods


def _usable(task: dict) -> bool:
    try:
        mods = _imports(task["code_sample"]) | _imports(task["input_generator"])
    except SyntaxError:
        return False
    return (
        mods <= set(sys.stdlib_module_names)
        and not (_imports(task["code_sample"]) & NONDETERMINISTIC)
        and "def main_solution" in task["code_sample"]
        and "def generate_input" in task["input_generator"]
    )


def read_tasks(path: str | Path) -> list[dict]:
    """The usable tasks of a codeio-hq file (a gzipped JSON array), in file order."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        tasks = json.load(f)
    return [dict(t, index=i) for i, t in enumerate(tasks) if _usable(t)]


def split(tasks: list[dict]) -> tuple[list[dict], list[dict]]:
    """(in-context pool, test): a seeded shuffle, then the first `POOL` tasks form the pool."""
    order = list(range(len(tasks)))
    random.Random(0).shuffle(order)
    shuffled = [tasks[i] for i in order]
    return shuffled[:POOL], shuffled[POOL:]


def _describe(task: dict) -> str:
    return (
        f"Task: {task['task_description'].strip()}\n\n{task['input_output_spec'].strip()}\n\n"
        "Write a Python function `main_solution` that solves the task.\n"
    )


def _solution(code: str) -> str:
    return f"```python\n{code.strip()}\n```\n\n"


@dataclass(frozen=True)
class MBPPLike:
    """The mbpp-like task over one codeio-hq file."""

    path: str
    name: str = "mbpp-like"
    version: str = "1"
    default_shots: int = 3
    max_shots: int = 10
    max_new_tokens: int = 384
    stop: tuple[str, ...] = ("```",)
    timeout: float = 10.0

    def examples(self, shots: int) -> list[Example]:
        pool, test = split(read_tasks(self.path))
        context = "".join(_describe(t) + _solution(t["code_sample"]) for t in pool[:shots])
        return [
            Example(
                id=f"codeio-hq/{t['index']}",
                prompt=context + _describe(t) + "```python\n",
                reference={"code": t["code_sample"], "generator": t["input_generator"]},
            )
            for t in test
        ]

    def program(self, example: Example, completion: str) -> str:
        ref = example.reference
        return _CHECK.format(
            generator=ref["generator"],
            reference=ref["code"],
            candidate=completion,
            seed=1234,
            n=NUM_INPUTS,
        )

    def score(self, examples: list[Example], completions: list[list[str]]) -> tuple[dict, list]:
        return score_in_sandbox(self.program, examples, completions, self.timeout)


@register(
    "mbpp-like", "MBPP stand-in: reasoning-gym codeio-hq tasks, 3-shot, pass@k in the sandbox"
)
def make(variant: str | None = None, data: str | None = None) -> MBPPLike:
    if variant:
        raise UserError(f"mbpp-like has no variants, got {variant!r}.")
    path = (
        sources.given(data)
        if data
        else sources.locate("reasoning-gym", "reasoning_gym/data/codeio-hq.jsonl.gz")
    )
    return MBPPLike(path=str(path))
