"""HumanEval: the pass@k estimator, and canonical/empty completions scored in the sandbox."""

from __future__ import annotations

import math

import pytest

from calm.tasks.humaneval import pass_at_k, pass_at_k_metrics


def _data_or_skip():
    from calm.tasks import humaneval

    try:
        return humaneval.make()
    except FileNotFoundError as e:
        pytest.skip(str(e))


def test_pass_at_k_matches_hand_computed_values():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    # 1 - C(7,5)/C(10,5) = 1 - 21/252
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - math.comb(7, 5) / math.comb(10, 5))
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 3, 3) == 1.0  # fewer than k failures: some k-subset always passes
    assert pass_at_k(1, 1, 1) == 1.0


def test_pass_at_k_metrics_average_over_problems_and_skip_large_k():
    metrics = pass_at_k_metrics([[True, False] * 5, [False] * 10])
    assert metrics == {"pass@1": pytest.approx(0.25), "pass@10": pytest.approx(0.5)}
    with pytest.raises(ValueError, match="pass@k needs"):
        pass_at_k(3, 4, 1)


def test_canonical_solutions_score_100_and_empty_completions_score_0():
    task = _data_or_skip()
    examples = task.examples(0)[:6]
    canonical = [[e.reference["canonical_solution"]] for e in examples]
    metrics, records = task.score(examples, canonical)
    assert metrics == {"pass@1": 1.0}, [r["stderr"] for r in records]
    metrics, _ = task.score(examples, [[""] for _ in examples])
    assert metrics == {"pass@1": 0.0}


@pytest.mark.slow
def test_all_164_canonical_solutions_pass():
    task = _data_or_skip()
    examples = task.examples(0)
    assert len(examples) == 164
    metrics, records = task.score(examples, [[e.reference["canonical_solution"]] for e in examples])
    assert metrics["pass@1"] == 1.0, [r["id"] for r in records if r["status"] != ["passed"]]


def test_hostile_completion_is_scored_as_failure_and_the_rest_still_score():
    task = _data_or_skip()
    examples = task.examples(0)[:2]
    hostile = "    import os\n    os._exit(0)\n"
    completions = [[hostile], [examples[1].reference["canonical_solution"]]]
    metrics, records = task.score(examples, completions)
    assert [r["status"] for r in records] == [["failed"], ["passed"]]
    assert metrics["pass@1"] == 0.5
