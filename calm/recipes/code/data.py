"""D_C, the code the composition trains on: Python source that no evaluation set holds.

The files of a Python source tree (default: this Python's standard library) on the train side of
code-to-text's split (`calm.tasks.bpb.python_files(root, "train")`, the folders it skips
skipped), cut at line ends into pieces of at most `chunk_chars` characters like the
bits-per-byte task's chunks (`calm.tasks.bpb.chunks`), each piece a plain-text record
{"text": ...}. code-bpb reads the test side of the same split and code-to-text its test side for
questions (its train side only for the 3 shots), so D_C shares no file with any test set.
The records are shuffled with the seed and the first `size` kept: its size is set by the time
budget (steps x batch size, each record seen once).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sysconfig
from pathlib import Path

from calm.errors import UserError
from calm.tasks.bpb import chunks, python_files


def source_root(root: str | os.PathLike | None) -> Path:
    """`root`, or this Python's standard library when None; refused unless a folder."""
    path = Path(root) if root is not None else Path(sysconfig.get_paths()["stdlib"])
    if not path.is_dir():
        raise UserError(f"The Python source folder {path} does not exist.")
    return path


def train_files(root: str | os.PathLike) -> dict[str, str]:
    """{relative path: source} of the Python files under `root` on code-to-text's train side."""
    return python_files(root, "train")


def dc_pieces(
    root: str | os.PathLike, size: int, chunk_chars: int, seed: int
) -> list[tuple[str, str]]:
    """D_C as (relative path of its file, piece): `size` pieces drawn (seeded) from the
    train-side pieces under `root`."""
    files = train_files(root)
    pieces = [
        (path, piece)
        for path, text in files.items()
        for piece in chunks(text, chunk_chars)
        if piece.strip()
    ]
    if len(pieces) < size:
        raise UserError(
            f"D_C needs {size} pieces of code, but the train-side files under {root} give "
            f"{len(pieces)}; lower the steps or the batch size."
        )
    random.Random(seed).shuffle(pieces)
    return pieces[:size]


def dc_records(
    root: str | os.PathLike, size: int, chunk_chars: int, seed: int
) -> tuple[list[dict], dict]:
    """D_C as records {"text": piece} (`dc_pieces`), and what it is: {"records", "characters",
    "files", "chunk_chars", "sha256"} (the hash of the records: a changed D_C changes the rows)."""
    chosen = dc_pieces(root, size, chunk_chars, seed)
    records = [{"text": piece} for _, piece in chosen]
    digest = hashlib.sha256(json.dumps(records, ensure_ascii=False).encode()).hexdigest()
    info = {
        "records": len(records),
        "characters": sum(len(r["text"]) for r in records),
        "files": len({path for path, _ in chosen}),
        "chunk_chars": chunk_chars,
        "sha256": digest[:16],
    }
    return records, info
