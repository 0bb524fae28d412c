"""Pure functions that decide which anchor layer meets which augmenting layer."""

from __future__ import annotations

from calm.config import Connection


def default_connections(
    num_aug_layers: int, num_anchor_layers: int, every: int = 4, augment: int = 0
) -> tuple[Connection, ...]:
    """The paper's rule: every `every`-th augmenting layer, the same number of anchor layers.

    With N_A augmenting and N_B anchor layers (0-based indices), n = N_A // every connections:
    augmenting layer `every * (k + 1) - 1` feeds anchor layer `round((k + 1) * N_B / n) - 1`,
    for k = 0 .. n - 1 (Python's `round`). If N_A < every, one connection joins the last layer
    of each model. When n exceeds N_B, several augmenting layers share an anchor layer (their
    residuals add up) and anchor indices are clamped at 0.
    Example: N_A = 8, N_B = 12, every = 4 -> (5, 3), (11, 7) as (anchor, aug).
    """
    if num_aug_layers < 1 or num_anchor_layers < 1:
        raise ValueError("Both models need at least one decoder layer.")
    if every < 1:
        raise ValueError(f"every must be a positive int, got {every!r}.")
    n = num_aug_layers // every
    if n == 0:
        return (Connection(num_anchor_layers - 1, num_aug_layers - 1, augment),)
    return tuple(
        Connection(max(0, round((k + 1) * num_anchor_layers / n) - 1), every * (k + 1) - 1, augment)
        for k in range(n)
    )
