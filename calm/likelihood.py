"""How likely a model finds a text: the summed negative log-likelihood of each continuation.

    scores = text_nll(model, tokenizer, [("", "def f(x):\\n    return x\\n")])
    scores[0]  # {"nll": nats, "tokens": scored tokens}

Any causal LM the evaluator takes (Hugging Face, peft, `calm.CALM`) is scored the same way, as
lm-evaluation-harness scores a (context, continuation) request: the continuation's tokens are
those of `tokenizer(context + continuation)` after the tokens of `tokenizer(context)`, and only
they are summed. An empty context with no leading special token becomes the tokenizer's BOS (or
EOS) token, so that the first token of the text is predicted too. A composition with a
`TokenizerPair` reads the pair's aligned batch, and its scored tokens are the anchor tokens that
end after the context's characters (`TokenizerPair.labels`); if the anchor tokenizer adds no
leading special token, the first token of a text without context is not scored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from calm.data import IGNORE, pad_rows
from calm.errors import UserError
from calm.model import CALM
from calm.progress import bar


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _row_nll(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor
) -> tuple[list[float], list[int]]:
    """Per row: the summed next-token loss in nats (float32), and how many tokens it sums. A
    token after padding (the first of a left-padded row) has no context and is not scored."""
    nll, count = [], []
    labels = labels.masked_fill(mask == 0, IGNORE)
    for row_logits, row_labels, row_mask in zip(logits, labels, mask):  # (T, V) at a time
        target = row_labels[1:].masked_fill(row_mask[:-1] == 0, IGNORE)
        loss = F.cross_entropy(
            row_logits[:-1].float(), target, ignore_index=IGNORE, reduction="sum"
        )
        nll.append(float(loss))
        count.append(int((target != IGNORE).sum()))
    return nll, count


def encode_pairs(tokenizer, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) of each (context, continuation), lm-evaluation-harness style."""
    out = []
    for context, continuation in pairs:
        whole = tokenizer(context + continuation)["input_ids"]
        head = tokenizer(context)["input_ids"] if context else []
        if not context:  # the specials an empty text gets (a BOS), else a BOS or EOS as context
            head = tokenizer("")["input_ids"]
            if not head:
                first = tokenizer.bos_token_id
                first = tokenizer.eos_token_id if first is None else first
                if first is None:
                    raise UserError(
                        "A text without context needs a BOS or EOS token to start from; the "
                        "tokenizer has neither: give each example a context."
                    )
                whole, head = [first, *whole], [first]
        if whole[: len(head)] != head:  # the context's last token merged into the continuation
            head = head[:-1]
        if len(whole) <= len(head):
            raise UserError(f"The continuation {continuation[:40]!r} has no token to score.")
        out.append((whole, [IGNORE] * len(head) + whole[len(head) :]))
    return out


@torch.no_grad()
def text_nll(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    *,
    batch_size: int = 4,
    progress: bool = True,
) -> list[dict[str, float]]:
    """{"nll": nats, "tokens": n} of each (context, continuation) in `pairs`, in order.

    Longest texts first (less padding, an early out-of-memory); the logits of one row at a time
    are turned into float32 losses, so a 262k-token vocabulary fits at batch size 4."""
    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, got {batch_size}.")
    pair = model.tokenizers if isinstance(model, CALM) else None
    if isinstance(model, CALM) and model.calm_config.mode == "encoder":
        raise UserError(
            "Likelihood tasks score a causal composition; an encoder-mode one reads its prompt "
            "separately (score it with a generation task)."
        )
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0] + pairs[i][1]))
    encoded = None if pair is not None else encode_pairs(tokenizer, pairs)
    out: list[dict[str, float]] = [{} for _ in pairs]
    device = _device(model)
    shown = bar(total=len(pairs), desc="scoring", unit="text", disable=not progress)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        if pair is not None:
            batch = pair([pairs[i][0] + pairs[i][1] for i in rows]).to(device)
            contexts = [len(pairs[i][0]) for i in rows]
            labels = pair.labels(batch, prompt_chars=contexts if any(contexts) else None)
            logits, mask = model(**batch).logits, batch["attention_mask"]
        else:
            ids, mask = pad_rows([encoded[i][0] for i in rows], 0, side="right")
            labels, _ = pad_rows([encoded[i][1] for i in rows], IGNORE, side="right")
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        nll, count = _row_nll(logits, labels.to(logits.device), mask.to(logits.device))
        for i, n, c in zip(rows, nll, count):
            out[i] = {"nll": n, "tokens": c}
        shown.update(len(rows))
    shown.close()
    return out
