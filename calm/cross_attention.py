"""One composition block: projection, masked multi-head cross-attention, residual output.

Shapes: B batch, T anchor (query) positions, S augmenting (key) positions, A augmenting width,
D anchor width, H heads, Dh = D // H.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square normalisation with a learned per-channel scale."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding: (B, H, L, Dh) rotated by (B, L) integer positions."""
    half = x.shape[-1] // 2
    freqs = theta ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = positions[:, None, :, None].to(torch.float32) * freqs  # (B, 1, L, half)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


class CrossAttentionBlock(nn.Module):
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
            raise ValueError(
                f"rope needs an even head width, got {anchor_dim} / {num_heads} heads; change "
                "CALMConfig(num_heads=...)."
            )
        if anchor_dim % num_heads:
            raise ValueError(
                f"num_heads={num_heads} must divide the anchor width {anchor_dim}; pick a divisor "
                f"of {anchor_dim} in CALMConfig(num_heads=...)."
            )
        self.num_heads = num_heads
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

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        return x.view(B, L, self.num_heads, D // self.num_heads).transpose(1, 2)  # (B, H, L, Dh)

    def keys_values(
        self, aug_states: torch.Tensor, positions: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S, A) augmenting layer outputs -> keys and values, each (B, H, S, Dh).

        positions: (B, S) stream positions, used (and required) when the block has rope."""
        x = self.proj(self.aug_norm(aug_states))  # (B, S, D)
        keys = self._heads(self.k(x))
        if self.rope:
            keys = rotate(keys, positions)
        return keys, self._heads(self.v(x))

    def forward(
        self,
        anchor_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor | None,
        query_valid: torch.Tensor | None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T, D) anchor states -> (B, T, D) residual.

        mask: (B, 1, T, S) bool, True where query t may attend key s; every row has a True.
            None when nothing is padded and the queries are the last T keys' positions with
            T == S or T == 1: then query t sees keys s <= t (plain causal attention, no mask built).
        query_valid: (B, T, 1), 0 for rows that must get no residual (nothing to attend, padding);
            None when every row gets its residual.
        """
        B, T, D = anchor_states.shape
        q = self._heads(self.q(self.query_norm(anchor_states)))  # (B, H, T, Dh)
        if self.rope:
            q = rotate(q, positions)  # positions: (B, T) stream positions of the queries
        out = F.scaled_dot_product_attention(
            q,
            keys,
            values,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=mask is None and T > 1,
        )  # (B, H, T, Dh)
        out = self.o(out.transpose(1, 2).reshape(B, T, D))
        return out if query_valid is None else out * query_valid


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
