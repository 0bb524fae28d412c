"""End to end at micro scale: pretrain tiny bases, compose, evaluate, write the results."""

import json

import pytest

from calm.kv_reproduce import ReproduceConfig, run_reproduction
from calm.pretrain import ModelShape, PretrainConfig, pretrain
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


def test_unknown_variant_raises():
    with pytest.raises(ValueError, match="D_C variant"):
        ReproduceConfig(variant="kv_mul")


@pytest.mark.parametrize(
    "field, value, message",
    [("dropout", 1.0, "dropout"), ("dropout", -0.1, "dropout"), ("learning_rate", 0.0, "rate")],
)
def test_bad_training_settings_raise(field, value, message):
    with pytest.raises(ValueError, match=message):
        ReproduceConfig(**{field: value})


@pytest.mark.slow
def test_lora_gets_the_composition_dropout(bases_dir):
    from calm.kv_reproduce import _lora_model, load_bases

    mB = load_bases(bases_dir).models["mB"]
    lora, rank = _lora_model(mB, 1000, dropout=0.1)
    drops = [m for n, m in lora.named_modules() if n.endswith("lora_dropout.default")]
    assert rank >= 1 and drops and all(m.p == 0.1 for m in drops)


@pytest.mark.slow
@pytest.mark.parametrize("wiring", [[], ["--connections", "3:3"]])
def test_memorization_script_reports_both_key_sets(wiring):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "scripts" / "kv_memorization.py"
    out = subprocess.run(
        [sys.executable, str(script), "--steps", "2", "--eval-every", "2", *wiring],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "step 2 " in out and "held-out KV-SUBS" in out and "D_C-key KV-SUBS" in out
