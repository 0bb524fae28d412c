"""calm.train on a composition whose anchor and augmenting tokenizers differ (a TokenizerPair):
data alignment, the loss falls, the augmenting-state cache, bad input. Tiny models, seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import randomize_blocks
from test_tokenizers import byte_bpe, lm, unigram
from test_train import config as train_config

from calm import CALM, CALMConfig, TokenizerPair
from calm.data import IGNORE, collate, encode
from calm.train import TrainConfig, train

WORDS = ["river", "stone", "cloud", "tiger", "apple", "music", "green", "storm"]


@pytest.fixture(scope="module")
def toks():
    return unigram(), byte_bpe()  # anchor, augment: different vocabularies and special tokens


def make_model(toks, dropout: float = 0.0, randomize: bool = False, init="default") -> CALM:
    anchor_tok, aug_tok = toks
    pair = TokenizerPair(anchor_tok, aug_tok)
    anchor, aug = lm(len(anchor_tok), 32, 4, 0), lm(len(aug_tok), 24, 4, 1)
    model = CALM(anchor, aug, CALMConfig(every=2, dropout=dropout, init=init), tokenizers=pair)
    if randomize:
        randomize_blocks(model)
    return model


def records(n: int = 8) -> list[dict]:
    out = []
    for i in range(n):
        a, b = WORDS[i % len(WORDS)], WORDS[(3 * i + 1) % len(WORDS)]
        if i % 2:
            out.append({"text": f"the {a} and the {b} went home"})
        else:
            out.append({"prompt": f"say {a} then {b}:", "completion": f" {a} {b}"})
    return out


def config(tmp_path, name: str, **kw) -> TrainConfig:
    """test_train's config without its warm-up."""
    return train_config(tmp_path, name, **{"warmup_steps": 0, **kw})


def losses(run_dir) -> list[float]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


def test_collated_batch_gives_the_pairs_logits(toks):
    """Right-padded training batches (anchor and augments) compute what `pair(texts)` computes."""
    model = make_model(toks, randomize=True)
    pair = model.tokenizers
    data = [r for r in records(6) if "text" in r] + [{"text": "a"}]
    encoded = encode(data, pair=pair)
    assert len(encoded.aug_input_ids) == 1 and len(encoded.aug_visible[0]) == len(data)
    batch = collate(encoded, range(len(data)), pair.anchor.pad_id, [pair.augs[0].pad_id])
    assert batch["aug_input_ids"][0].shape == batch["aug_attention_mask"][0].shape
    assert batch["aug_visible"][0].shape == batch["input_ids"].shape
    with torch.no_grad():
        got = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        ref_batch = pair([r["text"] for r in data], append_eos=pair.anchor.eos_id is not None)
        ref = model(**ref_batch).logits
    for row in range(len(data)):
        real_got = got[row][batch["attention_mask"][row].bool()]
        real_ref = ref[row][ref_batch["attention_mask"][row].bool()]
        torch.testing.assert_close(real_got, real_ref, atol=1e-5, rtol=1e-5)


def test_prompt_tokens_carry_no_loss(toks):
    pair = TokenizerPair(*toks)
    record = {"prompt": "say river then stone:", "completion": " river stone"}
    encoded = encode([record], pair=pair)
    ids, labels = encoded.input_ids[0], encoded.labels[0]
    prompt_only = pair(["say river then stone:"])["input_ids"].shape[1]
    assert all(t == IGNORE for t in labels[: prompt_only - 1])
    assert list(labels[prompt_only:]) == list(ids[prompt_only:])


def test_trains_a_pair_and_the_loss_falls(toks, tmp_path):
    model = make_model(toks)
    base = {n: p.clone() for n, p in model.named_parameters() if not n.startswith("blocks.")}
    cfg = config(tmp_path, "run", max_steps=12, eval_every=6)
    result = train(model, records(), records(4), cfg)
    assert result.step == 12 and result.skipped_steps == 0 and result.eval_loss is not None
    curve = losses(cfg.output_dir)
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3 - 0.1, curve
    for n, p in model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), n
    reloaded = CALM.from_pretrained(
        result.checkpoint,
        lm(len(toks[0]), 32, 4, 0),
        lm(len(toks[1]), 24, 4, 1),
        tokenizers=model.tokenizers,
    )
    batch = model.tokenizers(["the river and"])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model.eval()(**batch).logits)


@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_cache_gives_the_same_training(toks, tmp_path, kind):
    plain, cached = make_model(toks), make_model(toks)
    train(plain, records(), config=config(tmp_path, "plain", epochs=3, max_steps=None))
    cfg = config(tmp_path, kind, epochs=3, max_steps=None, aug_cache=kind)
    train(cached, records(), config=cfg)
    for a, b in zip(plain.trainable_parameters(), cached.trainable_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert losses(cfg.output_dir) == pytest.approx(losses(tmp_path / "plain"), abs=1e-6)
    if kind == "disk":
        assert len(list((Path(cfg.output_dir) / "aug_cache").glob("*/*.safetensors"))) == 8


def test_pair_data_bad_input(toks, tmp_path):
    pair = TokenizerPair(*toks)
    with pytest.raises(ValueError, match="record 0: this composition pairs different tokenizers"):
        encode([{"input_ids": [1, 2, 3]}], pair=pair)
    with pytest.raises(ValueError, match="field 'text' must be a string"):
        encode([{"text": 3}], pair=pair)
    long = [{"text": " ".join(WORDS * 4)}]
    with pytest.raises(ValueError, match="more than max_length=8 anchor tokens"):
        encode(long, max_length=8, truncation="error", pair=pair)
    cut = encode(long, max_length=8, pair=pair)
    assert cut.num_truncated == 1 and len(cut.input_ids[0]) <= 8
    assert len(cut.aug_visible[0][0]) == len(cut.input_ids[0])


def test_eval_harness_on_a_pair_equals_the_anchor_at_init(toks):
    """calm.evaluate feeds a pair composition its aligned batch (plain ids would be refused)."""
    from test_eval import EchoTask

    from calm.eval import evaluate

    model = make_model(toks, init="zero")
    result = evaluate(model, EchoTask(), tokenizer=toks[0], progress=False)
    alone = evaluate(model.anchor, EchoTask(), tokenizer=toks[0], progress=False)
    assert result.metadata["model"]["class"] == "CALM"
    completions = [s["completions"] for s in result.samples]
    assert completions == [s["completions"] for s in alone.samples]
    assert any(c[0] for c in completions)
