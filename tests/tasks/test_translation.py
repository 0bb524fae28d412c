"""Translation: verse alignment, fixed disjoint splits, 5-shot prompts, chrF scoring."""

from __future__ import annotations

import json

import pytest

from calm.tasks.translation import load_pairs, make

BSB_HEADER = (
    "id\tsource_verse\ttext\tskip_space_after\texclude\tid_range_end\tsource_verse_range_end\n"
)


def _bible(root, chapters=60):
    (root / "english").mkdir()
    rows = [BSB_HEADER]
    for c in range(1, chapters + 1):
        verses = [f"Mawu a chaputala {c} vesi {v} ndi abwino kwambiri." for v in (1, 2)]
        (root / "chichewa" / "1").mkdir(parents=True, exist_ok=True)
        (root / "chichewa" / "1" / f"{c}.json").write_text(json.dumps(verses))
        for v in (1, 2):
            words = [("These", ""), ("are", ""), ("the", ""), ("words", ""), ("of", "")]
            words += [(f"chapter{c}", ""), (f"verse{v}", "y"), (".", "")]
            for w, (text, skip) in enumerate(words):
                rows.append(f"01{c:03d}{v:03d}{w + 1:03d}\tx\t{text}\t{skip}\t\t\t\n")
    (root / "english" / "ot_BSB.tsv").write_text("".join(rows))
    return root


def test_verses_are_joined_on_book_chapter_verse(tmp_path):
    root = _bible(tmp_path)
    pairs = {
        p["id"]: p for s in ("train", "dev", "test") for p in load_pairs("nya-en", s, str(root))
    }
    assert len(pairs) == 120
    assert pairs["1:7:2"]["source"] == "Mawu a chaputala 7 vesi 2 ndi abwino kwambiri."
    assert pairs["1:7:2"]["target"] == "These are the words of chapter7 verse2."


def test_splits_are_disjoint_deterministic_and_by_chapter(tmp_path):
    root = str(_bible(tmp_path))
    splits = {s: load_pairs("nya-en", s, root) for s in ("train", "dev", "test")}
    chapters = {s: {p["id"].rsplit(":", 1)[0] for p in ps} for s, ps in splits.items()}
    assert chapters["test"] and chapters["train"]
    assert not chapters["test"] & chapters["train"] and not chapters["test"] & chapters["dev"]
    assert splits["test"] == load_pairs("nya-en", "test", root)


def test_prompt_has_five_train_shots_and_scores_chrf(tmp_path):
    root = str(_bible(tmp_path))
    task = make("nya-en", data=root)
    examples = task.examples(5)
    assert [e.id for e in examples] == [p["id"] for p in load_pairs("nya-en", "test", root)]
    prompt = examples[0].prompt
    assert prompt.startswith("Translate from Chichewa to English.\n\n")
    assert prompt.count("\nEnglish: ") == 5 and prompt.endswith("\nEnglish:")
    train_sources = {p["source"] for p in load_pairs("nya-en", "train", root)}
    shots = [line[len("Chichewa: ") :] for line in prompt.splitlines()[2:-2:3]]
    assert len(shots) == 5 and set(shots) <= train_sources
    assert len({s.split()[3] for s in shots}) == 5  # five different chapters: spread, not the first
    metrics, _ = task.score(examples, [[" " + e.reference] for e in examples])
    assert metrics["chrf"] == pytest.approx(100.0)


def test_nahuatl_pairs_are_deduplicated_and_split(tmp_path):
    rows = [
        f'"Es la frase española número {i}.","Inin tlahtolli nahuatl {i} ika.",Classical,Doc,x\n'
        for i in range(200)
    ]
    path = tmp_path / "axolotl.csv"
    path.write_text("".join(rows + rows[:5]))
    splits = {s: load_pairs("nah-es", s, str(path)) for s in ("train", "dev", "test")}
    assert sum(map(len, splits.values())) == 200
    keys = {s: {p["source"] for p in ps} for s, ps in splits.items()}
    assert not keys["train"] & keys["test"]
    task = make("nah-es", data=str(path))
    assert task.name == "translation:nah-es"
    assert task.examples(5)[0].prompt.startswith("Translate from Nahuatl to Spanish.")


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="Unknown translation variant"):
        make("xx-en")


@pytest.mark.slow
def test_shipped_corpora_load_with_documented_sizes():
    try:
        sizes = {s: len(load_pairs("nah-es", s)) for s in ("train", "dev", "test")}
    except FileNotFoundError as e:
        pytest.skip(str(e))
    assert sizes == {"train": 11028, "dev": 613, "test": 604}
    try:
        sizes = {s: len(load_pairs("nya-en", s)) for s in ("train", "dev", "test")}
    except FileNotFoundError as e:
        pytest.skip(str(e))
    assert sizes == {"train": 28726, "dev": 1064, "test": 1296}
