"""Moved to `calm.recipes.kv.reproduce`; this alias keeps the old import path working."""

from calm.recipes.kv.bases import Bases, load_bases
from calm.recipes.kv.pretrain import BASE_RECIPES, pretrain_bases
from calm.recipes.kv.reproduce import ABLATIONS, ReproduceConfig, run_reproduction

__all__ = [
    "ABLATIONS",
    "BASE_RECIPES",
    "Bases",
    "ReproduceConfig",
    "load_bases",
    "pretrain_bases",
    "run_reproduction",
]
