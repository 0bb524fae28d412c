"""One composition block: projection, masked multi-head cross-attention, residual output.

Shapes: B batch, T anchor (query) positions, S augmenting (key) positions, A augmenting width,
D anchor width, H heads, Dh = D // H.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from calm.errors import UserError


class RMSNorm(nn.Module):
    """Root-mean-square normalisation with a learned per-channel scale."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(
    positions: torch.Tensor, head_dim: int, dtype: torch.dtype, theta: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding cos and sin of (B, L) integer positions, each (B, 1, L, Dh // 2): built
    once per call and shared by every block."""
    half = head_dim // 2
    freqs = theta ** (-torch.arange(half, device=positions.device, dtype=torch.float32) / half)
    angles = positions[:, None, :, None].to(torch.float32) * freqs  # (B, 1, L, half)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """(B, H, L, Dh) rotated by the `rope_tables` of its L positions."""
    cos, sin = rope
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    B, L, D = x.shape
    return x.view(B, L, num_heads, D // num_heads).transpose(1, 2)  # (B, H, L, Dh)


def _attend(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """(B, H, T, Dh) queries -> (B, T, D) attention outputs (before the output projection)."""
    B, H, T, Dh = q.shape
    out = F.scaled_dot_product_attention(
        q, keys, values, attn_mask=mask, dropout_p=dropout_p, is_causal=mask is None and T > 1
    )  # (B, H, T, Dh)
    return out.transpose(1, 2).reshape(B, T, H * Dh)


class _KeysValuesMath:
    """The key/value half of the block math, written once for the block and its folded forms:
    each form supplies its maps (`_aug_norm`, `_proj`, `_kv`); this composes them."""

    num_heads: int
    head_dim: int
    rope: bool

    def keys_values(
        self, aug_states: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S, A) augmenting layer outputs -> keys and values, each (B, H, S, Dh).

        rope: the `rope_tables` of the S stream positions, used (and required) when the block
        has rope."""
        x = self._proj(self._aug_norm(aug_states))  # (B, S, D)
        keys, values = self._kv(x, aug_states.shape[:-1])  # (B, H, S, Dh) each
        if self.rope:
            keys = rotate(keys, rope)
        return keys, values


class _BlockMath(_KeysValuesMath):
    """The whole block math, written once: the key/value half, and the query half composed from
    the form's `_query_norm`, `_q`, `_o` and `_dropout_p`."""

    def forward(
        self,
        anchor_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor | None,
        query_valid: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """(B, T, D) anchor states -> (B, T, D) residual.

        mask: (B, 1, T, S) bool, True where query t may attend key s; every row has a True.
            None when nothing is padded and the queries are the last T keys' positions with
            T == S or T == 1: then query t sees keys s <= t (plain causal attention, no mask built).
        query_valid: (B, T, 1), 0 for rows that must get no residual (nothing to attend, padding);
            None when every row gets its residual.
        rope: the `rope_tables` of the queries' T stream positions (for rope).
        """
        q = _heads(self._q(self._query_norm(anchor_states)), self.num_heads)  # (B, H, T, Dh)
        if self.rope:
            q = rotate(q, rope)
        out = self._o(_attend(q, keys, values, mask, self._dropout_p()))
        return out if query_valid is None else out * query_valid


class CrossAttentionBlock(_BlockMath, nn.Module):
    """f_proj (A -> D), then cross-attention: queries from the anchor, keys/values from f_proj.

    The block returns only the residual f_cross(f_proj(H_A), H_B); the caller adds it to H_B.
    With init="zero" the output projection starts at zero, so the residual is exactly zero.
    """

    def __init__(
        self,
        aug_dim: int,
        anchor_dim: int,
        num_heads: int,
        *,
        init: str = "zero",
        norm: bool = True,
        dropout: float = 0.0,
        rope: bool = False,
    ) -> None:
        super().__init__()
        if rope and (anchor_dim // max(num_heads, 1)) % 2:
            raise UserError(
                f"rope needs an even head width, got {anchor_dim} / {num_heads} heads; change "
                "CALMConfig(num_heads=...)."
            )
        if anchor_dim % num_heads:
            raise UserError(
                f"num_heads={num_heads} must divide the anchor width {anchor_dim}; pick a divisor "
                f"of {anchor_dim} in CALMConfig(num_heads=...)."
            )
        self.num_heads = num_heads
        self.head_dim = anchor_dim // num_heads
        self.dropout = dropout
        self.rope = rope
        self.aug_norm = RMSNorm(aug_dim) if norm else nn.Identity()
        self.proj = nn.Linear(aug_dim, anchor_dim)
        self.query_norm = RMSNorm(anchor_dim) if norm else nn.Identity()
        self.q = nn.Linear(anchor_dim, anchor_dim, bias=False)
        self.k = nn.Linear(anchor_dim, anchor_dim, bias=False)
        self.v = nn.Linear(anchor_dim, anchor_dim, bias=False)
        self.o = nn.Linear(anchor_dim, anchor_dim, bias=False)
        if init == "zero":
            nn.init.zeros_(self.o.weight)

    def _aug_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.aug_norm(x)

    def _proj(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)

    def _kv(self, x: torch.Tensor, lead: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        return _heads(self.k(x), self.num_heads), _heads(self.v(x), self.num_heads)

    def _query_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.query_norm(x)

    def _q(self, x: torch.Tensor) -> torch.Tensor:
        return self.q(x)

    def _o(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(x)

    def _dropout_p(self) -> float:
        return self.dropout if self.training else 0.0

    def folded(self) -> FoldedBlock:
        """This block's inference form, from its parameters as they are now (see FoldedBlock)."""
        return FoldedBlock(self)


class _FoldedNorm(_KeysValuesMath):
    """The augmenting norm of folded forms: its scale is folded into `proj_weight`."""

    aug_eps: float | None

    def _aug_norm(self, x: torch.Tensor) -> torch.Tensor:
        if self.aug_eps is None:
            return x
        return F.rms_norm(x, x.shape[-1:], eps=self.aug_eps)


class FoldedBlock(_FoldedNorm, _BlockMath):
    """A block's inference form: the norms' scales folded into the matrices after them, k and v
    in one matrix; no dropout. Fewer small ops per call, which is what a decoding step pays for.
    Build one per use: it copies the parameters' values, and training changes them. Called as
    the block is (`CrossAttentionBlock.forward`).

    Equal to the block up to float rounding: with n(x) = x / rms(x), the block's projection is
    W_p (g * n(x)) + b_p = (W_p diag(g)) n(x) + b_p, and its queries W_q (g' * n(y)) =
    (W_q diag(g')) n(y). f_proj is not folded into k and v: the (2D, D) x (D, A) product would
    cost more per call than it saves per token unless a call decodes many tokens
    (docs/benchmarks.md, "Folded blocks for decoding").
    """

    def __init__(self, block: CrossAttentionBlock) -> None:
        self.num_heads, self.head_dim, self.rope = block.num_heads, block.head_dim, block.rope
        dtype = block.q.weight.dtype
        wide = torch.promote_types(dtype, torch.float32)  # each scale is rounded once
        with torch.no_grad():
            proj, q = block.proj.weight.to(wide), block.q.weight.to(wide)  # (D, A), (D, D)
            self.aug_eps = self.query_eps = None
            if isinstance(block.aug_norm, RMSNorm):
                proj = proj * block.aug_norm.weight.to(wide)  # W_p diag(g): scales columns
                self.aug_eps = block.aug_norm.eps
            if isinstance(block.query_norm, RMSNorm):
                q = q * block.query_norm.weight.to(wide)
                self.query_eps = block.query_norm.eps
            self.proj_weight = proj.to(dtype, copy=True)
            self.proj_bias = block.proj.bias.clone()
            self.kv_weight = torch.cat([block.k.weight, block.v.weight])  # (2D, D)
            self.q_weight = q.to(dtype, copy=True)
            self.o_weight = block.o.weight.clone()
        # blocks with equal shape keys can share a FoldedGroup
        self.shape_key = (
            tuple(self.proj_weight.shape),
            self.num_heads,
            self.rope,
            self.aug_eps,
            dtype,
            self.proj_weight.device,
        )

    __call__ = _BlockMath.forward

    def _proj(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.proj_weight, self.proj_bias)

    def _kv(self, x: torch.Tensor, lead: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        B, S = lead
        kv = F.linear(x, self.kv_weight).view(B, S, 2, self.num_heads, self.head_dim)
        return kv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, S, Dh) each

    def _query_norm(self, x: torch.Tensor) -> torch.Tensor:
        if self.query_eps is None:
            return x
        return F.rms_norm(x, x.shape[-1:], eps=self.query_eps)

    def _q(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.q_weight)

    def _o(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.o_weight)

    def _dropout_p(self) -> float:
        return 0.0


class FoldedGroup(_FoldedNorm):
    """The key/value side of several folded blocks that read states of one shape, batched: one
    stacked norm and two batched matmuls per call for the whole group, instead of those ops once
    per block. Decoding computes every block's keys/values for each new augmenting token, and at
    small widths those calls cost more in per-op overhead than in arithmetic.

    The blocks must share widths, heads, rope and norm (`FoldedBlock.shape_key`); the states
    given to `keys_values` must share a shape (e.g. layers of one augmenting model).
    """

    def __init__(self, blocks: list[FoldedBlock]) -> None:
        if len({b.shape_key for b in blocks}) != 1:
            raise ValueError("FoldedGroup needs blocks of one shape (FoldedBlock.shape_key).")
        first = blocks[0]
        self.num_heads, self.head_dim, self.rope = first.num_heads, first.head_dim, first.rope
        self.aug_eps = first.aug_eps
        self.proj_t = torch.stack([b.proj_weight.t() for b in blocks])  # (G, A, D)
        self.proj_bias = torch.stack([b.proj_bias for b in blocks])[:, None]  # (G, 1, D)
        self.kv_t = torch.stack([b.kv_weight.t() for b in blocks])  # (G, D, 2D)

    def keys_values(
        self, aug_states: list[torch.Tensor], rope: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One (B, S, A) state per block -> each block's keys and values, (B, H, S, Dh) each;
        as each `FoldedBlock.keys_values` up to float rounding (the rope tables broadcast over
        the group)."""
        keys, values = super().keys_values(torch.stack(aug_states), rope)  # (G, B, H, S, Dh)
        return list(zip(keys.unbind(0), values.unbind(0), strict=True))

    def _proj(self, x: torch.Tensor) -> torch.Tensor:
        G, B, S, A = x.shape
        return torch.baddbmm(self.proj_bias, x.reshape(G, B * S, A), self.proj_t)  # (G, BS, D)

    def _kv(self, x: torch.Tensor, lead: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        G, B, S = lead
        kv = torch.bmm(x, self.kv_t).view(G, B, S, 2, self.num_heads, self.head_dim)
        return kv.permute(3, 0, 1, 4, 2, 5).unbind(0)  # (G, B, H, S, Dh) each


def attention_mask(
    key_valid: torch.Tensor,
    query_valid: torch.Tensor,
    query_offset: int | None,
    visible: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The mask shared by every block of one call, built once.

    key_valid: (B, S) bool, real (non-padding) augmenting positions.
    query_valid: (B, T) bool, real anchor positions.
    query_offset: None for encoder mode (every real key visible); otherwise the causal rule of the
        shared stream: query t sits at stream position query_offset + t and sees keys s <= it.
    visible: (B, T) int, or None. When given (models with different tokenizers), it replaces
        query_offset: query t sees the first visible[b, t] real keys of its row, counted in order.
    Returns the (B, 1, T, S) bool mask, with empty rows filled so SDPA never yields NaN, and the
    (B, T, 1) multiplier that zeroes the residual of rows that had nothing to attend.
    """
    B, S = key_valid.shape
    T = query_valid.shape[1]
    mask = key_valid[:, None, None, :].expand(B, 1, T, S)
    if visible is not None:
        rank = key_valid.long().cumsum(-1) - 1  # (B, S): index of each real key among its row's
        mask = mask & (rank[:, None, None, :] < visible[:, None, :, None].to(rank.device))
    elif query_offset is not None:
        q_pos = torch.arange(query_offset, query_offset + T, device=key_valid.device)
        k_pos = torch.arange(S, device=key_valid.device)
        mask = mask & (k_pos[None, :] <= q_pos[:, None])
    has_key = mask.any(-1)  # (B, 1, T)
    rows = (has_key[:, 0] & query_valid)[..., None]  # (B, T, 1)
    mask = mask | ~has_key[..., None]
    return mask, rows


def attention_masks(
    key_masks: list[torch.Tensor],
    query_mask: torch.Tensor,
    past_length: int,
    causal: bool,
    visible: list[torch.Tensor] | None = None,
    padded: bool | None = None,
) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
    """`attention_mask` per augmenting model of one call, for queries at stream positions
    past_length + t; (None, None) for all when nothing is padded and plain causal attention does.

    key_masks[i]: (B, S_i) padding mask of what augmenting model i has read (past included);
    query_mask: (B, P + T) anchor padding mask (past included);
    causal: the shared-stream rule (mode="causal"); otherwise every real key is visible;
    visible[i]: (B, T) how many real keys of augmenting model i each query sees (replaces the
    shared-stream rule; see `calm.tokenizers`);
    padded: whether any of these masks holds a zero, when the caller knows (None: look, one
    host sync per mask).
    """
    device = query_mask.device
    offset = past_length if causal else None
    T = query_mask.shape[1] - past_length
    same_stream = (
        visible is None
        and offset is not None
        and (offset == 0 or T == 1)
        and all(k.shape[1] == offset + T for k in key_masks)
    )
    if same_stream and padded is None:
        padded = not (bool(query_mask.all()) and all(bool(k.all()) for k in key_masks))
    if same_stream and not padded:
        # nothing padded: plain causal attention, no mask to build (see CrossAttentionBlock)
        return [(None, None)] * len(key_masks)
    query_valid = query_mask[:, past_length:].bool()
    if visible is not None:
        return [
            attention_mask(k.to(device).bool(), query_valid, None, v)
            for k, v in zip(key_masks, visible)
        ]
    built: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    out = []
    for key_mask in key_masks:
        if id(key_mask) not in built:  # causal mode: one mask shared by every block
            built[id(key_mask)] = attention_mask(key_mask.to(device).bool(), query_valid, offset)
        out.append(built[id(key_mask)])
    return out
