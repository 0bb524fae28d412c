"""The pretrained models of the code experiment, by role, and the models built from them.

    mB          the anchor, a general model: Gemma-3-270M (base)
    mA          the augmenting code model: Qwen2.5-Coder-0.5B-Instruct (another tokenizer)
    vanilla_mA  a general model of similar size in mA's place: SmolLM2-135M (its own tokenizer)

They are the GGUF checkpoints that `python tools/hub_offline.py model NAME` converts into
`$CALM_CACHE/models/NAME` (default ~/.cache/calm): this module only reads that directory, so the
recipe runs offline and a missing model is one line naming the command that converts it.
`random_like` builds random_mA (mA's architecture, seeded random weights); `lora_model` the LoRA
row (mB with as many trainable parameters as the composition).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from calm.errors import UserError
from calm.run import load_model, load_tokenizer, make_pair
from calm.tasks.sources import model_available, model_dir

# role -> the name `tools/hub_offline.py model` converts it under
CHECKPOINTS = {"mB": "gemma3-270m", "mA": "qwen2.5-coder-0.5b", "vanilla_mA": "smollm2-135m"}
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPES = ("float32", "bfloat16")


@dataclass
class Models:
    """The three pretrained models (frozen, in eval mode) with their own tokenizers, and what
    identifies each (a row's config holds it, so a changed model recomputes the row)."""

    mB: Any
    mA: Any
    vanilla_mA: Any
    tokenizers: dict[str, Any]  # role -> the model's own tokenizer (with a pad token)
    identity: dict[str, str] = field(default_factory=dict)  # role -> name and checksum

    def pair(self, aug_role: str):
        """The `TokenizerPair` that composes mB with the model of `aug_role` (None when the two
        share a vocabulary, so one token stream serves both)."""
        return make_pair(self.tokenizers["mB"], [self.tokenizers[aug_role]])


def checkpoint_dir(role: str) -> Path:
    """The converted checkpoint of `role`, refused (one line) when it is not converted yet."""
    name = CHECKPOINTS[role]
    path = model_dir(name)
    if not model_available(name):
        raise UserError(
            f"The {role} model {name} is not converted yet; run `python tools/hub_offline.py "
            f"model {name}` from a calm checkout first."
        )
    return path


def _with_pad(tokenizer):
    """The tokenizer, with its EOS as the pad token when it has none (batches need one)."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_models(device: str = "cpu", dtype: str = "float32") -> Models:
    """The converted mB, mA and vanilla mA on `device` in `dtype`, frozen, with their tokenizers."""
    if dtype not in DTYPES:
        raise UserError(f"dtype must be one of {DTYPES}, got {dtype!r}.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} needs a CUDA GPU, and torch sees none.")
    paths = {role: checkpoint_dir(role) for role in CHECKPOINTS}
    models, tokenizers, identity = {}, {}, {}
    for role, path in paths.items():
        model = load_model(str(path), role).to(device=device, dtype=getattr(torch, dtype))
        models[role] = model.requires_grad_(False).eval()
        tokenizers[role] = _with_pad(load_tokenizer(str(path)))
        sha = path / "gguf.sha256"
        checksum = sha.read_text().strip()[:16] if sha.is_file() else "unknown"
        identity[role] = f"{CHECKPOINTS[role]} (gguf sha256 {checksum})"
    return Models(**models, tokenizers=tokenizers, identity=identity)


def random_like(model, seed: int):
    """A model of `model`'s architecture and config with seeded random weights, on its device
    and in its dtype, frozen, in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    fresh = AutoModelForCausalLM.from_config(model.config)
    p = next(model.parameters())
    return fresh.to(device=p.device, dtype=p.dtype).requires_grad_(False).eval()


def lora_rank(model, target: int) -> int:
    """The LoRA rank over `LORA_MODULES` whose trainable parameter count is closest to
    `target` (the count grows by the same amount with each rank)."""
    per_rank = sum(
        m.in_features + m.out_features
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LORA_MODULES
    )
    if per_rank == 0:
        raise UserError(f"The model has no linear layer named one of {LORA_MODULES} for LoRA.")
    return max(1, round(target / per_rank))


def lora_model(model, rank: int):
    """A copy of `model` with LoRA of rank `rank` (alpha = rank) on every `LORA_MODULES` layer."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(LORA_MODULES))
    return get_peft_model(copy.deepcopy(model), config)


def full_copy(model):
    """A copy of `model` whose every parameter trains (the fine-tuning skyline), in float32
    (AdamW on bfloat16 weights would lose most small updates)."""
    return copy.deepcopy(model).float().requires_grad_(True)
