"""Progress bars that stay small in logs: a terminal redraws often, a file every few seconds."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm
from tqdm.std import tqdm as plain_tqdm

LOG_INTERVAL = 10.0  # seconds between redraws when the bar writes to a file or pipe


class _LogBar(plain_tqdm):
    """A bar for a file or pipe: redraws at most every `mininterval` seconds, postfix included
    (tqdm's `set_postfix` redraws at once by default, one line per step in a log)."""

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):  # noqa: ARG002
        super().set_postfix(ordered_dict, refresh=False, **kwargs)

    def set_description(self, desc=None, refresh=True):  # noqa: ARG002
        super().set_description(desc, refresh=False)


def _is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def bar(iterable=None, **kwargs):
    """`tqdm(iterable, **kwargs)` on stderr (or `file=`); when that is not a terminal, the bar
    redraws at most every `LOG_INTERVAL` seconds instead of on every update."""
    stream = kwargs.setdefault("file", sys.stderr)
    if _is_terminal(stream):
        return tqdm(iterable, **kwargs)
    kwargs.setdefault("mininterval", LOG_INTERVAL)
    kwargs.setdefault("maxinterval", LOG_INTERVAL)
    kwargs.pop("dynamic_ncols", None)  # a file has no width to follow
    return _LogBar(iterable, **kwargs)
