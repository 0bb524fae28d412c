"""Invariants of the key-value arithmetic generators."""

import random
import re

import pytest

from calm.tasks.kv import VARIANTS, KVScale, KVTask, parse_result, parse_subs


@pytest.fixture(scope="module")
def task():
    return KVTask(KVScale(num_keys=200))


def _numeric(expr: str) -> int:
    """Evaluate a numeric expression (digits reversed) left to right (the task's convention)."""
    tokens = re.findall(r"\d+|[+\-*]", expr)
    acc = int(tokens[0][::-1])
    for op, x in zip(tokens[1::2], tokens[2::2], strict=True):
        x = x[::-1]
        acc = acc + int(x) if op == "+" else acc - int(x) if op == "-" else acc * int(x)
    return acc


def test_values_unique_and_in_range(task):
    values = list(task.kv.values())
    assert sorted(values) == list(range(1, 201))
    assert all(re.fullmatch(r"[a-z]{2,6}", k) for k in task.kv)
    assert len(set(task.kv)) == 200


def test_map_is_seeded(task):
    assert KVTask(KVScale(num_keys=200)).kv == task.kv
    assert KVTask(KVScale(num_keys=200, map_seed=1)).kv != task.kv


def test_split_is_20_percent_and_disjoint(task):
    dc, held = task.split_keys(seed=0)
    assert len(dc) == 40 and len(held) == 160
    assert not set(dc) & set(held)
    assert set(dc) | set(held) == set(task.kv)
    assert task.split_keys(seed=1)[0] != dc
    assert task.split_keys(seed=0)[0] == dc


@pytest.mark.parametrize("variant", VARIANTS)
def test_composition_data_uses_only_dc_keys(task, variant):
    dc, _ = task.split_keys(seed=3)
    data = task.composition_data(variant, 100, dc, seed=3)
    assert len({ex.prompt for ex in data}) == 100
    for ex in data:
        keys = re.findall(r"[a-z]+", ex.prompt)
        assert set(keys) <= set(dc)


def test_formats_and_results_are_exact(task):
    _, held = task.split_keys(seed=0)
    for e in task.sample_expressions(200, held, seed=0):
        subs, num, kvm, both = task.kv_subs(e), task.num_math(e), task.kv_math(e), task.subs_math(e)
        assert subs.prompt == kvm.prompt == both.prompt == task.key_string(e) + "="
        expected_subs = re.sub(
            r"[a-z]+", lambda m: str(task.kv[m.group()]).zfill(3)[::-1], subs.prompt
        )
        assert subs.completion + "=" == expected_subs == num.prompt
        true = _numeric(subs.completion)
        assert num.answer == kvm.answer == both.answer == true >= 0
        assert parse_result(num.completion) == parse_result(both.completion) == true
        assert parse_subs(both.completion) == subs.completion
        chunks = num.completion.split("|")
        assert len(chunks) == len(e.keys) - 1 and all(len(c) == 3 for c in chunks)


def test_random_numeric_expressions_are_correct(task):
    rng = random.Random(0)
    for _ in range(200):
        ex = task.random_numeric_expression(rng)
        assert parse_result(ex.completion) == _numeric(ex.prompt[:-1]) == ex.answer >= 0


def test_parse_result_rejects_non_numbers():
    assert parse_result("012+034=") is None
    assert parse_result("640|1x0") is None
    assert parse_result("640|140") == 41


def test_bad_scale_raises():
    with pytest.raises(ValueError, match="operators must"):
        KVScale(operators="/")
    with pytest.raises(ValueError, match="num_keys"):
        KVScale(num_keys=2)
    with pytest.raises(ValueError, match="variant"):
        KVTask(KVScale(num_keys=20)).composition_data("bogus", 1, ["ab"], seed=0)


def test_fake_expressions_hold_no_key(task):
    s = task.scale
    exprs = task.fake_expressions(500, seed=0)
    assert exprs == task.fake_expressions(500, seed=0)
    assert exprs != task.fake_expressions(500, seed=1)
    for e in exprs:
        assert not set(e.keys) & set(task.kv)
        assert all(re.fullmatch(f"[a-z]{{{s.min_key_len},{s.max_key_len}}}", k) for k in e.keys)
        assert s.min_operands <= len(e.keys) <= s.max_operands
        assert len(e.ops) == len(e.keys) - 1 and set(e.ops) <= set(s.operators)


@pytest.mark.parametrize("variant", [*VARIANTS, "num_math"])
def test_explicit_values_format_like_the_map(task, variant):
    make = getattr(task, variant)
    for e in task.sample_expressions(50, task.keys, seed=4):
        assert make(e, [task.kv[k] for k in e.keys]) == make(e)
    e = task.fake_expressions(1, seed=2)[0]
    values = [130, 45, 7][: len(e.keys)]  # running results >= 0 whatever the operators
    ex = task.subs_math(e, values)
    assert ex.prompt == task.key_string(e) + "="
    assert parse_subs(ex.completion) == task.value_string(e, values)
    assert parse_result(ex.completion) == ex.answer == task.evaluate(values, e.ops)[-1]


def test_kv_is_registered_with_its_three_data_sets():
    from calm.tasks.registry import get_task, list_tasks

    assert "kv" in [t.name for t in list_tasks()]
    assert get_task("kv").name == "kv:kv_math"
    for data_set in ("kv_subs", "num_math", "kv_math"):
        task = get_task(f"kv:{data_set}")
        assert task.name == f"kv:{data_set}" and len(task.examples(0)) == 300
    with pytest.raises(ValueError, match="data set"):
        get_task("kv:subs_math")


def test_held_out_task_draws_over_the_held_out_keys_of_its_split(task):
    from calm.tasks.kv import held_out_task

    dc, held = task.split_keys(seed=2)
    for keys, allowed in (("held_out", held), ("dc", dc)):
        t = held_out_task("kv_math", task.scale, seed=2, size=50, keys=keys)
        for e in t.examples(0):
            assert set(re.findall("[a-z]+", e.prompt)) <= set(allowed)
    longer = held_out_task("kv_subs", task.scale, seed=2, size=60).examples(0)
    assert [e.prompt for e in longer[:50]] == [
        e.prompt for e in held_out_task("kv_subs", task.scale, seed=2, size=50).examples(0)
    ]


def test_held_out_task_scores_substitutions_and_results(task):
    from calm.tasks.kv import held_out_task, max_new_tokens

    subs = held_out_task("kv_subs", task.scale, size=2)
    math = held_out_task("kv_math", task.scale, size=2)
    s_ex, m_ex = subs.examples(0), math.examples(0)
    right = m_ex[1].reference.completion
    off = right[:-1] + str((int(right[-1]) + 1) % 10)  # the result's most significant digit
    metrics, records = math.score(m_ex, [["x=" + m_ex[0].reference.completion], [off]])
    assert metrics == {"accuracy": 50.0}
    assert [r["correct"] for r in records] == [True, False]
    metrics, _ = subs.score(s_ex, [[s_ex[0].reference.completion + "=640|140"], ["000+000-000"]])
    assert metrics == {"accuracy": 50.0}
    longest = max(
        len(task.kv_subs(e).completion) for e in task.sample_expressions(50, task.keys, 0)
    )
    longest += max(
        len(task.num_math(e).completion) for e in task.sample_expressions(50, task.keys, 0)
    )
    assert max_new_tokens(task.scale) == longest + 2
