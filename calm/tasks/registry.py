"""The registry of evaluation tasks: what a task provides, and how to name, list and build one.

A task is any object with the attributes and methods of `Task` below. To add one, decorate a
factory in its module and list the module in `MODULES`:

    @register("my-task", "one line for `calm eval --list`")
    def make(variant: str | None = None, data: str | None = None) -> Task: ...

`variant` selects a subset (`mgsm:sw`, `translation:nah-es`); `data` is a file or directory that
replaces the task's default data source. `get_task("name:variant", data=...)` builds it.
Modules listed in `MODULES` are imported on first use; a missing optional one is skipped.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from calm.errors import UserError

MODULES = ("humaneval", "mbpp_like", "code_to_text", "translation", "math", "kv", "bpb")


@dataclass(frozen=True)
class Example:
    """One test item: the prompt the model sees and what the scorer needs."""

    id: str
    prompt: str
    reference: Any  # a string for text tasks; task-specific data for code tasks
    meta: dict = field(default_factory=dict)


class Task(Protocol):
    """What `calm.evaluate` needs from a task.

    A task is scored on generated text by default. A task with `scoring = "likelihood"` is scored
    on how likely the model finds each example's reference after its prompt instead: `score`
    then gets, for example i, {"nll": summed negative log-likelihood in nats, "tokens": n}
    (`calm.likelihood`), not completions; its max_new_tokens and stop are unused."""

    name: str  # registry name, with the variant: "mgsm:sw"
    version: str  # bumped whenever prompts, splits or scoring change
    default_shots: int
    max_shots: int
    max_new_tokens: int
    stop: tuple[str, ...]  # a completion is cut at the first of these

    def examples(self, shots: int) -> list[Example]:
        """The test split, in a fixed order, with `shots` in-context examples in each prompt."""

    def score(self, examples: list[Example], completions: list[list[str]]) -> tuple[dict, list]:
        """(metrics, one record per example) for `completions[i]`, the samples of example i."""


@dataclass(frozen=True)
class TaskInfo:
    """A registered task family."""

    name: str
    description: str
    factory: Callable[..., Task]


_REGISTRY: dict[str, TaskInfo] = {}
_loaded = False


def register(name: str, description: str) -> Callable[[Callable[..., Task]], Callable[..., Task]]:
    """Decorator: register `factory(variant=None, data=None) -> Task` under `name`."""

    def decorate(factory: Callable[..., Task]) -> Callable[..., Task]:
        if name in _REGISTRY and _REGISTRY[name].factory is not factory:
            raise ValueError(f"Task {name!r} is already registered.")
        _REGISTRY[name] = TaskInfo(name, description, factory)
        return factory

    return decorate


def _load_modules() -> None:
    global _loaded
    if _loaded:
        return
    for module in MODULES:
        try:
            importlib.import_module(f"calm.tasks.{module}")
        except ModuleNotFoundError as e:
            if e.name != f"calm.tasks.{module}":
                raise
    _loaded = True


def list_tasks() -> list[TaskInfo]:
    """All registered task families, sorted by name."""
    _load_modules()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def get_task(name: str, data: str | None = None) -> Task:
    """Build the task `name` (`family` or `family:variant`), reading `data` if given."""
    _load_modules()
    family, _, variant = name.partition(":")
    if family not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise UserError(f"Unknown task {name!r}; known tasks: {known} (see `calm eval --list`).")
    return _REGISTRY[family].factory(variant=variant or None, data=data)


def check_shots(task: Task, shots: int | None) -> int:
    """`shots`, or the task's default; refuses a count the task cannot provide."""
    shots = task.default_shots if shots is None else shots
    if not 0 <= shots <= task.max_shots:
        raise UserError(f"{task.name} takes 0 to {task.max_shots} shots, got {shots}.")
    return shots


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """`text` up to (not including) the first occurrence of any stop string."""
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]
