"""Training data for a composition: read records, tokenize them, batch them with dynamic padding.

A record is one of
  {"text": str}                          loss on every token,
  {"prompt": str, "completion": str}     loss on the completion tokens only,
  {"input_ids": [int], "labels": [int]}  pre-tokenized; labels optional (default: the input ids),
                                         -100 marks positions without loss.
Sources: a JSONL file (one record a line), a list of dicts, or a Hugging Face `datasets.Dataset`.
Labels follow the Hugging Face convention used by `CALM.forward`: they are aligned with the inputs
and shifted inside the loss.

With a `TokenizerPair` (a composition whose tokenizers differ), text records are also tokenized for
each augmenting model, with the alignment `aug_visible` (see `calm.tokenizers`); pre-tokenized
records are refused there, since the augmenting models need the text.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE = -100
TRUNCATION = ("right", "error")


@dataclass(frozen=True)
class Encoded:
    """A tokenized data set: one list of input ids and one of labels per example."""

    input_ids: tuple[tuple[int, ...], ...]
    labels: tuple[tuple[int, ...], ...]
    name: str
    num_truncated: int = 0
    num_dropped: int = 0
    # With a TokenizerPair, per augmenting model, per example: its ids, and for each anchor token
    # how many of them it sees (`aug_visible`). Empty when the models share the anchor's tokens.
    aug_input_ids: tuple[tuple[tuple[int, ...], ...], ...] = ()
    aug_visible: tuple[tuple[tuple[int, ...], ...], ...] = ()

    def __len__(self) -> int:
        return len(self.input_ids)

    def lengths(self) -> list[int]:
        return [len(x) for x in self.input_ids]

    def num_targets(self, indices: Sequence[int]) -> int:
        """Tokens that carry a loss (labels shifted by one, -100 ignored) in these examples."""
        return sum(sum(1 for t in self.labels[i][1:] if t != IGNORE) for i in indices)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for ids, labels in zip(self.input_ids, self.labels):
            h.update(json.dumps([ids, labels]).encode())
        if self.aug_input_ids:
            h.update(json.dumps([self.aug_input_ids, self.aug_visible]).encode())
        return h.hexdigest()[:16]


def read_records(source, name: str | None = None) -> tuple[list[dict], str]:
    """The records of `source` (JSONL path, list of dicts or `datasets.Dataset`) and its name."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"Data file {path} does not exist.")
        records = []
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}, line {line_no}: not valid JSON ({e.msg}).") from None
                if not isinstance(record, dict):
                    raise ValueError(
                        f"{path}, line {line_no}: expected a JSON object, got "
                        f"{type(record).__name__}."
                    )
                records.append((record, f"{path}, line {line_no}"))
        return records, str(path)
    if isinstance(source, (list, tuple)):
        for i, r in enumerate(source):
            if not isinstance(r, dict):
                raise TypeError(f"Record {i} of the data list is a {type(r).__name__}, not a dict.")
        return [(r, f"record {i}") for i, r in enumerate(source)], name or "list"
    if hasattr(source, "column_names") and hasattr(source, "__getitem__"):  # datasets.Dataset
        return [(dict(r), f"row {i}") for i, r in enumerate(source)], name or "dataset"
    raise TypeError(
        "Training data must be a JSONL path, a list of dicts or a datasets.Dataset, got "
        f"{type(source).__name__}."
    )


def _ids(tokenizer, text: str, where: str, field: str, special: bool) -> list[int]:
    if not isinstance(text, str):
        raise ValueError(f"{where}: field {field!r} must be a string, got {type(text).__name__}.")
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _int_list(value, where: str, field: str) -> list[int]:
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    ):
        raise ValueError(f"{where}: field {field!r} must be a list of ints.")
    return list(value)


def encode_record(record: dict, tokenizer, where: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one record; see the module docstring for the formats."""
    if "input_ids" in record:
        ids = _int_list(record["input_ids"], where, "input_ids")
        labels = _int_list(record.get("labels", ids), where, "labels")
        if len(labels) != len(ids):
            raise ValueError(
                f"{where}: 'labels' has {len(labels)} entries but 'input_ids' has {len(ids)}."
            )
        return ids, labels
    if "text" not in record and not ("prompt" in record and "completion" in record):
        raise ValueError(
            f"{where}: a record needs 'text', or 'prompt' and 'completion', or 'input_ids'; "
            f"got fields {sorted(record)}."
        )
    if tokenizer is None:
        raise ValueError(
            f"{where}: text records need the anchor's tokenizer; pass tokenizer=..., or give "
            "pre-tokenized 'input_ids'."
        )
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if "text" in record:
        ids = _ids(tokenizer, record["text"], where, "text", True) + eos
        return ids, list(ids)
    prompt = _ids(tokenizer, record["prompt"], where, "prompt", True)
    completion = _ids(tokenizer, record["completion"], where, "completion", False) + eos
    return prompt + completion, [IGNORE] * len(prompt) + completion


def _pair_text(record: dict, where: str) -> tuple[str, int]:
    """The text of a record for a TokenizerPair, and how many of its characters are prompt."""
    if "input_ids" in record:
        raise ValueError(
            f"{where}: this composition pairs different tokenizers, so its data must be text "
            "('text', or 'prompt' and 'completion'), not pre-tokenized 'input_ids'."
        )
    if "text" in record:
        fields = [("text", record["text"])]
    elif "prompt" in record and "completion" in record:
        fields = [("prompt", record["prompt"]), ("completion", record["completion"])]
    else:
        raise ValueError(
            f"{where}: a record needs 'text', or 'prompt' and 'completion'; got fields "
            f"{sorted(record)}."
        )
    for field, value in fields:
        if not isinstance(value, str):
            raise ValueError(
                f"{where}: field {field!r} must be a string, got {type(value).__name__}."
            )
    prompt = record.get("prompt", "") if "text" not in record else ""
    return "".join(v for _, v in fields), len(prompt)


def encode_pair_record(
    record: dict, pair, where: str, max_length: int | None = None
) -> tuple[list[int], list[int], list[tuple[list[int], list[int]]], bool]:
    """(input_ids, labels, per augmenting model (ids, visible), whether the text was cut) of
    one text record, tokenized by `pair` with the anchor's EOS appended (if it has one)."""
    text, prompt_chars = _pair_text(record, where)
    eos = pair.anchor.eos_id is not None
    b = pair([text], append_eos=eos)
    cut = max_length is not None and b["input_ids"].shape[1] > max_length
    if cut:
        b = pair([text], append_eos=eos, max_length=max_length)
    labels = pair.labels(b, prompt_chars=[prompt_chars] if prompt_chars else None)
    augs = [
        (ids[0][mask[0].bool()].tolist(), visible[0].tolist())
        for ids, mask, visible in zip(b["aug_input_ids"], b["aug_attention_mask"], b["aug_visible"])
    ]
    return b["input_ids"][0].tolist(), labels[0].tolist(), augs, cut


def encode(
    source,
    tokenizer=None,
    max_length: int | None = None,
    truncation: str = "right",
    name: str | None = None,
    pair=None,
) -> Encoded:
    """Read and tokenize a data set; longer examples are cut to `max_length` (counted) or, with
    truncation="error", refused; examples left without a target token are dropped (counted).
    With `pair` (a `calm.TokenizerPair`), text records are tokenized for every model through it
    and `tokenizer` is not used."""
    if truncation not in TRUNCATION:
        raise ValueError(f"truncation must be one of {TRUNCATION}, got {truncation!r}.")
    records, name = read_records(source, name)
    if not records:
        raise ValueError(f"The data set {name} holds no records.")
    all_ids, all_labels = [], []
    aug_ids: list[list[tuple[int, ...]]] = [[] for _ in range(len(pair) if pair else 0)]
    aug_visible: list[list[tuple[int, ...]]] = [[] for _ in aug_ids]
    truncated = dropped = 0
    for record, where in records:
        if pair is not None:
            ids, labels, augs, cut = encode_pair_record(record, pair, where, max_length)
            if cut and truncation == "error":
                raise ValueError(
                    f"{where}: more than max_length={max_length} anchor tokens; raise "
                    'max_length or use truncation="right".'
                )
            truncated += cut
            if all(t == IGNORE for t in labels[1:]):
                dropped += 1
                continue
            for i, (a_ids, a_visible) in enumerate(augs):
                aug_ids[i].append(tuple(a_ids))
                aug_visible[i].append(tuple(a_visible))
            all_ids.append(tuple(ids))
            all_labels.append(tuple(labels))
            continue
        ids, labels = encode_record(record, tokenizer, where)
        if max_length is not None and len(ids) > max_length:
            if truncation == "error":
                raise ValueError(
                    f"{where}: {len(ids)} tokens, more than max_length={max_length}; raise "
                    'max_length or use truncation="right".'
                )
            ids, labels = ids[:max_length], labels[:max_length]
            truncated += 1
        if all(t == IGNORE for t in labels[1:]):
            dropped += 1
            continue
        all_ids.append(tuple(ids))
        all_labels.append(tuple(labels))
    if not all_ids:
        raise ValueError(
            f"No example of {name} has a token to predict (each needs >= 2 tokens and a label "
            "after the first position)."
        )
    return Encoded(
        tuple(all_ids),
        tuple(all_labels),
        name,
        truncated,
        dropped,
        tuple(map(tuple, aug_ids)),
        tuple(map(tuple, aug_visible)),
    )


def epoch_batches(
    lengths: Sequence[int],
    batch_size: int,
    seed: int,
    epoch: int,
    bucket: bool = False,
    min_size: int = 1,
) -> list[list[int]]:
    """The batches (lists of example indices) of one epoch, a pure function of its arguments.

    Shuffled with (seed, epoch). With `bucket`, examples of similar length share a batch (sorted
    within windows of 50 batches, then the batches are shuffled). A last batch with fewer than
    `min_size` examples is dropped.
    """
    rng = random.Random(f"{seed}/{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if bucket:
        window = batch_size * 50
        order = [
            i
            for start in range(0, len(order), window)
            for i in sorted(order[start : start + window], key=lambda i: lengths[i])
        ]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if bucket:
        rng.shuffle(batches)
    return [b for b in batches if len(b) >= min_size]


PAD_SIDES = ("right", "left")


def pad_rows(
    rows: Sequence[Sequence[int]], pad_id: int, side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of different lengths -> (ids (B, T), mask (B, T)), both long, padded with `pad_id` on
    `side` ("right" for training batches, "left" for generation prompts); T >= 1."""
    if side not in PAD_SIDES:
        raise ValueError(f"side must be one of {PAD_SIDES}, got {side!r}.")
    width = max(1, max((len(r) for r in rows), default=0))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        cols = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
        ids[b, cols] = torch.as_tensor(r, dtype=torch.long)
        mask[b, cols] = 1
    return ids, mask


def collate(
    data: Encoded, indices: Sequence[int], pad_id: int, aug_pad_ids: Sequence[int] = ()
) -> dict:
    """Right-pad the examples to the longest one: input_ids, attention_mask, labels, (B, T);
    for a TokenizerPair data set also aug_input_ids, aug_attention_mask (B, S_i) and
    aug_visible (B, T), one tensor per augmenting model, padded with `aug_pad_ids[i]` and 0."""
    ids, mask = pad_rows([data.input_ids[i] for i in indices], pad_id)
    labels, _ = pad_rows([data.labels[i] for i in indices], IGNORE)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if data.aug_input_ids:
        padded = [
            pad_rows([rows[i] for i in indices], pad)
            for rows, pad in zip(data.aug_input_ids, aug_pad_ids, strict=True)
        ]
        batch["aug_input_ids"] = [x for x, _ in padded]
        batch["aug_attention_mask"] = [m for _, m in padded]
        batch["aug_visible"] = [
            pad_rows([rows[i] for i in indices], 0)[0] for rows in data.aug_visible
        ]
    return batch
