"""Bits per byte on held-out text: how well a model predicts code or prose, whatever its tokenizer.

  code-bpb  Python source: the files of this Python's standard library on the test side of
            code-to-text's split (sha256 of the path mod 10 == 9; never a train or dev file, so a
            recipe may train on the train side), skipping the folders code-to-text skips.
  text-bpb  English prose: the BSB chapters on the test side of translation's split (book:chapter,
            `bible-alignments`), verses joined by spaces.
  lrl-bpb:<lang>  held-out low-resource text (nya, nah, bn, ur, id, tr): the low-resource side of
            the test split of translation's variant <lang>-en (nah: nah-es), one verse a line
            (`calm.tasks.translation.monolingual(variant, "test")`: Chichewa test chapters, Quran
            test blocks, Nahuatl test sentences), never a verse of the train side.

Each text is cut at line ends (verse ends) into chunks of at most `CHUNK` characters; a chunk is
one example (an empty prompt and the chunk as reference), and the examples are ordered by the
sha256 of their id, so that `limit` takes a fixed sample spread over all files. The task is scored
by likelihood (`scoring = "likelihood"`): `calm.evaluate` sums each chunk's negative
log-likelihood in nats (`calm.likelihood`), and the metric is bits per UTF-8 byte,
sum(nll) / ln 2 / sum(bytes), lower is better; tokens per byte is reported beside it.
"""

from __future__ import annotations

import hashlib
import math
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from calm.errors import UserError
from calm.tasks import sources
from calm.tasks.code_to_text import SKIP_DIRS
from calm.tasks.code_to_text import _split_of as code_split
from calm.tasks.registry import Example, register
from calm.tasks.translation import LANGUAGES, monolingual, read_bsb
from calm.tasks.translation import _split_of as bible_split

CHUNK = 1500  # characters: about 400-600 tokens of code for the tokenizers used here


def chunks(text: str, size: int = CHUNK) -> list[str]:
    """`text` cut at line ends into pieces of at most `size` characters (a longer line is cut
    hard); the pieces join back into `text`."""
    pieces, current = [], ""
    for line in text.splitlines(keepends=True):
        while len(line) > size:
            pieces += [current, line[:size]]
            current, line = "", line[size:]
        if len(current) + len(line) > size:
            pieces.append(current)
            current = ""
        current += line
    return [p for p in [*pieces, current] if p]


def python_files(root: str | Path, split: str = "test") -> dict[str, str]:
    """{relative path: source} of the Python files under `root` on one side of code-to-text's
    split ("train", "dev" or "test"), in the folders code-to-text reads."""
    root, files = Path(root), {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for filename in sorted(f for f in filenames if f.endswith(".py")):
            relpath = (Path(dirpath) / filename).relative_to(root).as_posix()
            if code_split(relpath) == split:
                try:
                    files[relpath] = (Path(dirpath) / filename).read_text(encoding="utf-8")
                except UnicodeDecodeError:
                    continue
    return files


def bible_test_chapters(bsb_paths: list[Path]) -> dict[str, str]:
    """{"book:chapter": text} of the English BSB chapters on translation's test side."""
    chapters: dict[str, list[str]] = {}
    for (book, chapter, _), verse in sorted(read_bsb(bsb_paths).items()):
        key = f"{book}:{chapter}"
        if bible_split(key) == "test":
            chapters.setdefault(key, []).append(verse)
    return {k: "\n".join(v) + "\n" for k, v in chapters.items()}


@dataclass(frozen=True)
class BitsPerByte:
    """Bits per byte over fixed chunks of held-out texts ({id: text})."""

    name: str
    texts: dict[str, str]
    version: str = "1"
    scoring: str = "likelihood"
    default_shots: int = 0
    max_shots: int = 0
    max_new_tokens: int = 0
    stop: tuple[str, ...] = ()

    def examples(self, shots: int) -> list[Example]:
        out = [
            Example(id=f"{key}#{i}", prompt="", reference=piece)
            for key, text in self.texts.items()
            for i, piece in enumerate(chunks(text))
        ]
        return sorted(out, key=lambda e: hashlib.sha256(e.id.encode()).hexdigest())

    def score(self, examples: list[Example], scores: list[dict]) -> tuple[dict, list]:
        """Bits per byte from each example's {"nll": nats, "tokens": n}."""
        records = [
            {
                "id": e.id,
                "bytes": len(e.reference.encode("utf-8")),
                "bits": s["nll"] / math.log(2),
                "tokens": s["tokens"],
            }
            for e, s in zip(examples, scores)
        ]
        total = sum(r["bytes"] for r in records)
        if not total:
            return {}, records
        return {
            "bits_per_byte": sum(r["bits"] for r in records) / total,
            "tokens_per_byte": sum(r["tokens"] for r in records) / total,
        }, records


@register("code-bpb", "bits per byte on held-out Python files (stdlib, code-to-text's test side)")
def make_code(variant: str | None = None, data: str | None = None) -> BitsPerByte:
    if variant:
        raise UserError(f"code-bpb has no variants, got {variant!r}.")
    root = sources.given(data) if data else sysconfig.get_paths()["stdlib"]
    return BitsPerByte(name="code-bpb", texts=python_files(root, "test"))


@register("text-bpb", "bits per byte on held-out English prose (BSB Bible test chapters)")
def make_text(variant: str | None = None, data: str | None = None) -> BitsPerByte:
    if variant:
        raise UserError(f"text-bpb has no variants, got {variant!r}.")
    if data:  # BSB TSV files, or translation's data layout (english/*.tsv)
        root = sources.given(data)
        paths = sorted((root / "english").glob("*.tsv")) or sorted(root.glob("*.tsv"))
        if not paths:
            raise UserError(f"text-bpb found no BSB .tsv file in {data} or {data}/english.")
    else:
        paths = [
            sources.locate("bible-alignments", f"data/eng/targets/BSB/{t}_BSB.tsv")
            for t in ("ot", "nt")
        ]
    return BitsPerByte(name="text-bpb", texts=bible_test_chapters(paths))


# lrl-bpb's languages: the language code -> the translation variant whose test side it reads
LRL_VARIANTS = {variant.split("-")[0]: variant for variant in LANGUAGES}


@register(
    "lrl-bpb", "bits per byte on held-out low-resource text: lrl-bpb:nya, nah, bn, ur, id, tr"
)
def make_lrl(variant: str | None = None, data: str | None = None) -> BitsPerByte:
    if variant not in LRL_VARIANTS:
        raise UserError(f"lrl-bpb takes a language, one of {', '.join(LRL_VARIANTS)}: lrl-bpb:bn.")
    source = str(sources.given(data)) if data else None
    texts = monolingual(LRL_VARIANTS[variant], "test", source)
    return BitsPerByte(name=f"lrl-bpb:{variant}", texts=texts)
