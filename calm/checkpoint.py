"""Checkpoint directories on disk: what they hold, written atomically, read back with checks.

A composition directory (`CALM.save_pretrained`) holds `composition.safetensors` (the blocks'
weights) and `calm_config.json` (config, connections, version, and the identity of every base
model); loading it refuses other base models (`base_model_problems`, the one identity check). A
training checkpoint adds the trainer state: `trainer_state.pt` (optimizer, scheduler),
`rng-rank*.pt` and `state.json`. A model that is not a composition (a peft adapter, a Hugging Face
model trained in full) is saved with its own `save_pretrained` instead of the composition files.
A composition directory also gets a README.md model card (`calm.model_card`); loading never reads
it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from calm import __version__, hf
from calm.config import CALMConfig, Connection
from calm.errors import UserError
from calm.model_card import CARD_NAME, MARKER, model_card

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from calm.model import CALM
    from calm.tokenizers import TokenizerPair

WEIGHTS_NAME = "composition.safetensors"
CONFIG_NAME = "calm_config.json"
STATE_NAME = "state.json"  # where a training run stood at the checkpoint (its step, losses, data)
TRAINER_NAME = "trainer_state.pt"  # optimizer and learning-rate scheduler


# --------------------------------------------------------------------------------- atomic files


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory's entries (a rename in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write) -> None:
    """Write `path` through `write(tmp_path)` into a temporary file, fsync it, then rename: a
    crash leaves either the old file or the new one, never a torn one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


def publish(tmp: Path, final: Path) -> None:
    """Put the finished directory `tmp` in place of `final` by renames: a crash leaves the old
    `final` or the new one (or the old one beside it as `.old-<name>`), never a mix."""
    old = final.parent / f".old-{final.name}"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    fsync_dir(final.parent)


def step_directories(root: str | os.PathLike) -> list[Path]:
    """The complete training checkpoints (`step-*` holding a state.json) under `root`, oldest
    first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / STATE_NAME).is_file())


def prune(root: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints under `root`."""
    for old in step_directories(root)[:-keep]:
        shutil.rmtree(old)


# --------------------------------------------------------------------------------- composition


def composition_record(model: CALM) -> dict:
    """What `calm_config.json` holds: config, resolved connections, version, base identities,
    heads per block and trainable parameters (the model card is built from it)."""
    return {
        "calm_version": __version__,
        "config": model.calm_config.to_dict(),
        "connections": [
            {"anchor_layer": c.anchor_layer, "aug_layer": c.aug_layer, "augment": c.augment}
            for c in model.connections
        ],
        "anchor": hf.model_identity(model.anchor),
        "augments": [hf.model_identity(a) for a in model.augments],
        "num_heads": model.blocks[0].num_heads,
        "num_trainable_parameters": model.num_trainable_parameters(),
    }


def write_card(
    directory: Path, record: dict, pair: TokenizerPair | None, training: dict | None
) -> None:
    """README.md, the model card (`calm.model_card`); a README.md that calm did not write (no
    `MARKER` in it) is left as it is."""
    path = directory / CARD_NAME
    if path.is_file() and MARKER.encode() not in path.read_bytes():
        return
    tokenizers = None
    if pair is not None:
        tokenizers = {
            "anchor_vocab_size": pair.anchor.vocab_size,
            "aug_vocab_sizes": [side.vocab_size for side in pair.augs],
        }
    atomic_write_text(path, model_card(record, tokenizers, training))


def save_composition(
    model: CALM, directory: str | os.PathLike, training: dict[str, Any] | None = None
) -> None:
    """The blocks' weights, `calm_config.json` and the model card (README.md, which states
    `training`, a `calm.train` checkpoint's state, when given); each file written atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.blocks.state_dict().items()}
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp))
    record = composition_record(model)
    atomic_write_text(directory / CONFIG_NAME, json.dumps(record, indent=2))
    write_card(directory, record, model.tokenizers, training)


def read_record(directory: str | os.PathLike) -> dict:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"No {CONFIG_NAME} in {directory}; point at a directory written by "
            "CALM.save_pretrained or a checkpoint of `calm train`."
        )
    return json.loads(path.read_text())


def identity_problem(role: str, saved: dict, actual: dict) -> str | None:
    """How the model with identity `actual` differs from the recorded `saved` one (class, config,
    weights; see `hf.model_identity`), or None when they match."""
    for key, what in (
        ("class", "class"),
        ("config_hash", "config"),
        ("weights_fingerprint", "weights"),
    ):
        if saved.get(key) != actual.get(key):
            name = saved.get("name_or_path") or saved.get("class")
            return (
                f"the {role} differs from the one the checkpoint was made with ({name}): its "
                f"{what} do not match (saved {saved.get(key)}, given {actual.get(key)})"
            )
    return None


def base_model_problems(record: dict, anchor: PreTrainedModel, augments) -> list[str]:
    """The one base-model check: how `anchor` and `augments` differ from the base models recorded
    in a composition's `record` (empty when they are the same)."""
    if len(record["augments"]) != len(augments):
        return [
            f"this composition was trained with {len(record['augments'])} augmenting models, "
            f"but {len(augments)} were given"
        ]
    pairs = [("anchor", record["anchor"], anchor)] + [
        (f"augmenting model {i}", saved, aug)
        for i, (saved, aug) in enumerate(zip(record["augments"], augments))
    ]
    problems = (identity_problem(role, saved, hf.model_identity(m)) for role, saved, m in pairs)
    return [p for p in problems if p]


def load_composition_weights(model: CALM, directory: str | os.PathLike) -> None:
    """Copy a saved composition's block weights into `model` (on its device and dtype)."""
    weights = Path(directory) / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"No {WEIGHTS_NAME} in {directory}.")
    device = hf.model_device(model.anchor)
    dtype = getattr(torch, model.calm_config.dtype)
    state = load_file(str(weights))
    model.blocks.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()})


def load_composition(cls, directory, anchor, augments, check_base_models: bool = True) -> CALM:
    """`cls(anchor, augments, saved config)` with the saved weights. On any failure the base
    models get back their requires_grad flags and train/eval modes (`CALM.remove`)."""
    directory = Path(directory)
    record = read_record(directory)
    connections = tuple(Connection(**c) for c in record["connections"])
    config = dataclasses.replace(CALMConfig.from_dict(record["config"]), connections=connections)
    model = cls(anchor, augments, config)
    try:
        problems = (
            base_model_problems(record, model.anchor, model.augments) if check_base_models else []
        )
        if problems:
            raise UserError(
                f"{problems[0][0].upper()}{problems[0][1:]}; pass the original models, or "
                "check_base_models=False to load anyway."
            )
        load_composition_weights(model, directory)
    except BaseException:
        model.remove()
        raise
    return model


# --------------------------------------------------------------------------------- trainer state


def save_rng(directory: Path, rank: int) -> None:
    """This process's random number generators (CPU, and CUDA when present)."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    atomic_write(directory / f"rng-rank{rank}.pt", lambda p: torch.save(rng, p))


def restore_rng(directory: Path, rank: int) -> None:
    path = directory / f"rng-rank{rank}.pt"
    if path.is_file():
        rng = torch.load(path, weights_only=False)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])


def save_trainer_state(directory: Path, optimizer, scheduler, state: dict[str, Any]) -> None:
    """Optimizer and scheduler (`trainer_state.pt`), then `state.json`, which marks the checkpoint
    complete (`step_directories` lists only those that have it)."""
    trainer = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    atomic_write(directory / TRAINER_NAME, lambda p: torch.save(trainer, p))
    atomic_write_text(directory / STATE_NAME, json.dumps(state, indent=2))


def load_trainer_state(directory: Path, optimizer, scheduler) -> dict[str, Any]:
    """Restore the optimizer and scheduler saved in `directory`; returns its state.json."""
    trainer = torch.load(directory / TRAINER_NAME, weights_only=False)
    optimizer.load_state_dict(trainer["optimizer"])
    scheduler.load_state_dict(trainer["scheduler"])
    return read_state(directory)


def read_state(directory: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(directory) / STATE_NAME).read_text())


# --------------------------------------------------------------------------------- other models


def is_peft(model: torch.nn.Module) -> bool:
    return getattr(model, "peft_config", None) is not None


def save_module(model: torch.nn.Module, directory: str | os.PathLike) -> None:
    """A trained model that is not a composition, by its own `save_pretrained`: a peft model
    writes its adapter only; a Hugging Face model all its weights and its config."""
    from transformers.utils import logging

    shown = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()  # no "Writing model shards" bar at every checkpoint
    try:
        model.save_pretrained(directory)
    finally:
        if shown:
            logging.enable_progress_bar()


def load_module(model: torch.nn.Module, directory: str | os.PathLike) -> None:
    """Copy the weights `save_module` wrote in `directory` into `model`, in place."""
    directory = Path(directory)
    if is_peft(model):
        from peft import load_peft_weights, set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_peft_weights(str(directory)))
        if result.unexpected_keys:
            raise UserError(
                f"The adapter in {directory} does not fit this model (e.g. "
                f"{result.unexpected_keys[0]}); build the model with the run's LoraConfig."
            )
        return
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state = {}
    for name in files:
        state.update(load_file(str(directory / name)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    current = model.state_dict()
    loaded = {t.data_ptr() for k, t in current.items() if k in state}
    untied = [k for k in missing if current[k].data_ptr() not in loaded]  # not a tied copy
    if unexpected or untied:
        raise UserError(
            f"The weights in {directory} do not fit this model ({(unexpected or untied)[0]}); "
            "resume with a model of the run's architecture."
        )
