"""The pretrained models of the low-resource-language experiment, by role.

    mB          the anchor, a general multilingual model: Gemma-3-270M (base)
    vanilla_mA  the base of mA, untrained on the languages: SmolLM2-135M (its own tokenizer)

mA itself is vanilla_mA trained in full on the low-resource corpus (built once by
`reproduce.py`, then read back from the run's directory by `load_built`). The checkpoints are
those `calm.recipes.pretrained` reads (a missing one is one line naming the command).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from calm.recipes.pretrained import check_placement, converted, load_converted
from calm.run import load_model, make_pair

# role -> the name `tools/hub_offline.py model` converts it under
CHECKPOINTS = {"mB": "gemma3-270m", "vanilla_mA": "smollm2-135m"}


@dataclass
class Models:
    """mB and vanilla mA (frozen, in eval mode) with their own tokenizers, and what identifies
    each (a row's config holds it, so a changed model recomputes the row). mA, random mA and
    vanilla mA share vanilla mA's tokenizer."""

    mB: Any
    vanilla_mA: Any
    tokenizers: dict[str, Any]  # role -> the model's own tokenizer (with a pad token)
    identity: dict[str, str] = field(default_factory=dict)  # role -> name and checksum

    def pair(self):
        """The `TokenizerPair` that composes mB with a model of vanilla mA's tokenizer (None
        when the two share a vocabulary)."""
        return make_pair(self.tokenizers["mB"], [self.tokenizers["vanilla_mA"]])


def load_models(device: str = "cpu", dtype: str = "float32") -> Models:
    """The converted mB and vanilla mA on `device` in `dtype`, frozen, with their tokenizers."""
    check_placement(device, dtype)
    paths = {role: converted(name, role) for role, name in CHECKPOINTS.items()}
    models, tokenizers, identity = {}, {}, {}
    for role, path in paths.items():
        models[role], tokenizers[role], identity[role] = load_converted(
            CHECKPOINTS[role], path, role, device, dtype
        )
    return Models(**models, tokenizers=tokenizers, identity=identity)


def load_built(path: Path, like) -> Any:
    """The built mA saved at `path`, on the device and in the dtype of `like`, frozen."""
    p = next(like.parameters())
    model = load_model(str(path), "built mA")
    return model.to(device=p.device, dtype=p.dtype).requires_grad_(False).eval()


def versions() -> dict[str, str]:
    """The package versions that change what training computes (part of mA's cache key)."""
    import transformers

    import calm

    return {
        "calm": calm.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
