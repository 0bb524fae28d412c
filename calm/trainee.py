"""What `calm.train` trains: the kinds of model it takes, and how each is fed, saved and checked.

A composition (`calm.CALM`) trains its blocks and is saved as a composition; any other model with
`save_pretrained` and a config (a peft model: its adapters; a Hugging Face model trained in full)
trains the parameters that have requires_grad and is saved by its own `save_pretrained`. Under
FSDP2 (a composition only) every process holds a shard of each weight: a checkpoint gathers the
blocks and their optimizer state in full and is written as one process writes it; resuming cuts
the optimizer state into shards again.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from safetensors.torch import save_file

from calm import hf
from calm.checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    atomic_write,
    atomic_write_text,
    base_model_problems,
    composition_record,
    identity_problem,
    is_peft,
    load_composition_weights,
    load_module,
    read_record,
    save_composition,
    save_module,
    write_card,
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
        self.record: dict | None = None  # a sharded composition's (`prepare`)

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

    def save(self, directory: Path, state: dict[str, Any] | None = None) -> None:
        """Write the model into `directory`: a composition with its model card, which states
        `state` (where the run stands: step, losses, data) when given; another model by its own
        `save_pretrained` (a peft model writes its own card)."""
        if self.calm is not None:
            save_composition(self.calm, directory, training=state)
        else:
            save_module(self.model, directory)

    def prepare(self, acc, optimizer: torch.optim.Optimizer, sharded: bool):
        """The model and the (torch) optimizer wrapped by accelerate for the processes: DDP, or
        `sharded` FSDP2, which replaces every weight by its shard (`params` and the optimizer
        then hold the shards)."""
        if sharded:
            if self.calm is None:
                name = type(self.model).__name__
                raise UserError(
                    f"Under FSDP calm.train shards a calm.CALM only, not a {name}; train it "
                    "with DDP (accelerate launch --multi_gpu)."
                )
            # what a checkpoint records of the frozen base models, taken while they are whole
            self.record = composition_record(self.calm)
        model, prepared = acc.prepare(self.model, optimizer)
        optimizer = prepared.optimizer
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        if sharded:
            optimizer.register_load_state_dict_pre_hook(to_shards)
        return model, optimizer

    def gather(self, optimizer: torch.optim.Optimizer | None = None):
        """What a checkpoint saves: (None, `optimizer`); sharded, the blocks' full weights and a
        stand-in for `optimizer` whose state_dict is its state in full, on the CPU. Sharded, it
        all-gathers (the blocks and their optimizer state, never the frozen base models): every
        process must call it."""
        if self.record is None:
            return None, optimizer
        weights = gathered(self.calm.blocks.state_dict())
        if optimizer is not None:
            state = gathered(optimizer.state_dict())
            optimizer = SimpleNamespace(state_dict=lambda: state)
        return weights, optimizer

    def write(self, directory: Path, weights, state: dict[str, Any] | None) -> None:
        """`save`, or for a sharded composition the same files from `weights` (`gather`) and the
        base models' record taken before sharding (`prepare`)."""
        if weights is None:
            self.save(directory, state)
            return
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(weights, tmp))
        atomic_write_text(directory / CONFIG_NAME, json.dumps(self.record, indent=2))
        write_card(directory, self.record, self.calm.tokenizers, state)

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


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a sharded (DTensor) tensor; any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def gathered(state):
    """A state dict (nested dicts and lists) with every shard (DTensor) replaced by the full
    tensor on the CPU: an all-gather, so every process must call it, in the same order."""
    from torch.distributed.tensor import DTensor

    if isinstance(state, dict):
        return {k: gathered(v) for k, v in state.items()}
    if isinstance(state, list):
        return [gathered(v) for v in state]
    return state.full_tensor().cpu() if isinstance(state, DTensor) else state


def to_shards(optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
    """Load-state pre-hook of a sharded optimizer: the full tensors a checkpoint holds (saved by
    `gathered`, as one process saves them), cut to this process's shards of its parameters."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, values in state_dict["state"].items():
        p = params[i]
        if isinstance(p, DTensor):
            state_dict["state"][i] = {
                k: distribute_tensor(
                    v.to(p.device), p.device_mesh, p.placements, src_data_rank=None
                )
                if torch.is_tensor(v) and v.shape == p.shape
                else v
                for k, v in values.items()
            }
    return state_dict


def sharded(acc, aug_cache: str) -> bool:
    """Whether accelerate shards the model (FSDP2). Refuses what calm cannot train sharded and
    launches whose processes would each train alone; says so when an FSDP config runs as DDP."""
    from accelerate.utils import DistributedType

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != acc.num_processes:
        raise UserError(
            f"{launched} processes were launched, but accelerate joins {acc.num_processes}, so "
            "each would train alone (it found no GPU for them); on CPU, pass --cpu to "
            "accelerate launch."
        )
    fsdp = acc.distributed_type == DistributedType.FSDP
    asked = os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    if asked and not fsdp and acc.is_main_process:
        print(
            "calm.train: the accelerate config asks for FSDP, but accelerate shards on "
            f"accelerators only: it runs {acc.distributed_type.value} here, every process "
            "holding the whole model.",
            file=sys.stderr,
        )
    if fsdp and not acc.is_fsdp2:
        raise UserError(
            "calm.train shards with FSDP2 only; set fsdp_version: 2 in the accelerate config."
        )
    if fsdp and aug_cache != "none":
        raise UserError('aug_cache does not work under FSDP yet; use aug_cache="none".')
    return fsdp
