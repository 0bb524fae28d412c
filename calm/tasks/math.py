"""Math word problems (GSM8K, MGSM): chain-of-thought few-shot, scored by final-number exact match.

Data (loaders take a folder; the default is `$CALM_DATA`, else the copy shipped in the package,
calm/tasks/data/, whose README gives sources and licences): `gsm8k/{train,test}.jsonl` (GSM8K,
MIT: question, answer ending "#### N") and `mgsm/mgsm_<lang>.tsv` (MGSM, CC-BY-SA-4.0: question
TAB number; 250 problems, the first 250 of GSM8K test, in en es fr de ru zh ja th sw bn te).
Shots (8 by default, at most 8) are the first training problems of GSM8K in English, with the
"<<...>>" calculator notes removed and the answer written "The answer is N." (MGSM's
English-exemplar setting). The score is the fraction of problems whose extracted number equals
the gold number: the number after the last "The answer is", else the last number in the
completion.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from calm.errors import UserError
from calm.tasks.registry import Example, register
from calm.tasks.sources import MissingData

SHIPPED_DATA = Path(__file__).resolve().parent / "data"  # gsm8k/ and mgsm/, package data
MGSM_LANGUAGES = ("en", "es", "fr", "de", "ru", "zh", "ja", "th", "sw", "bn", "te")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_ANSWER = re.compile(r"answer is\s*:?\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)", re.IGNORECASE)


def data_root(data: str | None = None) -> Path:
    """The folder holding gsm8k/ and mgsm/: `data`, else $CALM_DATA, else the shipped copy."""
    if data:
        return Path(data)
    if os.environ.get("CALM_DATA"):
        return Path(os.environ["CALM_DATA"])
    return SHIPPED_DATA


def normalize_number(text: str) -> str | None:
    """'1,234.50' -> '1234.5'; '18' -> '18'; None when `text` is not a number."""
    text = text.replace(",", "").strip().rstrip(".")
    try:
        value = float(text)
    except ValueError:
        return None
    return str(int(value)) if value == int(value) else repr(value)


def extract_answer(completion: str) -> str | None:
    """The final number of a chain-of-thought completion (see the module docstring)."""
    found = _ANSWER.findall(completion)
    if found:
        return normalize_number(found[-1])
    numbers = _NUMBER.findall(completion)
    return normalize_number(numbers[-1]) if numbers else None


def read_gsm8k(path: str | Path) -> list[dict]:
    """GSM8K problems of one .jsonl file: question, full solution, gold number."""
    problems = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                solution, _, gold = row["answer"].rpartition("####")
                problems.append(
                    {"question": row["question"], "solution": solution, "gold": gold.strip()}
                )
    return problems


def read_mgsm(path: str | Path) -> list[dict]:
    """MGSM problems of one question-TAB-number .tsv file."""
    problems = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                question, _, gold = line.rstrip("\n").rpartition("\t")
                problems.append({"question": question, "gold": gold.strip()})
    return problems


def exemplar(problem: dict) -> str:
    """A GSM8K training problem as an in-context example."""
    steps = re.sub(r"<<[^>]*>>", "", problem["solution"]).strip()
    return f"Question: {problem['question']}\nAnswer: {steps} The answer is {problem['gold']}.\n\n"


@dataclass(frozen=True)
class MathWordProblems:
    """GSM8K test or one MGSM language, with English GSM8K exemplars."""

    name: str
    test_path: str
    train_path: str
    mgsm: bool
    version: str = "1"
    default_shots: int = 8
    max_shots: int = 8
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ("\n\nQuestion:", "\nQuestion:", "\n\n\n")

    def examples(self, shots: int) -> list[Example]:
        context = "".join(exemplar(p) for p in read_gsm8k(self.train_path)[:shots])
        test = read_mgsm(self.test_path) if self.mgsm else read_gsm8k(self.test_path)
        return [
            Example(
                id=f"{self.name}/{i}",
                prompt=f"{context}Question: {p['question']}\nAnswer:",
                reference=normalize_number(p["gold"]),
            )
            for i, p in enumerate(test)
        ]

    def score(self, examples: list[Example], completions: list[list[str]]) -> tuple[dict, list]:
        records = []
        for e, cs in zip(examples, completions):
            predicted = extract_answer(cs[0])
            records.append({"id": e.id, "gold": e.reference, "predicted": predicted})
        if not records:
            return {}, records
        correct = sum(r["predicted"] == r["gold"] for r in records)
        return {"accuracy": 100.0 * correct / len(records)}, records


def _existing(*paths: Path) -> list[str]:
    for path in paths:
        if not path.is_file():
            raise MissingData(
                f"{path} does not exist; pass --data DIR (a folder with gsm8k/ and mgsm/) or set "
                "CALM_DATA."
            )
    return [str(p) for p in paths]


@register("gsm8k", "GSM8K test (1,319), 8-shot chain of thought, final-number exact match")
def make_gsm8k(variant: str | None = None, data: str | None = None) -> MathWordProblems:
    if variant:
        raise UserError(f"gsm8k has no variants, got {variant!r}.")
    root = data_root(data) / "gsm8k"
    test, train = _existing(root / "test.jsonl", root / "train.jsonl")
    return MathWordProblems("gsm8k", test, train, False)


@register("mgsm", "MGSM (250 problems) in mgsm:en|es|fr|de|ru|zh|ja|th|sw|bn|te, 8-shot")
def make_mgsm(variant: str | None = None, data: str | None = None) -> MathWordProblems:
    variant = variant or "en"
    if variant not in MGSM_LANGUAGES:
        raise UserError(f"Unknown MGSM language {variant!r}; known: {', '.join(MGSM_LANGUAGES)}.")
    root = data_root(data)
    test, train = _existing(root / "mgsm" / f"mgsm_{variant}.tsv", root / "gsm8k" / "train.jsonl")
    return MathWordProblems(f"mgsm:{variant}", test, train, True)
