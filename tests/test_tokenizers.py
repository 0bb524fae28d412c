"""calm.TokenizerPair and CALM with different tokenizers: prefix consistency, identity with the
shared stream, cached generation, bad input. Tokenizers are trained here, in well under a second."""

from __future__ import annotations

import inspect
import textwrap

import numpy as np
import pytest
import torch
import transformers as T
from conftest import randomize_blocks, tiny_lm
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from calm import CALM, CALMConfig
from calm.errors import UserError
from calm.tokenizers import TokenizerPair, cut_points

SAMPLES = {
    "english": "The quick brown fox jumps over the lazy dog. It's 2026; don't panic!",
    "code": "def add(a, b):\n    return a+b  # sum\n\nprint(add(1,2)) if x>=3 else None",
    "chichewa": "Pachiyambi Mulungu adalenga kumwamba ndi dziko lapansi. Moni, muli bwanji?",
    "emoji": "Hello 😀 world 🎉🎉 ok 👍🏽 naïve café — fin",
    "whitespace": "a  b   c\t\td \n\n  e    \t f  ",
}
CORPUS = "\n".join(SAMPLES.values()) + "\n" + inspect.getsource(textwrap)


def _fast(tok: Tokenizer, bos: str | None, eos: str | None) -> T.PreTrainedTokenizerFast:
    return T.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token="<pad>"
    )


def byte_bpe(vocab: int = 420) -> T.PreTrainedTokenizerFast:
    """GPT-2-style byte-level BPE with a BOS added in front."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        [CORPUS],
        trainers.BpeTrainer(
            vocab_size=vocab,
            special_tokens=["<pad>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return _fast(tok, "<s>", "</s>")


def wordpiece() -> T.PreTrainedTokenizerFast:
    """BERT-style lower-cased WordPiece, [CLS] before and [SEP] after every text."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(
        [CORPUS],
        trainers.WordPieceTrainer(
            vocab_size=300, special_tokens=["<pad>", "[UNK]", "[CLS]", "[SEP]"]
        ),
    )
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    return _fast(tok, "[CLS]", "[SEP]")


def unigram() -> T.PreTrainedTokenizerFast:
    """SentencePiece-style Unigram over Metaspace pieces, no special tokens added."""
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(
        [CORPUS],
        trainers.UnigramTrainer(
            vocab_size=250, special_tokens=["<pad>", "<unk>"], unk_token="<unk>"
        ),
    )
    return _fast(tok, None, None)


@pytest.fixture(scope="module")
def toks():
    return {"bpe": byte_bpe(), "wordpiece": wordpiece(), "unigram": unigram()}


def lm(vocab: int, width: int, layers: int, seed: int):
    """A random Llama over a vocabulary of `vocab` tokens."""
    return tiny_lm("llama", width, layers, seed, vocab=vocab)


def composed(anchor_tok, aug_tok, seed=0):
    pair = TokenizerPair(anchor_tok, aug_tok)
    anchor = lm(len(anchor_tok), 32, 4, seed)
    aug = lm(len(aug_tok), 24, 4, seed + 1)
    model = CALM(anchor, aug, CALMConfig(every=2), tokenizers=pair)
    randomize_blocks(model, seed)
    return pair, model


def train_losses(model, batch, labels, steps: int, lr: float) -> list[float]:
    """The loss before each of `steps` AdamW steps of the composition on one batch."""
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


PAIRS = [("unigram", "bpe"), ("bpe", "wordpiece"), ("wordpiece", "unigram")]


def naive_visible(pair, text):
    """The leaky rule: every augmenting token whose span ends by the anchor token's end."""
    anchor = pair.anchor.encode([text])[0]
    ends = np.maximum.accumulate(np.concatenate([np.zeros(len(pair.anchor.lead)), anchor[2]]))
    _, _, aug_ends = pair.augs[0].encode([text])[0]
    return len(pair.augs[0].lead) + np.searchsorted(np.sort(aug_ends), ends, side="right")


def prefix_violations(pair, text, visible_of=None):
    """(e, t): cut points e (every character) where anchor token t, the same token with the same
    end in text[:e] and in text, sees different augmenting tokens in the two."""

    def aligned(t):
        b = pair([t])
        real = b["attention_mask"][0].bool()
        lead = np.zeros(len(pair.anchor.lead), dtype=np.int64)
        ends = np.maximum.accumulate(np.concatenate([lead, pair.anchor.encode([t])[0][2]]))
        aug = b["aug_input_ids"][0][0][b["aug_attention_mask"][0][0].bool()]
        vis = b["aug_visible"][0][0][real]
        if visible_of is not None:
            vis = torch.as_tensor(visible_of(pair, t))
        return b["input_ids"][0][real], ends, aug, vis

    ids, ends, aug, vis = aligned(text)
    bad = []
    for e in range(1, len(text) + 1):
        p_ids, p_ends, p_aug, p_vis = aligned(text[:e])
        for t in range(min(len(ids), len(p_ids))):
            if ids[t] != p_ids[t]:
                break
            k = int(vis[t])
            same = int(p_vis[t]) == k and torch.equal(aug[:k], p_aug[:k])
            if ends[t] == p_ends[t] and not same:
                bad.append((e, t))
                break
    return bad


def test_cut_points():
    assert cut_points("ab  c d").tolist() == [2, 5]
    assert cut_points(" a\n b").tolist() == []
    assert cut_points("x😀 y").tolist() == [2]


@pytest.mark.parametrize("anchor_name,aug_name", PAIRS)
@pytest.mark.parametrize("sample", sorted(SAMPLES))
def test_prefix_consistency_of_alignment(toks, anchor_name, aug_name, sample):
    pair = TokenizerPair(toks[anchor_name], toks[aug_name])
    assert prefix_violations(pair, SAMPLES[sample]) == []


def test_naive_rule_leaks(toks):
    """The check above can fail: "aug tokens that end by e_t" changes when text is appended."""
    pair = TokenizerPair(toks["unigram"], toks["bpe"])
    leaks = sum(
        len(prefix_violations(pair, text, visible_of=naive_visible)) for text in SAMPLES.values()
    )
    assert leaks > 0


@pytest.mark.parametrize("anchor_name,aug_name", PAIRS)
def test_prefix_consistency_of_logits(toks, anchor_name, aug_name):
    pair, model = composed(toks[anchor_name], toks[aug_name])
    for text in SAMPLES.values():
        full = pair([text])
        logits = model(**full).logits[0]
        ends = pair.anchor.encode([text])[0][2]
        lead = len(pair.anchor.lead)
        cuts = sorted({int(e) for e in ends[:: max(1, len(ends) // 6)]} | {int(ends[-1])})
        prefixes = [text[:e] for e in cuts]
        batch = pair(prefixes)  # one left-padded batch of prefixes
        out = model(**batch).logits
        for row in range(len(cuts)):
            real = batch["attention_mask"][row].bool()
            ids = batch["input_ids"][row][real]
            if not torch.equal(ids, full["input_ids"][0][: len(ids)]):
                continue  # the condition: the prefix tokenizes as the text's first tokens
            assert len(ids) >= lead
            torch.testing.assert_close(out[row][real], logits[: len(ids)], atol=2e-5, rtol=0)


def test_composition_changes_outputs_and_sees_augment(toks):
    pair, model = composed(toks["unigram"], toks["bpe"])
    batch = pair([SAMPLES["english"]])
    with model.disable_composition():
        plain = model(**batch).logits
    assert not torch.allclose(model(**batch).logits, plain)
    other = dict(batch)
    other["aug_input_ids"] = [torch.randint(3, len(toks["bpe"]), batch["aug_input_ids"][0].shape)]
    assert not torch.allclose(model(**other).logits, model(**batch).logits)


def test_identity_at_init(toks):
    pair = TokenizerPair(toks["unigram"], toks["bpe"])
    anchor = lm(len(toks["unigram"]), 32, 4, 0)
    model = CALM(anchor, lm(len(toks["bpe"]), 24, 4, 1), tokenizers=pair)
    batch = pair(list(SAMPLES.values()))
    mask = batch["attention_mask"]
    want = anchor(
        batch["input_ids"], attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)
    ).logits
    got = model(**batch).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=1e-5, rtol=0)


def test_identical_tokenizers_equal_shared_stream(toks):
    """Same tokenizer on both sides: the same ids, and exactly the shared-stream composition
    restricted by the visibility rule, which never shows more than positions <= t."""
    tok = toks["bpe"]
    pair = TokenizerPair(tok, tok)
    anchor, aug = lm(len(tok), 32, 4, 0), lm(len(tok), 24, 4, 1)
    paired = CALM(anchor, aug, CALMConfig(every=2), tokenizers=pair)
    shared = CALM(anchor, aug, CALMConfig(every=2))
    randomize_blocks(paired)
    shared.blocks.load_state_dict(paired.blocks.state_dict())
    batch = pair(list(SAMPLES.values()))
    assert torch.equal(batch["aug_input_ids"][0], batch["input_ids"])
    assert torch.equal(batch["aug_attention_mask"][0], batch["attention_mask"])
    visible = batch["aug_visible"][0]
    mask = batch["attention_mask"]
    position = mask.cumsum(-1)  # t + 1 among real tokens
    assert bool(((visible <= position) | (mask == 0)).all())
    ids = batch["input_ids"]
    got = paired(**batch).logits
    assert torch.equal(got, shared(ids, attention_mask=mask, aug_visible=[visible]).logits)
    # With the shared-stream count, the visibility mask is the shared-stream mask, bit for bit.
    assert torch.equal(
        shared(ids, attention_mask=mask, aug_visible=[position * mask]).logits,
        shared(ids, attention_mask=mask).logits,
    )
    assert not torch.equal(got, shared(ids, attention_mask=mask).logits)


@pytest.mark.parametrize("anchor_name,aug_name", PAIRS)
def test_cached_generation_equals_full_recomputation(toks, anchor_name, aug_name):
    pair, model = composed(toks[anchor_name], toks[aug_name], seed=3)
    prompts = [SAMPLES["english"][:23], SAMPLES["code"][:40], "Moni"]
    batch = pair(prompts)
    steps = 10
    got = model.generate(**batch, max_new_tokens=steps, eos_token_id=[], pad_token_id=0)
    prompt_len = batch["input_ids"].shape[1]
    assert got.shape == (3, prompt_len + steps)
    for j in range(steps):
        ref = pair.extend(batch, got[:, prompt_len : prompt_len + j])
        want = model(**ref).logits[:, -1].argmax(-1)
        assert torch.equal(got[:, prompt_len + j], want), j
    final = pair.extend(batch, got[:, prompt_len:])
    assert all(t.startswith(p) for t, p in zip(final["texts"], prompts))


def test_generation_feeds_augment_incrementally(toks):
    """The augmenting model reads each stable token once: its cache grows with the text."""
    pair, model = composed(toks["unigram"], toks["bpe"], seed=3)
    batch = pair(["The quick brown"])
    calls = []
    backbone = model.augments[0].model
    handle = backbone.register_forward_pre_hook(
        lambda m, a, kw: calls.append(kw["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        model.generate(**batch, max_new_tokens=12, eos_token_id=[], pad_token_id=0)
    finally:
        handle.remove()
    assert calls[0] == batch["aug_input_ids"][0].shape[1]
    assert all(n <= 4 for n in calls[1:])


def test_two_augmenting_models(toks):
    pair = TokenizerPair(toks["unigram"], [toks["bpe"], toks["wordpiece"]])
    anchor = lm(len(toks["unigram"]), 32, 4, 0)
    augs = [lm(len(toks["bpe"]), 24, 4, 1), lm(len(toks["wordpiece"]), 16, 4, 2)]
    model = CALM(anchor, augs, CALMConfig(every=2), tokenizers=pair)
    randomize_blocks(model)
    batch = pair([SAMPLES["english"][:30], SAMPLES["emoji"][:20]])
    assert len(batch["aug_input_ids"]) == 2
    got = model.generate(**batch, max_new_tokens=5, eos_token_id=[], pad_token_id=0)
    n = batch["input_ids"].shape[1]
    for j in range(5):
        want = model(**pair.extend(batch, got[:, n : n + j])).logits[:, -1].argmax(-1)
        assert torch.equal(got[:, n + j], want)


def test_special_tokens(toks):
    pair = TokenizerPair(toks["wordpiece"], toks["bpe"])
    batch = pair(["hello world"])
    wp, bpe = toks["wordpiece"], toks["bpe"]
    assert batch["input_ids"][0, 0] == wp.convert_tokens_to_ids("[CLS]")
    assert wp.convert_tokens_to_ids("[SEP]") not in batch["input_ids"][0].tolist()
    assert batch["aug_input_ids"][0][0, 0] == bpe.convert_tokens_to_ids("<s>")
    assert int(batch["aug_visible"][0][0, 0]) == 1  # BOS: always visible, from the first token
    reverse = TokenizerPair(bpe, wp)(["hello world"])
    assert wp.convert_tokens_to_ids("[SEP]") not in reverse["aug_input_ids"][0][0].tolist()


def test_training_step(toks):
    pair, model = composed(toks["unigram"], toks["bpe"])
    model.train()
    batch = pair(list(SAMPLES.values()))
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    losses = train_losses(model, batch, labels, steps=5, lr=1e-2)
    assert losses[-1] < losses[0]


class SlowChars(T.PreTrainedTokenizer):
    """A Python tokenizer: it silently ignores return_offsets_mapping."""

    def __init__(self, **kwargs):
        self.vocab = {chr(i): i for i in range(128)}
        super().__init__(**kwargs)

    def get_vocab(self):
        return dict(self.vocab)

    @property
    def vocab_size(self):
        return 128

    def _tokenize(self, text):
        return list(text)

    def _convert_token_to_id(self, token):
        return self.vocab.get(token, 0)

    def _convert_id_to_token(self, index):
        return chr(index)


def test_bad_input(toks):
    with pytest.raises(UserError, match="offsets"):
        TokenizerPair(SlowChars(), toks["bpe"])
    with pytest.raises(UserError, match="offsets"):
        TokenizerPair(toks["bpe"], SlowChars())
    joined = Tokenizer(models.WordLevel({"a b": 0, "a": 1, "b": 2, "[UNK]": 3}, unk_token="[UNK]"))
    joined.pre_tokenizer = pre_tokenizers.Split("\n", "isolated")
    joined.decoder = decoders.Fuse()
    with pytest.raises(ValueError, match="space after it"):
        TokenizerPair(toks["bpe"], joined)
    TokenizerPair(joined, toks["bpe"])  # an anchor may join words: it only needs offsets
    pair = TokenizerPair(toks["unigram"], toks["bpe"])
    anchor = lm(len(toks["unigram"]), 32, 4, 0)
    aug = lm(len(toks["bpe"]), 24, 4, 1)
    with pytest.raises(ValueError, match="vocabulary"):
        CALM(anchor, aug)  # different vocabularies, no pair: refused as before
    with pytest.raises(ValueError, match="2 augmenting tokenizers"):
        CALM(anchor, aug, tokenizers=TokenizerPair(toks["unigram"], [toks["bpe"]] * 2))
    with pytest.raises(ValueError, match="rows"):
        CALM(lm(10, 32, 4, 0), aug, tokenizers=pair)
    model = CALM(anchor, aug, tokenizers=pair)
    batch = pair(["hello there"])
    with pytest.raises(ValueError, match="pair\\(texts\\)"):
        model(batch["input_ids"])
    no_texts = {k: v for k, v in batch.items() if k != "texts"}
    with pytest.raises(ValueError, match="texts"):
        model.generate(**no_texts, max_new_tokens=2)
    with pytest.raises(TypeError, match="list of strings"):
        pair([1, 2])
    shared = CALM(anchor, lm(len(toks["unigram"]), 24, 4, 1))
    ids = batch["input_ids"]
    with pytest.raises(ValueError, match="TokenizerPair batch"):
        shared.generate(ids, aug_visible=[torch.ones_like(ids)], max_new_tokens=1)
    with pytest.raises(ValueError, match="one tensor of shape"):
        shared(ids, aug_visible=[torch.ones(1, 1, dtype=torch.long)])


def test_forward_reads_the_batch_texts(toks):
    """A TokenizerPair batch is passed whole; forward checks that its texts match its rows."""
    pair, model = composed(toks["unigram"], toks["bpe"])
    batch = pair(["hello there", "general kenobi"])
    want = model(**batch).logits
    assert torch.equal(model(**{k: v for k, v in batch.items() if k != "texts"}).logits, want)
    with pytest.raises(ValueError, match="one text per row"):
        model(**{**batch, "texts": batch["texts"][:1]})
    with pytest.raises(ValueError, match="one text per row"):
        model.generate(**{**batch, "texts": "hello there"}, max_new_tokens=1)


def test_append_eos_and_labels(toks):
    pair = TokenizerPair(toks["bpe"], toks["unigram"])
    prompts, completions = ["Moni, muli", "def add(a, b):"], [" bwanji?", "\n    return a+b"]
    texts = [p + c for p, c in zip(prompts, completions)]
    plain, ended = pair(texts), pair(texts, append_eos=True)
    eos = toks["bpe"].eos_token_id
    assert (ended["input_ids"][:, -1] == eos).all()
    assert torch.equal(ended["aug_visible"][0][:, -1], plain["aug_visible"][0][:, -1])
    labels = pair.labels(ended, prompt_chars=[len(p) for p in prompts])
    assert labels.shape == ended["input_ids"].shape
    assert (labels[:, -1] == eos).all()
    for b, prompt in enumerate(prompts):
        kept = labels[b][labels[b] != -100]
        n_prompt = len(pair([prompt])["input_ids"][0])
        assert len(kept) == ended["attention_mask"][b].sum() - n_prompt  # prompt tokens masked
    assert torch.equal(
        pair.labels(plain), plain["input_ids"].masked_fill(plain["attention_mask"] == 0, -100)
    )
    anchor = lm(len(toks["bpe"]), 32, 4, 0)
    model = CALM(anchor, lm(len(toks["unigram"]), 24, 4, 1), tokenizers=pair)
    assert torch.isfinite(model(**ended, labels=labels).loss)
    with pytest.raises(ValueError, match="eos_token"):
        TokenizerPair(toks["unigram"], toks["bpe"])(texts, append_eos=True)


@pytest.mark.slow
def test_real_pair_smollm2_into_gemma3():
    """SmolLM2-135M (augmenting) composed into Gemma-3-270M (anchor): identity at init, aligned
    prefixes, a few training steps, cached generation equal to full recomputation."""
    hub = pytest.importorskip("tools.hub_offline")
    if not (hub.available("smollm2-135m") and hub.available("gemma3-270m")):
        pytest.skip("run `python -m tools.hub_offline model smollm2-135m` and `... gemma3-270m`")
    gemma_dir, smol_dir = hub.model_dir("gemma3-270m"), hub.model_dir("smollm2-135m")
    pair = TokenizerPair(
        T.AutoTokenizer.from_pretrained(gemma_dir), T.AutoTokenizer.from_pretrained(smol_dir)
    )
    for text in SAMPLES.values():
        assert prefix_violations(pair, text) == []
    anchor = T.AutoModelForCausalLM.from_pretrained(gemma_dir, dtype=torch.float32).eval()
    aug = T.AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32).eval()
    model = CALM(anchor, aug, CALMConfig(every=6), tokenizers=pair)
    texts = [SAMPLES["chichewa"], SAMPLES["code"]]
    batch = pair(texts)
    mask = batch["attention_mask"].bool()
    with model.disable_composition():
        plain = model(**batch).logits
    torch.testing.assert_close(model(**batch).logits[mask], plain[mask], atol=1e-4, rtol=0)

    model.train()
    losses = train_losses(model, batch, pair.labels(batch), steps=4, lr=1e-3)
    model.eval()
    assert losses[-1] < losses[0]

    prompts = pair(["Moni, muli bwanji? Ndili", "def fib(n):\n    "])
    got = model.generate(**prompts, max_new_tokens=6, eos_token_id=[], pad_token_id=0)
    n = prompts["input_ids"].shape[1]
    for j in range(6):
        want = model(**pair.extend(prompts, got[:, n : n + j])).logits[:, -1].argmax(-1)
        assert torch.equal(got[:, n + j], want), j


def test_save_load_round_trip(toks, tmp_path):
    pair, model = composed(toks["unigram"], toks["bpe"])
    batch = pair([SAMPLES["chichewa"]])
    want = model(**batch).logits
    model.save_pretrained(tmp_path)
    loaded = CALM.from_pretrained(tmp_path, model.anchor, model.augments[0], tokenizers=pair)
    assert torch.equal(loaded(**batch).logits, want)
    with pytest.raises(ValueError, match="TokenizerPair"):
        CALM.from_pretrained(tmp_path, model.anchor, model.augments[0])


@pytest.mark.parametrize("append_eos", [False, True])
def test_max_length_cuts_texts(toks, append_eos):
    pair = TokenizerPair(toks["wordpiece"], toks["bpe"])
    texts = list(SAMPLES.values())
    batch = pair(texts, append_eos=append_eos, max_length=9)
    assert batch["input_ids"].shape[1] <= 9
    for text, cut in zip(texts, batch["texts"]):
        assert text.startswith(cut) and cut
    short = pair(texts, append_eos=append_eos)
    assert short["input_ids"].shape[1] > 9
    assert torch.equal(pair(batch["texts"], append_eos=append_eos)["input_ids"], batch["input_ids"])
    crabs = TokenizerPair(toks["bpe"], toks["unigram"])(  # 🦀: 4 byte tokens with one span
        ["ok " + "🦀" * 6], append_eos=append_eos, max_length=9
    )
    assert crabs["texts"] == ["ok 🦀"] and crabs["input_ids"].shape[1] == 8 + append_eos
    with pytest.raises(ValueError, match="max_length"):
        pair(texts, max_length=1)


@pytest.mark.parametrize("anchor_name,aug_name", PAIRS)
def test_prefix_consistency_on_random_strings(toks, anchor_name, aug_name):
    pair = TokenizerPair(toks[anchor_name], toks[aug_name])
    rng = np.random.default_rng(0)
    alphabet = list("aeiou bcdkmnst  \t\n.,'()0123") + ["😀", "é", "ŵ", "\u0301"]
    for _ in range(12):
        text = "".join(rng.choice(alphabet, size=int(rng.integers(5, 40))))
        assert prefix_violations(pair, text) == [], repr(text)


def right_padded(rows, pad=0):
    """Right-pad 1-D tensors of different lengths -> (B, L) and its mask."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(out)
    for b, r in enumerate(rows):
        out[b, : len(r)], mask[b, : len(r)] = r, 1
    return out, mask


def test_right_padded_collation_equals_pair_batch(toks):
    """Training code may encode one text at a time and right-pad the pieces itself."""
    pair, model = composed(toks["unigram"], toks["bpe"])
    texts = [SAMPLES["english"], SAMPLES["emoji"][:15], SAMPLES["code"]]
    singles = [pair([t]).to("cpu") for t in texts]
    ids, mask = right_padded([s["input_ids"][0] for s in singles])
    aug_ids, aug_mask = right_padded([s["aug_input_ids"][0][0] for s in singles])
    visible, _ = right_padded([s["aug_visible"][0][0] for s in singles])
    got = model(
        ids,
        attention_mask=mask,
        aug_input_ids=[aug_ids],
        aug_attention_mask=[aug_mask],
        aug_visible=[visible],
    ).logits
    batch = pair(texts)
    want = model(**batch).logits
    torch.testing.assert_close(
        got[mask.bool()], want[batch["attention_mask"].bool()], atol=1e-5, rtol=0
    )


def test_generation_detects_a_tokenizer_that_merges_across_spaces(toks, monkeypatch):
    """A vocabulary the construction check misses still cannot corrupt generation: re-reading
    the text finds that a committed token changed, and `append` raises."""
    vocab = {"c": 0, " ": 1, "a": 2, "b": 3, "a ": 4, "a b": 5}
    merges = [("a", " "), ("a ", "b")]
    joins = Tokenizer(models.BPE(vocab, merges))  # no pre-tokenizer: merges cross spaces
    monkeypatch.setattr("calm.tokenizers._Side.check_no_space_merges", lambda self: None)
    pair = TokenizerPair(toks["bpe"], joins)
    stream = pair.stream(pair(["c a"]))
    space, b = toks["bpe"].convert_tokens_to_ids(["Ġ", "b"])
    stream.append([space], [True])  # "c a " commits "c", " " and "a " (wrongly, across a cut)
    with pytest.raises(RuntimeError, match="re-split"):
        stream.append([b], [True])  # "c a b" tokenizes as "c", " ", "a b"


# Stop strings: `generate(..., stop_strings=...)` ends each row as Hugging Face does.


def _sharp_lm(vocab: int, seed: int):
    """A random Llama whose greedy choices are far from ties (its logits scaled up), so that a
    composition equal to it up to rounding picks the same tokens."""
    model = lm(vocab, 32, 4, seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    return model


def _hf_greedy(anchor, batch, steps, **kw):
    return anchor.generate(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        max_new_tokens=steps,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=2,
        **kw,
    )


@pytest.mark.parametrize("with_pair", [False, True])
def test_stop_strings_at_init_generate_exactly_the_anchors_tokens(toks, with_pair):
    """At init a composition writes the anchor's tokens and stops where Hugging Face's
    `generate(stop_strings=..., tokenizer=...)` stops the anchor: no token more, none fewer."""
    tok = toks["unigram"]
    anchor = _sharp_lm(len(tok), 5)
    prompts = [SAMPLES["english"][:30], "Moni", SAMPLES["code"][:20]]
    if with_pair:
        pair = TokenizerPair(tok, toks["bpe"])
        model = CALM(anchor, lm(len(toks["bpe"]), 24, 4, 6), tokenizers=pair)
        batch = pair(prompts)
        kw = {}  # the pair's anchor tokenizer is the default
    else:
        model = CALM(anchor, lm(len(tok), 24, 4, 6))
        tok.padding_side = "left"
        batch = dict(tok(prompts, return_tensors="pt", padding=True))
        kw = {"tokenizer": tok}
    steps, prompt_len = 12, batch["input_ids"].shape[1]
    free = _hf_greedy(anchor, batch, steps)
    assert torch.equal(model.generate(**batch, max_new_tokens=steps, eos_token_id=2), free)
    stop = tok.decode(free[0, prompt_len + 3 : prompt_len + 5])  # row 0 writes it mid-way
    want = _hf_greedy(anchor, batch, steps, stop_strings=[stop], tokenizer=tok)
    got = model.generate(**batch, max_new_tokens=steps, eos_token_id=2, stop_strings=stop, **kw)
    assert torch.equal(got, want)
    assert got.shape[1] < free.shape[1] or (got[0, prompt_len + 5 :] == 0).all()
    assert (got[0, prompt_len + 5 :] == 0).all()  # row 0 ended where the stop string ended


def test_stop_strings_stop_a_trained_composition(toks):
    """A composition that is not the anchor stops at the first stop string it writes; the
    other rows write what they wrote without stop strings."""
    pair, model = composed(toks["unigram"], toks["bpe"], seed=3)
    tok = toks["unigram"]
    batch = pair([SAMPLES["english"][:23], SAMPLES["code"][:40], "Moni"])
    steps, prompt_len = 12, batch["input_ids"].shape[1]
    free = model.generate(**batch, max_new_tokens=steps, eos_token_id=[], pad_token_id=0)
    stop = tok.decode(free[0, prompt_len + 3 : prompt_len + 5])
    got = model.generate(
        **batch,
        max_new_tokens=steps,
        eos_token_id=[],
        pad_token_id=0,
        stop_strings=[stop, "\u2603 never written"],
    )
    new = got[:, prompt_len:]
    ended = [int((row != 0).nonzero().max()) + 1 for row in new]
    assert ended[0] <= 5 and (new[0, ended[0] :] == 0).all()
    assert stop in tok.decode(new[0, : ended[0]])
    for row, end in enumerate(ended):
        assert torch.equal(new[row, :end], free[row, prompt_len : prompt_len + end])
        assert stop not in tok.decode(new[row, : end - 1])  # none ran past a stop string


def test_stop_strings_without_a_tokenizer_are_refused(pair):
    model = CALM(*pair)
    with pytest.raises(UserError, match="tokenizer"):
        model.generate(torch.ones(1, 3, dtype=torch.long), max_new_tokens=2, stop_strings="x")
