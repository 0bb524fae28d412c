"""The base-model pretraining loop, the shared tokenizer and the shipped key-value models."""

import json

import pytest
import torch

from calm.recipes.kv.bases import ModelShape, build_tokenizer, load_bases
from calm.recipes.kv.pretrain import (
    PretrainConfig,
    gate_accuracy,
    gate_examples,
    gate_task,
    pretrain,
    training_batch,
    training_source,
)
from calm.tasks.kv import Example, KVScale, KVTask

MICRO = KVScale(num_keys=20, max_key_len=3)
TINY = ModelShape(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)


def test_tokenizer_is_one_token_per_character():
    tok = build_tokenizer()
    ids = tok("ab+012=640|1")["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == 13
    assert tok.decode(ids, skip_special_tokens=True) == "ab+012=640|1"
    assert tok.unk_token_id not in ids


def test_labels_cover_only_the_completion_and_eos():
    tok = build_tokenizer()
    stream = iter([Example("ab=", "01"), Example("xy=", "09"), Example("abc+de=", "02+03")])
    cfg = PretrainConfig(batch_size=2)
    batch = training_batch(lambda rng: next(stream), cfg, 0, tok, held={"xy="})  # gate: skipped
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape == (2, 14)
    assert labels[0].tolist()[:4] == [-100] * 4  # BOS + "ab="
    assert tok.decode(labels[0][4:6]) == "01" and labels[0][6] == tok.eos_token_id
    assert (labels[0][7:] == -100).all() and mask[0].sum() == 7
    assert tok.decode(ids[1], skip_special_tokens=True) == "abc+de=02+03"


def test_gate_set_is_never_trained_on():
    task = KVTask(MICRO)
    gate = {ex.prompt for ex in gate_examples(task, "mB", 50)}
    assert len(gate) == 50
    tiny = KVTask(KVScale(num_keys=5, max_key_len=2))  # few expressions: the gate is often drawn
    gate = {ex.prompt for ex in gate_examples(tiny, "mB", 30)}
    cfg, tok = PretrainConfig(model="mB", scale=tiny.scale, batch_size=64), build_tokenizer()
    draw = training_source(tiny, "mB")
    for held, overlaps in ((set(), True), (gate, False)):
        batch = training_batch(draw, cfg, 0, tok, held)
        prompts = {p.split("=")[0] + "=" for p in tok.batch_decode(batch["input_ids"], True)}
        assert bool(prompts & gate) is overlaps


def test_bad_model_name_raises():
    with pytest.raises(ValueError, match="Unknown base model"):
        PretrainConfig(model="mC")


def test_micro_pretrain_writes_model_and_resumes(tmp_path):
    cfg = PretrainConfig(
        model="mA",
        out_dir=str(tmp_path),
        scale=MICRO,
        shape=TINY,
        max_steps=6,
        batch_size=8,
        eval_every=3,
        eval_size=8,
        save_every=3,
        warmup_steps=2,
    )
    summary = pretrain(cfg, verbose=False)
    assert summary["steps"] == 6
    for name in ("model.safetensors", "config.json", "tokenizer.json", "pretrain.json"):
        assert (tmp_path / name).exists()
    assert json.loads((tmp_path / "pretrain.json").read_text())["model"] == "mA"
    again = pretrain(cfg, verbose=False)  # resumes at step 6: nothing left to train
    assert again["steps"] == 6


@pytest.mark.slow
def test_shipped_models_meet_their_gates():
    torch.manual_seed(0)
    bases = load_bases()
    task = KVTask(bases.scale)
    for name, gate in (("mA", 0.95), ("mB", 0.85)):
        sample = gate_task(name, gate_examples(task, name, 100))
        assert gate_accuracy(bases.models[name], bases.tokenizer, sample) >= gate - 0.03


def test_cli_pretrains_a_micro_model_and_records_its_command(tmp_path, capsys):
    from calm.cli import main

    args = ["pretrain", "kv", "vanilla_mA", "--out", str(tmp_path), "--max-steps", "2"]
    args += ["--batch-size", "4", "--eval-size", "4", "--num-keys", "20", "--operands", "2"]
    args += ["--hidden-size", "16", "--layers", "1", "--heads", "2", "--threads", "1"]
    assert main(args) == 0
    summary = json.loads((tmp_path / "pretrain.json").read_text())
    assert summary["steps"] == 2 and summary["trained_on"] == "kv_subs (map_seed 1)"
    assert summary["command"].startswith("calm pretrain kv vanilla_mA --out")
    assert summary["config"]["scale"]["max_operands"] == 2
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["model"] == "vanilla_mA"
