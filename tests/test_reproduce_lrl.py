"""`calm reproduce lrl` end to end at micro scale: tiny random models and tokenizers, a tiny fake
Quran (bn, ur, en) and English Bible; every row through the runner, mA built once; the results
contract, resumption, row selection, and D_C and mA's corpus off the dev and test splits."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_lm
from recipe_helpers import Counting, run_counting, tiny_bible
from test_tokenizers import byte_bpe

import calm
from calm.errors import UserError
from calm.recipes.lrl import models as lrl_models
from calm.recipes.lrl import reproduce as lrl_reproduce
from calm.recipes.lrl.data import LrlData, dc_records, ma_records
from calm.recipes.lrl.evaluation import metric_names
from calm.recipes.lrl.models import Models
from calm.recipes.lrl.reproduce import ROWS, LrlConfig, run_lr_probe, run_lrl
from calm.tasks.translation import load_pairs, monolingual

LANGS = ("bn-en", "ur-en")
TRAINED = ("calm_paper", "calm_parallel", "lora_paper", "lora_parallel", "finetune")
TRAINED += ("vanilla_mA", "random_mA")


def _quran(root, surahs=40, verses=20):
    """quran-json's layout with one translation a language: every verse unique."""
    (root / "dist").mkdir(parents=True)
    for lang in ("bn", "ur", "en"):
        data = [
            {
                "id": s,
                "verses": [
                    {
                        "id": v,
                        "translation": f"{lang} surah {s} verse {v}, words of the {lang} text",
                    }
                    for v in range(1, verses + 1)
                ],
            }
            for s in range(1, surahs + 1)
        ]
        (root / "dist" / f"quran_{lang}.json").write_text(json.dumps(data))
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("lrl-data")
    return LrlData(quran=str(_quran(root / "quran")), bible=str(tiny_bible(root / "bible")))


@pytest.fixture(scope="module")
def models():
    """mB a tiny Gemma 3 and vanilla mA a tiny Llama, each with its own byte-level tokenizer
    (two vocabularies, so every composition reads through a TokenizerPair)."""
    tok_b, tok_v = byte_bpe(), byte_bpe(300)
    return Models(
        mB=tiny_lm("gemma3", 32, 4, seed=0, vocab=len(tok_b)).requires_grad_(False),
        vanilla_mA=tiny_lm("llama", 24, 4, seed=2, vocab=len(tok_v)).requires_grad_(False),
        tokenizers={"mB": tok_b, "vanilla_mA": tok_v},
        identity={"mB": "tiny gemma3", "vanilla_mA": "tiny llama"},
    )


def _config(out, **overrides):
    tiny = dict(steps=2, batch_size=2, max_length=48, chunk_chars=200, max_new_tokens=6)
    tiny |= dict(ma_steps=2, ma_max_length=48, parallel_pairs=4, dc_fraction=0.05)
    tiny |= dict(eval_batch_size=2, every=2, threads=1, progress=False, save_every=1)
    limits = {"translation": 2, "lrl-bpb": 2, "text-bpb": 2}
    return LrlConfig(out_dir=str(out), limits=limits, **tiny | overrides)


def _run(cfg, models, data, monkeypatch, refuse=False):
    return run_counting(run_lrl, cfg, models, data, monkeypatch, refuse)


def test_every_row_writes_the_results_contract_and_a_rerun_computes_nothing(
    models, data, tmp_path, monkeypatch
):
    cfg = _config(tmp_path)
    results, trained, evaluated = _run(cfg, models, data, monkeypatch)
    # mA's build (1 training, lrl-bpb before and after: 4) + 7 trained rows; 9 model rows x 5
    assert trained == 1 + len(TRAINED) and evaluated == 4 + 9 * 5
    assert list(results["rows"]) == list(ROWS) and results["languages"] == list(LANGS)
    metrics = metric_names(LANGS)
    assert metrics == ["bn_en_chrf", "bn_en_chrf1", "ur_en_chrf", "ur_en_chrf1"] + [
        "bn_bpb",
        "ur_bpb",
        "text_bpb",
    ]
    chrf = [m for m in metrics if "chrf" in m]
    for name, row in results["rows"].items():
        floor = name in ("copy_source", "random_reference")
        assert set(chrf if floor else metrics) <= set(row["metrics"]), name
        assert floor == ("bn_bpb" not in row["metrics"]), name
        assert all(0.0 <= row["metrics"][m] <= 100.0 for m in chrf)
        assert "per_example" not in row and row["seconds"] >= 0
        lines = (tmp_path / "rows" / name / "samples.jsonl").read_text().splitlines()
        assert len(lines) == (4 if floor else 10), name
    others = {r for r in ROWS if r != "calm_paper"}
    expected = {f"calm_paper-{r}" for r in others}
    expected |= {f"calm_parallel-{r}" for r in others - {"calm_parallel"}}
    expected |= {"mB-copy_source", "mB-random_reference"}
    assert set(results["paired"]) == expected
    for key, deltas in results["paired"].items():
        floor = key.endswith(("copy_source", "random_reference"))
        assert set(deltas) == set(chrf if floor else metrics), key
        for d in deltas.values():
            lo, hi = d["ci95"]
            assert isinstance(d["delta"], float) and lo <= hi and d["n"] == 2
    mB, composed = results["rows"]["mB"]["metrics"], results["rows"]["calm_paper"]["metrics"]
    for metric in ("bn_en_chrf", "ur_bpb", "text_bpb"):
        assert results["paired"]["calm_paper-mB"][metric]["delta"] == pytest.approx(
            composed[metric] - mB[metric]
        )
    assert results["limits"] == {
        "translation:bn-en": 2,
        "translation:ur-en": 2,
        "lrl-bpb:bn": 2,
        "lrl-bpb:ur": 2,
        "text-bpb": 2,
    }
    paper, parallel = results["dc"]["paper"], results["dc"]["parallel"]
    assert parallel["records"] == paper["records"] + 8 and parallel["parallel"] == {
        "bn-en": 4,
        "ur-en": 4,
    }
    assert paper["high_resource"] == sum(paper["low_resource"].values()) > 0
    build = results["mA_build"]
    assert build["train"]["steps"] == 2 and set(build["corpus"]["languages"]) == set(LANGS)
    assert {"bn_bpb_before", "bn_bpb_after", "ur_bpb_before", "ur_bpb_after"} <= set(
        build["metrics"]
    )
    assert build["metrics"]["bn_bpb_before"] != build["metrics"]["bn_bpb_after"]  # it trained
    assert (tmp_path / "build" / "rows" / "mA" / "model" / "config.json").is_file()
    assert results["lora"]["calm_parameters"] == results["rows"]["calm_paper"]["parameters"]
    for name in TRAINED:
        assert results["rows"][name]["train"]["steps"] == 2
        assert results["rows"][name]["train"]["dc"] == (
            "parallel" if "parallel" in name else "paper"
        )
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["paired"] == results["paired"] and saved["languages"] == list(LANGS)
    md = (tmp_path / "results.md").read_text()
    assert md.startswith("# Low-resource languages") and "| calm_paper | 46.1 | 60.5 |" in md
    assert (tmp_path / "results.png").stat().st_size > 0

    again, trained, evaluated = _run(cfg, models, data, monkeypatch, refuse=True)
    assert trained == evaluated == 0
    assert again["rows"] == results["rows"] and again["paired"] == results["paired"]


def test_rows_flag_runs_only_those_rows_and_mA_is_built_once(models, data, tmp_path, monkeypatch):
    results, trained, _ = _run(
        _config(tmp_path, rows=("mB", "copy_source")), models, data, monkeypatch
    )
    assert trained == 0 and list(results["rows"]) == ["copy_source", "mB"]
    assert not (tmp_path / "build").exists() and "mA_build" not in results  # not needed yet
    assert list(results["paired"]) == ["mB-copy_source"]  # the anchor against the floor
    results, trained, _ = _run(_config(tmp_path, rows=("calm_paper",)), models, data, monkeypatch)
    assert trained == 2  # mA's build, then the row
    assert set(results["paired"]) == {"calm_paper-copy_source", "calm_paper-mB", "mB-copy_source"}
    model = tmp_path / "build" / "rows" / "mA" / "model" / "model.safetensors"
    stamp = model.stat().st_mtime_ns
    results, trained, _ = _run(
        _config(tmp_path, rows=("mA", "calm_parallel")), models, data, monkeypatch
    )
    assert trained == 1 and model.stat().st_mtime_ns == stamp  # mA read back, not rebuilt
    assert sorted(p.name for p in (tmp_path / "rows").iterdir()) == [
        "calm_paper",
        "calm_parallel",
        "copy_source",
        "mA",
        "mB",
    ]
    results, trained, _ = _run(
        _config(tmp_path, rows=("mA",), lr_ma=2e-4), models, data, monkeypatch
    )
    assert trained == 1 and model.stat().st_mtime_ns != stamp  # a changed build: rebuilt
    assert (tmp_path / "stale" / "mA").is_dir()  # and the row that used the old mA recomputed
    with pytest.raises(UserError, match="Unknown rows"):
        _config(tmp_path, rows=("calm", "mB"))
    with pytest.raises(UserError, match="--lang takes distinct pairs"):
        _config(tmp_path, languages=("bn-en", "xx-en"))


def _held_out(data, variant):
    """Every dev and test sentence of `variant`: both sides of its pairs, its monolingual lines."""
    out = set()
    for split in ("dev", "test"):
        out |= {
            t for p in load_pairs(variant, split, data.quran) for t in (p["source"], p["target"])
        }
        out |= {
            line
            for text in monolingual(variant, split, data.quran).values()
            for line in text.splitlines()
        }
    return out


def test_dc_and_mA_corpus_hold_no_dev_or_test_sentence_and_paper_has_no_aligned_pair(data):
    records, info = ma_records(LANGS, data, chunk_chars=200)
    dc = dc_records(LANGS, data, chunk_chars=200, fraction=0.1, pairs=10_000, seed=0)
    paper, parallel = dc["paper"][0], dc["parallel"][0]
    texts = [r["text"] for r in records + paper + parallel]
    held_out = set().union(*(_held_out(data, v) for v in LANGS))
    assert held_out and info["languages"]["bn-en"]["records"] > 0
    assert not [s for s in held_out if any(s in t for t in texts)]
    train = {v: load_pairs(v, "train", data.quran) for v in LANGS}
    paper_text = "\n".join(r["text"] for r in paper)
    aligned = [p for v in LANGS for p in train[v] if p["source"] in paper_text]
    assert aligned and not [p for p in aligned if p["target"] in paper_text]
    assert any(p["target"] in paper_text for v in LANGS for p in train[v])  # English is there
    assert dc["parallel"][1]["parallel"] == {v: len(train[v]) for v in LANGS}  # all, fewer
    assert sum(r["text"].startswith("Bengali: ") for r in parallel) == len(train["bn-en"])
    assert parallel[: len(paper)] == paper
    again = dc_records(LANGS, data, chunk_chars=200, fraction=0.1, pairs=10_000, seed=1)
    assert again["paper"][1]["sha256"] != dc["paper"][1]["sha256"]  # the seed draws D_C


def test_a_model_not_converted_is_one_line_naming_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("CALM_CACHE", str(tmp_path))
    with pytest.raises(UserError, match=r"python tools/hub_offline.py model gemma3-270m"):
        lrl_models.load_models()


def test_command_line_builds_the_config_and_refuses_the_other_experiments_flags(
    tmp_path, monkeypatch, capsys
):
    from calm.cli import main
    from calm.recipes.lrl import reproduce

    seen = []

    def fake(cfg):
        seen.append(cfg)
        return {"rows": {}, "seconds_this_invocation": 0.0}

    monkeypatch.setattr(reproduce, "run_lrl", fake)
    argv = ["reproduce", "lrl", "--quick", "--rows", "calm_paper,mB", "--seed", "3", "--out"]
    argv += [str(tmp_path), "--lang", "bn-en", "nya-en", "--device", "cpu", "--dtype", "bfloat16"]
    assert main(argv) == 0
    (cfg,) = seen
    assert cfg.rows == ("calm_paper", "mB") and cfg.seed == 3 and cfg.dtype == "bfloat16"
    assert cfg.languages == ("bn-en", "nya-en") and cfg.out_dir == str(tmp_path)
    assert cfg.limits == LrlConfig.quick().limits
    assert main(["reproduce", "lrl", "--lang", "bn-en,ur-en", "--full-eval", "--steps", "7"]) == 0
    assert seen[1].languages == LANGS and set(seen[1].limits.values()) == {None}
    assert seen[1].steps == 7 and seen[1].out_dir == "runs/lrl"
    assert main(["reproduce", "lrl"]) == 0 and seen[2].languages == LrlConfig().languages
    argv = ["reproduce", "lrl", "--lr-calm", "1e-3", "--lr-lora", "2e-3", "--lr-finetune", "5e-5"]
    assert main([*argv, "--ma-steps", "9"]) == 0
    assert (seen[3].lr_calm, seen[3].lr_lora, seen[3].lr_finetune) == (1e-3, 2e-3, 5e-5)
    assert seen[3].ma_steps == 9 and LrlConfig().ma_steps != 9
    probed = []
    monkeypatch.setattr(reproduce, "run_lr_probe", lambda cfg, lrs: probed.append(lrs) or {})
    assert main(["reproduce", "lrl", "--lr-probe", "3e-4,1e-3", "--rows", "calm_paper"]) == 0
    assert probed == [(3e-4, 1e-3)] and len(seen) == 4  # the probe, not the rows
    assert main(["reproduce", "lrl", "--lr-probe", "0,1e-3"]) == 2
    assert "--lr-probe takes positive learning rates" in capsys.readouterr().err
    assert main(["reproduce", "kv", "--lr-probe", "1e-3"]) == 2
    assert "--lr-probe does not apply to calm reproduce kv" in capsys.readouterr().err
    assert main(["reproduce", "lrl", "--lang", "xx-en"]) == 2
    assert "--lang takes distinct pairs" in capsys.readouterr().err
    assert main(["reproduce", "lrl", "--variant", "kv_math"]) == 2
    assert "--variant does not apply to calm reproduce lrl" in capsys.readouterr().err
    assert main(["reproduce", "code", "--lang", "bn-en"]) == 2
    assert "--lang does not apply to calm reproduce code" in capsys.readouterr().err
    assert main(["reproduce", "kv", "--lang", "bn-en", "--rows", "mB"]) == 2
    assert "--rows, --lang do not apply to calm reproduce kv" in capsys.readouterr().err


def test_lr_probe_trains_each_row_at_each_rate_without_scoring(models, data, tmp_path, monkeypatch):
    cfg = _config(tmp_path, rows=("calm_paper", "finetune"), steps=3)
    train = Counting(calm.train)
    monkeypatch.setattr(calm, "train", train)

    def probe(rates):
        return run_lr_probe(cfg, rates, load=lambda _: models, data=data, log=lambda _: None)

    score = Counting(lrl_reproduce.score_row)
    monkeypatch.setattr(lrl_reproduce, "score_row", score)
    report = probe((1e-4, 3e-2))
    assert train.calls == 1 + 4  # mA's build (calm_paper needs it), then 2 rows x 2 rates
    assert score.calls == 2  # mA's bits per byte before and after its build; no probe scores
    assert set(report) == {"calm_paper", "finetune"}
    for entry in report.values():
        assert entry["best_lr"] in (1e-4, 3e-2) and set(entry["learning_rates"]) == {
            "0.0001",
            "0.03",
        }
        runs = entry["learning_rates"].values()
        assert all(m["loss_last"] > 0 and m["seconds"] >= 0 for m in runs)
        lows = {f"{m['loss_last']:.6f}" for m in runs}
        assert len(lows) == 2  # the rate changed the training
        best = entry["learning_rates"][f"{entry['best_lr']:g}"]["loss_last"]
        assert best == min(m["loss_last"] for m in runs)
    saved = json.loads((tmp_path / "lr_probe" / "lr_probe.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert "| calm_paper | " in (tmp_path / "lr_probe" / "lr_probe.md").read_text()
    assert not (tmp_path / "rows").exists()  # no row of the experiment ran
    assert probe((1e-4, 3e-2)) == report and train.calls == 5  # read back, nothing retrained
    probe((1e-4, 3e-2, 1e-3))
    assert train.calls == 5 + 2 and score.calls == 2  # only the new rate trains
    with pytest.raises(UserError, match="does not train"):
        run_lr_probe(
            _config(tmp_path, rows=("mB",)), (1e-3,), load=lambda _: models, data=data, log=print
        )
