"""calm.run: a run directory as an object, and `load_run` rebuilding a trained composition from it
(one token stream, and a TokenizerPair) on tiny saved models."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_lm
from test_tokenizers import byte_bpe, lm, unigram
from test_train import config

from calm import CALM, CALMConfig, TokenizerPair
from calm.errors import UserError
from calm.recipes.kv.bases import build_tokenizer
from calm.run import LoadedRun, Run, load_run, resolve_source
from calm.train import train

DATA = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(4) for b in range(3)]
TEXTS = [{"text": f"the {w} is {w}"} for w in ("river", "stone", "cloud", "tiger")] * 2


def blocks(model: CALM) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.trainable_parameters()]


def saved(path, model, tokenizer):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory):
    """A trained composition whose models share one tokenizer, its run directory written as
    `calm train` writes it."""
    root = tmp_path_factory.mktemp("run")
    tok = build_tokenizer()
    anchor = saved(root / "anchor", tiny_lm("llama", 32, 4, seed=0), tok)
    aug = saved(root / "aug", tiny_lm("llama", 24, 8, seed=1), tok)
    model = CALM(*_load(anchor, aug), CALMConfig(init="default"))
    cfg = config(root, "out", max_steps=2, eval_every=1, save_every=1)
    train(model, DATA, DATA[:4], config=cfg, tokenizer=tok)
    Run(cfg.output_dir).write_models(anchor, [aug], anchor)
    return root, model


def _load(*sources):
    from calm.run import load_model

    return [load_model(s, "model") for s in sources]


def test_load_run_round_trip_with_one_tokenizer(shared_run):
    root, model = shared_run
    loaded = load_run(root / "out")
    assert isinstance(loaded, LoadedRun) and isinstance(loaded.model, CALM)
    assert loaded.pair is None and loaded.aug_tokenizers == []
    assert loaded.checkpoint == Run(root / "out").checkpoints()[-1]
    assert loaded.tokenizer.get_vocab() == build_tokenizer().get_vocab()
    assert not loaded.model.training
    for a, b in zip(blocks(model), blocks(loaded.model)):
        assert torch.equal(a, b)
    best = load_run(root / "out", checkpoint="best")
    assert best.checkpoint == root / "out" / "best"
    with pytest.raises(ValueError, match="anchor differs"):  # another anchor than recorded
        other = saved(root / "other", tiny_lm("llama", 32, 4, seed=9), build_tokenizer())
        load_run(root / "out", anchor=other)


def test_run_directory_files_and_lookup(shared_run, tmp_path):
    root, _ = shared_run
    run = Run(root / "out")
    assert [p.name for p in run.checkpoints()] == ["step-00000001", "step-00000002"]
    assert run.resolve("last") == run.checkpoints()[-1]
    assert run.resolve(run.checkpoints()[0]) == run.checkpoints()[0]
    assert run.config().max_steps == 2
    assert [r["step"] for r in run.metrics() if "loss" in r] == [1, 2]
    assert run.models()["augments"] == [str(root / "aug")]
    assert run.base_models(run.resolve())["anchor"] == str(root / "anchor")
    no_models = Run(tmp_path)  # no models.json: the names the composition record holds
    assert no_models.models() is None
    assert no_models.base_models(run.resolve())["anchor"] == str(root / "anchor")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Run(tmp_path / "missing").resolve()
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        Run(tmp_path).resolve()
    with pytest.raises(FileNotFoundError, match="holds no composition"):
        Run(tmp_path).resolve("best")
    with pytest.raises(UserError, match="does not exist"):
        resolve_source(str(tmp_path / "nowhere"))
    assert resolve_source("org/model") == "org/model"


def test_load_run_round_trip_with_a_tokenizer_pair(tmp_path):
    anchor_tok, aug_tok = unigram(), byte_bpe()
    anchor = saved(tmp_path / "anchor", lm(len(anchor_tok), 32, 4, 0), anchor_tok)
    aug = saved(tmp_path / "aug", lm(len(aug_tok), 24, 4, 1), aug_tok)
    pair = TokenizerPair(anchor_tok, aug_tok)
    model = CALM(*_load(anchor, aug), CALMConfig(every=2, init="default"), tokenizers=pair)
    cfg = config(tmp_path, "out", max_steps=2)
    train(model, TEXTS, config=cfg)
    models = Run(cfg.output_dir).write_models(anchor, [aug], anchor, aug_tokenizers=[aug])
    assert json.loads(Run(cfg.output_dir).models_path.read_text()) == models

    loaded = load_run(cfg.output_dir)
    assert loaded.pair is not None and len(loaded.aug_tokenizers) == 1
    assert loaded.aug_tokenizers[0].get_vocab() == aug_tok.get_vocab()
    assert loaded.model.tokenizers is loaded.pair
    batch = loaded.pair(["the river is cloud"])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**batch).logits, model(**batch).logits)
