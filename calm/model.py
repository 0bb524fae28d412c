"""CALM: a frozen anchor LM composed with frozen augmenting LMs through cross-attention blocks.

Shapes: B batch, T tokens of this call, P tokens already cached, S augmenting positions,
V anchor vocabulary. Layer indices are 0-based positions in each model's decoder-layer stack.

The composition acts only inside `CALM.forward` and `CALM.generate`: forward hooks are registered
for the duration of one call and removed in a `finally`, so the base models stay usable on their
own, and several compositions can share them.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from calm import checks, decoding, hf
from calm.config import CALMConfig
from calm.cross_attention import CrossAttentionBlock, FoldedBlock, attention_masks, rope_tables
from calm.errors import UserError
from calm.generation import chooser
from calm.tokenizers import TokenizerPair

AugStates = dict[tuple[int, int], torch.Tensor]  # (augment, aug_layer) -> (B, S, A)
Blocks = Sequence[CrossAttentionBlock | FoldedBlock]  # one per connection
Rope = tuple[torch.Tensor, torch.Tensor] | None  # calm.cross_attention.rope_tables, or None


def next_token_loss(
    logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Next-token cross-entropy of (B, T, V) logits, in float32; labels (B, T) are aligned with
    the inputs (Hugging Face convention: shifted here) and -100 is ignored. reduction: "mean" or
    "sum" over the counted tokens, as `F.cross_entropy`."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        labels[:, 1:].flatten().to(logits.device),
        ignore_index=-100,
        reduction=reduction,
    )


class _StopForward(Exception):
    """Raised by a hook after the last augmenting layer we need: the rest is never computed."""


class CALM(nn.Module):
    """Compose `anchor` with one or more `augments` (Hugging Face causal LMs), both frozen.

    Only `self.blocks` (one `CrossAttentionBlock` per connection) trains.
    """

    def __init__(
        self,
        anchor: PreTrainedModel,
        augments: PreTrainedModel | Sequence[PreTrainedModel],
        config: CALMConfig | None = None,
        tokenizers: TokenizerPair | None = None,
    ) -> None:
        super().__init__()
        config = config if config is not None else CALMConfig()
        if not isinstance(config, CALMConfig):
            raise TypeError(f"config must be a calm.CALMConfig, got {type(config).__name__}.")
        hf.check_causal_lm(anchor, "anchor")
        augs = list(augments) if isinstance(augments, (list, tuple, nn.ModuleList)) else [augments]
        for i, aug in enumerate(augs):
            hf.check_causal_lm(aug, f"augmenting model {i}")
        if tokenizers is not None and not isinstance(tokenizers, TokenizerPair):
            raise TypeError(
                f"tokenizers must be a calm.TokenizerPair, got {type(tokenizers).__name__}."
            )
        anchor_dim = hf.hidden_size(anchor)
        num_heads = config.num_heads or hf.num_attention_heads(anchor)
        checks.composition(config, len(augs), anchor_dim, num_heads, tokenizers is not None)
        self.calm_config = config
        self.anchor = anchor
        self.augments = nn.ModuleList(augs)
        # Plain tuples: the layers are already submodules of the base models.
        self._anchor_layers = tuple(hf.decoder_layers(anchor))
        self._aug_layers = tuple(tuple(hf.decoder_layers(a)) for a in augs)
        self.connections = checks.connections(
            config.connections,
            config.every,
            len(self._anchor_layers),
            [len(x) for x in self._aug_layers],
        )
        self.tokenizers = tokenizers
        vocabs = (hf.vocab_size(anchor), [hf.vocab_size(a) for a in augs])
        if tokenizers is not None:
            tokenizers.check_models(*vocabs)
        elif config.mode == "causal":
            checks.shared_vocabulary(*vocabs)
        self.blocks = nn.ModuleList(
            CrossAttentionBlock(
                hf.hidden_size(augs[c.augment]),
                anchor_dim,
                num_heads,
                init=config.init,
                norm=config.norm,
                dropout=config.dropout,
                rope=config.rope,
            )
            for c in self.connections
        ).to(device=hf.model_device(anchor), dtype=getattr(torch, config.dtype))
        # Which augmenting layers each augmenting model must expose, and the deepest of them.
        self._aug_needed = tuple(
            tuple(sorted({c.aug_layer for c in self.connections if c.augment == i}))
            for i in range(len(augs))
        )

        self._base_state = [(p, p.requires_grad) for p in self._base_parameters()]
        self._base_training = [(m, m.training) for m in (anchor, *augs)]
        for p, _ in self._base_state:
            p.requires_grad_(False)
        self._freeze_modes()
        self._disabled = False
        self._removed = False

    # ----------------------------------------------------------------------------- set-up

    def _base_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.anchor.parameters()
        for aug in self.augments:
            yield from aug.parameters()

    def _freeze_modes(self) -> None:
        self.anchor.eval()
        for aug in self.augments:
            aug.eval()

    @property
    def config(self):
        """The anchor's Hugging Face config (as in peft); the composition's is `calm_config`."""
        return self.anchor.config

    def train(self, mode: bool = True) -> CALM:
        """Set the blocks' mode; the frozen base models always stay in eval mode."""
        super().train(mode)
        self._freeze_modes()
        return self

    # ----------------------------------------------------------------------------- public API

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The composition parameters: everything in `self.blocks`, nothing else."""
        return list(self.blocks.parameters())

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    @contextlib.contextmanager
    def disable_composition(self) -> Iterator[None]:
        """Within this context, `forward` and `generate` give exactly the anchor's outputs."""
        previous = self._disabled
        self._disabled = True
        try:
            yield
        finally:
            self._disabled = previous

    def remove(self) -> PreTrainedModel:
        """Detach the composition: restore the base models' requires_grad flags and train/eval
        modes as they were before composing, and return the anchor."""
        for p, flag in self._base_state:
            p.requires_grad_(flag)
        for m, training in self._base_training:
            m.train(training)
        self._removed = True
        return self.anchor

    def save_pretrained(self, directory) -> None:
        """Write only the composition: `composition.safetensors` and `calm_config.json`."""
        from calm.checkpoint import save_composition

        save_composition(self, directory)

    @classmethod
    def from_pretrained(
        cls,
        directory,
        anchor: PreTrainedModel,
        augments: PreTrainedModel | Sequence[PreTrainedModel],
        *,
        check_base_models: bool = True,
        tokenizers: TokenizerPair | None = None,
    ) -> CALM:
        """Rebuild a saved composition on top of `anchor` and `augments` (and the TokenizerPair
        it was trained with, when their tokenizers differ).

        Refuses base models whose class, config or weights differ from those it was trained on,
        unless `check_base_models=False`.
        """
        from calm.checkpoint import load_composition

        build = cls if tokenizers is None else functools.partial(cls, tokenizers=tokenizers)
        return load_composition(build, directory, anchor, augments, check_base_models)

    # ----------------------------------------------------------------------------- internals

    def _check_live(self) -> None:
        if self._removed:
            raise RuntimeError("This composition was removed; build a new calm.CALM to compose.")

    def _aug_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        aug_input_ids,
        aug_attention_mask,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per augmenting model: the ids it reads and their mask (`calm.checks.aug_inputs`)."""
        paired = self.tokenizers is not None
        shared = self.calm_config.mode == "causal" and not paired
        return checks.aug_inputs(
            input_ids,
            attention_mask,
            aug_input_ids,
            aug_attention_mask,
            len(self.augments),
            shared,
            paired,
        )

    def _run_augment(
        self,
        index: int,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache=None,
        past_length: int = 0,
        padded: bool | None = None,
    ) -> AugStates:
        """Run augmenting model `index` up to its deepest connected layer; no LM head, no grads.
        attention_mask None: nothing is padded; padded: see `hf.mask_kwargs`."""
        aug = self.augments[index]
        device = hf.model_device(aug)
        layers = self._aug_layers[index]
        needed = self._aug_needed[index]
        if not needed:
            return {}
        captured: AugStates = {}

        def capture(layer: int):
            def hook(module, args, output):
                captured[(index, layer)] = hf.layer_output(output)
                if layer == needed[-1]:
                    raise _StopForward

            return hook

        handles = [layers[i].register_forward_hook(capture(i)) for i in needed]
        if attention_mask is not None:
            attention_mask = attention_mask.to(device)
        kwargs = dict(
            input_ids=input_ids.to(device),
            **hf.mask_kwargs(attention_mask, past_length, padded),
            **hf.cache_kwargs(hf.backbone(aug), cache),
        )
        try:
            with torch.no_grad():
                hf.backbone(aug)(**kwargs)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        return captured

    def augment_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        aug_input_ids=None,
        aug_attention_mask=None,
    ) -> AugStates:
        """The connected augmenting layers' outputs, {(augment, aug_layer): (B, S, A)}.

        They depend only on the frozen augmenting models and the input, so a training loop may
        compute them once and pass them back as `forward(..., aug_states=...)`.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        states: AugStates = {}
        inputs = self._aug_inputs(input_ids, attention_mask, aug_input_ids, aug_attention_mask)
        for i, (ids, mask) in enumerate(inputs):
            states.update(self._run_augment(i, ids, mask))
        return states

    def _masks(
        self,
        key_masks: list[torch.Tensor],
        query_mask: torch.Tensor,
        past_length: int,
        visible: list[torch.Tensor] | None = None,
        padded: bool | None = None,
    ) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
        """(mask, rows) per augmenting model: `calm.cross_attention.attention_masks` in this
        composition's mode."""
        causal = self.calm_config.mode == "causal"
        return attention_masks(key_masks, query_mask, past_length, causal, visible, padded)

    def _check_visible(self, aug_visible, input_ids: torch.Tensor) -> list[torch.Tensor] | None:
        """aug_visible as one (B, T) tensor per augmenting model (`calm.checks.visible`)."""
        causal = self.calm_config.mode == "causal"
        paired = self.tokenizers is not None
        return checks.visible(aug_visible, input_ids, len(self.augments), causal, paired)

    def _connection_states(self, states: AugStates) -> list[torch.Tensor | None]:
        """Per connection: its augmenting layer's output in `states` (None where absent), on the
        anchor's device in the blocks' dtype."""
        device = hf.model_device(self.anchor)
        dtype = getattr(torch, self.calm_config.dtype)
        out = []
        for c in self.connections:
            x = states.get((c.augment, c.aug_layer))
            if x is not None and (x.dtype != dtype or x.device != device):
                x = x.to(device=device, dtype=dtype)
            out.append(x)
        return out

    def _rope(self, attention_mask: torch.Tensor, past_length: int = 0) -> Rope:
        """The rotary tables of this call's stream positions, shared by every block; None
        without rope."""
        if not self.calm_config.rope:
            return None
        positions = hf.position_ids(attention_mask, past_length)  # (B, T)
        dtype = getattr(torch, self.calm_config.dtype)
        return rope_tables(positions, self.blocks[0].head_dim, dtype)

    @contextlib.contextmanager
    def _composed(self, kv, masks, blocks: Blocks, rope: Rope = None) -> Iterator[None]:
        """Hooks that add each block's residual to its anchor layer's output, for one call.

        kv[j]: keys and values of connection j; masks[i]: (mask, rows) for augmenting model i;
        blocks[j]: connection j's block (or its folded form); rope: the tables of this call's
        anchor positions.
        """
        by_layer: dict[int, list[int]] = {}
        for j, c in enumerate(self.connections):
            by_layer.setdefault(c.anchor_layer, []).append(j)
        dtype = getattr(torch, self.calm_config.dtype)

        def add_residual(block_ids: list[int]):
            calls = [(blocks[j], kv[j], masks[self.connections[j].augment]) for j in block_ids]

            def hook(module, args, output):
                h = hf.layer_output(output)  # (B, T, D)
                x = h.to(dtype)
                delta = None
                for block, (k, v), (mask, rows) in calls:
                    out = block(x, k, v, mask, rows, rope)
                    delta = out if delta is None else delta + out
                return hf.with_layer_output(output, h + delta.to(h.dtype))

            return hook

        handles = [
            self._anchor_layers[layer].register_forward_hook(add_residual(ids))
            for layer, ids in by_layer.items()
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _anchor_call(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        past_length: int = 0,
        cache=None,
        last_only: bool = False,
        padded: bool | None = None,
    ) -> torch.Tensor:
        """The anchor's logits, (B, T, V) or (B, V) with last_only; attention_mask None: nothing
        is padded; padded: see `hf.mask_kwargs`."""
        kwargs = dict(
            input_ids=input_ids,
            **hf.mask_kwargs(attention_mask, past_length, padded),
            **hf.cache_kwargs(self.anchor, cache),
        )
        if last_only and hf.accepts(self.anchor, "logits_to_keep"):
            kwargs["logits_to_keep"] = 1
        logits = self.anchor(**kwargs).logits
        return logits[:, -1] if last_only else logits

    # ----------------------------------------------------------------------------- forward

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        aug_input_ids=None,
        aug_attention_mask=None,
        aug_states: AugStates | None = None,
        aug_visible: Sequence[torch.Tensor] | torch.Tensor | None = None,
        texts: Sequence[str] | None = None,
    ) -> CausalLMOutputWithPast:
        """Composed logits (B, T, V), and the mean next-token loss when `labels` are given
        (Hugging Face convention: labels are the inputs, shifted inside; -100 is ignored).

        aug_visible (causal mode): one (B, T) tensor per augmenting model; anchor token t sees the
        first aug_visible[i][b, t] real augmenting tokens instead of those at positions <= t.
        texts: the texts a `TokenizerPair` batch carries for `generate` to continue; a batch is
        passed whole (`model(**pair(texts))`), so they are checked to hold one text per row."""
        self._check_live()
        device = hf.model_device(self.anchor)
        checks.token_ids("input_ids", input_ids, device)
        checks.texts(texts, input_ids, required=False)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self._disabled:
            logits = self._anchor_call(input_ids, attention_mask)
        else:
            inputs = self._aug_inputs(input_ids, attention_mask, aug_input_ids, aug_attention_mask)
            if aug_states is None:
                aug_states = {}
                for i, (ids, mask) in enumerate(inputs):
                    aug_states.update(self._run_augment(i, ids, mask))
            visible = self._check_visible(aug_visible, input_ids)
            masks = self._masks([m for _, m in inputs], attention_mask, 0, visible)
            rope = self._rope(attention_mask)
            states = self._connection_states(aug_states)
            kv = [block.keys_values(x, rope) for block, x in zip(self.blocks, states, strict=True)]
            with self._composed(kv, masks, self.blocks, rope):
                logits = self._anchor_call(input_ids, attention_mask)
        loss = None if labels is None else next_token_loss(logits, labels)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    # ----------------------------------------------------------------------------- generate

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        aug_input_ids=None,
        aug_attention_mask=None,
        generator: torch.Generator | None = None,
        streamer=None,
        aug_visible=None,
        texts: Sequence[str] | None = None,
        stop_strings: str | Sequence[str] | None = None,
        tokenizer=None,
    ) -> torch.Tensor:
        """Prompt + up to `max_new_tokens` new tokens, (B, T + new), like Hugging Face.

        The anchor and every augmenting model keep their own KV cache, and each block keeps the
        keys/values of the augmenting states seen so far; each step feeds the new token to every
        model once (`calm.decoding`). The blocks run in their folded inference form
        (`FoldedBlock`, equal up to rounding), built at the start of each call; the blocks of one
        augmenting model compute their keys/values together (`FoldedGroup`). Finished rows are
        filled with `pad_token_id`. Left-padded batches work. A row also ends when its text ends
        in one of `stop_strings`, as in Hugging Face (`tokenizer`: the anchor's; a composition
        with a TokenizerPair has its own). `streamer` (optional) gets `put(tokens)` after each
        step and `end()` at the end.

        With a TokenizerPair, pass its batch (`**pair(texts)`): as the anchor writes, the texts
        grow, and the augmenting tokens that become stable are appended to each augmenting
        model's cache (see `calm.tokenizers.TextStream`).
        """
        self._check_live()
        device = hf.model_device(self.anchor)
        checks.token_ids("input_ids", input_ids, device)
        if max_new_tokens < 0:
            raise UserError(f"max_new_tokens must be >= 0, got {max_new_tokens!r}.")
        choose = chooser(do_sample, temperature, top_k, top_p, generator, device)
        if aug_visible is not None and self.tokenizers is None:
            raise ValueError(
                "generate reads aug_visible only from a TokenizerPair batch; build the model "
                "with CALM(..., tokenizers=pair), or drop aug_visible."
            )
        checks.texts(texts, input_ids, required=self.tokenizers is not None and not self._disabled)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        eos, pad_token_id = decoding.end_tokens(self.anchor, eos_token_id, pad_token_id, device)
        stop = decoding.stop_criterion(stop_strings, tokenizer, self.tokenizers)
        return decoding.generate(
            self,
            input_ids,
            attention_mask,
            max_new_tokens,
            choose,
            eos,
            pad_token_id,
            streamer,
            stop,
            aug_input_ids=aug_input_ids,
            aug_attention_mask=aug_attention_mask,
            aug_visible=aug_visible,
            texts=texts,
        )
