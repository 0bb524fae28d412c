"""The only module that knows Hugging Face internals: layer stacks, shapes, caches, identities."""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
from collections.abc import Iterator
from functools import cache

import torch
from torch import nn
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, PreTrainedModel

# Where the decoder-layer stack lives, for the architectures we test. Anything else is found
# generically: the ModuleList whose length is the config's number of hidden layers.
LAYER_PATHS = {
    "LlamaForCausalLM": "model.layers",
    "MistralForCausalLM": "model.layers",
    "Qwen2ForCausalLM": "model.layers",
    "Qwen3ForCausalLM": "model.layers",
    "GemmaForCausalLM": "model.layers",
    "Gemma2ForCausalLM": "model.layers",
    "Gemma3ForCausalLM": "model.layers",
    "Phi3ForCausalLM": "model.layers",
    "GPT2LMHeadModel": "transformer.h",
    "GPTNeoXForCausalLM": "gpt_neox.layers",
    "OPTForCausalLM": "model.decoder.layers",
}

# Config attributes volatile across saves of the same model; left out of its config hash.
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype"}


def check_causal_lm(model: object, role: str) -> None:
    """Raise a clear error unless `model` is a Hugging Face causal LM."""
    if not isinstance(model, PreTrainedModel) or not hasattr(model, "get_output_embeddings"):
        raise TypeError(
            f"The {role} must be a Hugging Face causal LM (a transformers PreTrainedModel such as "
            f"AutoModelForCausalLM.from_pretrained(...)), got {type(model).__name__}."
        )
    if model.get_output_embeddings() is None:
        raise TypeError(
            f"The {role} ({type(model).__name__}) has no language-model head; load it with "
            "AutoModelForCausalLM instead of AutoModel."
        )


def text_config(model: PreTrainedModel):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The model's stack of decoder layers, in order."""
    name = type(model).__name__
    path = LAYER_PATHS.get(name)
    if path is not None:
        return model.get_submodule(path)
    n = getattr(text_config(model), "num_hidden_layers", None)
    candidates = [
        m for m in model.modules() if isinstance(m, nn.ModuleList) and n is not None and len(m) == n
    ]
    if len(candidates) != 1:
        raise TypeError(
            f"Unsupported model {name}: looked for one nn.ModuleList of length "
            f"config.num_hidden_layers={n} (the decoder layers) and found {len(candidates)}; add "
            f"its layer path to calm.hf.LAYER_PATHS."
        )
    return candidates[0]


def backbone(model: PreTrainedModel) -> nn.Module:
    """The decoder without the language-model head (e.g. LlamaModel inside LlamaForCausalLM)."""
    return model.base_model


def hidden_size(model: PreTrainedModel) -> int:
    config = text_config(model)
    for key in ("hidden_size", "n_embd", "d_model"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    raise TypeError(f"Cannot find the hidden size of {type(model).__name__} in its config.")


def num_attention_heads(model: PreTrainedModel) -> int:
    config = text_config(model)
    for key in ("num_attention_heads", "n_head"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    raise TypeError(f"Cannot find the number of attention heads of {type(model).__name__}.")


def vocab_size(model: PreTrainedModel) -> int:
    return model.get_input_embeddings().num_embeddings


def model_device(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


def model_dtype(model: nn.Module) -> torch.dtype:
    return model.get_input_embeddings().weight.dtype


@cache
def _accepted_kwargs(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def accepts(module: nn.Module, kwarg: str) -> bool:
    return kwarg in _accepted_kwargs(type(module))


def cache_kwargs(module: nn.Module, cache) -> dict:
    """Keyword arguments passing `cache` to a forward: `cache=` (transformers >= 5.2x) or the
    older `past_key_values=`; none when `cache` is None."""
    if cache is None:
        return {"use_cache": False}
    key = "cache" if accepts(module, "cache") else "past_key_values"
    return {key: cache, "use_cache": True}


def new_cache(model: PreTrainedModel) -> DynamicCache:
    """A fresh, empty KV cache of the kind the model's own `generate` would use."""
    return DynamicCache(config=model.config)


def position_ids(attention_mask: torch.Tensor, past_length: int = 0) -> torch.Tensor:
    """Positions that skip left padding: the i-th real token gets position i.

    attention_mask covers past and current tokens (B, past + T); returns (B, T).
    """
    pos = attention_mask.long().cumsum(-1) - 1
    pos = pos.clamp(min=0)
    return pos[:, past_length:]


def layer_output(output) -> torch.Tensor:
    """The hidden states (B, T, D) of a decoder layer's output (a tensor or a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def with_layer_output(output, hidden: torch.Tensor):
    """A decoder layer's `output` with its hidden states replaced by `hidden`."""
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def mask_kwargs(
    attention_mask: torch.Tensor | None, past_length: int, padded: bool | None = None
) -> dict:
    """attention_mask and position_ids for a base model's forward; none when nothing is padded
    (or the mask is None: known unpadded), where the model derives the same positions itself and
    skips its per-call mask work. padded: whether the mask holds a zero, when the caller knows
    (None: look, one host sync)."""
    if attention_mask is None:
        return {}
    if padded is None:
        padded = not bool(attention_mask.all())
    if not padded:
        return {}
    return {
        "attention_mask": attention_mask,
        "position_ids": position_ids(attention_mask, past_length),
    }


def model_identity(model: PreTrainedModel, weights: bool = True) -> dict[str, str]:
    """Class, name or path, config hash and a weight fingerprint: tells apart two checkpoints of
    one architecture. The one model-identity hash of the project (checkpoints, the trainer's
    state and `calm.evaluate`'s results all use it); `weights=False` skips the fingerprint.

    The config hash leaves out the keys that change between saves of one model (path, dtype,
    transformers version). The fingerprint hashes a fixed sample of every parameter after rounding
    to bfloat16, so the same checkpoint loaded in float32 or bfloat16 gets the same fingerprint.
    """
    config = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    config_hash = hashlib.sha256(
        json.dumps(config, sort_keys=True, default=str).encode()
    ).hexdigest()[:16]
    identity = {
        "class": type(model).__name__,
        "name_or_path": str(getattr(model.config, "_name_or_path", "") or ""),
        "config_hash": config_hash,
    }
    if not weights:
        return identity
    return identity | {"weights_fingerprint": weights_fingerprint(model)}


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A hash of a fixed sample of every parameter (64 evenly spaced values, rounded to
    bfloat16, with its name): tells apart two states of one architecture, the same weights
    in float32 or bfloat16 alike."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            flat = p.detach().reshape(-1)
            k = min(64, flat.numel())
            idx = torch.arange(k, device=flat.device) * (flat.numel() - 1) // max(k - 1, 1)
            sample = flat[idx].to(torch.bfloat16).float().cpu()
            h.update(name.encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def tiny_llama(
    vocab_size: int,
    hidden_size: int = 32,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_positions: int = 128,
    seed: int | None = None,
    **config_overrides,
) -> LlamaForCausalLM:
    """A small randomly initialised `LlamaForCausalLM` built from a config (no download), in eval
    mode like a loaded model. `kv_heads` defaults to `heads`, `intermediate_size` to twice
    `hidden_size`; token ids are pad 0, bos 1, eos 2 unless `config_overrides` (any other
    `LlamaConfig` field) say otherwise. With `seed`, `torch.manual_seed(seed)` runs first, so the
    same arguments give the same weights.
    """
    config = LlamaConfig(
        **{
            "vocab_size": vocab_size,
            "hidden_size": hidden_size,
            "intermediate_size": intermediate_size or 2 * hidden_size,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads or heads,
            "max_position_embeddings": max_positions,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
        }
        | config_overrides
    )
    if seed is not None:
        torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@contextlib.contextmanager
def checkpointed_layers(model: PreTrainedModel, enabled: bool = True) -> Iterator[None]:
    """Within this context, every decoder layer's own `forward` runs under
    `torch.utils.checkpoint` (recomputed in backward, its activations not kept).

    Only the layer's `forward` is checkpointed, not its `__call__`: forward hooks on the layer
    (a composition's cross-attention residual) run outside the checkpointed region, so the
    recomputation in backward, after the hooks are gone, is the layer alone, exactly as in the
    first pass. `model` is the Hugging Face model that holds the layers (a composition's anchor,
    a peft model's `get_base_model()`).
    """
    if not enabled:
        yield
        return
    from torch.utils.checkpoint import checkpoint

    layers = list(decoder_layers(model))

    def wrap(forward):
        def checkpointed(*args, **kwargs):
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)

        return checkpointed

    own = [layer.__dict__.get("forward") for layer in layers]  # e.g. accelerate's device hooks
    for layer in layers:
        layer.forward = wrap(layer.forward)
    try:
        yield
    finally:
        for layer, forward in zip(layers, own):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward
