"""calm.checkpoint: a failed load leaves the base models as they were, directories are published
whole, old checkpoints pruned; the module stands below calm.model."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import tiny_lm

from calm import CALM
from calm.checkpoint import STATE_NAME, prune, publish, step_directories


def flags(models) -> tuple[list[bool], list[bool]]:
    grads = [p.requires_grad for m in models for p in m.parameters()]
    return grads, [m.training for m in models]


@pytest.fixture
def saved(tmp_path):
    model = CALM(tiny_lm("llama", 32, 4, seed=0), tiny_lm("llama", 24, 8, seed=1))
    model.save_pretrained(tmp_path / "comp")
    model.remove()
    return tmp_path / "comp"


def bases(anchor_seed: int = 0, width: int = 32):
    anchor, aug = tiny_lm("llama", width, 4, seed=anchor_seed), tiny_lm("llama", 24, 8, seed=1)
    anchor.train()  # modes and flags the composition must give back
    anchor.lm_head.weight.requires_grad_(False)
    return anchor, aug


@pytest.mark.parametrize("case", ["other weights", "wider anchor unchecked", "no weights file"])
def test_failed_load_gives_the_base_models_back(saved, case):
    seed, width = (9, 32) if case == "other weights" else (0, 48 if "wider" in case else 32)
    anchor, aug = bases(anchor_seed=seed, width=width)
    if case == "no weights file":
        (saved / "composition.safetensors").unlink()
    before = flags([anchor, aug])
    with pytest.raises((ValueError, RuntimeError, FileNotFoundError)):
        CALM.from_pretrained(saved, anchor, aug, check_base_models=case == "other weights")
    assert flags([anchor, aug]) == before
    assert before[0].count(False) == 1 and before[1] == [True, False]


def test_refused_base_models_say_which_and_how(saved):
    with pytest.raises(ValueError, match=r"^The anchor differs .*weights.*check_base_models=False"):
        CALM.from_pretrained(saved, *bases(anchor_seed=9))
    with pytest.raises(ValueError, match="trained with 1 augmenting models, but 2 were given"):
        anchor, aug = bases()
        CALM.from_pretrained(saved, anchor, [aug, tiny_lm("llama", 24, 8, seed=1)])
    assert CALM.from_pretrained(saved, *bases()).num_trainable_parameters() > 0


def test_publish_replaces_a_directory_whole_and_prune_keeps_the_newest(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        tmp = root / f".tmp-step-{step:08d}"
        tmp.mkdir(parents=True)
        (tmp / STATE_NAME).write_text("{}")
        publish(tmp, root / f"step-{step:08d}")
    (root / "step-00000004").mkdir()  # incomplete: no state.json
    assert [p.name for p in step_directories(root)] == [f"step-{s:08d}" for s in (1, 2, 3)]
    replacement = root / ".tmp-again"
    replacement.mkdir()
    (replacement / STATE_NAME).write_text('{"new": 1}')
    publish(replacement, root / "step-00000003")
    assert (root / "step-00000003" / STATE_NAME).read_text() == '{"new": 1}'
    assert not any(p.name.startswith((".tmp", ".old")) for p in root.iterdir())
    prune(root, keep=2)
    assert [p.name for p in step_directories(root)] == ["step-00000002", "step-00000003"]
    assert step_directories(tmp_path / "missing") == []


def test_checkpoint_module_does_not_import_the_model():
    code = "import sys, calm.checkpoint; print('calm.model' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
