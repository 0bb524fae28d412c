"""Real pretrained models in a recipe: loading converted checkpoints, and the baselines built
from a model (LoRA of a matched rank, a full copy, a random twin); sentence-level chrF.

The checkpoints are the GGUF files that `python tools/hub_offline.py model NAME` converts into
`$CALM_CACHE/models/NAME` (default ~/.cache/calm): this module only reads that directory, so a
recipe runs offline and a missing model is one line naming the command that converts it. Shared
by the recipes on real models (code, lrl), which may not import each other.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from calm.errors import UserError
from calm.run import load_model, load_tokenizer
from calm.tasks.sources import model_available, model_dir

LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPES = ("float32", "bfloat16")


def converted(name: str, role: str) -> Path:
    """The converted checkpoint `name` (used as `role`), refused (one line) when it is not
    converted yet."""
    path = model_dir(name)
    if not model_available(name):
        raise UserError(
            f"The {role} model {name} is not converted yet; run `python tools/hub_offline.py "
            f"model {name}` from a calm checkout first."
        )
    return path


def with_pad(tokenizer):
    """The tokenizer, with its EOS as the pad token when it has none (batches need one)."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_placement(device: str, dtype: str) -> None:
    """Refuse (one line) a dtype that is not one of `DTYPES`, or CUDA where torch sees none."""
    if dtype not in DTYPES:
        raise UserError(f"dtype must be one of {DTYPES}, got {dtype!r}.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} needs a CUDA GPU, and torch sees none.")


def load_converted(name: str, path: Path, role: str, device: str, dtype: str):
    """(model, tokenizer, identity) of the converted checkpoint `name` at `path`: the model on
    `device` in `dtype`, frozen, in eval mode; its tokenizer with a pad token; "name (gguf
    sha256 <first 16 hex digits>)", what a row's config holds so that a changed model recomputes
    it."""
    model = load_model(str(path), role).to(device=device, dtype=getattr(torch, dtype))
    tokenizer = with_pad(load_tokenizer(str(path)))
    sha = path / "gguf.sha256"
    checksum = sha.read_text().strip()[:16] if sha.is_file() else "unknown"
    return model.requires_grad_(False).eval(), tokenizer, f"{name} (gguf sha256 {checksum})"


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


def sentence_chrf(samples: list[dict], beta: int = 2) -> list[float]:
    """The sentence-level chrF (0-100; beta 2 is sacrebleu's default chrF, 1 the chrF1) of each
    sample's first completion (stripped) against its reference, so that a paired difference of
    two rows is a mean over examples."""
    from sacrebleu.metrics import CHRF

    chrf = CHRF(beta=beta)
    return [
        chrf.sentence_score(s["completions"][0].strip(), [s["reference"]]).score for s in samples
    ]
