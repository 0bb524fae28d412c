"""`CALM.generate` (calm.decoding) decodes with the blocks' folded forms (`FoldedBlock`): its
tokens equal greedy full recomputation through `forward`, which uses the blocks as they are."""

from __future__ import annotations

import pytest
import torch
from conftest import random_ids, randomize_blocks
from test_model import full_recompute_greedy, left_padded

from calm import CALM, CALMConfig
from calm.cross_attention import FoldedBlock
from calm.decoding import decoding_blocks


@pytest.mark.parametrize("norm", [True, False], ids=["norm", "no-norm"])
@pytest.mark.parametrize("rope", [True, False], ids=["rope", "no-rope"])
@pytest.mark.parametrize("seed", [0, *(pytest.param(s, marks=pytest.mark.slow) for s in (1, 2))])
def test_generate_equals_full_recomputation(pair, norm, rope, seed):
    model = CALM(*pair, CALMConfig(norm=norm, rope=rope))
    randomize_blocks(model, seed=seed)  # norm scales and projection biases away from 1 and 0
    for ids, mask in (left_padded(seed=seed), (random_ids(2, 5, seed), torch.ones(2, 5).long())):
        got = model.generate(
            ids, attention_mask=mask, max_new_tokens=6, eos_token_id=2, pad_token_id=0
        )
        assert torch.equal(got, full_recompute_greedy(model, ids, mask, 6))


def test_generate_folds_the_parameters_of_each_call(pair):
    """Training between two calls changes the blocks; the second call must decode with them."""
    model = CALM(*pair)
    randomize_blocks(model)
    ids, mask = left_padded()
    first = model.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=2)
    opt = torch.optim.SGD(model.trainable_parameters(), lr=3.0)
    model.train()
    for _ in range(3):
        model(ids, attention_mask=mask, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    second = model.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=2)
    assert not torch.equal(first, second)
    assert torch.equal(second, full_recompute_greedy(model, ids, mask, 6))


def test_dropout_while_training_decodes_with_the_blocks(pair):
    """The folded forms have no dropout: while it acts, generate keeps the blocks themselves."""
    model = CALM(*pair, CALMConfig(dropout=0.5))
    model.train()
    assert all(a is b for a, b in zip(decoding_blocks(model), model.blocks, strict=True))
    model.eval()
    assert all(isinstance(b, FoldedBlock) for b in decoding_blocks(model))


def test_decoding_blocks_group_the_connections_of_each_augmenting_model(pair):
    anchor, aug = pair
    model = CALM(anchor, [aug, aug])  # 8 augmenting layers, every 4th: two blocks each
    by_augment = [[j for j, c in enumerate(model.connections) if c.augment == i] for i in (0, 1)]
    assert [len(ids) for ids in by_augment] == [2, 2]
    groups = decoding_blocks(model).groups
    assert sorted(ids for ids, _ in groups) == sorted(by_augment)
    assert all(group is not None for _, group in groups)  # two blocks each: batched
