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

import benchmarks.investigations
from benchmarks import measure, reference
from calm import CALM

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
