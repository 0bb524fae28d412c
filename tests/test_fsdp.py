"""calm.train sharded by FSDP2 (`accelerate launch --config_file tests/accelerate/fsdp.yaml`, two
processes) matches one unsharded process, and its checkpoints are ordinary ones."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_lm
from test_train import config, losses, make_model, make_pair, records, weights

from calm import CALM
from calm.errors import UserError
from calm.run import checkpoints
from calm.train import train
from calm.trainee import Trainee, sharded

TESTS = Path(__file__).parent
# Same global batch, same math: only the order of float additions differs (per-process sums of
# the loss, the reduce-scatter of the gradient shards, the gradient norm summed over shards), so
# losses agree to float32 rounding: measured 6e-7 on losses near 4.6 (about one float32 step),
# tolerance 5e-6. Weights after 4 Adam steps: measured 2.3e-6 (Adam divides by the small early
# second moments, which magnifies rounding), tolerance 1e-5 as for DDP. Clipping by one shard's
# gradient norm instead of the global one moves the losses by 3e-5.
LOSS_ATOL = 5e-6
ATOL = 1e-5
GPUS = torch.cuda.device_count()


def launch(out: Path, grad_accum: int) -> subprocess.CompletedProcess:
    """The worker on 2 processes: 2 GPUs (NCCL) where there are; else CPU processes (gloo), where
    the worker itself turns accelerate's FSDP on (see `fsdp_worker.force_fsdp_on_cpu`)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if GPUS < 2:
        env["ACCELERATE_USE_CPU"] = "1"
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    command += ["--config_file", str(TESTS / "accelerate" / "fsdp.yaml")]
    command += ["--main_process_port", "29523", str(TESTS / "fsdp_worker.py"), str(out)]
    return subprocess.run(
        [*command, str(grad_accum)], env=env, capture_output=True, text=True, timeout=300
    )


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x.cpu() - y.cpu()).abs().max()) for x, y in zip(a, b, strict=True))


@pytest.mark.slow
def test_fsdp_matches_one_process_resumes_and_reloads_unsharded(tmp_path):
    # init="default" (make_model): the blocks add a residual from the first step, so the losses
    # would differ if the composition hooks did not act under FSDP's own hooks.
    # grad_clip=0.1: below the gradient norms (about 0.5), so every step clips by the norm over
    # all shards.
    one = make_model(dropout=0.0)
    cfg = config(tmp_path, "one", max_steps=4, warmup_steps=1, grad_clip=0.1)
    train(one, records(12), records(4, seed=9), cfg)

    out = tmp_path / "fsdp"
    proc = launch(out, grad_accum=2)  # 2 micro-steps per process: FSDP2's no_sync path too
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = torch.load(out / "fsdp.pt")
    assert result["sharded"], "after training, a weight was not a shard: FSDP did not shard it"
    assert result["changed"] == [], f"frozen base weights changed: {result['changed'][:3]}"
    assert '"world_size": 2' in (checkpoints(out)[-1] / "state.json").read_text()
    # the same files as one process writes (and one RNG state per process), the same record
    last, last_one = checkpoints(out)[-1], checkpoints(tmp_path / "one")[-1]
    names = {p.name for p in last_one.iterdir()} | {"rng-rank1.pt"}
    assert {p.name for p in last.iterdir()} == names
    record = (last / "calm_config.json").read_text()
    assert record == (last_one / "calm_config.json").read_text()

    # (a) the losses of every step, stopped at step 2 and resumed, equal the unsharded ones
    reference, sharded = losses(tmp_path / "one"), losses(out)
    assert sorted(sharded) == [1, 2, 3, 4]
    loss_diff = max(abs(sharded[s] - reference[s]) for s in reference)
    print(f"max |loss_fsdp - loss_1proc| = {loss_diff:.3g}")
    assert loss_diff <= LOSS_ATOL

    # (b) the sharded checkpoint loads into an unsharded CALM with the same weights and logits
    loaded = CALM.from_pretrained(checkpoints(out)[-1], *make_pair())
    weight_diff = max_diff(weights(loaded), weights(one))
    print(f"max |w_fsdp - w_1proc| = {weight_diff:.3g}")
    assert weight_diff <= ATOL
    with torch.no_grad():
        unsharded = loaded(result["ids"]).logits
        anchor_alone = make_pair()[0](result["ids"]).logits
    logits_diff, residual = (max_diff([result["logits"]], [x]) for x in (unsharded, anchor_alone))
    print(f"max |logits_fsdp - logits_unsharded| = {logits_diff:.3g}, vs anchor {residual:.3g}")
    assert logits_diff <= ATOL
    assert residual > 1e-2  # the blocks' residual is there

    # (b) one unsharded process resumes the sharded run from its step-2 checkpoint (force: it
    # ran on 2 processes) and takes the same steps 3 and 4 as the unsharded run
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(checkpoints(resumed)[-1])
    model = make_model(dropout=0.0)
    cfg = config(tmp_path, "resumed", max_steps=4, warmup_steps=1, grad_clip=0.1, grad_accum=2)
    result = train(model, records(12), records(4, seed=9), cfg, resume=True, force=True)
    assert result.step == 4
    assert json.loads((checkpoints(resumed)[-1] / "state.json").read_text())["world_size"] == 1
    assert max(abs(losses(resumed)[s] - reference[s]) for s in (3, 4)) <= LOSS_ATOL
    assert max_diff(weights(model), weights(one)) <= ATOL


def accelerator(kind: str, processes: int = 2, fsdp2: bool = True) -> SimpleNamespace:
    """What `calm.trainee.sharded` reads of an accelerate Accelerator."""
    from accelerate.utils import DistributedType

    return SimpleNamespace(
        num_processes=processes,
        distributed_type=DistributedType[kind],
        is_fsdp2=fsdp2 and kind == "FSDP",
        is_main_process=True,
    )


def test_launches_that_would_not_train_sharded_are_refused_or_said(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    # an FSDP config launched on CPU without --cpu: accelerate leaves each process alone
    with pytest.raises(UserError, match="2 processes were launched, but accelerate joins 1"):
        sharded(accelerator("NO", processes=1), "none")
    assert not sharded(accelerator("MULTI_CPU"), "none")
    assert capsys.readouterr().err == ""
    # the same config with --cpu: accelerate runs DDP, and calm.train says so
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert not sharded(accelerator("MULTI_CPU"), "none")
    assert "asks for FSDP, but accelerate shards on accelerators only" in capsys.readouterr().err
    with pytest.raises(UserError, match="set fsdp_version: 2"):
        sharded(accelerator("FSDP", fsdp2=False), "none")
    with pytest.raises(UserError, match="aug_cache does not work under FSDP"):
        sharded(accelerator("FSDP"), "memory")
    assert sharded(accelerator("FSDP"), "none")


def test_only_a_composition_is_sharded():
    trainee = Trainee(tiny_lm("llama", 32, 2, seed=0))  # a model trained in full
    with pytest.raises(UserError, match="shards a calm.CALM only, not a LlamaForCausalLM"):
        trainee.prepare(None, None, sharded=True)
