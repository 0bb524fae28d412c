"""code-to-text: summarize a Python function in one line, scored with chrF against its docstring.

Pairs come from the Python standard library source on this machine (the CodeXGlue stand-in;
CodeXGlue is in no registry): every function or method with a docstring, in files outside tests,
idlelib, turtledemo, lib2to3, ensurepip and site-packages. The input is the function re-printed
by `ast.unparse` with its docstring removed (so comments are gone too); the target is the first
paragraph of the docstring on one line. Kept: targets of 20-200 characters, functions of at most
1,200 characters. Split by file (sha256 of the path relative to the stdlib, mod 10): 0-7 train,
8 dev, 9 test; shots are the first train pairs in order. Because the stdlib differs between
Python versions, the Python version is part of the results' metadata. 3-shot by default.
Metrics: chrF (sacrebleu's default, beta=2) and chrF1 (beta=1, the paper's), corpus level.
"""

from __future__ import annotations

import ast
import hashlib
import itertools
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from calm.errors import UserError
from calm.tasks import sources
from calm.tasks.registry import Example, register

SKIP_DIRS = {"test", "tests", "idlelib", "turtledemo", "lib2to3", "ensurepip", "site-packages"}
SKIP_DIRS |= {"__pycache__", "tkinter"}
SPLITS = {"train": range(0, 8), "dev": range(8, 9), "test": range(9, 10)}


def chrf(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """Corpus chrF (beta=2, sacrebleu's default) and chrF1 (beta=1), in 0-100."""
    from sacrebleu.metrics import CHRF

    if not hypotheses:
        return {}
    return {
        "chrf": CHRF().corpus_score(hypotheses, [references]).score,
        "chrf1": CHRF(beta=1).corpus_score(hypotheses, [references]).score,
    }


def _split_of(relpath: str) -> str:
    bucket = int(hashlib.sha256(relpath.encode()).hexdigest(), 16) % 10
    return next(name for name, r in SPLITS.items() if bucket in r)


def _summary(docstring: str) -> str:
    return " ".join(docstring.strip().split("\n\n")[0].split())


def pairs_from_source(source: str) -> list[tuple[str, str, str]]:
    """(qualified name, code without docstring, summary) for each documented function."""
    pairs = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(child, clean=True)
                if doc and len(child.body) > 1:
                    summary = _summary(doc)
                    child.body = child.body[1:]
                    code = ast.unparse(child)
                    if 20 <= len(summary) <= 200 and len(code) <= 1200:
                        pairs.append((prefix + child.name, code, summary))

    visit(ast.parse(source), "")
    return pairs


def iter_pairs(root: str | Path, split: str) -> Iterator[dict]:
    """The pairs of one split under `root` (a source tree), in sorted file order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}.")
    root = Path(root)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for filename in sorted(f for f in filenames if f.endswith(".py")):
            relpath = (Path(dirpath) / filename).relative_to(root).as_posix()
            if _split_of(relpath) != split:
                continue
            try:
                source = (Path(dirpath) / filename).read_text(encoding="utf-8")
                pairs = pairs_from_source(source)
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for name, code, summary in pairs:
                yield {"id": f"{relpath}::{name}", "code": code, "summary": summary}


def _format(pair: dict) -> str:
    return f"{pair['code']}\n# Summary:"


@dataclass(frozen=True)
class CodeToText:
    """The code-to-text task over one source tree (default: this Python's standard library)."""

    root: str
    name: str = "code-to-text"
    version: str = "1"
    default_shots: int = 3
    max_shots: int = 10
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ("\n",)

    def examples(self, shots: int) -> list[Example]:
        shot_pairs = itertools.islice(iter_pairs(self.root, "train"), shots)
        context = "".join(f"{_format(p)} {p['summary']}\n\n" for p in shot_pairs)
        return [
            Example(id=p["id"], prompt=context + _format(p), reference=p["summary"])
            for p in iter_pairs(self.root, "test")
        ]

    def score(self, examples: list[Example], completions: list[list[str]]) -> tuple[dict, list]:
        hyps = [cs[0].strip() for cs in completions]
        refs = [e.reference for e in examples]
        records = [{"id": e.id, "reference": r} for e, r in zip(examples, refs)]
        return chrf(hyps, refs), records


@register("code-to-text", "Python function -> docstring summary (stdlib via ast), 3-shot, chrF")
def make(variant: str | None = None, data: str | None = None) -> CodeToText:
    if variant:
        raise UserError(f"code-to-text has no variants, got {variant!r}.")
    return CodeToText(root=str(sources.given(data) if data else sysconfig.get_paths()["stdlib"]))
