"""Save and load the composition alone, with the identity of the base models it was trained on."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

import calm
from calm import hf
from calm.config import CALMConfig, Connection

if TYPE_CHECKING:
    from calm.model import CALM

WEIGHTS_NAME = "composition.safetensors"
CONFIG_NAME = "calm_config.json"


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
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


def composition_record(model: CALM) -> dict:
    """What `calm_config.json` holds: config, resolved connections, version, base identities."""
    return {
        "calm_version": calm.__version__,
        "config": model.calm_config.to_dict(),
        "connections": [
            {"anchor_layer": c.anchor_layer, "aug_layer": c.aug_layer, "augment": c.augment}
            for c in model.connections
        ],
        "anchor": hf.model_identity(model.anchor),
        "augments": [hf.model_identity(a) for a in model.augments],
        "num_trainable_parameters": model.num_trainable_parameters(),
    }


def save_composition(model: CALM, directory: str | os.PathLike) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.blocks.state_dict().items()}
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp))
    atomic_write_text(directory / CONFIG_NAME, json.dumps(composition_record(model), indent=2))


def read_record(directory: str | os.PathLike) -> dict:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"No {CONFIG_NAME} in {directory}; point at a directory written by "
            "CALM.save_pretrained or a checkpoint of `calm train`."
        )
    return json.loads(path.read_text())


def _identity_mismatch(role: str, saved: dict, actual: dict) -> str | None:
    for key, what in (
        ("class", "class"),
        ("config_hash", "config"),
        ("weights_fingerprint", "weights"),
    ):
        if saved.get(key) != actual.get(key):
            name = saved.get("name_or_path") or saved.get("class")
            return (
                f"The {role} differs from the one this composition was trained on ({name}): "
                f"its {what} do not match (saved {saved.get(key)}, given {actual.get(key)}); "
                "pass the original model, or check_base_models=False to load anyway."
            )
    return None


def load_composition(cls, directory, anchor, augments, check_base_models: bool = True) -> CALM:
    directory = Path(directory)
    record = read_record(directory)
    connections = tuple(Connection(**c) for c in record["connections"])
    config = dataclasses.replace(CALMConfig.from_dict(record["config"]), connections=connections)
    model = cls(anchor, augments, config)
    if check_base_models:
        if len(record["augments"]) != len(model.augments):
            raise ValueError(
                f"This composition was trained with {len(record['augments'])} augmenting models, "
                f"but {len(model.augments)} were given."
            )
        pairs = [("anchor", record["anchor"], model.anchor)] + [
            (f"augmenting model {i}", saved, aug)
            for i, (saved, aug) in enumerate(zip(record["augments"], model.augments))
        ]
        for role, saved, base in pairs:
            problem = _identity_mismatch(role, saved, hf.model_identity(base))
            if problem:
                model.remove()
                raise ValueError(problem)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"No {WEIGHTS_NAME} in {directory}.")
    state = load_file(str(weights))
    device = hf.model_device(model.anchor)
    dtype = getattr(torch, config.dtype)
    model.blocks.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()})
    return model
