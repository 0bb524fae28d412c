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
records are refused there, since the augmenting models need the text. For an encoder-mode
composition the augmenting models read the record's prompt (or its "aug_input_ids").

`AugCache` keeps the augmenting models' states of each example for the next epoch.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from calm.config import TRUNCATION
from calm.errors import UserError

if TYPE_CHECKING:
    from calm.model import CALM, AugStates

IGNORE = -100


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
                    raise UserError(f"{path}, line {line_no}: not valid JSON ({e.msg}).") from None
                if not isinstance(record, dict):
                    raise UserError(
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
        raise UserError(f"{where}: field {field!r} must be a string, got {type(text).__name__}.")
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _int_list(value, where: str, field: str) -> list[int]:
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    ):
        raise UserError(f"{where}: field {field!r} must be a list of ints.")
    return list(value)


def encode_record(record: dict, tokenizer, where: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one record; see the module docstring for the formats."""
    if "input_ids" in record:
        ids = _int_list(record["input_ids"], where, "input_ids")
        labels = _int_list(record.get("labels", ids), where, "labels")
        if len(labels) != len(ids):
            raise UserError(
                f"{where}: 'labels' has {len(labels)} entries but 'input_ids' has {len(ids)}."
            )
        return ids, labels
    if "text" not in record and not ("prompt" in record and "completion" in record):
        raise UserError(
            f"{where}: a record needs 'text', or 'prompt' and 'completion', or 'input_ids'; "
            f"got fields {sorted(record)}."
        )
    if tokenizer is None:
        raise UserError(
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
        raise UserError(
            f"{where}: this composition pairs different tokenizers, so its data must be text "
            "('text', or 'prompt' and 'completion'), not pre-tokenized 'input_ids'."
        )
    if "text" in record:
        fields = [("text", record["text"])]
    elif "prompt" in record and "completion" in record:
        fields = [("prompt", record["prompt"]), ("completion", record["completion"])]
    else:
        raise UserError(
            f"{where}: a record needs 'text', or 'prompt' and 'completion'; got fields "
            f"{sorted(record)}."
        )
    for field, value in fields:
        if not isinstance(value, str):
            raise UserError(
                f"{where}: field {field!r} must be a string, got {type(value).__name__}."
            )
    prompt = record.get("prompt", "") if "text" not in record else ""
    return "".join(v for _, v in fields), len(prompt)


def encode_pair_record(
    record: dict, pair, where: str, max_length: int | None = None
) -> tuple[list[int], list[int], list[tuple[list[int], list[int]]], int]:
    """(input_ids, labels, per augmenting model (ids, visible), anchor tokens before any cut) of
    one text record, tokenized by `pair` with the anchor's EOS appended (if it has one)."""
    text, prompt_chars = _pair_text(record, where)
    eos = pair.anchor.eos_id is not None
    b = pair([text], append_eos=eos)
    length = b["input_ids"].shape[1]
    if max_length is not None and length > max_length:
        b = pair([text], append_eos=eos, max_length=max_length)
    labels = pair.labels(b, prompt_chars=[prompt_chars] if prompt_chars else None)
    augs = [
        (ids[0][mask[0].bool()].tolist(), visible[0].tolist())
        for ids, mask, visible in zip(b["aug_input_ids"], b["aug_attention_mask"], b["aug_visible"])
    ]
    return b["input_ids"][0].tolist(), labels[0].tolist(), augs, length


def encoder_prompt(record: dict, tokenizer, where: str) -> list[int]:
    """The ids an encoder-mode composition's augmenting models read for one record: its
    'aug_input_ids', or its 'prompt' tokenized like the anchor's (special tokens included)."""
    if "aug_input_ids" in record:
        return _int_list(record["aug_input_ids"], where, "aug_input_ids")
    if "prompt" not in record or "completion" not in record:
        raise UserError(
            f"{where}: in encoder mode the augmenting models read the prompt, so a record needs "
            f"'prompt' and 'completion' (or 'input_ids' and 'aug_input_ids'); got fields "
            f"{sorted(record)}."
        )
    return _ids(tokenizer, record["prompt"], where, "prompt", True)


def _example(record, where, tokenizer, pair, encoder, max_length):
    """(input_ids, labels, augmenting rows [(ids, visible)], anchor tokens before the cut) of one
    record, cut to `max_length`."""
    if pair is not None:
        return encode_pair_record(record, pair, where, max_length)
    ids, labels = encode_record(record, tokenizer, where)
    augs = [(encoder_prompt(record, tokenizer, where)[:max_length], [])] if encoder else []
    return ids[:max_length], labels[:max_length], augs, len(ids)


def encode(
    source,
    tokenizer=None,
    max_length: int | None = None,
    truncation: str = "right",
    name: str | None = None,
    pair=None,
    encoder: bool = False,
) -> Encoded:
    """Read and tokenize a data set; longer examples are cut to `max_length` (counted) or, with
    truncation="error", refused; examples left without a target token are dropped (counted).
    With `pair` (a `calm.TokenizerPair`), text records are tokenized for every model through it
    and `tokenizer` is not used. With `encoder`, each example also holds the prompt the
    augmenting models of an encoder-mode composition read (`encoder_prompt`), shared by all."""
    if truncation not in TRUNCATION:
        raise UserError(f"truncation must be one of {TRUNCATION}, got {truncation!r}.")
    if encoder and pair is not None:
        raise UserError("An encoder-mode composition reads its prompts without a TokenizerPair.")
    records, name = read_records(source, name)
    if not records:
        raise UserError(f"The data set {name} holds no records.")
    kept: list[tuple[list[int], list[int], list]] = []
    truncated = dropped = 0
    for record, where in records:
        ids, labels, augs, length = _example(record, where, tokenizer, pair, encoder, max_length)
        if max_length is not None and length > max_length:
            if truncation == "error":
                raise UserError(
                    f"{where}: {length} tokens, more than max_length={max_length} anchor tokens; "
                    'raise max_length or use truncation="right".'
                )
            truncated += 1
        if all(t == IGNORE for t in labels[1:]):
            dropped += 1
            continue
        kept.append((ids, labels, augs))
    if not kept:
        raise UserError(
            f"No example of {name} has a token to predict (each needs >= 2 tokens and a label "
            "after the first position)."
        )
    num_augs = len(kept[0][2])
    return Encoded(
        tuple(tuple(ids) for ids, _, _ in kept),
        tuple(tuple(labels) for _, labels, _ in kept),
        name,
        truncated,
        dropped,
        tuple(tuple(tuple(augs[i][0]) for _, _, augs in kept) for i in range(num_augs)),
        tuple(tuple(tuple(augs[i][1]) for _, _, augs in kept) for i in range(num_augs) if pair),
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
    when the data hold augmenting ids (a TokenizerPair's, or an encoder-mode prompt shared by
    all augmenting models) also aug_input_ids, aug_attention_mask (B, S_i), one tensor per row
    set, padded with `aug_pad_ids[i]`, and for a TokenizerPair aug_visible (B, T), padded with 0."""
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
    if data.aug_visible:
        batch["aug_visible"] = [
            pad_rows([rows[i] for i in indices], 0)[0] for rows in data.aug_visible
        ]
    return batch


class AugCache:
    """Augmenting states per example, computed once and reused: in memory or on disk.

    The augmenting models of a composition are frozen, so the states of their connected layers
    depend on the example alone; a loop that sees an example again (another epoch) reads them
    back instead of running the augmenting models.
    """

    def __init__(self, kind: str, dtype: str, directory: Path | None) -> None:
        self.kind = kind
        self.dtype = getattr(torch, dtype)
        self.directory = directory
        self.memory: dict[int, dict[tuple[int, int], torch.Tensor]] = {}
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)

    def _file(self, index: int) -> Path:
        return self.directory / f"{index}.safetensors"

    def has(self, index: int) -> bool:
        return index in self.memory if self.kind == "memory" else self._file(index).is_file()

    def put(self, index: int, states: dict[tuple[int, int], torch.Tensor]) -> None:
        states = {k: v.detach().to("cpu", self.dtype).contiguous() for k, v in states.items()}
        if self.kind == "memory":
            self.memory[index] = states
            return
        from safetensors.torch import save_file

        path = self._file(index)
        tmp = path.with_name(f".{path.name}.tmp")  # renamed when complete: never a torn entry
        save_file({f"{a}_{layer}": v for (a, layer), v in states.items()}, str(tmp))
        os.replace(tmp, path)

    def get(self, index: int) -> dict[tuple[int, int], torch.Tensor]:
        if self.kind == "memory":
            return self.memory[index]
        from safetensors.torch import load_file

        raw = load_file(str(self._file(index)))
        return {tuple(int(x) for x in k.split("_")): v for k, v in raw.items()}

    def batch_states(self, model: CALM, indices: list[int], batch: dict) -> AugStates:
        """{(augment, layer): (B, S_i, A)} states of a right-padded batch (S_i = T when the
        models share the anchor's tokens): cached rows reused, the others computed."""
        num_augs = len(model.augments)
        aug_masks = batch.get("aug_attention_mask") or [batch["attention_mask"]]
        if len(aug_masks) == 1:  # one token stream read by every augmenting model
            aug_masks = aug_masks * num_augs
        lengths = [m.sum(1).tolist() for m in aug_masks]  # per augment, per row
        if not all(self.has(i) for i in indices):
            states = model.augment_states(
                batch["input_ids"],
                batch["attention_mask"],
                batch.get("aug_input_ids"),
                batch.get("aug_attention_mask"),
            )
            for row, i in enumerate(indices):
                self.put(i, {k: v[row, : lengths[k[0]][row]] for k, v in states.items()})
            return states
        per_example = [self.get(i) for i in indices]
        device = batch["input_ids"].device
        out: AugStates = {}
        for key in per_example[0]:
            rows = [states[key] for states in per_example]
            padded = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)  # zeros after a row
            width = aug_masks[key[0]].shape[1]
            if padded.shape[1] < width:
                padded = torch.nn.functional.pad(padded, (0, 0, 0, width - padded.shape[1]))
            out[key] = padded.to(device)
        return out
