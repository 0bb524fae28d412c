"""CALMConfig validation and JSON round trip; the default layer-mapping rule."""

from __future__ import annotations

import pytest

from calm import CALMConfig, Connection, default_connections


def test_json_round_trip():
    config = CALMConfig(
        connections=(Connection(1, 3), Connection(3, 7, augment=1)),
        every=2,
        num_heads=4,
        mode="encoder",
        init="default",
        norm=False,
        dropout=0.1,
        dtype="bfloat16",
    )
    assert CALMConfig.from_json(CALMConfig(rope=True).to_json()).rope
    assert CALMConfig.from_json(config.to_json()) == config
    assert CALMConfig.from_json(CALMConfig().to_json()) == CALMConfig()


def test_connections_from_dicts():
    config = CALMConfig(connections=[{"anchor_layer": 2, "aug_layer": 5}])
    assert config.connections == (Connection(2, 5, 0),)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"mode": "sideways"}, "mode"),
        ({"init": "ones"}, "init"),
        ({"every": 0}, "every"),
        ({"num_heads": 0}, "num_heads"),
        ({"dropout": 1.5}, "dropout"),
        ({"dtype": "int8"}, "dtype"),
        ({"connections": ()}, "at least one"),
    ],
)
def test_invalid_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CALMConfig(**kwargs)


def test_unknown_field_in_json():
    with pytest.raises(ValueError, match="Unknown CALMConfig fields"):
        CALMConfig.from_dict({"every": 4, "gating": True})


def test_negative_connection():
    with pytest.raises(ValueError, match="anchor_layer"):
        Connection(-1, 0)


@pytest.mark.parametrize(
    "n_aug,n_anchor,every,expected",
    [
        (8, 12, 4, [(5, 3), (11, 7)]),
        (16, 16, 4, [(3, 3), (7, 7), (11, 11), (15, 15)]),
        (24, 28, 4, [(4, 3), (8, 7), (13, 11), (18, 15), (22, 19), (27, 23)]),
        (3, 5, 4, [(4, 2)]),
        (6, 4, 4, [(3, 3)]),
        (8, 2, 2, [(0, 1), (0, 3), (1, 5), (1, 7)]),
    ],
)
def test_default_rule(n_aug, n_anchor, every, expected):
    got = default_connections(n_aug, n_anchor, every)
    assert [(c.anchor_layer, c.aug_layer) for c in got] == expected
    # The rule, literally: aug every*(k+1)-1, anchor round((k+1)*N_B/n)-1.
    n = n_aug // every
    if n:
        assert [(c.anchor_layer, c.aug_layer) for c in got] == [
            (max(0, round((k + 1) * n_anchor / n) - 1), every * (k + 1) - 1) for k in range(n)
        ]
