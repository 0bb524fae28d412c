"""code-to-text: docstring extraction, deterministic file-level split, chrF."""

from __future__ import annotations

import pytest

from calm.tasks.code_to_text import CodeToText, chrf, iter_pairs, pairs_from_source

SOURCE = '''
def add(a, b):
    """Add two numbers and return their sum.

    More detail that is not part of the summary.
    """
    return a + b


class Box:
    def open(self):
        """Open the box so that its contents can be read."""
        self.opened = True

    def undocumented(self):
        return 1


def only_doc():
    """This function has nothing but a docstring."""
'''


def test_pairs_drop_the_docstring_and_keep_the_first_paragraph():
    pairs = pairs_from_source(SOURCE)
    assert [(name, summary) for name, _, summary in pairs] == [
        ("add", "Add two numbers and return their sum."),
        ("Box.open", "Open the box so that its contents can be read."),
    ]
    code = pairs[0][1]
    assert code == "def add(a, b):\n    return a + b"
    assert "Add two" not in pairs[1][1]


def _tree(tmp_path):
    for i in range(40):
        (tmp_path / f"mod{i}.py").write_text(SOURCE.replace("add", f"add{i}"))
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "test_x.py").write_text(SOURCE)
    return tmp_path


def test_split_is_by_file_disjoint_and_deterministic(tmp_path):
    root = _tree(tmp_path)
    splits = {s: list(iter_pairs(root, s)) for s in ("train", "dev", "test")}
    files = {s: {p["id"].split("::")[0] for p in ps} for s, ps in splits.items()}
    assert files["train"] and files["test"]
    assert not files["train"] & files["test"] and not files["dev"] & files["test"]
    assert sum(map(len, files.values())) == 40  # test/ is skipped
    assert splits["test"] == list(iter_pairs(root, "test"))
    with pytest.raises(ValueError, match="split must be"):
        list(iter_pairs(root, "validation"))


def test_prompt_has_shots_from_train_only(tmp_path):
    root = _tree(tmp_path)
    task = CodeToText(root=str(root))
    examples = task.examples(3)
    train_codes = [p["code"] for p in iter_pairs(root, "train")][:3]
    test_pairs = list(iter_pairs(root, "test"))
    assert [e.reference for e in examples] == [p["summary"] for p in test_pairs]
    prompt = examples[0].prompt
    assert prompt.count("\n# Summary: ") == 3 and prompt.startswith(train_codes[0])
    assert prompt.endswith(f"\n\n{test_pairs[0]['code']}\n# Summary:")


def test_chrf_hand_values():
    assert chrf(["the same sentence"], ["the same sentence"]) == {"chrf": 100.0, "chrf1": 100.0}
    assert chrf(["xyz"], ["abc"]) == {"chrf": 0.0, "chrf1": 0.0}
    # one character n-gram order only: hyp "ab" vs ref "abc" has P = 1, R = 2/3;
    # chrF1 = 2PR/(P+R) = 0.8, chrF2 = 5PR/(4P+R) = 10/14
    from sacrebleu.metrics import CHRF

    assert CHRF(char_order=1, beta=1).corpus_score(["ab"], [["abc"]]).score == pytest.approx(80.0)
    assert CHRF(char_order=1).corpus_score(["ab"], [["abc"]]).score == pytest.approx(1000 / 14)
    partial = chrf(["ab"], ["abc"])
    assert 0 < partial["chrf"] < 100 and 0 < partial["chrf1"] < 100
