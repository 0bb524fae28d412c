"""calm: compose frozen Hugging Face causal LMs with learned cross-attention (CALM)."""

__version__ = "0.1.0"
