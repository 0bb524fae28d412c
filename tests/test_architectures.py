"""One composed pair per supported architecture family: identity, causality, cached decoding."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, random_ids, randomize_blocks, tiny_lm
from test_model import full_recompute_greedy, left_padded

from calm import CALM
from calm.hf import decoder_layers


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_composed_pair(family):
    anchor = tiny_lm(family, 32, 4, seed=0)
    aug = tiny_lm(family, 32, 4, seed=1)
    ids, mask = left_padded()
    expected = anchor(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    model = CALM(anchor, aug)
    assert len(model.connections) == 1  # 4 layers, every 4th
    got = model(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected.logits[real], atol=1e-5, rtol=0)

    randomize_blocks(model)
    x = random_ids(2, 9)
    y = x.clone()
    y[:, 5:] = 7
    torch.testing.assert_close(model(x).logits[:, :5], model(y).logits[:, :5], atol=1e-5, rtol=0)
    assert torch.equal(
        model.generate(ids, attention_mask=mask, max_new_tokens=5, eos_token_id=2, pad_token_id=0),
        full_recompute_greedy(model, ids, mask, 5),
    )


@pytest.mark.parametrize("anchor_family,aug_family", [("gpt2", "llama"), ("qwen2", "opt")])
def test_mixed_families(anchor_family, aug_family):
    model = CALM(tiny_lm(anchor_family, 32, 4), tiny_lm(aug_family, 24, 8, seed=1))
    randomize_blocks(model)
    ids, mask = left_padded()
    assert torch.equal(
        model.generate(ids, attention_mask=mask, max_new_tokens=4, eos_token_id=2, pad_token_id=0),
        full_recompute_greedy(model, ids, mask, 4),
    )


def test_unknown_architecture_names_class():
    model = tiny_lm("llama")
    type_name = "NotARealForCausalLM"
    fake = type(type_name, (type(model),), {})
    model.__class__ = fake
    model.model.layers.append(model.model.layers[0])  # no ModuleList of num_hidden_layers left
    with pytest.raises(TypeError, match=type_name):
        decoder_layers(model)
