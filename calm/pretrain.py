"""Moved to `calm.recipes.kv.pretrain` and `.bases`; this alias keeps the old import path."""

from calm.recipes.kv.bases import BASE_MODELS, ModelShape, build_model, build_tokenizer
from calm.recipes.kv.pretrain import PretrainConfig, pretrain

__all__ = [
    "BASE_MODELS",
    "ModelShape",
    "PretrainConfig",
    "build_model",
    "build_tokenizer",
    "pretrain",
]
