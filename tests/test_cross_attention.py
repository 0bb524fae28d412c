"""CrossAttentionBlock: the unmasked fast path (nothing padded) equals the explicit causal mask."""

from __future__ import annotations

import pytest
import torch

from calm.cross_attention import CrossAttentionBlock, attention_mask


@pytest.mark.parametrize("past", [0, 5])
def test_no_mask_path_equals_explicit_mask(past):
    torch.manual_seed(0)
    block = CrossAttentionBlock(12, 16, 4, init="default")
    T = 6 if past == 0 else 1  # the two shapes the fast path is used for
    S = past + T
    x = torch.randn(2, T, 16)
    k, v = block.keys_values(torch.randn(2, S, 12))
    mask, rows = attention_mask(torch.ones(2, S, dtype=torch.bool), torch.ones(2, T).bool(), past)
    torch.testing.assert_close(block(x, k, v, None, None), block(x, k, v, mask, rows))
