"""The quick benchmark runs end to end and writes the documented report (timings never asserted)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

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
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--out", str(tmp_path)],
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
    assert config["causal"]["calm_leaks"] is False
    peer = config.get("peer_calm_pytorch")
    if peer is None:
        assert report["peer_note"]
    else:
        assert isinstance(peer["leaks"], bool) and peer["step_ms"] > 0
    assert report["scaling"]["by_seq"] and report["scaling"]["by_connections"]
    assert (tmp_path / "bench.md").read_text().startswith("# calm benchmarks")
    assert (tmp_path / "scaling.png").stat().st_size > 0
