"""calm.model_card: the README.md written with every saved composition names its models,
connections and trainable parameters, holds a loading call that works, states a `calm.train`
checkpoint's step and losses, and is never read when loading."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import randomize_blocks, tiny_lm
from test_tokenizers import byte_bpe, lm, unigram
from test_train import config, records

from calm import CALM, CALMConfig, Connection, TokenizerPair
from calm.checkpoint import composition_record
from calm.model_card import CARD_NAME, MARKER, model_card
from calm.run import load_model
from calm.train import train
from calm.trainee import Trainee

CONNECTIONS = (Connection(anchor_layer=1, aug_layer=5), Connection(anchor_layer=3, aug_layer=7))


def saved_base(path: Path, model, tokenizer=None) -> str:
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """The paths of a saved tiny anchor (4 layers) and augmenting model (8 layers)."""
    root = tmp_path_factory.mktemp("bases")
    anchor = saved_base(root / "anchor", tiny_lm("llama", 32, 4, seed=0))
    aug = saved_base(root / "aug", tiny_lm("llama", 24, 8, seed=1))
    return anchor, aug


def composed(bases) -> CALM:
    anchor, aug = (load_model(p, "model") for p in bases)
    model = CALM(anchor, aug, CALMConfig(connections=CONNECTIONS, num_heads=2))
    randomize_blocks(model)
    return model


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def code_block(card: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    assert len(blocks) == 1
    return blocks[0]


def run_card_code(directory: Path, monkeypatch) -> CALM:
    """Execute the card's loading code as a user would, from the card's directory."""
    code = code_block((directory / CARD_NAME).read_text())
    monkeypatch.chdir(directory)
    namespace: dict = {}
    exec(compile(code, str(directory / CARD_NAME), "exec"), namespace)
    return namespace["model"]


def blocks(model: CALM) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.trainable_parameters()]


def test_card_names_the_composition_and_its_code_loads_it(bases, tmp_path, monkeypatch):
    model = composed(bases)
    model.save_pretrained(tmp_path / "comp")
    card = (tmp_path / "comp" / CARD_NAME).read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "calm" and "arxiv:2401.02412" in meta["tags"]
    assert "base_model" not in meta  # a local path is no hub name
    assert card.split("---\n", 2)[2].startswith(MARKER)
    for path in bases:
        assert f"`{path}`" in card and f"from_pretrained({path!r})" in card
    assert "| 0 | 0 | 5 | 1 |" in card and "| 1 | 0 | 7 | 3 |" in card
    assert "2 heads each" in card
    count = sum(p.numel() for p in model.blocks.parameters() if p.requires_grad)
    assert f"**{count:,} trainable parameters**" in card
    identity = composition_record(model)["anchor"]
    assert identity["weights_fingerprint"] in card and identity["config_hash"] in card
    assert "@inproceedings{bansal2024llm" in card and "2401.02412" in card
    assert "No training state" in card

    loaded = run_card_code(tmp_path / "comp", monkeypatch)
    assert isinstance(loaded, CALM) and loaded.connections == model.connections
    for a, b in zip(blocks(model), blocks(loaded)):
        assert torch.equal(a, b)


def test_card_of_a_tokenizer_pair_rebuilds_the_pair(tmp_path, monkeypatch):
    anchor_tok, aug_tok = unigram(), byte_bpe()
    anchor = saved_base(tmp_path / "anchor", lm(len(anchor_tok), 32, 4, 0), anchor_tok)
    aug = saved_base(tmp_path / "aug", lm(len(aug_tok), 24, 4, 1), aug_tok)
    pair = TokenizerPair(anchor_tok, aug_tok)
    models = (load_model(anchor, "anchor"), load_model(aug, "aug"))
    model = CALM(*models, CALMConfig(every=2), tokenizers=pair)
    randomize_blocks(model)
    model.save_pretrained(tmp_path / "comp")
    card = (tmp_path / "comp" / CARD_NAME).read_text()
    assert "calm.TokenizerPair(" in card and "tokenizers=tokenizers" in card
    assert f"{len(aug_tok)} augmenting tokens" in card

    loaded = run_card_code(tmp_path / "comp", monkeypatch)
    assert isinstance(loaded.tokenizers, TokenizerPair)
    batch = loaded.tokenizers(["the river is cloud"])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)


def test_loading_ignores_the_card_and_a_foreign_readme_is_kept(bases, tmp_path):
    model = composed(bases)
    directory = tmp_path / "comp"
    model.save_pretrained(directory)
    config_json = (directory / "calm_config.json").read_bytes()
    garbled = b"\xff\xfe---\n\x00not: [yaml\n" + bytes(range(256))
    (directory / CARD_NAME).write_bytes(garbled)
    models = [load_model(p, "model") for p in bases]
    loaded = CALM.from_pretrained(directory, *models)
    for a, b in zip(blocks(model), blocks(loaded)):
        assert torch.equal(a, b)
    loaded.remove()
    model.save_pretrained(directory)  # a README.md calm did not write stays as it is
    assert (directory / CARD_NAME).read_bytes() == garbled
    assert (directory / "calm_config.json").read_bytes() == config_json  # the card is in no record
    (directory / CARD_NAME).unlink()
    CALM.from_pretrained(directory, *models).remove()
    assert not any(p.name.startswith(".") for p in directory.iterdir())  # no temporary file left


def test_train_checkpoint_cards_hold_the_step_and_losses(tmp_path):
    anchor, aug = tiny_lm("llama", 32, 4, seed=0), tiny_lm("llama", 24, 8, seed=1)
    model = CALM(anchor, aug, CALMConfig(init="default"))
    cfg = config(tmp_path, "run", max_steps=4, save_every=2, eval_every=2, stop_after=2)
    train(model, records(), records(4, seed=9), cfg)
    first = Path(cfg.output_dir) / "checkpoints" / "step-00000002"
    (first / CARD_NAME).write_bytes(b"\x00garbled")  # resuming does not read the card
    resumed = config(tmp_path, "run", max_steps=4, save_every=2, eval_every=2)
    train(model, records(), records(4, seed=9), resumed, resume=True)
    run = Path(cfg.output_dir)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in metrics if "loss" in r}
    evals = {r["step"]: r["eval_loss"] for r in metrics if "eval_loss" in r}
    card = (run / "checkpoints" / "step-00000004" / CARD_NAME).read_text()
    state = json.loads((run / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert "| step | 4 |" in card
    assert f"| train loss (mean of the last logging window) | {losses[4]:.4f} |" in card
    assert f"| eval loss (last evaluation) | {evals[4]:.4f} |" in card
    assert f"| best eval loss | {min(evals.values()):.4f} at step " in card
    assert f"| training data fingerprint | {state['data_fingerprint']} |" in card
    assert "| training examples | 12 |" in card
    assert f"{model.num_trainable_parameters():,} trainable parameters" in card
    best = json.loads((run / "best" / "state.json").read_text())
    best_card = (run / "best" / CARD_NAME).read_text()  # best/ states the step it was saved at
    assert f"| step | {best['step']} |" in best_card
    assert f"| eval loss (last evaluation) | {best['eval_loss']:.4f} |" in best_card


def test_a_peft_checkpoint_keeps_the_card_peft_writes(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_lm("llama", 32, 4), LoraConfig(r=2, target_modules=["q_proj"]))
    Trainee(model).save(tmp_path, {"step": 3, "train_loss": 1.0})
    card = (tmp_path / CARD_NAME).read_text()
    assert MARKER not in card and "library_name: peft" in card


def record(anchor_name: str = "org/anchor-7b", aug_name: str = "") -> dict:
    """A composition record as `composition_record` writes it, with these base-model names."""

    def identity(name: str, seed: int) -> dict:
        hashes = {"config_hash": f"c{seed}", "weights_fingerprint": f"w{seed}"}
        return {"class": "LlamaForCausalLM", "name_or_path": name, **hashes}

    return {
        "calm_version": "0.1.0",
        "config": CALMConfig().to_dict(),
        "connections": [{"anchor_layer": 3, "aug_layer": 7, "augment": 0}],
        "anchor": identity(anchor_name, 0),
        "augments": [identity(aug_name, 1)],
        "num_heads": 8,
        "num_trainable_parameters": 1234567,
    }


def test_card_text_from_a_record():
    card = model_card(record())
    assert front_matter(card)["base_model"] == "org/anchor-7b"
    assert "**1,234,567 trainable parameters**" in card and "8 heads each" in card
    assert "(not recorded)" in card  # the augmenting model was built in memory
    assert "<the augmenting model 0: LlamaForCausalLM w1>" in code_block(card)
    assert "replace each `<...>`" in card
    compile(code_block(card), "card", "exec")
    for path in ("/data/models/anchor", "./anchor", "../m", "a/b/c"):
        assert "base_model" not in front_matter(model_card(record(anchor_name=path)))
    training = {"step": 10, "train_loss": 2.5, "eval_loss": None, "best_eval_loss": None}
    card = model_card(record(), training=training)
    assert "| step | 10 |" in card and "| 2.5000 |" in card
    assert (
        "| eval loss (last evaluation) | not measured |" in card
        and "| best eval loss | - |" in card
    )
