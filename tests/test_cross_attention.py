"""CrossAttentionBlock: the unmasked fast path equals the explicit causal mask; the folded
inference form equals the block, and a FoldedGroup's batched keys/values equal each block's."""

from __future__ import annotations

import pytest
import torch

from calm.cross_attention import CrossAttentionBlock, FoldedGroup, attention_mask, rope_tables


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


def random_block(norm: bool, rope: bool, seed: int = 0) -> CrossAttentionBlock:
    """A block whose every parameter is random, norm scales and projection bias included (as
    after training; at init they are ones and zeros, which would hide a wrong fold)."""
    torch.manual_seed(seed)
    block = CrossAttentionBlock(12, 16, 4, init="default", norm=norm, rope=rope)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape) * (0.5 if p.dim() == 1 else p.shape[-1] ** -0.5))
    return block


@pytest.mark.parametrize("norm", [True, False], ids=["norm", "no-norm"])
@pytest.mark.parametrize("rope", [True, False], ids=["rope", "no-rope"])
def test_folded_block_equals_block(norm, rope):
    block = random_block(norm, rope)
    folded = block.folded()
    B, S, T = 2, 7, 3
    aug = torch.randn(B, S, 12) * 3
    x = torch.randn(B, T, 16) * 3
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [0, 0, 0, 1, 2, 3, 4]])  # row 1 left-padded
    key_rope = rope_tables(positions, block.head_dim, torch.float32) if rope else None
    query_rope = rope_tables(positions[:, -T:], block.head_dim, torch.float32) if rope else None
    k, v = block.keys_values(aug, key_rope)
    fk, fv = folded.keys_values(aug, key_rope)
    torch.testing.assert_close(fk, k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fv, v, atol=1e-5, rtol=1e-5)
    key_valid = torch.ones(B, S, dtype=torch.bool)
    key_valid[1, :2] = False
    mask, rows = attention_mask(key_valid, torch.ones(B, T, dtype=torch.bool), S - T)
    for args in ((mask, rows), (None, None)):
        torch.testing.assert_close(
            folded(x, k, v, *args, query_rope),
            block(x, k, v, *args, query_rope),
            atol=1e-5,
            rtol=1e-5,
        )
    one = x[:, -1:]  # a decoding step: one query, no mask
    last = None if not rope else tuple(t[:, :, -1:] for t in query_rope)
    torch.testing.assert_close(
        folded(one, k, v, None, None, last),
        block(one, k, v, None, None, last),
        atol=1e-5,
        rtol=1e-5,
    )


def test_folded_block_copies_parameters_as_they_are_now():
    block = random_block(norm=True, rope=False)
    folded = block.folded()
    aug, x = torch.randn(1, 5, 12), torch.randn(1, 5, 16)
    k, v = folded.keys_values(aug)
    before = folded(x, k, v, None, None)
    with torch.no_grad():
        for p in block.parameters():
            p.mul_(2.0)
    assert torch.equal(folded(x, k, v, None, None), before)
    assert torch.equal(folded.keys_values(aug)[0], k)
    fresh = block.folded().keys_values(aug)[0]  # a new fold sees the new parameters
    torch.testing.assert_close(fresh, block.keys_values(aug)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm", [True, False], ids=["norm", "no-norm"])
@pytest.mark.parametrize("rope", [True, False], ids=["rope", "no-rope"])
def test_folded_group_equals_each_block(norm, rope):
    folded = [random_block(norm, rope, seed=s).folded() for s in range(3)]
    group = FoldedGroup(folded)
    B, S = 2, 7
    states = [torch.randn(B, S, 12) * 3 for _ in folded]  # a different layer per block
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [0, 0, 0, 1, 2, 3, 4]])
    tables = rope_tables(positions, folded[0].head_dim, torch.float32) if rope else None
    got = group.keys_values(states, tables)
    assert len(got) == len(folded)
    for block, x, (k, v) in zip(folded, states, got, strict=True):
        want_k, want_v = block.keys_values(x, tables)
        assert k.shape == want_k.shape == (B, 4, S, 4)
        torch.testing.assert_close(k, want_k, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v, want_v, atol=1e-5, rtol=1e-5)


def test_folded_group_refuses_blocks_of_different_shapes():
    other = CrossAttentionBlock(20, 16, 4, init="default").folded()  # another augmenting width
    with pytest.raises(ValueError, match="one shape"):
        FoldedGroup([random_block(True, False).folded(), other])
