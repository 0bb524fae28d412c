"""Frozen, validated configurations (a composition's and a training run's) with a JSON round trip.

No torch or transformers here: a config is read, checked and written without loading a model.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

from calm.errors import UserError

MODES = ("causal", "encoder")
INITS = ("zero", "default")
DTYPES = ("float32", "bfloat16", "float16", "float64")


class JSONConfig:
    """A frozen dataclass's JSON round trip; `from_dict` refuses fields the class does not have."""

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON values (nested dataclasses as dicts, tuples as lists)."""
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(
                f"Unknown {cls.__name__} fields {unknown}; known fields are {sorted(known)}."
            )
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(json.loads(text))


@dataclass(frozen=True)
class Connection:
    """One composition block: reads the output of augmenting layer `aug_layer` of augmenting model
    number `augment` and adds into the output of anchor layer `anchor_layer`.

    Layer indices are 0-based indices into each model's stack of decoder layers, so the residual
    lands in the input of anchor layer `anchor_layer + 1` (or of the final norm for the last layer).
    """

    anchor_layer: int
    aug_layer: int
    augment: int = 0

    def __post_init__(self) -> None:
        for name in ("anchor_layer", "aug_layer", "augment"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise UserError(f"Connection.{name} must be a non-negative int, got {value!r}.")


@dataclass(frozen=True)
class CALMConfig(JSONConfig):
    """How the anchor and the augmenting models are composed.

    connections: explicit connections, or None for the default rule (see `calm.layer_map`).
    every: the default rule connects every `every`-th augmenting layer (the paper uses 4).
    num_heads: cross-attention heads; None uses the anchor's number of self-attention heads.
    mode: "causal" (the augmenting models read the same tokens; anchor position t sees augmenting
        positions <= t) or "encoder" (the augmenting models read a separate prompt, fully visible).
    init: "zero" starts the output projection at zero, so the composition equals the anchor
        exactly before training; "default" uses PyTorch's default initialisation everywhere.
    norm: RMS-normalise the anchor query states and the augmenting states inside each block.
    dropout: attention dropout inside the blocks while training.
    rope: rotate block queries and keys by their stream positions (rotary embedding, causal mode
        with a shared tokenizer only), so a block can find "the same position" in the augmenting
        stream, which content alone does not reveal; off by default (the paper has none).
    dtype: dtype of the composition parameters (float32 by default, whatever the base models use).
    """

    connections: tuple[Connection, ...] | None = None
    every: int = 4
    num_heads: int | None = None
    mode: str = "causal"
    init: str = "zero"
    norm: bool = True
    dropout: float = 0.0
    rope: bool = False
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.connections is not None:
            conns = tuple(
                c if isinstance(c, Connection) else Connection(**c) for c in self.connections
            )
            if not conns:
                raise UserError("connections must hold at least one Connection, or be None.")
            object.__setattr__(self, "connections", conns)
        if not isinstance(self.every, int) or self.every < 1:
            raise UserError(f"every must be a positive int, got {self.every!r}.")
        heads = self.num_heads
        if heads is not None and (not isinstance(heads, int) or heads < 1):
            raise UserError(f"num_heads must be a positive int or None, got {self.num_heads!r}.")
        if self.mode not in MODES:
            raise UserError(f"mode must be one of {MODES}, got {self.mode!r}.")
        if self.init not in INITS:
            raise UserError(f"init must be one of {INITS}, got {self.init!r}.")
        if self.rope and self.mode != "causal":
            raise UserError("rope needs mode='causal' (encoder prompts have other positions).")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout!r}.")
        if self.dtype not in DTYPES:
            raise UserError(f"dtype must be one of {DTYPES}, got {self.dtype!r}.")


SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("fp32", "bf16")
CACHES = ("none", "memory", "disk")
CACHE_DTYPES = ("float32", "bfloat16", "float16")
TRUNCATION = ("right", "error")
# Fields that only steer one invocation of `calm.train`; they may differ when resuming.
RUN_CONTROL = ("output_dir", "stop_after", "progress", "log_every", "save_every", "keep_last")


@dataclass(frozen=True)
class TrainConfig(JSONConfig):
    """How `calm.train` trains a model. Steps are optimizer steps over the global batch."""

    output_dir: str
    learning_rate: float = 1e-4
    warmup_steps: int = 0
    schedule: str = "cosine"  # decay after warmup: cosine or linear to the floor, or constant
    min_lr_ratio: float = 0.0  # the floor of the decay, as a fraction of learning_rate
    batch_size: int = 8  # global: examples per optimizer step, over processes and micro-steps
    grad_accum: int = 1  # micro-steps per optimizer step (per process)
    max_steps: int | None = None  # stop after this many steps (and/or `epochs`; first reached)
    epochs: float | None = None  # stop after this many passes over the data
    max_length: int | None = 512  # tokens per example; longer ones follow `truncation`
    truncation: str = "right"  # "right": cut and count; "error": refuse the data set
    grad_clip: float | None = 1.0  # max global gradient norm; None disables clipping
    weight_decay: float = 0.0
    seed: int = 0  # data order and dropout
    eval_every: int | None = None  # steps between evaluations (and at the end) if eval data
    save_every: int | None = None  # steps between checkpoints (one is always written at the end)
    log_every: int = 1  # steps between metrics.jsonl records
    keep_last: int = 2  # checkpoints kept besides best/
    precision: str = "fp32"  # "fp32", or "bf16" autocast
    aug_cache: str = "none"  # reuse a composition's augmenting states: "none", "memory", "disk"
    cache_dtype: str = "float32"  # dtype of cached states (bfloat16/float16 halve the memory)
    bucket_by_length: bool = False  # batch examples of similar length together
    gradient_checkpointing: bool = False  # recompute the (anchor's) decoder layers in backward
    max_bad_steps: int = 5  # stop after this many non-finite losses in a row
    stop_after: int | None = None  # checkpoint and return after this step, as if interrupted
    progress: bool = True  # show a progress bar

    def __post_init__(self) -> None:
        if not isinstance(self.output_dir, (str, os.PathLike)) or not str(self.output_dir):
            raise UserError("TrainConfig.output_dir must name a directory.")
        object.__setattr__(self, "output_dir", str(self.output_dir))
        for name in ("learning_rate", "batch_size", "grad_accum", "log_every", "keep_last"):
            self._positive(name)
        for name in ("max_steps", "epochs", "max_length", "eval_every", "save_every"):
            self._positive(name, allow_none=True)
        self._positive("max_bad_steps")
        self._positive("stop_after", allow_none=True)
        self._positive("grad_clip", allow_none=True)
        if self.max_steps is None and self.epochs is None:
            raise UserError("Set TrainConfig.max_steps or TrainConfig.epochs (or both).")
        if self.warmup_steps < 0 or self.weight_decay < 0:
            raise UserError("warmup_steps and weight_decay must be >= 0.")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise UserError(
                f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}."
            )
        for name, allowed in (
            ("schedule", SCHEDULES),
            ("precision", PRECISIONS),
            ("aug_cache", CACHES),
            ("cache_dtype", CACHE_DTYPES),
            ("truncation", TRUNCATION),
        ):
            if getattr(self, name) not in allowed:
                raise UserError(
                    f"TrainConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}."
                )

    def _positive(self, name: str, allow_none: bool = False) -> None:
        v = getattr(self, name)
        if allow_none and v is None:
            return
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
            raise UserError(f"TrainConfig.{name} must be positive, got {v!r}.")
