"""Two-process DDP on CPU (gloo, through `accelerate launch`) matches one process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import load_file

from calm.run import checkpoints
from calm.train import train

TESTS = Path(__file__).parent
# Same global batch, same math; only the order of float additions differs (per-rank sums, then
# the gloo all-reduce of gradients), so weights agree to float32 rounding after a few steps.
ATOL = 1e-5

SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_train import make_model, records
from calm.train import TrainConfig, train
cfg = TrainConfig(output_dir={out!r}, batch_size=4, grad_accum={accum}, max_steps=4,
                  learning_rate=1e-2, warmup_steps=1, progress=False)
train(make_model(dropout=0.0), records(12), records(4, seed=9), config=cfg)
"""


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    from test_train import config, make_model, records

    one = make_model(dropout=0.0)
    cfg = config(tmp_path, "one", max_steps=4, warmup_steps=1)
    train(one, records(12), records(4, seed=9), config=cfg)

    out = tmp_path / "two"
    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(SCRIPT.format(tests=str(TESTS), out=str(out), accum=1)))
    # `--multi_gpu` picks the torchrun launcher; ACCELERATE_USE_CPU makes each process use gloo.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes"]
    launch.append("2")
    proc = subprocess.run(
        [*launch, "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", "29517", str(script)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = load_file(str(checkpoints(out)[-1] / "composition.safetensors"))
    reference = {k: v for k, v in one.blocks.state_dict().items()}
    assert set(two) == set(reference)
    diff = max(float((two[k] - v).abs().max()) for k, v in reference.items())
    print(f"max |w_2proc - w_1proc| = {diff:.3g}")
    assert diff <= ATOL
    state = (checkpoints(out)[-1] / "state.json").read_text()
    assert '"world_size": 2' in state
