"""`calm reproduce code` end to end at micro scale: tiny random models and tokenizers, tiny task
data, every row through the runner; the results contract, resumption, row selection, D_C."""

from __future__ import annotations

import gzip
import json
import sysconfig

import pytest
from conftest import tiny_lm
from recipe_helpers import Counting, run_counting, tiny_bible
from test_tokenizers import byte_bpe, unigram

import calm
from calm.errors import UserError
from calm.recipes.code import models as code_models
from calm.recipes.code.data import dc_pieces, source_root
from calm.recipes.code.evaluation import METRICS, TASKS, TaskData
from calm.recipes.code.models import Models
from calm.recipes.code.reproduce import ROWS, CodeConfig, run_code, run_lr_probe
from calm.recipes.pretrained import lora_model, lora_rank
from calm.tasks.bpb import make_code, python_files
from calm.tasks.code_to_text import _split_of, iter_pairs


def _python_tree(root):
    """40 modules of documented functions (train, dev and test sides of the split), and a
    skipped tests/ folder."""
    for i in range(40):
        body = "".join(
            f'def f{i}_{j}(x, y):\n    """Return the sum of x and y plus {i} times {j}."""\n'
            f"    total = x + y\n    return total + {i * j}\n\n\n"
            for j in range(6)
        )
        (root / f"mod{i}.py").write_text(body)
    (root / "tests").mkdir()
    (root / "tests" / "test_mod.py").write_text("def test():\n    pass\n")
    return root


def _humaneval(path):
    problems = [
        {
            "task_id": f"Toy/{i}",
            "prompt": f'def add{i}(a, b):\n    """Return a plus b plus {i}."""\n',
            "entry_point": f"add{i}",
            "canonical_solution": f"    return a + b + {i}\n",
            "test": f"def check(f):\n    assert f(1, 2) == {3 + i}\n",
        }
        for i in range(4)
    ]
    path.write_text("".join(json.dumps(p) + "\n" for p in problems))
    return path


def _mbpp(path):
    gen = "def generate_input(rng):\n    return {'n': rng.randint(1, 50)}\n"
    tasks = [
        {
            "task_description": f"Task {i}: square n.",
            "input_output_spec": "Input: n (int). Output: return (int).",
            "code_sample": "def main_solution(n):\n    return n * n\n",
            "input_generator": gen,
        }
        for i in range(54)
    ]
    with gzip.open(path, "wt") as f:
        json.dump(tasks, f)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("code-data")
    for name in ("python", "bible"):
        (root / name).mkdir()
    return TaskData(
        humaneval=str(_humaneval(root / "humaneval.jsonl")),
        mbpp_like=str(_mbpp(root / "codeio-hq.jsonl.gz")),
        python_root=str(_python_tree(root / "python")),
        bible=str(tiny_bible(root / "bible")),
    )


@pytest.fixture(scope="module")
def models():
    """mB a tiny Gemma 3, mA a tiny Qwen2 and vanilla mA a tiny Llama, each with its own
    tokenizer (three vocabularies, so every composition reads through a TokenizerPair)."""
    tok_b, tok_a, tok_v = byte_bpe(), unigram(), byte_bpe(300)
    tok_a.eos_token = tok_a.pad_token  # the unigram adds no special token: start from its EOS
    return Models(
        mB=tiny_lm("gemma3", 32, 4, seed=0, vocab=len(tok_b)).requires_grad_(False),
        mA=tiny_lm("qwen2", 24, 4, seed=1, vocab=len(tok_a)).requires_grad_(False),
        vanilla_mA=tiny_lm("llama", 24, 4, seed=2, vocab=len(tok_v)).requires_grad_(False),
        tokenizers={"mB": tok_b, "mA": tok_a, "vanilla_mA": tok_v},
        identity={"mB": "tiny gemma3", "mA": "tiny qwen2", "vanilla_mA": "tiny llama"},
    )


def _config(out, **overrides):
    tiny = dict(steps=2, batch_size=2, max_length=48, chunk_chars=200, max_new_tokens=6)
    tiny |= dict(eval_batch_size=2, every=2, threads=1, progress=False, save_every=1)
    limits = {t: 2 for t in ("humaneval", "mbpp-like", "code-to-text", "code-bpb", "text-bpb")}
    return CodeConfig(out_dir=str(out), limits=limits, **tiny | overrides)


def _run(cfg, models, data, monkeypatch, refuse=False):
    return run_counting(run_code, cfg, models, data, monkeypatch, refuse)


def test_every_row_writes_the_results_contract_and_a_rerun_computes_nothing(
    models, data, tmp_path, monkeypatch
):
    cfg = _config(tmp_path)
    results, trained, evaluated = _run(cfg, models, data, monkeypatch)
    assert trained == 5 and evaluated == 5 * len(ROWS)  # five trained rows, five tasks a row
    assert list(results["rows"]) == list(ROWS)
    for name, row in results["rows"].items():
        assert set(METRICS) <= set(row["metrics"]), name
        assert all(isinstance(v, float) for v in row["metrics"].values())
        assert 0.0 <= row["metrics"]["humaneval_pass1"] <= 1.0
        assert 0.0 <= row["metrics"]["mbpp_like_pass1"] <= 1.0
        assert row["metrics"]["code_bpb"] > 0 and row["metrics"]["text_bpb"] > 0
        assert row["seconds"] > 0 and "per_example" not in row
        assert row["examples"] == {t: 2 for t in cfg.limits}
        lines = (tmp_path / "rows" / name / "samples.jsonl").read_text().splitlines()
        assert len(lines) == 10 and {json.loads(x)["task"] for x in lines} == set(cfg.limits)
    assert set(results["paired"]) == {f"calm-{r}" for r in ROWS if r != "calm"}
    for deltas in results["paired"].values():
        assert set(deltas) == set(METRICS)
        for d in deltas.values():
            lo, hi = d["ci95"]
            assert isinstance(d["delta"], float) and lo <= hi and d["n"] == 2
    mB, composed = results["rows"]["mB"]["metrics"], results["rows"]["calm"]["metrics"]
    assert results["paired"]["calm-mB"]["code_bpb"]["delta"] == pytest.approx(
        composed["code_bpb"] - mB["code_bpb"]
    )
    assert results["limits"] == cfg.limits and results["config"]["steps"] == 2
    assert results["dc"]["records"] == 4 and results["dc"]["anchor_tokens"] > 0
    assert results["lora"]["calm_parameters"] == results["rows"]["calm"]["parameters"]
    assert results["rows"]["lora"]["rank"] == results["lora"]["rank"]
    for name in ("calm", "lora", "finetune", "vanilla_mA", "random_mA"):
        assert results["rows"][name]["train"]["steps"] == 2
        assert (tmp_path / "rows" / name / "train" / "metrics.jsonl").is_file()
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["paired"] == results["paired"]
    assert (tmp_path / "results.md").read_text().startswith("# Code: CALM")
    assert (tmp_path / "results.png").stat().st_size > 0

    again, trained, evaluated = _run(cfg, models, data, monkeypatch, refuse=True)
    assert trained == evaluated == 0
    assert again["rows"] == results["rows"] and again["paired"] == results["paired"]


def test_rows_flag_runs_only_those_rows(models, data, tmp_path, monkeypatch):
    results, trained, _ = _run(_config(tmp_path, rows=("calm", "mB")), models, data, monkeypatch)
    assert trained == 1 and list(results["rows"]) == ["mB", "calm"]
    assert sorted(p.name for p in (tmp_path / "rows").iterdir()) == ["calm", "mB"]
    assert list(results["paired"]) == ["calm-mB"]
    with pytest.raises(UserError, match="Unknown rows"):
        _config(tmp_path, rows=("calm", "skyline"))


def test_a_row_stopped_while_scoring_resumes_at_the_next_task(models, data, tmp_path, monkeypatch):
    cfg = _config(tmp_path, rows=("calm",))
    evaluate, calls = calm.evaluate, []

    def stop_at_the_third_task(*args, **kwargs):
        calls.append(kwargs["journal"])  # where a task interrupted midway keeps its batches
        if len(calls) == 3:
            raise KeyboardInterrupt("stopped")
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(calm, "evaluate", stop_at_the_third_task)
    with pytest.raises(KeyboardInterrupt):
        run_code(cfg, load=lambda _: models, data=data, log=lambda _: None)
    monkeypatch.undo()
    row = tmp_path / "rows" / "calm"
    assert sorted(p.stem for p in (row / "eval").glob("*.json")) == ["humaneval", "mbpp-like"]
    assert calls == [row / "eval" / f"{t}.partial.jsonl" for t in TASKS[:3]]
    results, trained, evaluated = _run(cfg, models, data, monkeypatch)
    assert evaluated == 3 and trained == 1  # the loop resumed at its last step: nothing to train
    assert len((row / "train" / "metrics.jsonl").read_text().splitlines()) == 2
    assert len(json.loads((row / "result.json").read_text())["segments"]) == 2
    assert set(METRICS) <= set(results["rows"]["calm"]["metrics"])


def test_dc_shares_no_file_with_the_test_sets(data):
    def check(root, size, chunk):
        paths = {path for path, _ in dc_pieces(root, size, chunk, seed=0)}
        assert paths and all(_split_of(p) == "train" for p in paths)
        assert not paths & set(python_files(root))  # code-bpb's files
        code_to_text = {p["id"].split("::")[0] for p in iter_pairs(root, "test")}
        assert code_to_text and not paths & code_to_text
        assert not any(p.startswith("tests/") for p in paths)

    check(data.python_root, 4, 200)
    assert set(make_code(data=data.python_root).texts) == set(python_files(data.python_root))
    full = CodeConfig()  # the real run's D_C: this Python's standard library
    check(source_root(None), full.steps * full.batch_size, full.chunk_chars)
    assert str(source_root(None)) == sysconfig.get_paths()["stdlib"]
    with pytest.raises(UserError, match="D_C needs"):
        dc_pieces(data.python_root, 10_000, 200, seed=0)


def test_lora_rank_matches_the_target_parameter_count(models):
    per_rank = sum(p.numel() for p in lora_model(models.mB, 1).parameters() if p.requires_grad)
    for target in (per_rank, 7 * per_rank + per_rank // 3, 5 * per_rank - per_rank // 3):
        rank = lora_rank(models.mB, target)
        trained = sum(
            p.numel() for p in lora_model(models.mB, rank).parameters() if p.requires_grad
        )
        assert abs(trained - target) <= per_rank // 2
    assert not any(p.requires_grad for p in models.mB.parameters())  # a copy got the adapters


def test_a_model_not_converted_is_one_line_naming_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("CALM_CACHE", str(tmp_path))
    with pytest.raises(UserError, match=r"python tools/hub_offline.py model gemma3-270m"):
        code_models.load_models()


def test_command_line_builds_the_config_and_refuses_the_other_experiments_flags(
    tmp_path, monkeypatch, capsys
):
    from calm.cli import main
    from calm.recipes.code import reproduce

    seen = []

    def fake(cfg):
        seen.append(cfg)
        return {"rows": {}, "seconds_this_invocation": 0.0}

    monkeypatch.setattr(reproduce, "run_code", fake)
    argv = ["reproduce", "code", "--quick", "--rows", "calm,mB", "--seed", "3", "--out"]
    assert main([*argv, str(tmp_path), "--steps", "5", "--dtype", "bfloat16"]) == 0
    (cfg,) = seen
    assert cfg.rows == ("calm", "mB") and cfg.seed == 3 and cfg.steps == 5
    assert cfg.out_dir == str(tmp_path) and cfg.dtype == "bfloat16"
    assert cfg.limits == CodeConfig.quick().limits
    assert main(["reproduce", "code", "--full-eval", "--out", str(tmp_path)]) == 0
    assert set(seen[1].limits.values()) == {None} and seen[1].steps == CodeConfig().steps
    assert main(["reproduce", "code", "--lr-calm", "2e-3", "--lr-lora", "1e-3"]) == 0
    assert (seen[2].lr_calm, seen[2].lr_lora) == (2e-3, 1e-3)
    assert seen[2].lr_finetune == CodeConfig().lr_finetune
    probed = []
    monkeypatch.setattr(reproduce, "run_lr_probe", lambda cfg, lrs: probed.append(lrs) or {})
    assert main(["reproduce", "code", "--lr-probe", "1e-3,3e-3"]) == 0
    assert probed == [(1e-3, 3e-3)] and len(seen) == 3
    assert main(["reproduce", "code", "--variant", "kv_math"]) == 2
    assert "--variant does not apply to calm reproduce code" in capsys.readouterr().err
    assert main(["reproduce", "code", "--ma-steps", "3"]) == 2
    assert "--ma-steps does not apply to calm reproduce code" in capsys.readouterr().err
    assert main(["reproduce", "kv", "--rows", "calm", "--device", "cuda"]) == 2
    assert "--rows, --device do not apply to calm reproduce kv" in capsys.readouterr().err


def test_lr_probe_trains_without_scoring(models, data, tmp_path, monkeypatch):
    cfg = _config(tmp_path, rows=("lora",))
    train = Counting(calm.train)
    monkeypatch.setattr(calm, "train", train)
    monkeypatch.setattr(calm, "evaluate", Counting(calm.evaluate, refuse=True))
    report = run_lr_probe(cfg, (1e-4, 1e-2), load=lambda _: models, data=data, log=lambda _: None)
    assert train.calls == 2 and list(report) == ["lora"]
    runs = report["lora"]["learning_rates"]
    assert set(runs) == {"0.0001", "0.01"} and runs["0.0001"] != runs["0.01"]
    assert (tmp_path / "lr_probe" / "lr_probe.md").exists() and not (tmp_path / "rows").exists()
    cfg = _config(tmp_path, rows=("finetune",))
    both = run_lr_probe(cfg, (1e-4,), load=lambda _: models, data=data, log=lambda _: None)
    assert list(both) == ["lora", "finetune"] and both["lora"] == report["lora"]  # kept
    monkeypatch.undo()
    cfg = _config(tmp_path, rows=("mB",))
    results = run_code(cfg, load=lambda _: models, data=data, log=lambda _: None)
    assert results["lr_probe"] == json.loads(json.dumps(both))  # the rates' evidence, beside
    with pytest.raises(UserError, match="Unknown rows"):
        run_lr_probe(_config(tmp_path, rows=("calm_paper",)), (1e-3,), load=lambda _: models)
