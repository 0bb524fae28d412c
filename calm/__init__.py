"""calm: compose frozen Hugging Face causal LMs with learned cross-attention (CALM).

The package is lazy (PEP 562): `import calm` loads nothing heavy, and each public name imports
its module on first use, so `import calm.config`, `calm.layer_map` or `calm.sandbox` never loads
torch or transformers.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "CALM": "calm.model",
    "CALMConfig": "calm.config",
    "Connection": "calm.config",
    "TokenizerPair": "calm.tokenizers",
    "TrainConfig": "calm.config",
    "TrainResult": "calm.train",
    "default_connections": "calm.layer_map",
    "evaluate": "calm.eval",
    "load_run": "calm.run",
    "train": "calm.train",
}

__all__ = [  # the keys of _EXPORTS (a test checks), spelled out for tools that read __all__
    "CALM",
    "CALMConfig",
    "Connection",
    "TokenizerPair",
    "TrainConfig",
    "TrainResult",
    "default_connections",
    "evaluate",
    "load_run",
    "train",
    "__version__",
]

if TYPE_CHECKING:
    from calm.config import CALMConfig, Connection, TrainConfig
    from calm.eval import evaluate
    from calm.layer_map import default_connections
    from calm.model import CALM
    from calm.run import load_run
    from calm.tokenizers import TokenizerPair
    from calm.train import TrainResult, train


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'calm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    setattr(sys.modules[__name__], name, value)
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """The `calm` module object. Importing a submodule binds it to its package attribute; for
    `calm.train` that would hide the function `calm.train` behind the module `calm/train.py`
    (whichever was imported first would win), so that one attribute keeps the function."""

    def __setattr__(self, name: str, value) -> None:
        if name == "train" and isinstance(value, types.ModuleType):
            value = value.train
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
