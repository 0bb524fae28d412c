"""The pretrained models of the code experiment, by role.

    mB          the anchor, a general model: Gemma-3-270M (base)
    mA          the augmenting code model: Qwen2.5-Coder-0.5B-Instruct (another tokenizer)
    vanilla_mA  a general model of similar size in mA's place: SmolLM2-135M (its own tokenizer)

They are the converted GGUF checkpoints that `calm.recipes.pretrained` reads (a missing one is
one line naming the command that converts it); the models built from them (random mA, the LoRA
row, the fine-tuned copy) come from there too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from calm.recipes.pretrained import check_placement, converted, load_converted
from calm.run import make_pair

# role -> the name `tools/hub_offline.py model` converts it under
CHECKPOINTS = {"mB": "gemma3-270m", "mA": "qwen2.5-coder-0.5b", "vanilla_mA": "smollm2-135m"}


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
    return converted(CHECKPOINTS[role], role)


def load_models(device: str = "cpu", dtype: str = "float32") -> Models:
    """The converted mB, mA and vanilla mA on `device` in `dtype`, frozen, with their tokenizers."""
    check_placement(device, dtype)
    paths = {role: checkpoint_dir(role) for role in CHECKPOINTS}
    models, tokenizers, identity = {}, {}, {}
    for role, path in paths.items():
        models[role], tokenizers[role], identity[role] = load_converted(
            CHECKPOINTS[role], path, role, device, dtype
        )
    return Models(**models, tokenizers=tokenizers, identity=identity)
