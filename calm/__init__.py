"""calm: compose frozen Hugging Face causal LMs with learned cross-attention (CALM)."""

__version__ = "0.1.0"

from calm.config import CALMConfig, Connection  # noqa: E402
from calm.eval import evaluate  # noqa: E402
from calm.layer_map import default_connections  # noqa: E402
from calm.model import CALM  # noqa: E402
from calm.tokenizers import TokenizerPair  # noqa: E402
from calm.train import TrainConfig, TrainResult, train  # noqa: E402

__all__ = [
    "CALM",
    "CALMConfig",
    "Connection",
    "TokenizerPair",
    "TrainConfig",
    "TrainResult",
    "default_connections",
    "evaluate",
    "train",
    "__version__",
]
