"""Tiny random Hugging Face causal LMs built from configs: no downloads."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from calm.hf import tiny_llama

VOCAB = 97


def _llama_like(cls, width, layers, vocab, **extra):
    """A model of another family shaped like `tiny_llama`'s (4 heads, 2 key-value heads)."""
    return T.AutoModelForCausalLM.from_config(
        cls(
            vocab_size=vocab,
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            **extra,
        )
    )


def _from_config(config):
    return T.AutoModelForCausalLM.from_config(config)


# family -> build(width, layers, vocab): a random model of that family, built from a config
FAMILIES = {
    "llama": lambda w, n, v: tiny_llama(v, w, n, kv_heads=2),
    "qwen2": lambda w, n, v: _llama_like(T.Qwen2Config, w, n, v),
    "mistral": lambda w, n, v: _llama_like(T.MistralConfig, w, n, v),
    "gemma": lambda w, n, v: _llama_like(T.GemmaConfig, w, n, v, head_dim=w // 4),
    "gemma3": lambda w, n, v: _llama_like(
        T.Gemma3TextConfig, w, n, v, head_dim=w // 4, sliding_window=8
    ),
    "phi3": lambda w, n, v: _llama_like(T.Phi3Config, w, n, v),
    "gpt2": lambda w, n, v: _from_config(
        T.GPT2Config(
            vocab_size=v,
            n_embd=w,
            n_layer=n,
            n_head=4,
            n_positions=128,
            bos_token_id=1,
            eos_token_id=2,
        )
    ),  # fmt: skip
    "gpt_neox": lambda w, n, v: _from_config(
        T.GPTNeoXConfig(
            vocab_size=v,
            hidden_size=w,
            intermediate_size=2 * w,
            num_hidden_layers=n,
            num_attention_heads=4,
            max_position_embeddings=128,
            bos_token_id=1,
            eos_token_id=2,
        )
    ),  # fmt: skip
    "opt": lambda w, n, v: _from_config(
        T.OPTConfig(
            vocab_size=v,
            hidden_size=w,
            ffn_dim=2 * w,
            num_hidden_layers=n,
            num_attention_heads=4,
            word_embed_proj_dim=w,
            max_position_embeddings=128,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    ),  # fmt: skip
}


def tiny_lm(
    family: str = "llama",
    width: int = 32,
    layers: int = 4,
    seed: int = 0,
    dtype=torch.float32,
    vocab: int = VOCAB,
):
    """A randomly initialised causal LM of the given family, in eval mode; `vocab` tokens (another
    tokenizer's vocabulary size where a test tokenizes real text)."""
    torch.manual_seed(seed)
    return FAMILIES[family](width, layers, vocab).to(dtype).eval()


@pytest.fixture
def pair():
    """(anchor, augment): a 4-layer width-32 anchor and an 8-layer width-24 augmenting model."""
    return tiny_lm("llama", 32, 4, seed=0), tiny_lm("llama", 24, 8, seed=1)


def random_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def randomize_blocks(model, seed: int = 0, scale: float = 0.5) -> None:
    """Give every composition parameter a random non-zero value (zero init hides bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.copy_(
                torch.randn(p.shape, generator=g) * scale / max(1, p.shape[-1]) ** 0.5
                + (1.0 if p.dim() == 1 else 0.0)
            )
