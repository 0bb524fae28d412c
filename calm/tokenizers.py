"""Align one text for an anchor and augmenting models that use different tokenizers.

Both sides read the same TEXT, each with its own tokenizer. Correctness is prefix consistency: the
composed output at anchor token t depends only on text[:e_t], where e_t is the end (in characters)
of anchor token t. The augmenting tokens that anchor token t may see must therefore be a function
of text[:e_t] alone, which "tokens whose span ends before e_t" is not: how a tokenizer splits the
unfinished last word depends on the letters that follow.

Visibility rule, "stable boundary": a cut is a position c with text[c] == " " and text[c - 1] not
whitespace (a word has just ended). Anchor token t sees the first K_t augmenting tokens, where
K_t = (leading special tokens) + (augmenting tokens of the text that start before the last cut
c < e_t). Both the cut and the tokens before it are functions of text[:e_t], provided the
augmenting tokenizer never joins a word with the space that follows it (so the tokens left of a
cut never change when text is appended). That holds for byte-level BPE with GPT-2/Llama-3-style
pre-tokenizers, WordPiece and Metaspace tokenizers; `TokenizerPair` refuses a vocabulary with a
token that has a space right after a non-space, and `generate` re-checks every committed token.
Cost: one augmenting forward over the whole text; the augmenting side lags by the last word.

Special tokens: each side gets the leading special tokens its tokenizer adds (e.g. BOS), which are
always visible; trailing ones (EOS, [SEP]) are dropped, since a causal stream is never finished.
Rows are left-padded, so the same batch serves training and generation.

Shapes: B texts, T anchor tokens, S_i tokens of augmenting model i.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import tokenizers as tk
import torch

from calm.data import pad_rows
from calm.errors import UserError

_WHITESPACE = np.array([ord(c) for c in " \t\n\r\x0b\x0c"], dtype=np.uint32)
_SPACE_AFTER_WORD = re.compile(r"[^\s] ")


def cut_points(text: str) -> np.ndarray:
    """Sorted positions c where text[c] is a space and text[c - 1] is not whitespace."""
    cp = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    is_ws = np.isin(cp, _WHITESPACE)
    return np.flatnonzero((cp[1:] == 32) & ~is_ws[:-1]) + 1


def last_cuts(cuts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """For each end e, the last cut c < e (0 where there is none)."""
    if cuts.size == 0:
        return np.zeros_like(ends)
    idx = np.searchsorted(cuts, ends, side="left")
    return np.where(idx > 0, cuts[np.maximum(idx - 1, 0)], 0)


class _Side:
    """One tokenizer as the pair uses it: a private backend copy, its leading specials, its pad."""

    def __init__(self, tokenizer, role: str) -> None:
        backend = tokenizer if isinstance(tokenizer, tk.Tokenizer) else None
        backend = backend or getattr(tokenizer, "backend_tokenizer", None)
        if not isinstance(backend, tk.Tokenizer):
            raise UserError(
                f"The {role} tokenizer ({type(tokenizer).__name__}) cannot report character "
                "offsets; pass a fast tokenizer (AutoTokenizer.from_pretrained(...) with a "
                "tokenizer.json) or a tokenizers.Tokenizer."
            )
        self.role = role
        self.backend = tk.Tokenizer.from_str(backend.to_str())
        self.backend.no_truncation()
        self.backend.no_padding()
        self.lead = self._leading_specials(tokenizer)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad) if pad is not None else 0
        self.eos_id = getattr(tokenizer, "eos_token_id", None)
        self.vocab_size = self.backend.get_vocab_size(with_added_tokens=True)

    def _leading_specials(self, tokenizer) -> tuple[int, ...]:
        if isinstance(tokenizer, tk.Tokenizer):
            full = self.backend.encode("a", add_special_tokens=True).ids
        else:
            full = list(tokenizer("a", add_special_tokens=True)["input_ids"])
        bare = self.backend.encode("a", add_special_tokens=False).ids
        for k in range(len(full) - len(bare) + 1):
            if full[k : k + len(bare)] == bare:
                return tuple(full[:k])
        raise UserError(
            f"The {self.role} tokenizer's special tokens surround the text in a way the pair "
            "cannot separate; give a tokenizer that adds them only before or after the text."
        )

    def check_no_space_merges(self) -> None:
        """Refuse a vocabulary that can join a word with the following space."""
        n = self.backend.get_vocab_size(with_added_tokens=True)
        pieces = self.backend.decode_batch([[i] for i in range(n)], skip_special_tokens=True)
        bad = [p for p in pieces if _SPACE_AFTER_WORD.search(p)]
        if bad:
            raise UserError(
                f"The {self.role} tokenizer has tokens that join a word with the space after it "
                f"(e.g. {bad[0]!r}), so the stable-boundary rule would leak the next word; use it "
                "as the anchor, or pick another augmenting tokenizer."
            )

    def encode(self, texts: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per text: ids (leading specials first), start and end offsets of the text tokens."""
        out = []
        for enc in self.backend.encode_batch(list(texts), add_special_tokens=False):
            offsets = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
            ids = np.asarray(self.lead + tuple(enc.ids), dtype=np.int64)
            out.append((ids, offsets[:, 0], offsets[:, 1]))
        return out

    def visible(self, text: str, starts: np.ndarray, anchor_ends: np.ndarray) -> np.ndarray:
        """K for each anchor end: how many of this side's tokens of `text` are stable there."""
        cut = last_cuts(cut_points(text), anchor_ends)
        return len(self.lead) + np.searchsorted(np.sort(starts), cut, side="left")


class AlignedBatch(dict):
    """What `TokenizerPair` returns: keyword arguments for `CALM.forward` and `CALM.generate`.

    input_ids, attention_mask: (B, T) anchor tokens, left-padded.
    aug_input_ids, aug_attention_mask: one (B, S_i) tensor per augmenting model, left-padded.
    aug_visible: one (B, T) tensor per augmenting model: anchor token t sees the first
        aug_visible[i][b, t] real tokens of augmenting model i.
    texts: the texts themselves (generation continues them).
    """

    def to(self, device) -> AlignedBatch:
        def move(v):
            if isinstance(v, torch.Tensor):
                return v.to(device)
            if isinstance(v, list) and v and isinstance(v[0], torch.Tensor):
                return [x.to(device) for x in v]
            return v

        return AlignedBatch({k: move(v) for k, v in self.items()})


class TokenizerPair:
    """Tokenize texts for the anchor and each augmenting model, and align them causally.

    `pair(texts)` gives an `AlignedBatch`; `CALM(anchor, augments, config, tokenizers=pair)`
    reads it with `model(**batch)` and `model.generate(**batch, max_new_tokens=N)`.
    """

    def __init__(self, anchor_tokenizer, aug_tokenizers) -> None:
        augs = (
            list(aug_tokenizers) if isinstance(aug_tokenizers, (list, tuple)) else [aug_tokenizers]
        )
        if not augs:
            raise UserError("Give at least one augmenting tokenizer.")
        self.anchor = _Side(anchor_tokenizer, "anchor")
        self.augs = [_Side(t, f"augmenting {i}") for i, t in enumerate(augs)]
        for side in self.augs:
            side.check_no_space_merges()

    def __len__(self) -> int:
        """The number of augmenting tokenizers."""
        return len(self.augs)

    def check_models(self, anchor_vocab: int, aug_vocabs: Sequence[int]) -> None:
        """Refuse models this pair cannot feed: one augmenting model per augmenting tokenizer,
        each model's embedding (`*_vocab` rows) holding its tokenizer's ids."""
        if len(aug_vocabs) != len(self.augs):
            raise UserError(
                f"The TokenizerPair has {len(self.augs)} augmenting tokenizers for "
                f"{len(aug_vocabs)} augmenting models; give one per model, in order."
            )
        for rows, side in ((anchor_vocab, self.anchor), *zip(aug_vocabs, self.augs)):
            if side.vocab_size > rows:
                raise UserError(
                    f"The {side.role} tokenizer has {side.vocab_size} tokens but its model's "
                    f"embedding has {rows} rows; pair each model with its own tokenizer."
                )

    def _anchor_rows(
        self, texts: list[str], append_eos: bool
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per text: anchor ids, and the character where each anchor token's text ends."""
        if append_eos and self.anchor.eos_id is None:
            raise UserError("The anchor tokenizer has no eos_token; set one to append it.")
        rows, ends = [], []
        lead = np.zeros(len(self.anchor.lead), dtype=np.int64)
        for text, (ids, _, tok_ends) in zip(texts, self.anchor.encode(texts)):
            row_ends = np.maximum.accumulate(np.concatenate([lead, tok_ends]))
            if append_eos:  # EOS adds no text: it sees what the last token sees
                ids = np.append(ids, self.anchor.eos_id)
                row_ends = np.append(row_ends, len(text))
            rows.append(ids)
            ends.append(row_ends)
        return rows, ends

    def _truncate(self, texts: list[str], max_length: int, append_eos: bool) -> list[str]:
        """Cut each text at an anchor token's end so its anchor row fits `max_length`."""
        if max_length < len(self.anchor.lead) + 1 + append_eos:
            raise UserError(
                f"max_length={max_length} leaves no room for text after the anchor's special "
                "tokens; raise it."
            )
        texts = list(texts)
        rows, ends = self._anchor_rows(texts, append_eos)
        long = [b for b, r in enumerate(rows) if len(r) > max_length]
        while long:  # re-tokenizing a cut text can split its last token: cut again
            for b in long:
                allowed = ends[b][: max_length - append_eos]  # ends of the tokens that fit
                shorter = allowed[allowed < len(texts[b])]  # bytes of one character share ends
                texts[b] = texts[b][: int(shorter.max()) if shorter.size else 0]
            rows, ends = self._anchor_rows(texts, append_eos)
            long = [b for b in long if len(rows[b]) > max_length]
        return texts

    def __call__(
        self, texts: str | Sequence[str], append_eos: bool = False, max_length: int | None = None
    ) -> AlignedBatch:
        """Tokenize and align `texts`; `append_eos` ends each anchor row with the anchor's EOS
        (for training a model to stop; the augmenting side never sees an end); `max_length`
        cuts each text at an anchor token's end so its anchor row has at most that many tokens
        (`texts` in the batch are the cut texts)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError("TokenizerPair takes a non-empty list of strings.")
        if max_length is not None:
            texts = self._truncate(texts, max_length, append_eos)
        anchor_rows, anchor_ends = self._anchor_rows(texts, append_eos)
        input_ids, attention_mask = pad_rows(anchor_rows, self.anchor.pad_id, side="left")
        batch = AlignedBatch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            aug_input_ids=[],
            aug_attention_mask=[],
            aug_visible=[],
            texts=texts,
        )
        for side in self.augs:
            encoded = side.encode(texts)
            ids, mask = pad_rows([e[0] for e in encoded], side.pad_id, side="left")
            counts = [
                side.visible(t, e[1], ends) for t, e, ends in zip(texts, encoded, anchor_ends)
            ]
            visible, _ = pad_rows(counts, 0, side="left")
            batch["aug_input_ids"].append(ids)
            batch["aug_attention_mask"].append(mask)
            batch["aug_visible"].append(visible)
        return batch

    def anchor_ends(self, batch: AlignedBatch) -> list[np.ndarray]:
        """Per row of `batch`: the character where each real anchor token's text ends."""
        texts = batch["texts"]
        _, ends = self._anchor_rows(texts, append_eos=False)
        for b, n in enumerate(batch["attention_mask"].sum(-1).tolist()):
            if n == len(ends[b]) + 1:  # made with append_eos
                ends[b] = np.append(ends[b], len(texts[b]))
        return ends

    def labels(
        self, batch: AlignedBatch, prompt_chars: Sequence[int] | None = None
    ) -> torch.Tensor:
        """(B, T) labels for `model(**batch, labels=...)`: the anchor ids, with -100 on padding
        and on the anchor tokens that end within the first prompt_chars[b] characters of text b
        (a prompt whose continuation alone is trained)."""
        mask = batch["attention_mask"].bool()
        row_ends, _ = pad_rows(self.anchor_ends(batch), 0, side="left")
        labels = batch["input_ids"].masked_fill(~mask, -100)
        if prompt_chars is not None:
            limit = torch.as_tensor(list(prompt_chars), dtype=torch.long)[:, None]
            labels = labels.masked_fill(row_ends.to(labels.device) <= limit.to(labels.device), -100)
        return labels

    # ------------------------------------------------------------------------- generation

    def stream(self, batch: AlignedBatch) -> TextStream:
        """Track the texts of `batch` as the anchor appends tokens to them (see `TextStream`)."""
        return TextStream(self, batch)

    def extend(self, batch: AlignedBatch, new_ids: torch.Tensor) -> AlignedBatch:
        """`batch`'s prompts followed by the anchor tokens `new_ids` (B, N), aligned as
        `CALM.generate` aligns them step by step: the reference for cached generation, and the
        way to score a generated continuation."""
        stream = self.stream(batch)
        rows, steps = new_ids.shape
        ends = np.zeros((rows, steps), dtype=np.int64)  # anchor ends of the new tokens
        for j in range(steps):
            stream.append(new_ids[:, j].tolist(), [True] * rows)
            ends[:, j] = [len(t) for t in stream.texts]
        ids, mask = batch["input_ids"], batch["attention_mask"]
        out = AlignedBatch(
            input_ids=torch.cat([ids, new_ids.to(ids.device)], 1),
            attention_mask=torch.cat([mask, torch.ones_like(new_ids).to(mask.device)], 1),
            aug_input_ids=[],
            aug_attention_mask=[],
            aug_visible=[],
            texts=stream.texts,
        )
        for i, side in enumerate(self.augs):
            encoded = side.encode(stream.texts)
            aug_ids, aug_mask = pad_rows([e[0] for e in encoded], side.pad_id, side="left")
            counts = np.stack(
                [side.visible(t, e[1], x) for t, e, x in zip(stream.texts, encoded, ends)]
            )
            visible = batch["aug_visible"][i]
            out["aug_input_ids"].append(aug_ids)
            out["aug_attention_mask"].append(aug_mask)
            out["aug_visible"].append(
                torch.cat([visible, torch.from_numpy(counts).to(visible.device)], 1)
            )
        return out


class TextStream:
    """The texts of a batch as the anchor writes them, and the augmenting tokens they commit.

    Each step costs a few words of text, however long the text already is. A token the anchor
    emits is decoded after a context of the last few anchor tokens (decode(context + new) minus
    decode(context); an unfinished UTF-8 character waits for its last byte) and appended to the
    text. Each augmenting tokenizer then re-reads the text from the second-to-last committed cut:
    the tokens of the last committed stretch must come out unchanged (otherwise the tokenizer
    breaks the stable-boundary rule and `append` raises; the first step re-checks the whole
    prompt), and the tokens before the new last cut are committed.

    For generation, `read_masks` holds per augmenting model the (B, S_i) mask of what it has
    read: the batch's tokens stable at the last anchor token (1; padding and the unstable tail 0),
    then those `feed` commits, right-padded within each step.
    """

    CONTEXT = 4  # anchor tokens decoded before the new ones

    def __init__(self, pair: TokenizerPair, batch: AlignedBatch) -> None:
        self.pair = pair
        self.read_masks = []
        for m, visible in zip(batch["aug_attention_mask"], batch["aug_visible"], strict=True):
            last = visible.max(-1, keepdim=True).values.to(m.device)  # (B, 1)
            self.read_masks.append((m.bool() & (m.long().cumsum(-1) <= last)).long())
        self.texts = list(batch["texts"])
        rows = range(len(self.texts))
        mask = batch["attention_mask"].bool().cpu()
        ids = batch["input_ids"].cpu()
        self._ids = [ids[b][mask[b]].tolist() for b in rows]  # anchor ids, prompt and new
        self._read = [len(x) for x in self._ids]  # ids[:read] are in the text
        ends = pair.anchor_ends(batch)
        self._cut: list[list[int]] = []  # per augment, per row: tokens before it are committed
        self._check_from: list[list[int]] = []  # the cut before that one
        self._last: list[list[np.ndarray]] = []  # committed tokens between the two cuts
        for i, side in enumerate(pair.augs):
            aug_ids = batch["aug_input_ids"][i].cpu()
            aug_mask = batch["aug_attention_mask"][i].bool().cpu()
            last = batch["aug_visible"][i].max(-1).values.cpu()  # K at the last real token
            committed = [aug_ids[b][aug_mask[b]][: int(last[b])].numpy() for b in rows]
            self._cut.append(
                [
                    int(last_cuts(cut_points(self.texts[b]), np.append(0, ends[b])[-1:])[0])
                    for b in rows
                ]
            )
            self._check_from.append([0 for _ in rows])
            self._last.append([c[len(side.lead) :] for c in committed])

    def _grow(self, tokens: Sequence[int], rows: list[int]) -> list[int]:
        """Append one anchor token to each of `rows`; the rows whose text grew."""
        for b in rows:
            self._ids[b].append(int(tokens[b]))
        start = [max(0, self._read[b] - self.CONTEXT) for b in rows]
        decode = self.pair.anchor.backend.decode_batch
        before = decode(
            [self._ids[b][s : self._read[b]] for b, s in zip(rows, start)], skip_special_tokens=True
        )
        after = decode([self._ids[b][s:] for b, s in zip(rows, start)], skip_special_tokens=True)
        grown = []
        for b, old, new in zip(rows, before, after):
            if not new.startswith(old):
                raise RuntimeError(
                    "The anchor tokenizer's decoding of the generated tokens is not "
                    "append-only, so the text both models read cannot be kept in sync."
                )
            if new.endswith("\ufffd"):  # an unfinished character: wait for its last byte
                continue
            self._read[b] = len(self._ids[b])
            if len(new) > len(old):
                self.texts[b] += new[len(old) :]
                grown.append(b)
        return grown

    def append(self, tokens: Sequence[int], active: Sequence[bool]) -> list[list[np.ndarray]]:
        """Append one anchor token per active row; per augmenting model, per row, the ids of the
        tokens that became stable (possibly none)."""
        grown = self._grow(tokens, [b for b, a in enumerate(active) if a])
        out = []
        for i, side in enumerate(self.pair.augs):
            new = [np.zeros(0, dtype=np.int64) for _ in self.texts]
            cuts, check_from = self._cut[i], self._check_from[i]
            windows = [self.texts[b][check_from[b] :] for b in grown]
            for b, window, (ids, starts, _) in zip(grown, windows, side.encode(windows)):
                ids, starts = ids[len(side.lead) :], np.sort(starts)
                known = int(np.searchsorted(starts, cuts[b] - check_from[b]))
                if not np.array_equal(ids[:known], self._last[i][b]):
                    raise RuntimeError(
                        f"The {side.role} tokenizer re-split text that the stable-boundary rule "
                        f"had already committed (text {self.texts[b]!r}); it joins words across "
                        "spaces and cannot be paired this way."
                    )
                cut = check_from[b] + int(last_cuts(cut_points(window), np.array([len(window)]))[0])
                if cut > cuts[b]:
                    k = int(np.searchsorted(starts, cut - check_from[b]))
                    new[b] = ids[known:k]
                    check_from[b], cuts[b], self._last[i][b] = cuts[b], cut, new[b]
            out.append(new)
        return out

    def feed(self, tokens: torch.Tensor, active: torch.Tensor) -> list[torch.Tensor | None]:
        """`append` for generation, from (B,) tensors: per augmenting model, the tokens that
        became stable as a (B, n) right-padded tensor (None where no row has any), whose mask
        now ends `read_masks[i]`."""
        out = []
        for i, rows in enumerate(self.append(tokens.tolist(), active.tolist())):
            if not any(len(r) for r in rows):
                out.append(None)
                continue
            chunk, chunk_mask = pad_rows(rows, self.pair.augs[i].pad_id)  # (B, n) each
            read = self.read_masks[i]
            self.read_masks[i] = torch.cat([read, chunk_mask.to(read.device)], 1)
            out.append(chunk)
        return out
