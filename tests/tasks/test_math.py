"""GSM8K/MGSM: number extraction, loaders, prompts and exact-match scoring."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import calm
from calm.errors import UserError
from calm.tasks.math import (
    SHIPPED_DATA,
    MathWordProblems,
    data_root,
    extract_answer,
    make_gsm8k,
    make_mgsm,
    normalize_number,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("3 + 4 = 7. The answer is 7.", "7"),
        ("The answer is $1,250.00", "1250"),
        ("So 12 then 15 remain. The answer is: 15\n", "15"),
        ("first 3, then 2.5", "2.5"),
        ("The answer is 4. Next question 9", "4"),
        ("-3 degrees", "-3"),
        ("no digits here", None),
    ],
)
def test_extract_answer(text, number):
    assert extract_answer(text) == number


def test_normalize_number():
    assert normalize_number("1,000") == "1000"
    assert normalize_number("18.0") == "18"
    assert normalize_number("abc") is None


def _write_data(root):
    (root / "gsm8k").mkdir()
    (root / "mgsm").mkdir()
    train = [
        {"question": "One plus one?", "answer": "1+1=<<1+1=2>>2\n#### 2"},
        {"question": "Two times three?", "answer": "2*3=<<2*3=6>>6\n#### 6"},
    ]
    test = [{"question": "Ten minus four?", "answer": "10-4=6\n#### 6"}]
    for name, rows in (("train", train), ("test", test)):
        (root / "gsm8k" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "mgsm" / "mgsm_sw.tsv").write_text("Kumi toa nne?\t6\nMbili jumlisha tatu?\t5\n")


def test_gsm8k_prompt_uses_training_exemplars_and_scores_exact_match(tmp_path):
    _write_data(tmp_path)
    task = make_gsm8k(data=str(tmp_path))
    (example,) = task.examples(2)
    assert example.prompt == (
        "Question: One plus one?\nAnswer: 1+1=2 The answer is 2.\n\n"
        "Question: Two times three?\nAnswer: 2*3=6 The answer is 6.\n\n"
        "Question: Ten minus four?\nAnswer:"
    )
    assert example.reference == "6"
    metrics, records = task.score([example], [[" 10-4=6. The answer is 6."]])
    assert metrics == {"accuracy": 100.0} and records[0]["predicted"] == "6"
    metrics, _ = task.score([example], [[" I think 7"]])
    assert metrics == {"accuracy": 0.0}


def test_missing_data_names_the_file_and_the_fix(tmp_path):
    with pytest.raises(UserError, match="--data DIR") as missing:
        make_gsm8k(data=str(tmp_path))
    assert isinstance(missing.value, FileNotFoundError)  # what callers caught before


def test_mgsm_reads_one_language(tmp_path):
    _write_data(tmp_path)
    task = make_mgsm("sw", data=str(tmp_path))
    assert isinstance(task, MathWordProblems) and task.name == "mgsm:sw"
    examples = task.examples(1)
    assert [e.reference for e in examples] == ["6", "5"]
    assert examples[1].prompt.endswith("Question: Mbili jumlisha tatu?\nAnswer:")
    metrics, _ = task.score(examples, [["The answer is 6."], ["The answer is 4."]])
    assert metrics == {"accuracy": 50.0}


def test_the_default_data_is_inside_the_package_and_loads(monkeypatch, tmp_path):
    monkeypatch.delenv("CALM_DATA", raising=False)
    assert data_root() == SHIPPED_DATA
    assert Path(calm.__file__).resolve().parent in SHIPPED_DATA.parents
    assert len(make_gsm8k().examples(0)) == 1319
    for language in ("en", "te"):
        examples = make_mgsm(language).examples(8)
        assert len(examples) == 250 and examples[0].reference == "18"
    _write_data(tmp_path)  # $CALM_DATA and `data` still replace it
    monkeypatch.setenv("CALM_DATA", str(tmp_path))
    assert len(make_gsm8k().examples(1)) == 1


@pytest.mark.slow
def test_the_wheel_carries_the_shipped_data_and_its_licences(tmp_path):
    """`pip install` gets every file under calm/tasks/data (built from a copy: no build/ here)."""
    source = tmp_path / "src"
    shutil.copytree(ROOT / "calm", source / "calm", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet"]
        + ["--wheel-dir", str(tmp_path / "dist"), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    shipped = {
        f"calm/tasks/data/{p.relative_to(SHIPPED_DATA).as_posix()}"
        for p in SHIPPED_DATA.rglob("*")
        if p.is_file()
    }
    assert {"calm/tasks/data/gsm8k/LICENSE", "calm/tasks/data/mgsm/LICENSE"} <= shipped
    assert shipped <= set(zipfile.ZipFile(wheel).namelist())
