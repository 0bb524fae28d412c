"""Paired bootstrap intervals: by how much one row beats another on the same examples.

Two rows scored on the same n examples differ by the mean of their per-example differences; the
95% interval comes from resampling the n examples with replacement (the same draw for both rows,
so what the examples share cancels) and taking the 2.5th and 97.5th percentiles. A ratio metric
(bits per byte: sum of bits over sum of bytes) resamples each example's numerator and denominator
of both rows jointly. Seeded: the same values and seed give the same interval.

    paired_bootstrap(calm_pass, mB_pass, seed=0)   # {"delta": 0.06, "ci95": [0.01, 0.11], "n": 164}
    ratio_bootstrap(calm_bits, calm_bytes, mB_bits, mB_bytes)           # the same, bits per byte
    paired_deltas({"pass1": [...], "bpb": {"num": [...], "den": [...]}}, {...})      # per metric
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

RESAMPLES = 10_000
_CHUNK_VALUES = 1 << 21  # resampled values drawn at once (bounds the memory of one chunk)


def _columns(name: str, *arrays: Sequence[float]) -> np.ndarray:
    """The arrays as the rows of a float64 matrix (k, n), refused unless equally long, not empty."""
    lengths = {len(a) for a in arrays}
    if len(lengths) != 1 or 0 in lengths:
        raise ValueError(
            f"{name} needs per-example values of equal, non-zero length on the same examples, "
            f"got lengths {[len(a) for a in arrays]}."
        )
    return np.asarray([np.asarray(a, dtype=np.float64) for a in arrays])


def _resampled_sums(columns: np.ndarray, seed: int, resamples: int) -> np.ndarray:
    """(resamples, k): the sum of each row of `columns` (k, n) over n examples drawn with
    replacement, the same draw for every row."""
    if resamples < 1:
        raise ValueError(f"resamples must be positive, got {resamples}.")
    k, n = columns.shape
    rng = np.random.default_rng(seed)
    out = np.empty((resamples, k))
    chunk = max(1, _CHUNK_VALUES // n)
    for start in range(0, resamples, chunk):
        m = min(chunk, resamples - start)
        draw = rng.integers(0, n, size=(m, n))  # (m, n) example indices
        out[start : start + m] = columns[:, draw].sum(axis=-1).T
    return out


def _interval(delta: float, stats: np.ndarray, n: int) -> dict:
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return {"delta": float(delta), "ci95": [float(lo), float(hi)], "n": n}


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], seed: int = 0, resamples: int = RESAMPLES
) -> dict:
    """mean(a) - mean(b) over the same examples (a[i] and b[i] score example i) with its 95%
    percentile interval: {"delta", "ci95": [lo, hi], "n"}."""
    columns = _columns("paired_bootstrap", a, b)
    diff = columns[:1] - columns[1:]  # (1, n)
    n = diff.shape[1]
    stats = _resampled_sums(diff, seed, resamples)[:, 0] / n
    return _interval(diff.mean(), stats, n)


def ratio_bootstrap(
    a_num: Sequence[float],
    a_den: Sequence[float],
    b_num: Sequence[float],
    b_den: Sequence[float],
    seed: int = 0,
    resamples: int = RESAMPLES,
) -> dict:
    """sum(a_num)/sum(a_den) - sum(b_num)/sum(b_den) (bits per byte: bits over bytes per example)
    with its 95% interval, each resample drawing examples jointly for all four arrays."""
    columns = _columns("ratio_bootstrap", a_num, a_den, b_num, b_den)
    if (columns[1].sum() <= 0) or (columns[3].sum() <= 0):
        raise ValueError("ratio_bootstrap needs denominators that sum to a positive number.")
    sums = columns.sum(axis=1)
    delta = sums[0] / sums[1] - sums[2] / sums[3]
    s = _resampled_sums(columns, seed, resamples)
    with np.errstate(divide="ignore", invalid="ignore"):  # a resample of zero-size examples
        stats = s[:, 0] / s[:, 1] - s[:, 2] / s[:, 3]
    return _interval(delta, stats[np.isfinite(stats)], columns.shape[1])


def paired_deltas(
    a: Mapping[str, object], b: Mapping[str, object], seed: int = 0, resamples: int = RESAMPLES
) -> dict[str, dict]:
    """Row a minus row b for every metric both hold per example: a list of values (a mean:
    `paired_bootstrap`) or {"num": [...], "den": [...]} (a ratio: `ratio_bootstrap`)."""
    out = {}
    for metric, values in a.items():
        if metric not in b:
            continue
        other = b[metric]
        if isinstance(values, Mapping) != isinstance(other, Mapping):
            raise ValueError(f"Metric {metric!r} is a ratio in one row and a mean in the other.")
        if isinstance(values, Mapping):
            out[metric] = ratio_bootstrap(
                values["num"], values["den"], other["num"], other["den"], seed, resamples
            )
        else:
            out[metric] = paired_bootstrap(values, other, seed, resamples)
    return out
