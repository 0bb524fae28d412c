"""mA's corpus and D_C, the composition's training data: train-side text only, never a dev or
test sentence, never a test verse's translation.

mA's corpus: the low-resource side of the train split of each chosen language
(`calm.tasks.translation.monolingual(variant, "train")`: Quran blocks of 10 verses, Chichewa
chapters, Nahuatl sentences), cut at verse ends into pieces of at most `chunk_chars` characters
(`calm.tasks.bpb.chunks`), each a plain-text record {"text": piece}.

D_C `paper` (the paper's: no parallel data): per language a seeded `fraction` of mA's pieces (at
least one), mixed with as many pieces of high-resource text: the target side (English; Spanish for
nah-es) of train pairs whose source verse is in none of the chosen low-resource pieces, in the
corpus's order, cut the same way and drawn with the seed, so the two halves are not aligned.

D_C `parallel` (our addition): the same, plus per language `pairs` aligned train pairs (all, when
fewer) in the format of the evaluation prompt's shots: "Bengali: ...\nEnglish: ...\n".
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass

from calm.tasks.bpb import chunks
from calm.tasks.translation import LANGUAGES, QURAN, load_pairs, monolingual


@dataclass(frozen=True)
class LrlData:
    """Where each language's data is read from; None: the task's default (the cache filled by
    `tools/hub_offline.py data`). Tests pass tiny stand-ins."""

    quran: str | None = None  # quran-json's layout (dist/quran_<lang>.json): bn, ur, id, tr
    bible: str | None = None  # chichewa/ and english/*.tsv: nya-en, and text-bpb's English
    axolotl: str | None = None  # the Axolotl .csv: nah-es

    def of(self, variant: str) -> str | None:
        """The data of translation variant `variant`."""
        if variant in QURAN:
            return self.quran
        return self.bible if variant == "nya-en" else self.axolotl


def digest(records: list[dict]) -> str:
    """The first 16 hex digits of the sha256 of the records' JSON (a changed set changes it)."""
    return hashlib.sha256(json.dumps(records, ensure_ascii=False).encode()).hexdigest()[:16]


def corpus(variant: str, data: str | None, chunk_chars: int) -> list[str]:
    """The train-side low-resource text of `variant`, as pieces of at most `chunk_chars`."""
    texts = monolingual(variant, "train", data)
    return [p for text in texts.values() for p in chunks(text, chunk_chars) if p.strip()]


def ma_records(variants: tuple[str, ...], data: LrlData, chunk_chars: int) -> tuple[list, dict]:
    """mA's corpus as records {"text": piece}, every language's in turn, and what it is:
    {"languages": {variant: {"records", "characters"}}, "chunk_chars", "sha256"}."""
    records, languages = [], {}
    for v in variants:
        pieces = corpus(v, data.of(v), chunk_chars)
        records += [{"text": p} for p in pieces]
        languages[v] = {"records": len(pieces), "characters": sum(map(len, pieces))}
    return records, {"languages": languages, "chunk_chars": chunk_chars, "sha256": digest(records)}


def _corpus_key(variant: str, pair_id: str) -> tuple[str, str]:
    """A verse's identity across variants: the Quran variants share their English verses."""
    return ("quran" if variant in QURAN else variant, pair_id)


def _high_resource(
    variants: tuple[str, ...], data: LrlData, chosen: dict[str, list[str]], chunk_chars: int
) -> list[str]:
    """Pieces of the target side of the train pairs whose source is in no chosen piece."""
    aligned = set()
    for v in variants:
        lines = {line for piece in chosen[v] for line in piece.splitlines() if line.strip()}
        for p in load_pairs(v, "train", data.of(v)):
            if any(line in p["source"] for line in lines):  # a long verse may be cut in pieces
                aligned.add(_corpus_key(v, p["id"]))
    seen, texts = set(), []
    for v in variants:
        for p in load_pairs(v, "train", data.of(v)):
            key = _corpus_key(v, p["id"])
            if key not in aligned and key not in seen:
                seen.add(key)
                texts.append(p["target"])
    return [p for p in chunks("\n".join(texts) + "\n", chunk_chars) if p.strip()] if texts else []


def _parallel(variant: str, data: LrlData, count: int, seed: int) -> list[dict]:
    """`count` seeded train pairs of `variant` (all, when fewer) as records in the shots' format."""
    src, tgt = LANGUAGES[variant]
    pairs = load_pairs(variant, "train", data.of(variant))
    drawn = random.Random(f"{seed}:parallel:{variant}").sample(pairs, min(count, len(pairs)))
    return [{"text": f"{src}: {p['source']}\n{tgt}: {p['target']}\n"} for p in drawn]


def dc_records(
    variants: tuple[str, ...],
    data: LrlData,
    *,
    chunk_chars: int,
    fraction: float,
    pairs: int,
    seed: int,
) -> dict[str, tuple[list[dict], dict]]:
    """{"paper": (records, info), "parallel": (records, info)}: the two D_C variants (see the
    module), each with {"records", "characters", "low_resource", "high_resource", "parallel",
    "fraction", "chunk_chars", "sha256"}."""
    chosen = {}
    for v in variants:
        pieces = corpus(v, data.of(v), chunk_chars)
        k = max(1, round(fraction * len(pieces)))
        chosen[v] = random.Random(f"{seed}:dc:{v}").sample(pieces, min(k, len(pieces)))
    low = [p for v in variants for p in chosen[v]]
    pool = _high_resource(variants, data, chosen, chunk_chars)
    high = random.Random(f"{seed}:high").sample(pool, min(len(low), len(pool)))
    paper = [{"text": p} for p in low + high]
    parallel = {v: _parallel(v, data, pairs, seed) for v in variants}
    out = {}
    for name, extra in (("paper", {}), ("parallel", parallel)):
        records = paper + [r for v in variants for r in extra.get(v, [])]
        info = {
            "records": len(records),
            "characters": sum(len(r["text"]) for r in records),
            "low_resource": {v: len(chosen[v]) for v in variants},
            "high_resource": len(high),
            "parallel": {v: len(extra.get(v, [])) for v in variants},
            "fraction": fraction,
            "chunk_chars": chunk_chars,
            "sha256": digest(records),
        }
        out[name] = (records, info)
    return out
