"""Moved to tools/hub_offline.py (a development tool, not the library); this alias goes at the end
of issue 14, once tests/test_tokenizers.py imports `tools.hub_offline`."""

from tools.hub_offline import MODELS, available, convert, main, model_dir  # noqa: F401
