"""What `calm.train` trains: the kinds of model it takes, and how each is fed, saved and checked.

A composition (`calm.CALM`) trains its blocks and is saved as a composition; any other model with
`save_pretrained` and a config (a peft model: its adapters; a Hugging Face model trained in full)
trains the parameters that have requires_grad and is saved by its own `save_pretrained`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from calm import hf
from calm.checkpoint import (
    base_model_problems,
    identity_problem,
    is_peft,
    load_composition_weights,
    load_module,
    read_record,
    save_composition,
    save_module,
)
from calm.data import AugCache, Encoded
from calm.errors import UserError
from calm.model import CALM


def pad_id(config, tokenizer) -> int:
    """The id that pads a batch: the tokenizer's pad token, else the model config's, else the
    tokenizer's EOS, else 0 (padding is masked out; only its being a valid id matters)."""
    for source in (tokenizer, config):
        pad = getattr(source, "pad_token_id", None) if source is not None else None
        if isinstance(pad, int):
            return pad
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    return eos if isinstance(eos, int) else 0


class Trainee:
    """The model `train` updates, and all that differs between the kinds it takes: which
    parameters train, what its forward reads, how it is saved, restored and checked."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.calm = model if isinstance(model, CALM) else None
        if self.calm is None and not (
            hasattr(model, "save_pretrained") and hasattr(model, "config")
        ):
            raise TypeError(
                "model must be a calm.CALM, a peft model or a transformers PreTrainedModel, got "
                f"{type(model).__name__}."
            )
        if self.calm is not None:
            self.params = self.calm.trainable_parameters()
        else:
            self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise UserError(
                f"The {type(model).__name__} has no parameter with requires_grad=True, so "
                "nothing would train; unfreeze the parameters to train."
            )
        self.given = None if self.calm is not None else hf.model_identity(model)
        self.encoder = self.calm is not None and self.calm.calm_config.mode == "encoder"
        self.pair = self.calm.tokenizers if self.calm is not None else None

    def layers_model(self) -> torch.nn.Module:
        """The Hugging Face model whose decoder layers gradient checkpointing recomputes."""
        if self.calm is not None:
            return self.calm.anchor
        return self.model.get_base_model() if is_peft(self.model) else self.model

    def pad_ids(self, tokenizer) -> tuple[int, tuple[int, ...]]:
        """The anchor's pad id and those of the augmenting rows a batch holds."""
        if self.pair is not None:
            return self.pair.anchor.pad_id, tuple(side.pad_id for side in self.pair.augs)
        config = self.calm.anchor.config if self.calm is not None else self.model.config
        pad = pad_id(config, tokenizer)
        return pad, (pad,) if self.encoder else ()

    def inputs(self, batch: dict) -> dict:
        """The keyword arguments of the model's forward in a collated batch."""
        if self.calm is not None:
            return {k: v for k, v in batch.items() if k != "labels"}
        ids, mask = batch["input_ids"], batch["attention_mask"]
        return {"input_ids": ids, "attention_mask": mask, "use_cache": False}  # no cache to grow

    def save(self, directory: Path) -> None:
        if self.calm is not None:
            save_composition(self.calm, directory)
        else:
            save_module(self.model, directory)

    def identity(self) -> dict[str, Any]:
        """What a checkpoint of another model than a composition records of it (state.json):
        its class and config as given to `train` (`save_pretrained` adds to the config), and
        the fingerprint of its weights now."""
        if self.calm is not None:
            return {}
        weights = hf.model_identity(self.model)["weights_fingerprint"]
        return {"model_identity": {**self.given, "weights_fingerprint": weights}}

    def problems(self, directory: Path, state: dict) -> list[str]:
        """How this model differs from the one `directory` was saved from, seen before loading:
        a composition's base models; another model's class and config."""
        if self.calm is not None:
            return base_model_problems(read_record(directory), self.calm.anchor, self.calm.augments)
        keys = ("class", "config_hash")
        saved, actual = state["model_identity"], self.given
        problem = identity_problem(
            "model", {k: saved[k] for k in keys}, {k: actual[k] for k in keys}
        )
        return [problem] if problem else []

    def load(self, directory: Path, state: dict, force: bool) -> None:
        """Load the checkpoint's weights. A model with frozen parameters (a peft model's base)
        is then checked against the saved identity; refused, it gets its own weights back."""
        if self.calm is not None:
            load_composition_weights(self.calm, directory)
            return
        check = not force and any(not p.requires_grad for p in self.model.parameters())
        before = [p.detach().clone() for p in self.params] if check else []
        load_module(self.model, directory)
        if not check:
            return
        key = "weights_fingerprint"
        saved, actual = state["model_identity"][key], hf.model_identity(self.model)[key]
        problem = identity_problem("model", {key: saved}, {key: actual})
        if problem:
            with torch.no_grad():
                for p, b in zip(self.params, before):
                    p.copy_(b)
            raise UserError(f"Cannot resume from {directory}: {problem}; pass force=True.")

    def aug_cache(
        self, kind: str, dtype: str, data: Encoded, root: Path | None, rank: int
    ) -> AugCache:
        """An `AugCache` of this composition's augmenting states over `data` (on disk under
        `root`, keyed by the data and the augmenting models)."""
        if self.calm is None:
            raise UserError(
                "aug_cache keeps a composition's augmenting states; this model is not a "
                'calm.CALM, so use aug_cache="none".'
            )
        directory = None
        if root is not None:
            identities = [hf.model_identity(a) for a in self.calm.augments]
            key = json.dumps([data.fingerprint(), identities]).encode()
            directory = root / f"{hashlib.sha256(key).hexdigest()[:16]}-rank{rank}"
        return AugCache(kind, dtype, directory)
