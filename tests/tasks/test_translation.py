"""Translation: verse alignment, fixed disjoint splits, 5-shot prompts, chrF scoring."""

from __future__ import annotations

import hashlib
import json

import pytest

from calm.tasks.translation import (
    copy_source,
    load_pairs,
    make,
    monolingual,
    quran_split,
    random_reference,
)

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
    test_ids = [p["id"] for p in load_pairs("nya-en", "test", root)]
    assert sorted(e.id for e in examples) == sorted(test_ids)
    hashed = [hashlib.sha256(e.id.encode()).hexdigest() for e in examples]
    assert hashed == sorted(hashed) and len(set(hashed)) == len(hashed)  # a spread, not canonical
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


def _quran(root, surahs=40, verses=25, langs=("bn", "en")):
    """quran-json's layout (dist/quran_<lang>.json) with unique verses, one verse repeated in
    every surah (as the Quran repeats some), and one long verse per surah."""
    (root / "dist").mkdir(parents=True)
    for lang in langs:
        data = []
        for s in range(1, surahs + 1):
            texts = [
                f"{lang} surah {s} verse {v}, a verse of the fake corpus"
                for v in range(1, verses + 1)
            ]
            texts[4] = f"{lang} the repeated verse"
            texts[7] = f"{lang} long {s} " + "x" * 400
            data.append(
                {
                    "id": s,
                    "verses": [{"id": v, "translation": t} for v, t in enumerate(texts, 1)],
                }
            )
        (root / "dist" / f"quran_{lang}.json").write_text(json.dumps(data, ensure_ascii=False))
    return root


def test_quran_is_split_by_blocks_of_ten_verses_with_no_repeat_leaking(tmp_path):
    root = str(_quran(tmp_path))
    splits = {s: load_pairs("bn-en", s, root) for s in ("train", "dev", "test")}
    assert all(splits.values())
    blocks = {s: set() for s in splits}
    for s, pairs in splits.items():
        for p in pairs:
            surah, verse = map(int, p["id"].split(":"))
            assert quran_split(surah, verse) == s
            blocks[s].add((surah, (verse - 1) // 10))
            assert p["source"].startswith(f"bn surah {surah} verse {verse},") or s == "train"
            assert p["target"].startswith("en ") and 10 <= len(p["source"]) <= 300
    assert not blocks["test"] & blocks["train"] and not blocks["dev"] & blocks["train"]
    train_text = {p["source"] for p in splits["train"]}
    assert "bn the repeated verse" in train_text  # on the train side, and so nowhere else:
    assert not {p["source"] for p in splits["test"] + splits["dev"]} & train_text


def test_quran_monolingual_corpora_keep_long_verses_and_never_cross_splits(tmp_path):
    root = str(_quran(tmp_path))
    train, test = monolingual("bn-en", "train", root), monolingual("bn-en", "test", root)
    train_lines = {line for text in train.values() for line in text.splitlines()}
    test_lines = {line for text in test.values() for line in text.splitlines()}
    assert any(line.startswith("bn long") for line in train_lines)  # not length-filtered
    assert test_lines and not test_lines & train_lines
    assert all(line.startswith("bn ") for line in train_lines | test_lines)  # one language only
    for key in test:
        surah, block = map(int, key.split(":"))
        assert quran_split(surah, block * 10 + 1) == "test"
    assert {p["source"] for p in load_pairs("bn-en", "test", root)} <= test_lines


def test_bible_monolingual_reads_chichewa_chapters_of_one_split(tmp_path):
    root = _bible(tmp_path)
    (root / "chichewa" / "1" / "3.json").write_text(json.dumps(["a", "b", "  ", "c"]))
    chapters = {s: monolingual("nya-en", s, str(root)) for s in ("train", "dev", "test")}
    assert sum(map(len, chapters.values())) == 60
    everywhere = {**chapters["train"], **chapters["dev"], **chapters["test"]}
    assert everywhere["1:3"] == "a\nb\nc\n"  # every verse, aligned with English or not
    test_chapters = {p["id"].rsplit(":", 1)[0] for p in load_pairs("nya-en", "test", str(root))}
    assert set(chapters["test"]) == test_chapters


def test_floors_copy_the_source_and_draw_another_reference(tmp_path):
    root = str(_quran(tmp_path, langs=("tr", "en")))
    task = make("tr-en", data=root)
    assert task.name == "translation:tr-en" and task.version == "3"
    examples = task.examples(5)
    assert examples[0].prompt.startswith("Translate from Turkish to English.\n\n")
    copied = copy_source(examples)
    assert [c[0] for c in copied] == [
        e.prompt.rsplit("\n", 2)[-2][len("Turkish: ") :] for e in examples
    ]
    drawn = random_reference(examples, examples, seed=0)
    assert all(d[0] != e.reference for d, e in zip(drawn, examples))
    assert {d[0] for d in drawn} <= {e.reference for e in examples}
    assert random_reference(examples[:3], examples, seed=0) == drawn[:3]  # not subset-dependent
    assert random_reference(examples, examples, seed=1) != drawn
    metrics, records = task.score(examples, copied)
    assert 0 < metrics["chrf"] < 100 and [r["id"] for r in records] == [e.id for e in examples]


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

    for variant in ("bn-en", "ur-en", "id-en", "tr-en"):
        try:
            sizes = {s: len(load_pairs(variant, s)) for s in ("train", "dev", "test")}
        except FileNotFoundError as e:
            pytest.skip(str(e))
        assert sizes == QURAN_SIZES[variant]


QURAN_SIZES = {
    "bn-en": {"train": 4592, "dev": 582, "test": 570},
    "ur-en": {"train": 4534, "dev": 576, "test": 568},
    "id-en": {"train": 4300, "dev": 545, "test": 535},
    "tr-en": {"train": 4489, "dev": 557, "test": 534},
}
