"""The least work the method needs, written with plain torch: the bound CALM is measured against.

Shapes: B batch, T anchor tokens, S augmenting tokens (T with one tokenizer), A augmenting width,
D anchor width, H heads, Dh = D // H, V vocabulary.
Works on Llama-style Hugging Face models (decoder layers called directly, no HF model forward),
Gemma-3's local and global rotary tables included, on unpadded batches.
"""

from __future__ import annotations

import inspect
import time

import torch
import torch.nn.functional as F
from torch import nn

from calm import hf


class Block(nn.Module):
    """One plain projection + q/k/v/o + causal SDPA: the composition block without extras."""

    def __init__(self, aug_dim: int, anchor_dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.proj = nn.Linear(aug_dim, anchor_dim)
        self.q = nn.Linear(anchor_dim, anchor_dim, bias=False)
        self.k = nn.Linear(anchor_dim, anchor_dim, bias=False)
        self.v = nn.Linear(anchor_dim, anchor_dim, bias=False)
        self.o = nn.Linear(anchor_dim, anchor_dim, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        return x.view(B, L, self.num_heads, D // self.num_heads).transpose(1, 2)  # (B, H, L, Dh)

    def forward(
        self,
        h: torch.Tensor,
        aug: torch.Tensor,
        mask: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """mask None: query t sees keys s <= t (one tokenizer); else `visible_mask`'s pair."""
        B, L, D = h.shape
        x = self.proj(aug)  # (B, S, D)
        out = F.scaled_dot_product_attention(
            self._heads(self.q(h)),
            self._heads(self.k(x)),
            self._heads(self.v(x)),
            attn_mask=mask,
            is_causal=mask is None,
        )  # (B, H, T, Dh)
        out = self.o(out.transpose(1, 2).reshape(B, L, D))
        return out if rows is None else out * rows


def visible_mask(visible: torch.Tensor, S: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The cross-attention mask of a `TokenizerPair` batch with nothing padded: anchor token t
    sees the first visible[b, t] of the S augmenting tokens. Returns the (B, 1, T, S) bool mask,
    rows with no key filled (SDPA would give NaN), and the (B, T, 1) bool multiplier that zeroes
    those rows' residuals: what `calm.cross_attention.attention_mask` computes."""
    rank = torch.arange(S, device=visible.device)  # nothing padded: key s is the s-th real one
    mask = rank[None, None, None, :] < visible[:, None, :, None]  # (B, 1, T, S)
    has_key = mask.any(-1)  # (B, 1, T)
    return mask | ~has_key[..., None], has_key[:, 0, :, None]


def rotary_tables(model, x: torch.Tensor, positions: torch.Tensor) -> list:
    """The rotary (cos, sin) each decoder layer of `model` reads: one table for every layer, or
    one per layer type where the rotary embedding takes the type (Gemma-3: local and global)."""
    rotary = model.model.rotary_emb
    n = len(hf.decoder_layers(model))
    types = getattr(model.config, "layer_types", None)
    if types and "layer_type" in inspect.signature(rotary.forward).parameters:
        tables = {t: rotary(x, positions, t) for t in set(types)}
        return [tables[t] for t in types[:n]]
    return [rotary(x, positions)] * n


class ReferenceStep:
    """One training step of the composition: augmenting layers up to the deepest connected one
    under no_grad (no LM head), anchor layers with the blocks' residuals, loss, backward that
    stops at the first connection (nothing below it needs a gradient), AdamW on the blocks.

    With two tokenizers (a `TokenizerPair` batch), the augmenting model reads its own ids and
    the blocks attend through the batch's `aug_visible` (`visible_mask`). Nothing may be padded,
    and no sequence may be longer than a sliding-window layer's window (the layers run plain
    causal attention, with no mask)."""

    def __init__(self, anchor, aug, connections, blocks: nn.ModuleList, lr: float = 1e-4):
        self.anchor, self.aug = anchor, aug
        self.connections = connections  # Connection(anchor_layer, aug_layer), one per block
        self.blocks = blocks
        self.aug_layers = hf.decoder_layers(aug)[: max(c.aug_layer for c in connections) + 1]
        self.anchor_layers = hf.decoder_layers(anchor)
        self.needed = {c.aug_layer for c in connections}
        self.first = min(c.anchor_layer for c in connections)
        self.opt = torch.optim.AdamW(blocks.parameters(), lr=lr)

    @staticmethod
    def _embed(model, ids: torch.Tensor):
        """(B, L, width) embeddings and each decoder layer's rotary tables."""
        window = getattr(model.config, "sliding_window", None)
        if window and "sliding_attention" in (getattr(model.config, "layer_types", None) or ()):
            if ids.shape[1] > window:
                raise ValueError(f"{ids.shape[1]} tokens exceed the sliding window {window}.")
        x = model.model.embed_tokens(ids)  # (B, L, width)
        pos = torch.arange(ids.shape[1], device=ids.device)[None]
        return x, rotary_tables(model, x, pos)

    def loss(
        self,
        ids: torch.Tensor,
        aug_ids: torch.Tensor | None = None,
        visible: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """ids (B, T); aug_ids (B, S): the augmenting model's own ids (None: it reads ids);
        visible (B, T): how many of them each anchor token sees (a pair batch's aug_visible)."""
        aug_ids = ids if aug_ids is None else aug_ids
        mask, rows = (None, None) if visible is None else visible_mask(visible, aug_ids.shape[1])
        with torch.no_grad():
            x, ropes = self._embed(self.aug, aug_ids)
            states = {}
            for i, (layer, rope) in enumerate(zip(self.aug_layers, ropes)):
                x = layer(x, position_embeddings=rope)  # attention_mask=None: causal SDPA
                if i in self.needed:
                    states[i] = x  # (B, S, A)
            h, ropes = self._embed(self.anchor, ids)
        for i, (layer, rope) in enumerate(zip(self.anchor_layers, ropes)):
            with torch.set_grad_enabled(i > self.first):
                h = layer(h, position_embeddings=rope)  # (B, T, D)
            for c, block in zip(self.connections, self.blocks):
                if c.anchor_layer == i:
                    h = h + block(h, states[c.aug_layer], mask, rows)
        logits = self.anchor.lm_head(self.anchor.model.norm(h))  # (B, T, V)
        cap = getattr(self.anchor.config, "final_logit_softcapping", None)
        if cap is not None:  # Gemma-2/3 configs may set it (Gemma-3-270M does not)
            logits = torch.tanh(logits / cap) * cap
        # the loss in float32, as Hugging Face's causal LMs compute it (a no-op in float32)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())

    def __call__(
        self,
        ids: torch.Tensor,
        aug_ids: torch.Tensor | None = None,
        visible: torch.Tensor | None = None,
    ) -> float:
        loss = self.loss(ids, aug_ids, visible)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


def blocks_like(model) -> nn.ModuleList:
    """Reference blocks holding the same weights as a CALM built with CALMConfig(norm=False)."""
    out = nn.ModuleList()
    for block in model.blocks:
        ref = Block(block.proj.in_features, block.proj.out_features, block.num_heads)
        ref.load_state_dict(block.state_dict())
        out.append(ref)
    return out


def greedy_cached(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """A model alone: greedy decoding with its own KV cache and the last position's logits only."""
    return torch.cat([ids, *greedy_steps(model, ids, new_tokens)], 1)


def greedy_steps(model, ids: torch.Tensor, new_tokens: int):
    """Greedy decoding with the model's own KV cache, one step at a time: a generator that yields
    each new token, (B, 1)."""
    cache = hf.new_cache(model)
    step = ids
    for _ in range(new_tokens):
        with torch.no_grad():
            kwargs = hf.cache_kwargs(model, cache)
            logits = model(input_ids=step, logits_to_keep=1, **kwargs).logits
        step = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        yield step


@torch.no_grad()
def alternated_greedy(
    anchor,
    aug,
    ids: torch.Tensor,
    max_new_tokens: int,
    eos_token_id=None,
    streamer=None,
    aug_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The two models' cached calls alternated token by token in one loop, the augmenting
    model's output unused: a composition whose blocks cost nothing. Called like
    `CALM.generate` (greedy, no end token), so `Lockstep` can time it in CALM's place.

    aug_ids (B, S): the augmenting model's own prompt (another tokenizer); it then reads its own
    greedy tokens, since the anchor's are not in its vocabulary (None: it reads the anchor's)."""
    anchor_cache, aug_cache = hf.new_cache(anchor), hf.new_cache(aug)
    step = ids
    aug_step = aug_ids
    out = [ids]
    for _ in range(max_new_tokens):
        kwargs = hf.cache_kwargs(aug, aug_cache)
        logits = aug(input_ids=step if aug_ids is None else aug_step, logits_to_keep=1, **kwargs)
        if aug_ids is not None:
            aug_step = logits.logits[:, -1].argmax(-1)[:, None]
        kwargs = hf.cache_kwargs(anchor, anchor_cache)
        step = anchor(input_ids=step, logits_to_keep=1, **kwargs).logits[:, -1].argmax(-1)[:, None]
        out.append(step)
        if streamer is not None:
            streamer.put(step[:, 0])
    return torch.cat(out, 1)


class Lockstep:
    """Generation timed token by token against the bound: a streamer for `CALM.generate` that,
    after each token CALM makes, advances each model's own greedy loop (`greedy_steps`) by one
    token. `times[name]` lists seconds per token: "calm" is the time between two `put`s (the
    first counts from `start()`), the others the time of their own step.

    Each token's three measurements lie within milliseconds of each other, so the machine's slow
    phases (on the 2-core VM here a decode loop's speed drifts by up to 2x over about a second)
    hit all three alike. But each model's loop then runs alternated with other models, not
    alone, and loses what running alone gains (on mid, ~10% a token): this compares CALM with
    the two models alternated, not with the bound of each alone.

    With `chunk` > 1 (`benchmarks/alternation.py`) the loops advance `chunk` tokens after every
    `chunk`-th token (and the rest after the `n`-th), one entry in `times` per advance.
    """

    def __init__(
        self, loops: dict, chunk: int = 1, n: int | None = None, sync=lambda: None
    ) -> None:
        self.loops = loops  # name -> greedy_steps(...) generator
        self.chunk, self.n = chunk, n
        self.sync = sync  # waits for an accelerator before each clock reading
        self.times: dict[str, list[float]] = {"calm": [], **{name: [] for name in loops}}
        self._made = self._advanced = 0
        self._mark = 0.0

    def start(self) -> None:
        self.sync()
        self._mark = time.perf_counter()

    def put(self, tokens) -> None:
        self.sync()
        now = time.perf_counter()
        self.times["calm"].append(now - self._mark)
        self._made += 1
        if self._made % self.chunk == 0 or self._made == self.n:
            steps = self._made - self._advanced
            for name, loop in self.loops.items():
                begin = time.perf_counter()
                for _ in range(steps):
                    next(loop)
                self.sync()
                self.times[name].append(time.perf_counter() - begin)
            self._advanced = self._made
        self._mark = time.perf_counter()

    def end(self) -> None:
        pass


@torch.no_grad()
def greedy_recompute(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """CALM greedy decoding with no cache at all: the whole sequence re-run every step."""
    for _ in range(new_tokens):
        token = model(ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, token], 1)
    return ids
