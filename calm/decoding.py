"""Cached generation: per-model caches, per-connection keys/values, folded blocks.

Shapes: B batch, T tokens fed at a step (the prompt, then 1), P tokens already cached, S_i
positions augmenting model i has read, V anchor vocabulary, H heads, Dh head width.

`CALM.generate` checks its arguments and calls `generate` here with itself (duck typed: this module
uses the composition's models, blocks and per-call pieces, and never imports calm.model). The anchor
and every augmenting model keep their own KV cache, and each connection keeps the keys/values of
the augmenting states seen so far, computed by the blocks' folded forms (`decoding_blocks`). Each
step feeds the new tokens to every model once. What the augmenting side reads is the mode's, one
small class each:

  _AnchorOnly    composition disabled (`CALM.disable_composition`): the anchor alone
  _Encoder       mode="encoder": the augmenting models read their own prompt once, before the
                 first step; their keys/values stay as they are
  _SharedStream  mode="causal", one tokenizer: every step's tokens go to every model
  _Aligned       mode="causal" with a TokenizerPair: the augmenting models read the tokens that the
                 growing texts commit (`calm.tokenizers.TextStream`)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedTokenizerFast, StopStringCriteria

from calm import hf
from calm.cross_attention import CrossAttentionBlock, FoldedBlock, FoldedGroup
from calm.errors import UserError

if TYPE_CHECKING:
    from calm.model import CALM, AugStates

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per connection: keys, values, (B, H, S_i, Dh) each
Rope = tuple[torch.Tensor, torch.Tensor] | None  # calm.cross_attention.rope_tables, or None


class DecodingBlocks(list):
    """The blocks as decoding calls them, one per connection, and `groups`: (connection indices,
    `FoldedGroup` or None) whose keys/values are computed together."""

    def __init__(
        self,
        blocks: Sequence[CrossAttentionBlock | FoldedBlock],
        groups: list[tuple[list[int], FoldedGroup | None]],
    ) -> None:
        super().__init__(blocks)
        self.groups = groups

    @classmethod
    def folded(cls, blocks: Sequence[CrossAttentionBlock], augments: Sequence[int]):
        """The blocks' folded forms (`FoldedBlock`); the blocks of one shape that read one
        augmenting model (so their states share a shape) grouped."""
        forms = [block.folded() for block in blocks]
        by_key: dict[tuple, list[int]] = {}
        for j, (form, augment) in enumerate(zip(forms, augments, strict=True)):
            by_key.setdefault((augment, form.shape_key), []).append(j)
        groups = [
            (ids, FoldedGroup([forms[j] for j in ids]) if len(ids) > 1 else None)
            for ids in by_key.values()
        ]
        return cls(forms, groups)

    def keys_values(
        self, states: list[torch.Tensor | None], rope: Rope = None
    ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """{connection: (keys, values)} of the connections j with a state states[j] (B, S, A)."""
        out = {}
        for ids, group in self.groups:
            xs = [states[j] for j in ids]
            if group is not None and all(x is not None for x in xs):
                out.update(zip(ids, group.keys_values(xs, rope), strict=True))
                continue
            for j, x in zip(ids, xs, strict=True):
                if x is not None:
                    out[j] = self[j].keys_values(x, rope)
        return out


def decoding_blocks(model: CALM) -> DecodingBlocks:
    """The blocks' folded inference forms, built now from the current parameters; the blocks
    themselves while dropout acts (training mode), which the folded forms leave out."""
    if model.blocks.training and model.calm_config.dropout > 0:
        return DecodingBlocks(model.blocks, [([j], None) for j in range(len(model.blocks))])
    return DecodingBlocks.folded(model.blocks, [c.augment for c in model.connections])


def extend_kv(
    model: CALM, kv: KV | None, states: AugStates, blocks: DecodingBlocks, rope: Rope = None
) -> KV:
    """kv of every connection with the keys/values of `states` appended (kv None: all of them
    from `states`); connections whose augmenting layer is not in `states` keep theirs."""
    new = blocks.keys_values(model._connection_states(states), rope)
    if kv is None:
        return [new[j] for j in range(len(blocks))]
    return [
        (torch.cat([old[0], new[j][0]], 2), torch.cat([old[1], new[j][1]], 2)) if j in new else old
        for j, old in enumerate(kv)
    ]


# ----------------------------------------------------------------------------- the modes


class _AnchorOnly:
    """The anchor with its cache, no composition; the base of the composed modes.

    full_mask: (B, P + max_new) the mask of every position the call can reach (new tokens are
    real), sliced per step; padded: whether the prompt's mask holds a zero (then every mask of
    the call does), looked up once per call."""

    def __init__(self, model: CALM, full_mask: torch.Tensor, padded: bool) -> None:
        self.model = model
        self.full_mask = full_mask
        self.padded = padded
        self.cache = hf.new_cache(model.anchor)

    def logits(self, step_ids: torch.Tensor, past: int, finished: torch.Tensor) -> torch.Tensor:
        """(B, V) next-token logits after feeding step_ids (B, T) at positions past..past+T-1;
        finished (B,): rows that ended (their tokens are padding)."""
        return self._anchor(step_ids, self.full_mask[:, : past + step_ids.shape[1]], past)

    def _anchor(self, step_ids: torch.Tensor, mask: torch.Tensor, past: int) -> torch.Tensor:
        return self.model._anchor_call(
            step_ids,
            mask if self.padded else None,  # None: the models skip their mask work
            past,
            self.cache,
            last_only=True,
            padded=self.padded,
        )


class _Composed(_AnchorOnly):
    """A composed step: `feed` brings the augmenting side up to date (kv, key_masks, visible),
    then the anchor runs with every block's residual added."""

    masks_padded: bool | None = None  # what `CALM._masks` may assume about padding (None: look)

    def __init__(self, model: CALM, full_mask: torch.Tensor, padded: bool) -> None:
        super().__init__(model, full_mask, padded)
        self.blocks = decoding_blocks(model)
        self.rope_all = model._rope(full_mask)  # the rotary tables of every reachable position
        self.kv: KV | None = None
        self.key_masks: list[torch.Tensor] | None = None  # per augment, (B, S_i): what it read
        self.visible: list[torch.Tensor] | None = None  # per augment (B, T): see calm.tokenizers

    def feed(self, step_ids: torch.Tensor, mask: torch.Tensor, past: int, rope: Rope, finished):
        """Before the anchor reads step_ids: what the mode's augmenting side reads there."""

    def logits(self, step_ids: torch.Tensor, past: int, finished: torch.Tensor) -> torch.Tensor:
        length = past + step_ids.shape[1]
        mask = self.full_mask[:, :length]
        rope = None if self.rope_all is None else tuple(t[:, :, past:length] for t in self.rope_all)
        self.feed(step_ids, mask, past, rope, finished)
        masks = self.model._masks(self.key_masks, mask, past, self.visible, self.masks_padded)
        with self.model._composed(self.kv, masks, self.blocks, rope):
            return self._anchor(step_ids, mask, past)


class _Encoder(_Composed):
    """The augmenting models read their prompt once, before the first step."""

    def __init__(self, model: CALM, full_mask, padded, aug_inputs) -> None:
        super().__init__(model, full_mask, padded)
        states: AugStates = {}
        for i, (ids, mask) in enumerate(aug_inputs):
            states.update(model._run_augment(i, ids, mask))
        self.kv = extend_kv(model, None, states, self.blocks)
        self.key_masks = [mask for _, mask in aug_inputs]


class _SharedStream(_Composed):
    """Every augmenting model reads each step's tokens into its own cache."""

    def __init__(self, model: CALM, full_mask, padded) -> None:
        super().__init__(model, full_mask, padded)
        self.caches = [hf.new_cache(aug) for aug in model.augments]
        self.masks_padded = padded  # the new tokens are real: padded exactly when the prompt is

    def feed(self, step_ids, mask, past, rope, finished) -> None:
        model_mask = mask if self.padded else None
        states: AugStates = {}
        for i, cache in enumerate(self.caches):
            states.update(
                self.model._run_augment(i, step_ids, model_mask, cache, past, padded=self.padded)
            )
        self.kv = extend_kv(self.model, self.kv, states, self.blocks, rope)
        self.key_masks = [mask] * len(self.caches)


class _Aligned(_Composed):
    """Each augmenting model reads the prompt tokens stable at the last anchor token, then, after
    each step, the tokens the grown texts commit (right-padded within the step)."""

    def __init__(self, model: CALM, full_mask, padded, batch: dict) -> None:
        super().__init__(model, full_mask, padded)
        self.caches = [hf.new_cache(aug) for aug in model.augments]
        self.masks_padded = padded
        self.stream = model.tokenizers.stream(batch)
        self.key_masks = self.stream.read_masks  # the stream's list: `feed` grows its masks
        self.visible = batch["aug_visible"]
        states: AugStates = {}
        for i, (ids, cache) in enumerate(zip(batch["aug_input_ids"], self.caches, strict=True)):
            states.update(model._run_augment(i, ids, self.key_masks[i], cache))
        self.kv = extend_kv(model, None, states, self.blocks)

    def feed(self, step_ids, mask, past, rope, finished) -> None:
        if not past:  # the prompt: read at the start, seen as the batch's aug_visible says
            return
        read = [m.shape[1] for m in self.key_masks]
        states: AugStates = {}
        for i, chunk in enumerate(self.stream.feed(step_ids[:, 0], ~finished)):
            if chunk is not None:
                states.update(
                    self.model._run_augment(i, chunk, self.key_masks[i], self.caches[i], read[i])
                )
        if states:
            self.kv = extend_kv(self.model, self.kv, states, self.blocks)
        self.visible = [m.sum(-1, keepdim=True) for m in self.key_masks]  # (B, 1) each


# ----------------------------------------------------------------------------- the loop


def _mode(
    model: CALM, input_ids, attention_mask, full_mask, padded: bool, aug: dict
) -> _AnchorOnly:
    """The step strategy of this call (see the module docstring)."""
    if model._disabled:
        return _AnchorOnly(model, full_mask, padded)
    ids, masks = aug["aug_input_ids"], aug["aug_attention_mask"]
    if model.calm_config.mode != "causal":
        aug_inputs = model._aug_inputs(input_ids, attention_mask, ids, masks)
        return _Encoder(model, full_mask, padded, aug_inputs)
    if model.tokenizers is None:
        return _SharedStream(model, full_mask, padded)
    visible = model._check_visible(aug["aug_visible"], input_ids)
    aug_inputs = model._aug_inputs(input_ids, attention_mask, ids, masks)
    batch = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        aug_input_ids=[ids for ids, _ in aug_inputs],
        aug_attention_mask=[m for _, m in aug_inputs],
        aug_visible=visible,
        texts=list(aug["texts"]),
    )
    return _Aligned(model, full_mask, padded, batch)


def end_tokens(
    anchor, eos_token_id: int | Sequence[int] | None, pad_token_id: int | None, device
) -> tuple[torch.Tensor, int]:
    """The end tokens (a 1-D tensor, maybe empty: no row ends) and the padding id of finished
    rows; unset ones from the anchor's generation config, as Hugging Face does."""
    gen_config = getattr(anchor, "generation_config", None)
    if eos_token_id is None and gen_config is not None:
        eos_token_id = gen_config.eos_token_id
    if eos_token_id is None:
        eos_token_id = []
    elif isinstance(eos_token_id, int):
        eos_token_id = [eos_token_id]
    eos = torch.tensor(list(eos_token_id), dtype=torch.long, device=device)
    if pad_token_id is None:
        pad_token_id = getattr(gen_config, "pad_token_id", None)
    if pad_token_id is None:
        pad_token_id = int(eos[0]) if len(eos) else 0
    return eos, pad_token_id


Stop = Callable[[torch.Tensor], torch.Tensor]  # (B, T) ids so far -> (B,) rows that end here


def stop_criterion(stop_strings: str | Sequence[str] | None, tokenizer, pair) -> Stop | None:
    """Hugging Face's `StopStringCriteria` for `stop_strings` (None: none given): a row ends when
    its text ends in a stop string. tokenizer: the anchor's; by default the TokenizerPair's."""
    if stop_strings is None or len(stop_strings) == 0:
        return None
    if isinstance(stop_strings, str):
        stop_strings = [stop_strings]
    if tokenizer is None and pair is not None:
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=pair.anchor.backend)
    if tokenizer is None:
        raise UserError(
            "stop_strings need the anchor's tokenizer: pass generate(..., tokenizer=tokenizer)."
        )
    criterion = StopStringCriteria(tokenizer, list(stop_strings))
    return lambda ids: criterion(ids, None)


@torch.no_grad()
def generate(
    model: CALM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    choose: Callable[[torch.Tensor], torch.Tensor],
    eos: torch.Tensor,
    pad_token_id: int,
    streamer=None,
    stop: Stop | None = None,
    **aug,
) -> torch.Tensor:
    """Prompt + up to `max_new_tokens` new tokens, (B, T + new); arguments as `CALM.generate`
    has checked them. choose: (B, V) logits -> (B,) tokens; eos: `end_tokens`; stop:
    `stop_criterion`; aug: the augmenting inputs (aug_input_ids, aug_attention_mask,
    aug_visible, texts)."""
    B = input_ids.shape[0]
    full_mask = torch.cat([attention_mask, attention_mask.new_ones(B, max_new_tokens)], 1)
    padded = not bool(attention_mask.all())  # False: every mask of the call is all ones
    mode = _mode(model, input_ids, attention_mask, full_mask, padded, aug)
    tokens = []
    step_ids, past = input_ids, 0
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    track = len(eos) > 0 or stop is not None  # else no row finishes
    for _ in range(max_new_tokens):
        token = choose(mode.logits(step_ids, past, finished))
        if track:  # finished rows continue with padding
            token = torch.where(finished, torch.full_like(token, pad_token_id), token)
            finished |= torch.isin(token, eos)
        tokens.append(token)
        if stop is not None:  # on the whole sequence, prompt included, as Hugging Face does
            finished |= stop(torch.cat([input_ids, torch.stack(tokens, 1)], 1))
        if streamer is not None:
            streamer.put(token.cpu())
        past += step_ids.shape[1]
        step_ids = token[:, None]
        if track and finished.all():
            break
    if streamer is not None:
        streamer.end()
    if not tokens:
        return input_ids
    return torch.cat([input_ids, torch.stack(tokens, 1)], 1)
