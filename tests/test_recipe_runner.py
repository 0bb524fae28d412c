"""calm.recipes.runner: rows computed once, resumed from their checkpoints; paired bootstrap."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from conftest import VOCAB, tiny_lm

from calm import CALM, CALMConfig, TrainConfig
from calm.errors import UserError
from calm.recipes.bootstrap import paired_bootstrap, paired_deltas, ratio_bootstrap
from calm.recipes.runner import Row, RowInterrupted, Runner, row_key


def quiet_runner(out, rows, **kw) -> tuple[Runner, list[str]]:
    lines: list[str] = []
    return Runner(out, rows, log=lines.append, **kw), lines


def counting(calls: list[str], metrics: dict | None = None, **extra):
    def run(ctx):
        calls.append(ctx.name)
        return {"metrics": metrics or {"acc": 0.5}, **extra}

    return run


def test_a_finished_row_is_read_back_not_recomputed(tmp_path):
    calls: list[str] = []
    rows = [Row("a", {"lr": 0.1}, counting(calls)), Row("b", {"lr": 0.2}, counting(calls))]
    first = Runner(tmp_path, rows, log=lambda _: None).run()
    assert calls == ["a", "b"]
    record = json.loads((tmp_path / "rows" / "a" / "result.json").read_text())
    assert record["key"] == row_key("a", {"lr": 0.1}) and record["config"] == {"lr": 0.1}
    assert record["calm"]["version"] and record["host"]["cpus"] >= 1
    assert not (tmp_path / "rows" / "a" / "progress.json").exists()

    runner, lines = quiet_runner(tmp_path, rows)
    assert runner.run() == first
    assert calls == ["a", "b"]  # neither function ran again
    assert any("row a: finished earlier" in line for line in lines)


def test_a_changed_config_recomputes_the_row_and_keeps_the_old_result(tmp_path):
    calls: list[str] = []
    old = Row("a", {"lr": 0.1, "steps": 4}, counting(calls, {"acc": 0.1}))
    Runner(tmp_path, [old], log=lambda _: None).run()
    (tmp_path / "rows" / "a" / "train").mkdir()  # stands for its checkpoints

    new = Row("a", {"lr": 0.2, "steps": 4}, counting(calls, {"acc": 0.2}))
    runner, lines = quiet_runner(tmp_path, [new])
    assert runner.run()["a"]["metrics"] == {"acc": 0.2}
    assert calls == ["a", "a"]
    assert any("config changed (lr)" in line for line in lines)
    stale = tmp_path / "stale" / "a" / f"{row_key('a', old.config)}.json"
    assert json.loads(stale.read_text())["metrics"] == {"acc": 0.1}
    assert not (tmp_path / "rows" / "a" / "train").exists()
    # the key is canonical: another order of the same settings is the same row
    assert row_key("a", {"steps": 4, "lr": 0.2}) == row_key("a", {"lr": 0.2, "steps": 4})
    assert row_key("b", new.config) != row_key("a", new.config)


def test_rows_selection_results_shape_and_unknown_rows(tmp_path):
    calls: list[str] = []
    rows = [
        Row("mB", {}, counting(calls, {"acc": 0.4}, rank=8, per_example={"acc": [0, 1]})),
        Row("calm", {}, counting(calls, {"acc": 0.6})),
    ]
    runner, _ = quiet_runner(tmp_path, rows)
    assert list(runner.run(rows=["calm"])) == ["calm"] and calls == ["calm"]
    assert list(runner.results()["rows"]) == ["calm"]
    runner.run()
    assert calls == ["calm", "mB"]
    results = runner.results(config={"seed": 0})
    assert results["config"] == {"seed": 0}
    assert list(results["rows"]) == ["mB", "calm"]  # the runner's order
    mB = results["rows"]["mB"]
    assert set(mB) == {"metrics", "seconds", "rank"}  # per_example stays in result.json
    assert mB["metrics"] == {"acc": 0.4} and isinstance(mB["seconds"], float)
    assert runner.record("mB")["per_example"] == {"acc": [0, 1]}
    with pytest.raises(UserError, match=r"^Unknown rows lora, x; choose from mB, calm\.$"):
        runner.run(rows=["calm", "lora", "x"])
    with pytest.raises(ValueError, match="Two rows"):
        Runner(tmp_path, rows + rows[:1])


def test_bad_results_and_a_second_invocation_are_refused(tmp_path):
    runner, _ = quiet_runner(tmp_path, [Row("a", {}, lambda ctx: {"acc": 1.0})])
    with pytest.raises(TypeError, match="'metrics' dict"):
        runner.run()
    runner, _ = quiet_runner(tmp_path, [Row("a", {}, lambda ctx: {"metrics": {}, "key": 1})])
    with pytest.raises(TypeError, match="keys the runner writes"):
        runner.run()
    with pytest.raises(TypeError, match="JSON values"):
        Runner(tmp_path, [Row("a", {"path": object()}, lambda ctx: {})])

    def nested(ctx):  # another invocation on the same directory while this one runs
        Runner(tmp_path, [Row("b", {}, counting([]))], log=lambda _: None).run()
        return {"metrics": {}}

    runner, _ = quiet_runner(tmp_path, [Row("a", {}, nested)])
    with pytest.raises(UserError, match="in use by another invocation"):
        runner.run()


def test_seconds_accumulate_over_segments_and_are_saved_while_running(tmp_path):
    attempts: list[float] = []

    def run(ctx):
        t0 = time.monotonic()
        time.sleep(0.15)
        saved = json.loads((ctx.directory / "progress.json").read_text())
        assert saved["segments"][-1]["seconds"] > 0.05  # the heartbeat wrote it meanwhile
        attempts.append(time.monotonic() - t0)
        assert ctx.resume == (len(attempts) > 1)
        if len(attempts) < 3:
            raise RuntimeError("the session died")
        return {"metrics": {"acc": 1.0}}

    for _ in range(2):
        runner, lines = quiet_runner(tmp_path, [Row("a", {}, run)], heartbeat=0.02)
        with pytest.raises(RuntimeError, match="the session died"):
            runner.run()
        assert "rerun to resume" in lines[-1]
    record = runner.run()["a"]
    assert len(record["segments"]) == 3
    assert record["seconds"] == pytest.approx(sum(s["seconds"] for s in record["segments"]))
    assert record["seconds"] >= sum(attempts)


# ------------------------------------------------------------------ resuming a training row


def records(n: int = 10) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        length = int(torch.randint(4, 12, (1,), generator=g))
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (length // 2) + ids[length // 2 :]})
    return out


def training_row(
    models: list, steps: list, stop_after: int | None = None, crash_at: int | None = None
):
    """A row that trains a tiny composition through ctx.train, noting the steps it runs in
    `steps`; `stop_after` stops the loop early (a signal would too), `crash_at` raises from
    inside the loop (a killed session)."""

    def run(ctx):
        anchor, aug = tiny_lm("llama", 32, 4, seed=0), tiny_lm("llama", 24, 8, seed=1)
        model = CALM(anchor, aug, CALMConfig(dropout=0.1, init="default"))
        models.append(model)
        config = TrainConfig(
            output_dir="ignored",
            learning_rate=1e-2,
            batch_size=4,
            max_steps=6,
            warmup_steps=2,
            save_every=2,
            stop_after=stop_after,
            progress=False,
        )

        def on_step(step, loss):
            steps.append(step)
            if step == crash_at:
                raise RuntimeError(f"killed at step {step}")

        result = ctx.train(model, records(), config, on_step=on_step)
        return {"metrics": {"loss": result.train_loss}, "step": result.step}

    return run


def test_an_interrupted_row_resumes_from_its_checkpoint_exactly(tmp_path):
    config = {"lr": 1e-2, "steps": 6}
    done: list = []
    row = Row("calm", config, training_row(done, []))
    Runner(tmp_path / "ref", [row], log=lambda _: None).run()

    models: list = []
    out = tmp_path / "split"
    steps: list[list[int]] = [[], [], []]
    with pytest.raises(RowInterrupted, match="row calm stopped at step 2"):
        Runner(out, [Row("calm", config, training_row(models, steps[0], stop_after=2))]).run()
    with pytest.raises(RuntimeError, match="killed at step 5"):  # after the step-4 checkpoint
        Runner(out, [Row("calm", config, training_row(models, steps[1], crash_at=5))]).run()
    runner, lines = quiet_runner(out, [Row("calm", config, training_row(models, steps[2]))])
    record = runner.run()["calm"]

    assert steps == [[1, 2], [3, 4, 5], [5, 6]]  # each segment went on from the last checkpoint

    assert any("resuming (segment 3" in line for line in lines)
    assert record["step"] == 6 and len(record["segments"]) == 3
    reference = json.loads((tmp_path / "ref" / "rows" / "calm" / "result.json").read_text())
    assert record["metrics"] == reference["metrics"]
    for a, b in zip(done[0].trainable_parameters(), models[-1].trainable_parameters()):
        assert torch.equal(a, b)

    def losses(root):
        lines = (root / "rows" / "calm" / "train" / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["loss"]) for r in map(json.loads, lines)]

    assert losses(out) == losses(tmp_path / "ref") and len(losses(out)) == 6


# ------------------------------------------------------------------ paired bootstrap


def test_paired_bootstrap_covers_the_true_difference_and_is_seeded():
    rng = np.random.default_rng(1)
    shared = rng.normal(0, 1, 400)  # what the examples share: large, cancels when paired
    a, b = shared + 0.3 + rng.normal(0, 0.1, 400), shared + rng.normal(0, 0.1, 400)
    got = paired_bootstrap(a, b, seed=0, resamples=2000)
    lo, hi = got["ci95"]
    assert lo < 0.3 < hi and hi - lo < 0.1  # unpaired, the interval would be ~0.28 wide
    assert got["delta"] == pytest.approx(np.mean(a - b)) and got["n"] == 400
    assert paired_bootstrap(a, b, seed=0, resamples=2000) == got
    assert paired_bootstrap(a, b, seed=1, resamples=2000)["ci95"] != got["ci95"]
    assert paired_bootstrap(b, b, resamples=100)["ci95"] == [0.0, 0.0]
    with pytest.raises(ValueError, match="equal, non-zero length"):
        paired_bootstrap([1.0, 2.0], [1.0])


def test_ratio_bootstrap_resamples_examples_jointly():
    rng = np.random.default_rng(2)
    size = rng.integers(50, 5000, 300).astype(float)  # bytes per file, very unequal
    hard = rng.normal(0, 0.3, 300)  # per-file difficulty, shared by both rows
    a_bits = size * (1.1 + hard + rng.normal(0, 0.02, 300))
    b_bits = size * (1.0 + hard + rng.normal(0, 0.02, 300))
    got = ratio_bootstrap(a_bits, size, b_bits, size, seed=0, resamples=2000)
    assert got["delta"] == pytest.approx(a_bits.sum() / size.sum() - b_bits.sum() / size.sum())
    lo, hi = got["ci95"]
    assert lo < 0.1 < hi and hi - lo < 0.02
    assert ratio_bootstrap(a_bits, size, b_bits, size, seed=0, resamples=2000) == got

    deltas = paired_deltas(
        {"bpb": {"num": a_bits, "den": size}, "pass": [1, 1, 0], "only_a": [1]},
        {"bpb": {"num": b_bits, "den": size}, "pass": [0, 1, 0]},
        resamples=500,
    )
    assert set(deltas) == {"bpb", "pass"}
    assert deltas["pass"]["delta"] == pytest.approx(1 / 3)


def test_runner_paired_table(tmp_path):
    def row(name, values):
        return Row(name, {}, lambda ctx: {"metrics": {}, "per_example": {"pass": values}})

    rows = [row("calm", [1, 1, 1, 0]), row("mB", [0, 1, 1, 0]), Row("x", {}, counting([]))]
    runner, _ = quiet_runner(tmp_path, rows)
    runner.run()
    table = runner.paired("calm", resamples=200)
    assert list(table) == ["calm-mB"]  # x has no per-example values
    assert table["calm-mB"]["pass"]["delta"] == 0.25
    assert table == runner.paired("calm", resamples=200)


def test_loss_curve_keeps_a_resumed_steps_last_loss_and_probes_need_trained_rows(tmp_path):
    from calm.recipes.lr_probe import loss_curve, parse_learning_rates, probe_rows

    lines = [
        {"step": 1, "loss": 3.0},
        {"step": 2, "loss": 2.0},
        {"step": 2, "loss": 2.5},  # logged again after a resume from step 1
        {"step": 3, "eval_loss": 1.9},
        {"step": 3, "loss": 1.0},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert loss_curve(tmp_path) == [3.0, 2.5, 1.0]
    assert loss_curve(tmp_path / "missing") == []
    trained = Row("calm", {"lr": 1.0}, lambda ctx: {}, train_only=lambda lr: lambda ctx: {"lr": lr})
    probes = probe_rows([trained], (1e-3, 0.02))
    assert [p.name for p in probes] == ["calm-lr0.001", "calm-lr0.02"]
    assert [p.config["lr"] for p in probes] == [1e-3, 0.02] and probes[1].run(None) == {"lr": 0.02}
    with pytest.raises(UserError, match="Row mB does not train"):
        probe_rows([Row("mB", {}, lambda ctx: {})], (1e-3,))
    assert parse_learning_rates("3e-4, 1e-3") == (3e-4, 1e-3)
    for bad in ("", "x", "-1e-3"):
        with pytest.raises(UserError, match="--lr-probe takes"):
            parse_learning_rates(bad)
