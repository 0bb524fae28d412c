"""Run by tests/test_fsdp.py on every process of `accelerate launch --config_file
tests/accelerate/fsdp.yaml`: calm.train sharded by FSDP2, stopped after 2 steps, resumed by a
fresh composition to step 4; then the composed logits of a fixed batch and the frozen base
weights, gathered, go to OUT/fsdp.pt for the test to compare with one unsharded process.

usage: python tests/fsdp_worker.py OUT_DIR GRAD_ACCUM
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from conftest import VOCAB
from test_train import make_model, make_pair, records

from calm import hf
from calm.train import TrainConfig, train
from calm.trainee import gathered


def force_fsdp_on_cpu() -> None:
    """accelerate (1.16) turns FSDP on for accelerator devices only: CPU processes launched with
    an FSDP config run DDP instead. Set the distributed type it decided to FSDP, with the plugin
    read from the config (the FSDP_* variables the launcher set), as a GPU launch decides it."""
    state = Accelerator().state
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = FullyShardedDataParallelPlugin()


def sharded(model) -> bool:
    """Every weight, of the blocks and of the frozen base models, is a DTensor of which this
    process holds a part only: FSDP2 cut them all, and left none gathered after the steps
    (the augmenting model's forward stops by an exception after its last connected layer)."""
    from torch.distributed.tensor import DTensor

    return all(
        isinstance(p, DTensor) and p.to_local().numel() < p.numel() for p in model.parameters()
    )


def main(out: Path, grad_accum: int) -> None:
    if os.environ.get("ACCELERATE_USE_CPU"):
        force_fsdp_on_cpu()
    cfg = dict(output_dir=str(out), batch_size=4, grad_accum=grad_accum, max_steps=4)
    cfg.update(learning_rate=1e-2, warmup_steps=1, grad_clip=0.1, progress=False)
    data, evals = records(12), records(4, seed=9)
    model = make_model(dropout=0.0)
    first = train(model, data, evals, TrainConfig(**cfg, stop_after=2))
    assert first.interrupted and first.step == 2, first
    was_sharded = sharded(model)
    model = make_model(dropout=0.0)  # a fresh composition, as a new process would build
    second = train(model, data, evals, TrainConfig(**cfg), resume=True)
    assert second.step == 4 and not second.interrupted, second

    ids = torch.randint(3, VOCAB, (3, 10), generator=torch.Generator().manual_seed(5))
    model.eval()
    with torch.no_grad():  # every process runs the sharded forward (it all-gathers the layers)
        logits = model(ids.to(hf.model_device(model.anchor))).logits.cpu()
    anchor, aug = make_pair()
    bases = gathered({"anchor": model.anchor.state_dict(), "aug": model.augments[0].state_dict()})
    whole = {"anchor": anchor.state_dict(), "aug": aug.state_dict()}
    changed = [
        f"{side}.{k}"
        for side, state in whole.items()
        for k, v in state.items()
        if not torch.equal(bases[side][k].cpu(), v)
    ]
    if PartialState().is_main_process:
        result = dict(ids=ids, logits=logits, sharded=was_sharded)
        torch.save(result | dict(changed=changed), out / "fsdp.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
