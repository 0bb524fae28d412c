"""calm.likelihood and likelihood tasks: summed log-likelihoods of texts, for every model kind."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_tokenizers import SAMPLES, byte_bpe, unigram

import calm
from calm import hf
from calm.errors import UserError
from calm.likelihood import encode_pairs, text_nll
from calm.tasks.bpb import BitsPerByte
from calm.tokenizers import TokenizerPair


@pytest.fixture(scope="module")
def tok():
    return byte_bpe()  # adds a BOS


def lm(vocab, seed, width=32):
    return hf.tiny_llama(vocab, width, 4, kv_heads=2, seed=seed)


def manual_nll(model, ids: list[int], first_scored: int) -> float:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    targets = torch.tensor(ids[1:])
    losses = F.cross_entropy(logits[:-1].float(), targets, reduction="none")
    return float(losses[first_scored - 1 :].sum())


TEXTS = [("", SAMPLES["english"]), ("", SAMPLES["code"][:30]), ("def add(a, b):", "\n    return")]


def test_equals_a_sum_of_token_losses_and_does_not_depend_on_batching(tok):
    model = lm(len(tok), 0)
    one = text_nll(model, tok, TEXTS, batch_size=1, progress=False)
    three = text_nll(model, tok, TEXTS, batch_size=3, progress=False)
    for a, b in zip(one, three):
        assert a["tokens"] == b["tokens"] and a["nll"] == pytest.approx(b["nll"], abs=1e-4)
    ids = tok(TEXTS[0][1])["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert one[0]["tokens"] == len(ids) - 1  # every text token, the BOS as context
    assert one[0]["nll"] == pytest.approx(manual_nll(model, ids, 1), abs=1e-4)
    context = len(tok(TEXTS[2][0])["input_ids"])
    whole = tok(TEXTS[2][0] + TEXTS[2][1])["input_ids"]
    assert one[2]["tokens"] == len(whole) - context  # the context is not scored
    assert one[2]["nll"] == pytest.approx(manual_nll(model, whole, context), abs=1e-4)


def test_a_tokenizer_without_bos_starts_from_its_eos():
    tok = unigram()  # adds no special token
    tok.eos_token = "</s>" if "</s>" in tok.get_vocab() else tok.pad_token
    ((ids, labels),) = encode_pairs(tok, [("", "Moni bwanji")])
    assert ids[0] == tok.eos_token_id and labels[0] == -100
    assert ids[1:] == tok("Moni bwanji")["input_ids"] == labels[1:]


def test_a_composition_at_init_scores_as_its_anchor(tok):
    anchor = lm(len(tok), 1)
    composed = calm.CALM(anchor, lm(len(tok), 2, width=24), calm.CALMConfig(every=2))
    want = text_nll(anchor, tok, TEXTS, progress=False)
    got = text_nll(composed, tok, TEXTS, progress=False)
    for a, b in zip(want, got):
        assert a["tokens"] == b["tokens"] and a["nll"] == pytest.approx(b["nll"], abs=1e-4)
    with torch.no_grad():
        for p in composed.trainable_parameters():
            p.normal_(0, 0.5)
    moved = text_nll(composed, tok, TEXTS, progress=False)
    assert all(abs(a["nll"] - b["nll"]) > 1e-3 for a, b in zip(want, moved))


def test_a_composition_with_a_tokenizer_pair_at_init_scores_as_its_anchor(tok):
    aug_tok = unigram()
    pair = TokenizerPair(tok, aug_tok)
    anchor = lm(len(tok), 3)
    composed = calm.CALM(anchor, lm(len(aug_tok), 4, width=24), tokenizers=pair)
    want = text_nll(anchor, tok, TEXTS, progress=False)
    got = text_nll(composed, tok, TEXTS, batch_size=2, progress=False)
    for a, b in zip(want, got):
        assert a["tokens"] == b["tokens"] and a["nll"] == pytest.approx(b["nll"], abs=1e-4)


def test_evaluate_scores_a_likelihood_task_in_bits_per_byte(tok):
    model = lm(len(tok), 5)
    task = BitsPerByte(name="bpb-test", texts={k: v for k, v in SAMPLES.items()})
    result = calm.evaluate(model, task, tokenizer=tok, progress=False)
    nll = text_nll(model, tok, [(e.prompt, e.reference) for e in task.examples(0)], progress=False)
    total_bytes = sum(len(v.encode()) for v in SAMPLES.values())
    bits = sum(s["nll"] for s in nll) / torch.log(torch.tensor(2.0)).item()
    assert result.metrics["bits_per_byte"] == pytest.approx(bits / total_bytes, rel=1e-5)
    assert result.metadata["decoding"] == {"scoring": "likelihood"}
    assert [s["id"] for s in result.samples] == [e.id for e in task.examples(0)]


def test_bad_input_is_refused(tok):
    with pytest.raises(UserError, match="batch_size"):
        text_nll(lm(len(tok), 0), tok, TEXTS, batch_size=0, progress=False)
    with pytest.raises(UserError, match="no token to score"):
        encode_pairs(tok, [("abc", "")])
