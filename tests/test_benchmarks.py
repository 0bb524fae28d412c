"""The quick benchmark runs end to end and writes the documented report (timings never asserted)."""

from __future__ import annotations

import importlib
import json
import math
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as T
from conftest import tiny_lm
from test_tokenizers import byte_bpe, unigram

import benchmarks.investigations
from benchmarks import measure, reference, run
from benchmarks import pair as pair_bench
from calm import CALM, CALMConfig, TokenizerPair

ROOT = Path(__file__).resolve().parents[1]
HEADLINE = (
    "train_step_ratio",
    "peak_memory_ratio",
    "generate_ratio",
    "generate_speedup_vs_recompute",
    "aug_cache_speedup",
)


@pytest.mark.slow
def test_quick_benchmark_writes_report(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        check=True,
        timeout=300,
        capture_output=True,
    )
    report = json.loads((tmp_path / "bench.json").read_text())
    for key in HEADLINE:
        assert isinstance(report[key], float) and math.isfinite(report[key]) and report[key] > 0
    config = report["configs"][report["headline_config"]]
    for part in ("train", "memory", "generate", "aug_cache", "causal"):
        assert part in config
    # Correctness facts the benchmark also measures: these must hold whatever the timings.
    assert config["train"]["loss_abs_diff_vs_reference"] < 1e-4
    assert config["generate"]["cached_matches_recompute"] is True
    for key in ("alternated_to_bound", "ratio_to_alternated", "lockstep_control_ratio"):
        assert config["generate"][key] > 0
    assert config["causal"]["calm_leaks"] is False
    peer = config.get("peer_calm_pytorch")
    if peer is None:
        assert report["peer_note"]
    else:
        assert isinstance(peer["leaks"], bool) and peer["step_ms"] > 0
    assert report["scaling"]["by_seq"] and report["scaling"]["by_connections"]
    assert (tmp_path / "bench.md").read_text().startswith("# calm benchmarks")
    assert (tmp_path / "scaling.png").stat().st_size > 0


def test_lockstep_times_every_token_of_each_loop(pair):
    """The token-by-token timer advances each model's own greedy loop once per CALM token, and
    those loops (and the control) decode what each model's plain greedy loop decodes."""
    anchor, aug = pair
    model = CALM(anchor, aug)
    prompt = torch.randint(3, 97, (1, 5), generator=torch.Generator().manual_seed(0))
    n = 6
    tokens = {}

    def recording(name, m):
        for step in reference.greedy_steps(m, prompt, n):
            tokens.setdefault(name, []).append(step)
            yield step

    loops = {"anchor": recording("anchor", anchor), "aug": recording("aug", aug)}
    timer = reference.Lockstep(loops)
    timer.start()
    out = model.generate(prompt, max_new_tokens=n, eos_token_id=[], streamer=timer)
    assert out.shape == (1, 5 + n)
    assert {k: len(v) for k, v in timer.times.items()} == {"calm": n, "anchor": n, "aug": n}
    assert all(t > 0 for ts in timer.times.values() for t in ts)
    for name, m in (("anchor", anchor), ("aug", aug)):
        alone = reference.greedy_cached(m, prompt, n)
        assert torch.equal(torch.cat([prompt, *tokens[name]], 1), alone)
    control = reference.alternated_greedy(anchor, aug, prompt, max_new_tokens=n)
    assert torch.equal(control, reference.greedy_cached(anchor, prompt, n))


def test_interleaved_rotates_the_order_and_syncs_around_each_call():
    calls: list[str] = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = measure.interleaved(fns, reps=4, warmup=1, sync=lambda: calls.append("|"))
    assert calls[:3] == ["a", "b", "c"]  # the warm-up round, untimed
    order = "abc" + "bca" + "cab" + "abc"  # each rep starts one later
    assert calls[3:] == [x for name in order for x in ("|", name, "|")]
    assert {name: len(ts) for name, ts in times.items()} == {"a": 4, "b": 4, "c": 4}


def test_every_investigation_imports_as_a_module_of_the_package():
    names = [m.name for m in pkgutil.iter_modules(benchmarks.investigations.__path__)]
    assert {"ab_core_changes", "alternation", "generation_gap", "generation_reps"} <= set(names)
    for name in names:
        module = importlib.import_module(f"benchmarks.investigations.{name}")
        assert f"python -m benchmarks.investigations.{name}" in module.__doc__


def tiny_gemma3(vocab: int):
    """A random Gemma-3 (4 layers, local and global attention, as the real pair's anchor) with a
    window longer than the test's texts (the reference runs unmasked causal attention)."""
    torch.manual_seed(0)
    config = T.Gemma3TextConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=64,
        layer_types=["sliding_attention", "full_attention"] * 2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return T.AutoModelForCausalLM.from_config(config).eval()


def test_tokenizer_pair_config_on_tiny_models():
    """The real-pair config's code path (`benchmarks/pair.py`), on a tiny Gemma-3 anchor and a
    tiny Qwen2 augmenting model with two different tokenizers: the reference's loss equals
    CALM's, the report has its keys, and run.py's markdown has the pair's row."""
    anchor_tok, aug_tok = byte_bpe(), unigram()
    tokenizers = TokenizerPair(anchor_tok, aug_tok)
    anchor = tiny_gemma3(len(anchor_tok))
    aug = tiny_lm("qwen2", 24, 8, seed=1, vocab=len(aug_tok))
    setup = pair_bench.PairSetup("tiny-pair", "a", "b", seq=40, new_tokens=4, reps=1, gen_reps=1)
    out = pair_bench.section(setup, anchor, aug, tokenizers, run.CPU)
    train, gen = out["train"], out["generate"]
    assert out["kind"] == "tokenizer pair"
    assert train["loss_abs_diff_vs_reference"] < 1e-5
    assert train["connections"] == 2 and train["anchor_tokens"] == 40
    assert train["aug_tokens"] != train["anchor_tokens"]  # two tokenizers, two lengths
    for key in ("ratio", "ratio_default_config", "calm_ms", "reference_ms", "alignment_ms"):
        assert train[key] > 0
    for key in ("ratio_to_bound", "alternated_to_bound", "ratio_to_alternated", "tps_bound"):
        assert gen[key] > 0
    assert gen["aug_calls"] >= 1 and gen["text_sync_ms_per_token"] > 0
    assert gen["text"].startswith(pair_bench.PROMPT)
    report = {
        "mode": "full",
        "machine": "m",
        "device": "cpu",
        "dtype": "float32",
        "torch": torch.__version__,
        "threads": 1,
        "load_at_start": [0.0],
        "load_at_end": [0.0],
        "peer_note": "",
        "configs": {setup.name: out},
    }
    run.headline(report, ())
    assert report["headline_config"] == setup.name
    assert report["train_step_ratio"] == train["ratio"]
    text = run.markdown(report)
    assert "## Different tokenizers" in text and "| tiny-pair |" in text
    assert "## Scaling" not in text


def test_reference_with_a_visible_mask_equals_the_shared_stream_rule(pair):
    """With one tokenizer, seeing the first t + 1 augmenting tokens at anchor token t is the
    causal rule: the reference's loss is the same with the mask and without it."""
    anchor, aug = pair
    model = CALM(anchor, aug, CALMConfig(norm=False, init="default"))
    ref = reference.ReferenceStep(anchor, aug, model.connections, reference.blocks_like(model))
    ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    visible = torch.arange(1, 13).expand(2, 12)
    torch.testing.assert_close(ref.loss(ids), ref.loss(ids, ids, visible))
