"""Bad input gets a clear ValueError/TypeError that says what is wrong and how to fix it."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from conftest import random_ids, tiny_lm

from calm import CALM, CALMConfig, Connection


def test_not_a_causal_lm(pair):
    anchor, aug = pair
    with pytest.raises(TypeError, match="anchor must be a Hugging Face causal LM"):
        CALM(torch.nn.Linear(2, 2), aug)
    backbone_only = T.AutoModel.from_config(anchor.config)
    with pytest.raises(TypeError, match="AutoModelForCausalLM"):
        CALM(anchor, backbone_only)
    with pytest.raises(ValueError, match="at least one augmenting model"):
        CALM(anchor, [])


def test_causal_mode_needs_shared_vocabulary(pair):
    anchor, _ = pair
    config = T.LlamaConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
    )
    other_vocab = T.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="vocabulary"):
        CALM(anchor, other_vocab)
    CALM(anchor, other_vocab, CALMConfig(mode="encoder"))  # fine: separate prompt


@pytest.mark.parametrize(
    "connection,match",
    [
        (Connection(4, 0), "anchor_layer must be < 4"),
        (Connection(0, 8), "aug_layer must be < 8"),
        (Connection(0, 0, augment=1), "names augmenting model 1"),
    ],
)
def test_connection_out_of_range(pair, connection, match):
    with pytest.raises(ValueError, match=match):
        CALM(*pair, CALMConfig(connections=(connection,)))


def test_duplicate_connection(pair):
    with pytest.raises(ValueError, match="appears twice"):
        CALM(*pair, CALMConfig(connections=(Connection(1, 2), Connection(1, 2))))


def test_num_heads_must_divide_width(pair):
    with pytest.raises(ValueError, match="num_heads=5 does not divide the anchor width 32"):
        CALM(*pair, CALMConfig(num_heads=5))


def test_wrong_device(pair):
    model = CALM(*pair)
    with pytest.raises(ValueError, match="is on meta but the model that reads it is on cpu"):
        model(random_ids(1, 4).to("meta"))
    with pytest.raises(ValueError, match="is on meta"):
        model.generate(random_ids(1, 4).to("meta"), max_new_tokens=1)


def test_ids_must_be_2d(pair):
    model = CALM(*pair)
    with pytest.raises(TypeError, match="2-D tensor"):
        model(random_ids(1, 4)[0])


def test_bad_sampling_arguments(pair):
    model = CALM(*pair)
    ids = random_ids(1, 3)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(ids, do_sample=True, temperature=0.0, max_new_tokens=1)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(ids, do_sample=True, top_p=1.5, max_new_tokens=1)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(ids, do_sample=True, top_k=0, max_new_tokens=1)


def test_encoder_prompt_count(pair):
    anchor, aug = pair
    model = CALM(anchor, [aug, tiny_lm("llama", 16, 4, seed=2)], CALMConfig(mode="encoder"))
    ids = random_ids(1, 3)
    with pytest.raises(ValueError, match="3 aug_input_ids tensors for 2 augmenting models"):
        model(ids, aug_input_ids=[ids, ids, ids])


def test_config_type(pair):
    with pytest.raises(TypeError, match="calm.CALMConfig"):
        CALM(*pair, {"every": 4})
