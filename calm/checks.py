"""Checks of what a user gives a composition, each refusal one sentence that says the fix.

`CALM` calls these where input enters: at construction (its connections against the models'
layer stacks, the vocabularies of models that read the same ids) and at each call (token ids,
the augmenting models' inputs, a `TokenizerPair` batch's `aug_visible` and `texts`). They take
plain values, so they know nothing of the composition's internals.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from calm.config import CALMConfig, Connection
from calm.errors import UserError
from calm.layer_map import default_connections

PAIR_BATCH = "pass the batch its TokenizerPair makes, as model(**pair(texts))"


def composition(
    config: CALMConfig, num_augments: int, anchor_width: int, num_heads: int, paired: bool
) -> None:
    """What the config asks of the models: augmenting models to read, heads that divide the
    anchor width, and with a TokenizerPair (paired) one text stream read by both sides."""
    if num_augments == 0:
        raise UserError("Give at least one augmenting model.")
    if paired and config.mode != "causal":
        raise UserError(
            'A TokenizerPair aligns one text read by both sides; use CALMConfig(mode="causal").'
        )
    if paired and config.rope:
        raise UserError(
            "rope needs one token stream; with a TokenizerPair the two models' positions "
            "differ: use CALMConfig(rope=False)."
        )
    if anchor_width % num_heads:
        raise UserError(
            f"num_heads={num_heads} does not divide the anchor width {anchor_width}; set "
            f"CALMConfig(num_heads=...) to a divisor of {anchor_width}."
        )


def connections(
    given: Sequence[Connection] | None, every: int, anchor_layers: int, aug_layers: Sequence[int]
) -> tuple[Connection, ...]:
    """The connections of a composition: `given`, checked against the layer counts of the anchor
    and of each augmenting model, or the default rule (`layer_map.default_connections`)."""
    if given is None:
        return tuple(
            c
            for i, n in enumerate(aug_layers)
            for c in default_connections(n, anchor_layers, every, i)
        )
    seen = set()
    for c in given:
        if c.augment >= len(aug_layers):
            raise UserError(
                f"{c} names augmenting model {c.augment}, but only {len(aug_layers)} were given "
                "(indices start at 0)."
            )
        if c.aug_layer >= aug_layers[c.augment]:
            raise UserError(
                f"{c}: aug_layer must be < {aug_layers[c.augment]}, the number of decoder "
                f"layers of augmenting model {c.augment}."
            )
        if c.anchor_layer >= anchor_layers:
            raise UserError(
                f"{c}: anchor_layer must be < {anchor_layers}, the number of anchor decoder layers."
            )
        if c in seen:
            raise UserError(f"{c} appears twice in connections; list each connection once.")
        seen.add(c)
    return tuple(given)


def shared_vocabulary(anchor_vocab: int, aug_vocabs: Sequence[int]) -> None:
    """Causal mode without a TokenizerPair feeds the anchor's ids to every model."""
    for i, n in enumerate(aug_vocabs):
        if n != anchor_vocab:
            raise UserError(
                f"Causal mode feeds the same token ids to both models, but the anchor's "
                f"vocabulary has {anchor_vocab} entries and augmenting model {i}'s has {n}; pass "
                "tokenizers=calm.TokenizerPair(anchor_tokenizer, aug_tokenizers), use models that "
                'share a tokenizer, or CALMConfig(mode="encoder") with aug_input_ids.'
            )


def token_ids(name: str, ids: torch.Tensor, device: torch.device | None) -> None:
    """2-D ids on `device` (None: any device; augmenting inputs are moved to their model)."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise TypeError(f"{name} must be a 2-D tensor of token ids (batch, length).")
    if device is not None and ids.device != device:
        raise ValueError(
            f"{name} is on {ids.device} but the model that reads it is on {device}; "
            f"move it with .to({str(device)!r})."
        )


def aug_inputs(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    aug_input_ids,
    aug_attention_mask,
    num_augments: int,
    shared: bool,
    paired: bool,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per augmenting model: the ids it reads and their mask. shared: causal mode without a
    TokenizerPair (every model reads the anchor's ids); paired: with a TokenizerPair."""
    if shared:
        return [(input_ids, attention_mask)] * num_augments
    if aug_input_ids is None and paired:
        raise ValueError(f"This composition pairs different tokenizers: {PAIR_BATCH}.")
    if aug_input_ids is None:
        raise ValueError(
            "Encoder mode needs aug_input_ids (the prompt the augmenting models read); pass "
            'them, or use CALMConfig(mode="causal").'
        )
    ids = aug_input_ids if isinstance(aug_input_ids, (list, tuple)) else [aug_input_ids]
    masks = (
        aug_attention_mask
        if isinstance(aug_attention_mask, (list, tuple))
        else [aug_attention_mask] * len(ids)
    )
    if len(ids) == 1:
        ids, masks = ids * num_augments, masks * num_augments
    if len(ids) != num_augments:
        raise ValueError(
            f"Got {len(ids)} aug_input_ids tensors for {num_augments} augmenting models; "
            "give one tensor (shared) or one per augmenting model."
        )
    out = []
    for x, m in zip(ids, masks):
        token_ids("aug_input_ids", x, None)
        out.append((x, torch.ones_like(x) if m is None else m))
    return out


def visible(
    aug_visible, input_ids: torch.Tensor, num_augments: int, causal: bool, paired: bool
) -> list[torch.Tensor] | None:
    """aug_visible as one (B, T) tensor per augmenting model; required with a TokenizerPair."""
    if aug_visible is None:
        if paired:
            raise ValueError(
                f"This composition pairs different tokenizers and needs aug_visible; {PAIR_BATCH}."
            )
        return None
    if not causal:
        raise ValueError('aug_visible applies to CALMConfig(mode="causal") only.')
    out = list(aug_visible) if isinstance(aug_visible, (list, tuple)) else [aug_visible]
    if len(out) != num_augments or any(v.shape != input_ids.shape for v in out):
        raise ValueError(
            f"aug_visible must hold one tensor of shape {tuple(input_ids.shape)} (like "
            f"input_ids) per augmenting model ({num_augments})."
        )
    return out


def texts(texts: Sequence[str] | None, input_ids: torch.Tensor, required: bool) -> None:
    """A TokenizerPair batch's texts: one per row of input_ids; required for its generation."""
    if texts is None:
        if required:
            raise ValueError(
                "Generation with a TokenizerPair continues the prompt texts; pass the batch "
                "its TokenizerPair makes, as model.generate(**pair(texts))."
            )
        return
    if isinstance(texts, str) or len(texts) != input_ids.shape[0]:
        raise ValueError(
            f"texts must hold one text per row of input_ids ({input_ids.shape[0]}); pass "
            "the batch its TokenizerPair makes whole, as model(**pair(texts))."
        )
