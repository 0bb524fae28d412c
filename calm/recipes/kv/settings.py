"""The settings of the key-value base models, apart from their training code: which models there
are, their shape, and how each is pretrained. Plain dataclasses (no torch), so that the command
line builds its options without loading the models' libraries."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from calm.errors import UserError
from calm.tasks.kv import KVScale

BASE_MODELS = ("mA", "mB", "vanilla_mA")


@dataclass(frozen=True)
class ModelShape:
    """The Llama shape of one base model."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    max_positions: int = 64


@dataclass(frozen=True)
class PretrainConfig:
    """How one base model is trained (`model`: which data it sees, see `BASE_MODELS`)."""

    model: str = "mA"
    out_dir: str = "runs/pretrain/mA"
    scale: KVScale = field(default_factory=KVScale)
    shape: ModelShape = field(default_factory=ModelShape)
    max_steps: int = 6000
    batch_size: int = 128
    learning_rate: float = 2e-3
    warmup_steps: int = 200
    weight_decay: float = 0.01
    seed: int = 0
    eval_every: int = 250
    eval_size: int = 300
    save_every: int = 250
    target_accuracy: float = 0.99
    lookup_fraction: float = 0.5
    prefix_fraction: float = 0.0
    threads: int = 1

    def __post_init__(self) -> None:
        if self.model not in BASE_MODELS:
            raise UserError(f"Unknown base model {self.model!r}; choose one of {BASE_MODELS}.")
        if self.max_steps < 1 or self.batch_size < 1:
            raise UserError("max_steps and batch_size must be positive.")

    def to_dict(self) -> dict:
        return asdict(self)


# The recipes of the shipped base models (`calm pretrain kv ...` with these settings).
# The shipped mB took a two-stage path (see its pretrain.json); this is its one-stage equivalent.
BASE_RECIPES = {
    "mA": PretrainConfig(model="mA", max_steps=3000, batch_size=64, target_accuracy=0.96),
    "mB": PretrainConfig(model="mB", max_steps=2500, batch_size=128, prefix_fraction=0.5),
    "vanilla_mA": PretrainConfig(
        model="vanilla_mA", max_steps=3000, batch_size=64, target_accuracy=0.96
    ),
}
