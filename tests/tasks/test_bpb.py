"""Bits per byte: fixed chunks of held-out files, disjoint from the training side, scored."""

from __future__ import annotations

import math

import pytest
from test_translation import _bible, _quran

from calm.errors import UserError
from calm.tasks.bpb import BitsPerByte, chunks, make_code, make_lrl, make_text
from calm.tasks.code_to_text import _split_of as code_split
from calm.tasks.registry import get_task
from calm.tasks.translation import monolingual, quran_split


def test_chunks_join_back_and_keep_their_size():
    text = "".join(f"line {i} " + "x" * (i % 37) + "\n" for i in range(300)) + "y" * 700
    for size in (50, 200, 1500):
        pieces = chunks(text, size)
        assert "".join(pieces) == text
        assert all(0 < len(p) <= size for p in pieces)
    assert chunks("a\nb\n", 10) == ["a\nb\n"]


def _python_tree(root, n=40):
    for i in range(n):
        (root / f"mod{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n" * 3)
    (root / "tests").mkdir()
    for i in range(n):
        (root / "tests" / f"mod{i}.py").write_text("skipped\n")
    return root


def test_code_bpb_reads_only_test_side_files(tmp_path):
    task = make_code(data=str(_python_tree(tmp_path)))
    assert task.texts and all(code_split(path) == "test" for path in task.texts)
    assert not any(path.startswith("tests/") for path in task.texts)
    examples = task.examples(0)
    assert {e.id.split("#")[0] for e in examples} == set(task.texts)
    assert examples == task.examples(0)  # a fixed order
    assert all(e.prompt == "" for e in examples)


def test_text_bpb_reads_test_chapters(tmp_path):
    task = make_text(data=str(_bible(tmp_path)))
    assert task.texts
    for key, text in task.texts.items():
        assert text.startswith("These are the words of chapter" + key.split(":")[1] + " ")


def test_score_is_bits_per_byte():
    task = BitsPerByte(name="t", texts={"a": "héllo\n", "b": "world\n"})
    examples = task.examples(0)
    nats = [{"nll": 7.0, "tokens": 3}, {"nll": 3.0, "tokens": 2}]
    metrics, records = task.score(examples, nats)
    total_bytes = len("héllo\n".encode()) + len("world\n")
    assert math.isclose(metrics["bits_per_byte"], 10.0 / math.log(2) / total_bytes)
    assert math.isclose(metrics["tokens_per_byte"], 5 / total_bytes)
    assert [r["id"] for r in records] == [e.id for e in examples]


def test_registered_with_the_real_stdlib():
    task = get_task("code-bpb")
    assert len(task.texts) > 20 and len(task.examples(0)) > 100


def test_lrl_bpb_reads_the_low_resource_side_of_the_test_split(tmp_path):
    root = str(_quran(tmp_path, langs=("ur", "en")))
    task = get_task("lrl-bpb:ur", data=root)
    assert task.name == "lrl-bpb:ur" and task.texts == monolingual("ur-en", "test", root)
    lines = [line for e in task.examples(0) for line in e.reference.splitlines()]
    assert lines and all(line.startswith(("ur surah ", "ur long ")) for line in lines)
    assert any(line.startswith("ur long ") for line in lines)  # held-out text of every length
    for line in (line for line in lines if line.startswith("ur surah ")):
        surah, verse = int(line.split()[2]), int(line.split()[4].rstrip(","))
        assert quran_split(surah, verse) == "test"


def test_lrl_bpb_wants_a_known_language():
    with pytest.raises(UserError, match="lrl-bpb takes a language"):
        make_lrl(None)
    with pytest.raises(UserError, match="one of nya, nah, bn, ur, id, tr"):
        make_lrl("en")


@pytest.mark.slow
def test_lrl_bpb_on_the_fetched_corpora_has_the_documented_sizes():
    sizes = {}
    for lang in ("bn", "ur", "id", "tr", "nya", "nah"):
        try:
            task = get_task(f"lrl-bpb:{lang}")
        except FileNotFoundError as e:
            pytest.skip(str(e))
        examples = task.examples(0)
        sizes[lang] = (len(examples), sum(len(e.reference.encode()) for e in examples))
    assert sizes == {
        "bn": (87, 193303),
        "ur": (90, 139672),
        "id": (101, 98188),
        "tr": (89, 86720),
        "nya": (142, 167459),
        "nah": (604, 55907),
    }
