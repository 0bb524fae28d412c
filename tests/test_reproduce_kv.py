"""End to end at micro scale: pretrain tiny bases, compose, evaluate, write the results."""

import json

import pytest

from calm.recipes.kv.bases import ModelShape, load_bases
from calm.recipes.kv.pretrain import PretrainConfig, pretrain
from calm.recipes.kv.reproduce import ReproduceConfig, lora_model, run_reproduction
from calm.tasks.kv import KVScale

MICRO = KVScale(num_keys=20, max_key_len=3)
TINY = ModelShape(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def bases_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    for name in ("mA", "mB", "vanilla_mA"):
        cfg = PretrainConfig(
            model=name,
            out_dir=str(root / name),
            scale=MICRO,
            shape=TINY,
            max_steps=4,
            batch_size=8,
            eval_every=4,
            eval_size=4,
            save_every=100,
            warmup_steps=1,
        )
        pretrain(cfg, verbose=False)
    return root


@pytest.mark.slow
def test_reproduce_writes_the_results_contract(bases_dir, tmp_path):
    cfg = ReproduceConfig(
        out_dir=str(tmp_path),
        bases_dir=str(bases_dir),
        dc_size=16,
        steps=2,
        batch_size=8,
        eval_size=4,
        ablations=True,
        all_variants=True,
        every=1,
        num_heads=2,
        threads=1,
    )
    run_reproduction(cfg, log=lambda *_: None)
    results = json.loads((tmp_path / "results.json").read_text())
    expected = {"mA", "mB", "calm", "vanilla_mA", "random_mA", "encoder", "lora"}
    expected |= {"calm_kv_subs", "calm_kv_math", "calm_subs_math"}
    assert set(results["rows"]) == expected
    for row in results["rows"].values():
        assert all(0.0 <= row[t] <= 1.0 for t in ("kv_subs", "num_math", "kv_math"))
        assert row["seconds"] >= 0.0
    assert results["variant"] == "subs_math" and results["scale"]["num_keys"] == 20
    assert results["rows"]["lora"]["parameters"] > 0
    assert (tmp_path / "results.md").read_text().startswith("# Key-value arithmetic")
    assert (tmp_path / "results.png").stat().st_size > 0
    for row in expected - {"mA", "mB", "calm"}:  # every trained row went through calm.train
        assert (tmp_path / "train" / row / "metrics.jsonl").is_file()


def test_shipped_models_score_their_golden_numbers():
    """calm.evaluate on the kv task gives the numbers the recipe's own greedy scoring gave
    (seed 0, 300 held-out expressions: mA 287 KV-SUBS, mB 300 NUM-MATH, vanilla mA 1)."""
    from calm.recipes.kv.reproduce import score

    bases = load_bases()
    golden = {"mA": (0.9567, 0.0, 0.0), "mB": (0.0, 1.0, 0.0), "vanilla_mA": (0.0, 0.0033, 0.0)}
    for name, expected in golden.items():
        scores, _ = score(bases.models[name], bases.tokenizer, bases.scale, seed=0, size=300)
        got = tuple(round(scores[t], 4) for t in ("kv_subs", "num_math", "kv_math"))
        assert got == expected, name


def test_unknown_variant_raises():
    with pytest.raises(ValueError, match="D_C variant"):
        ReproduceConfig(variant="kv_mul")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("dropout", 1.0, "dropout"),
        ("dropout", -0.1, "dropout"),
        ("learning_rate", 0.0, "rate"),
    ],
)
def test_bad_training_settings_raise(field, value, message):
    with pytest.raises(ValueError, match=message):
        ReproduceConfig(**{field: value})


@pytest.mark.slow
def test_lora_gets_the_composition_dropout(bases_dir):
    mB = load_bases(bases_dir).models["mB"]
    lora, rank = lora_model(mB, 1000, dropout=0.1)
    drops = [m for n, m in lora.named_modules() if n.endswith("lora_dropout.default")]
    assert rank >= 1 and drops and all(m.p == 0.1 for m in drops)


@pytest.mark.slow
@pytest.mark.parametrize("wiring", [[], ["--connections", "3:3"]])
def test_memorization_probe_reports_both_key_sets(wiring, tmp_path):
    import subprocess
    import sys

    probe = [sys.executable, "-m", "calm.recipes.kv.memorization", "--out", str(tmp_path)]
    out = subprocess.run(
        [*probe, "--steps", "3", "--eval-every", "2", *wiring],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    lines = out.splitlines()
    assert [line.split()[1] for line in lines] == ["2", "3"]  # every 2 steps, and the last
    assert all("held-out KV-SUBS" in line and "D_C-key KV-SUBS" in line for line in lines)


@pytest.mark.parametrize(("field", "value"), [("fake_keys", -0.1), ("fake_keys", 0.75)])
def test_fake_keys_must_leave_room_for_key_examples(field, value):
    with pytest.raises(ValueError, match="fake_keys"):
        ReproduceConfig(**{field: value})


def test_self_labelled_examples_carry_mAs_own_values():
    """Examples over non-keys: the substitution is mA's greedy output, the rest computed on it."""
    import re

    from calm.recipes.kv.data import greedy, self_labelled
    from calm.tasks.kv import KVTask, parse_result, parse_subs

    bases = load_bases()
    task, mA, tok = KVTask(bases.scale), bases.models["mA"], bases.tokenizer
    data = self_labelled(task, mA, tok, "subs_math", 40, seed=0)
    assert len(data) == 40
    written = greedy(mA, tok, [ex.prompt for ex in data], 13)
    for ex, got in zip(data, written, strict=True):
        assert not set(re.findall("[a-z]+", ex.prompt)) & set(task.kv)
        subs = parse_subs(ex.completion)
        assert subs == parse_subs(got)
        values = [int(v[::-1]) for v in re.findall(r"\d+", subs)]
        ops = tuple(re.findall(r"[+\-]", subs))
        assert parse_result(ex.completion) == ex.answer == task.evaluate(values, ops)[-1]


def test_dc_data_with_an_untrained_mA_keeps_the_key_examples(bases_dir):
    """A mA that writes no well-formed values yields few or no fake-key examples, no error."""
    from calm.recipes.kv.data import dc_data
    from calm.tasks.kv import KVTask

    bases = load_bases(bases_dir)
    task = KVTask(bases.scale)
    dc_keys, _ = task.split_keys(0)
    cfg = ReproduceConfig(dc_size=40, fake_keys=0.25, replay=0.25)
    data = dc_data(task, dc_keys, "subs_math", cfg, bases.models["mA"], bases.tokenizer)
    assert 30 <= len(data) <= 40
    with pytest.raises(ValueError, match="needs mA"):
        dc_data(task, dc_keys, "subs_math", cfg)


@pytest.mark.slow
def test_cli_fake_keys_flag(bases_dir, tmp_path, capsys):
    from calm.cli import main

    common = ["reproduce", "kv", "--bases", str(bases_dir), "--quick", "--threads", "1"]
    small = ["--steps", "2", "--dc-size", "40", "--eval-size", "4", "--out", str(tmp_path)]
    assert main([*common, *small, "--fake-keys", "0.1"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["fake_keys"] == 0.1
    counts = results["dc_examples"]["subs_math"]
    assert counts["keys"] + counts["replay"] + counts["fake"] <= results["config"]["dc_size"]
    assert counts["fake"] <= 4 and counts["replay"] == 10 and counts["keys"] == 26
    assert main([*common, *small, "--fake-keys", "0.9"]) == 2
    assert "fake_keys" in capsys.readouterr().err
