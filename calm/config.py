"""Frozen, validated configuration of a composition, with a JSON round trip."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

MODES = ("causal", "encoder")
INITS = ("zero", "default")
DTYPES = ("float32", "bfloat16", "float16", "float64")


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
                raise ValueError(f"Connection.{name} must be a non-negative int, got {value!r}.")


@dataclass(frozen=True)
class CALMConfig:
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
                raise ValueError("connections must hold at least one Connection, or be None.")
            object.__setattr__(self, "connections", conns)
        if not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"every must be a positive int, got {self.every!r}.")
        heads = self.num_heads
        if heads is not None and (not isinstance(heads, int) or heads < 1):
            raise ValueError(f"num_heads must be a positive int or None, got {self.num_heads!r}.")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}.")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}.")
        if self.rope and self.mode != "causal":
            raise ValueError("rope needs mode='causal' (encoder prompts have other positions).")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}.")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}.")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if self.connections is not None:
            d["connections"] = [dataclasses.asdict(c) for c in self.connections]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CALMConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"Unknown CALMConfig fields {unknown}; known fields are {sorted(known)}."
            )
        d = dict(d)
        if d.get("connections") is not None:
            d["connections"] = tuple(Connection(**c) for c in d["connections"])
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CALMConfig:
        return cls.from_dict(json.loads(text))
