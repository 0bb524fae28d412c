"""Invariants of calm.CALM on tiny random models: identity, causality, padding, caching."""

from __future__ import annotations

import pytest
import torch
from conftest import random_ids, randomize_blocks, tiny_lm

import calm
from calm import CALM, CALMConfig, Connection, hf
from calm.model import next_token_loss


def full_recompute_greedy(model, ids, mask, steps, eos=2, pad=0):
    """Greedy decoding that re-runs the whole sequence every step (no caches anywhere); rows
    that emitted `eos` continue with `pad`, as `generate` does."""
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    for _ in range(steps):
        token = model(ids, attention_mask=mask).logits[:, -1].argmax(-1)
        token = torch.where(done, torch.full_like(token, pad), token)
        done |= token == eos
        ids = torch.cat([ids, token[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        if done.all():
            break
    return ids


def left_padded(batch=3, length=7, seed=0):
    ids = random_ids(batch, length, seed)
    mask = torch.ones_like(ids)
    for row in range(1, batch):
        mask[row, : row * 2] = 0
        ids[row, : row * 2] = 0
    return ids, mask


def test_identity_at_init(pair):
    anchor, aug = pair
    ids, mask = left_padded()
    expected = anchor(ids, attention_mask=mask).logits
    model = CALM(anchor, aug)
    got = model(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=0)


def test_training_changes_only_composition(pair):
    anchor, aug = pair
    base_before = {
        f"{i}.{n}": p.detach().clone() for i, m in enumerate(pair) for n, p in m.named_parameters()
    }
    model = CALM(anchor, aug)
    model.train()
    comp_before = [p.detach().clone() for p in model.trainable_parameters()]
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    ids = random_ids(4, 10)
    for _ in range(3):
        loss = model(ids, labels=ids).loss
        loss.backward()
        for name, p in model.named_parameters():
            in_blocks = name.startswith("blocks.")
            assert (p.grad is not None) == in_blocks, name
        opt.step()
        opt.zero_grad()
    for i, m in enumerate(pair):
        assert not m.training
        for n, p in m.named_parameters():
            assert torch.equal(p, base_before[f"{i}.{n}"]), n
            assert not p.requires_grad
    for before, p in zip(comp_before, model.trainable_parameters()):
        assert not torch.equal(before, p)


def test_trainable_parameters_are_the_blocks(pair):
    model = CALM(*pair)
    ids = {id(p) for p in model.trainable_parameters()}
    assert ids == {id(p) for p in model.blocks.parameters()}
    assert model.num_trainable_parameters() == sum(p.numel() for p in model.blocks.parameters())
    assert {id(p) for p in model.parameters() if p.requires_grad} == ids


@pytest.mark.parametrize("mode_t", [0, 3, 6])
def test_no_future_leakage(pair, mode_t):
    model = CALM(*pair)
    randomize_blocks(model)
    ids = random_ids(2, 9)
    changed = ids.clone()
    changed[:, mode_t + 1 :] = random_ids(2, 9, seed=5)[:, mode_t + 1 :]
    a = model(ids).logits
    b = model(changed).logits
    torch.testing.assert_close(a[:, : mode_t + 1], b[:, : mode_t + 1], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, mode_t + 1 :], b[:, mode_t + 1 :])


def test_composition_changes_outputs_once_trained(pair):
    anchor, aug = pair
    model = CALM(anchor, aug)
    randomize_blocks(model)
    ids = random_ids(2, 6)
    with model.disable_composition():
        plain = model(ids).logits
    assert not torch.allclose(model(ids).logits, plain)


def test_padding_invariance(pair):
    model = CALM(*pair)
    randomize_blocks(model)
    ids = random_ids(2, 8)
    lengths = [8, 5]
    left = torch.zeros_like(ids)
    right = torch.zeros_like(ids)
    lmask = torch.zeros_like(ids)
    rmask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        left[row, 8 - n :] = ids[row, :n]
        lmask[row, 8 - n :] = 1
        right[row, :n] = ids[row, :n]
        rmask[row, :n] = 1
    lo = model(left, attention_mask=lmask).logits
    ro = model(right, attention_mask=rmask).logits
    torch.testing.assert_close(lo[lmask.bool()], ro[rmask.bool()], atol=1e-5, rtol=0)


def test_no_nan_for_rows_without_keys(pair):
    model = CALM(*pair)
    randomize_blocks(model)
    ids, mask = left_padded()
    out = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    assert torch.isfinite(out.logits).all()
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.trainable_parameters())


def test_next_token_loss_is_the_forward_loss(pair):
    model = CALM(*pair)
    randomize_blocks(model)
    ids, mask = left_padded()
    labels = ids.masked_fill(mask == 0, -100)
    out = model(ids, attention_mask=mask, labels=labels)
    assert torch.equal(next_token_loss(out.logits, labels), out.loss)
    counted = (labels[:, 1:] != -100).sum()  # labels are shifted inside: the first is never used
    total = next_token_loss(out.logits, labels, reduction="sum")
    torch.testing.assert_close(total / counted, out.loss)
    assert total.dtype == torch.float32


def test_cached_generate_matches_full_recomputation(pair):
    model = CALM(*pair)
    randomize_blocks(model)
    ids, mask = left_padded()
    got = model.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=2, pad_token_id=0)
    want = full_recompute_greedy(model, ids, mask, 6)
    assert torch.equal(got, want)


def test_generate_stops_at_eos_and_pads(pair):
    model = CALM(*pair)
    randomize_blocks(model)
    ids, mask = left_padded()
    free = model.generate(
        ids, attention_mask=mask, max_new_tokens=5, eos_token_id=2, pad_token_id=0
    )
    eos = int(free[0, ids.shape[1]])  # row 0 emits this first: make it the end token
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=5, eos_token_id=eos, pad_token_id=0
    )
    assert out[0, ids.shape[1]] == eos
    assert (out[0, ids.shape[1] + 1 :] == 0).all()


def test_sampling_is_seeded(pair):
    model = CALM(*pair)
    randomize_blocks(model)
    ids = random_ids(2, 4)

    def sample(seed):
        g = torch.Generator().manual_seed(seed)
        return model.generate(
            ids,
            max_new_tokens=5,
            do_sample=True,
            top_k=10,
            top_p=0.9,
            temperature=0.8,
            generator=g,
            eos_token_id=2,
            pad_token_id=0,
        )

    assert torch.equal(sample(0), sample(0))
    assert sample(0).shape == (2, 9)


def test_save_load_round_trip(pair, tmp_path):
    model = CALM(*pair)
    randomize_blocks(model)
    ids = random_ids(2, 6)
    want = model(ids).logits
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "README.md",  # the model card (tests/test_model_card.py)
        "calm_config.json",
        "composition.safetensors",
    ]
    model.remove()
    loaded = CALM.from_pretrained(tmp_path, *pair)
    assert torch.equal(loaded(ids).logits, want)
    assert loaded.connections == model.connections


def test_load_refuses_different_anchor(pair, tmp_path):
    model = CALM(*pair)
    model.save_pretrained(tmp_path)
    other = tiny_lm("llama", 32, 4, seed=99)  # same architecture, other weights
    with pytest.raises(ValueError, match="anchor.*weights"):
        CALM.from_pretrained(tmp_path, other, pair[1])
    wider = tiny_lm("llama", 48, 4, seed=0)
    with pytest.raises(ValueError, match="anchor"):
        CALM.from_pretrained(tmp_path, wider, pair[1])


def test_checkpoint_holds_only_composition(pair, tmp_path):
    from safetensors.torch import load_file

    model = CALM(*pair)
    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "composition.safetensors"))
    assert set(saved) == set(model.blocks.state_dict())
    assert sum(t.numel() for t in saved.values()) == model.num_trainable_parameters()


def test_remove_restores_anchor(pair):
    anchor, aug = pair
    anchor.train()
    for p in anchor.lm_head.parameters():
        p.requires_grad_(False)
    flags = [p.requires_grad for p in anchor.parameters()]
    ids = random_ids(2, 5)
    anchor.eval()
    want = anchor(ids).logits
    anchor.train()
    model = CALM(anchor, aug)
    randomize_blocks(model)
    assert not anchor.training
    returned = model.remove()
    assert returned is anchor
    assert anchor.training
    assert [p.requires_grad for p in anchor.parameters()] == flags
    anchor.eval()
    assert torch.equal(anchor(ids).logits, want)
    with pytest.raises(RuntimeError, match="removed"):
        model(ids)


def test_base_models_usable_alone_while_composed(pair):
    anchor, aug = pair
    ids = random_ids(2, 5)
    want_anchor, want_aug = anchor(ids).logits, aug(ids).logits
    first = CALM(anchor, aug)
    second = CALM(anchor, aug)  # a second composition sharing the same base models
    randomize_blocks(first, seed=1)
    randomize_blocks(second, seed=2)
    a = first(ids).logits
    b = second(ids).logits
    assert not torch.allclose(a, b)
    assert torch.equal(anchor(ids).logits, want_anchor)
    assert torch.equal(aug(ids).logits, want_aug)
    assert torch.equal(first(ids).logits, a)


def test_disable_composition_gives_anchor(pair):
    anchor, aug = pair
    model = CALM(anchor, aug)
    randomize_blocks(model)
    ids, mask = left_padded()
    with model.disable_composition():
        got = model(ids, attention_mask=mask).logits
        gen = model.generate(
            ids, attention_mask=mask, max_new_tokens=3, eos_token_id=2, pad_token_id=0
        )
    assert torch.equal(
        got,
        anchor(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits,
    )
    assert gen.shape == (3, 10)


def test_stays_in_eval_mode_after_train(pair):
    model = CALM(*pair)
    model.train()
    assert model.blocks.training
    assert not model.anchor.training and not model.augments[0].training


def test_two_augmenting_models(pair):
    anchor, aug = pair
    aug2 = tiny_lm("llama", 40, 4, seed=3)
    model = CALM(anchor, [aug, aug2])
    assert {c.augment for c in model.connections} == {0, 1}
    randomize_blocks(model)
    ids = random_ids(2, 6)
    full = model(ids).logits
    only_first = CALM(
        anchor,
        [aug, aug2],
        CALMConfig(connections=tuple(c for c in model.connections if c.augment == 0)),
    )
    only_first.blocks.load_state_dict(
        {
            k: v
            for k, v in model.blocks.state_dict().items()
            if int(k.split(".")[0]) < len(only_first.connections)
        }
    )
    assert not torch.allclose(full, only_first(ids).logits)
    ids2, mask = left_padded()
    assert torch.equal(
        model.generate(ids2, attention_mask=mask, max_new_tokens=4, eos_token_id=2, pad_token_id=0),
        full_recompute_greedy(model, ids2, mask, 4),
    )


@pytest.mark.parametrize("aug_shape", [(64, 12), (16, 2)], ids=["wider-deeper", "narrower"])
def test_augment_size_differs(aug_shape):
    anchor = tiny_lm("llama", 32, 4)
    aug = tiny_lm("llama", *aug_shape, seed=4)
    model = CALM(anchor, aug)
    randomize_blocks(model)
    ids, mask = left_padded()
    out = model(ids, attention_mask=mask, labels=ids)
    assert out.logits.shape == (3, 7, 97)
    out.loss.backward()
    assert torch.equal(
        model.generate(ids, attention_mask=mask, max_new_tokens=3, eos_token_id=2, pad_token_id=0),
        full_recompute_greedy(model, ids, mask, 3),
    )


def test_bf16_bases_fp32_composition():
    anchor = tiny_lm("llama", 32, 4, dtype=torch.bfloat16)
    aug = tiny_lm("llama", 24, 8, seed=1, dtype=torch.bfloat16)
    model = CALM(anchor, aug)
    assert all(p.dtype == torch.float32 for p in model.trainable_parameters())
    ids = random_ids(2, 6)
    assert torch.equal(model(ids).logits, anchor(ids).logits)  # identity at init
    randomize_blocks(model)
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert all(
        p.grad is not None and p.grad.dtype == torch.float32 for p in model.trainable_parameters()
    )
    assert model.generate(ids, max_new_tokens=2, eos_token_id=2, pad_token_id=0).shape == (2, 8)


def test_encoder_mode():
    anchor, aug = tiny_lm("llama", 32, 4), tiny_lm("gpt2", 24, 4, seed=1)
    model = CALM(anchor, aug, CALMConfig(mode="encoder"))
    randomize_blocks(model)
    ids = random_ids(2, 5)
    prompt = random_ids(2, 7, seed=3)
    pmask = torch.ones_like(prompt)
    pmask[1, :3] = 0
    a = model(ids, aug_input_ids=prompt, aug_attention_mask=pmask).logits
    other = prompt.clone()
    other[1, :3] = 50  # padding content must not matter
    b = model(ids, aug_input_ids=other, aug_attention_mask=pmask).logits
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    gen = model.generate(
        ids,
        max_new_tokens=3,
        aug_input_ids=prompt,
        aug_attention_mask=pmask,
        eos_token_id=2,
        pad_token_id=0,
    )
    want = ids
    for _ in range(3):
        nxt = model(want, aug_input_ids=prompt, aug_attention_mask=pmask).logits[:, -1].argmax(-1)
        want = torch.cat([want, nxt[:, None]], 1)
    assert torch.equal(gen, want)
    with pytest.raises(ValueError, match="aug_input_ids"):
        model(ids)


def test_version_exported():
    assert isinstance(calm.__version__, str)
    assert Connection(1, 2) == Connection(anchor_layer=1, aug_layer=2, augment=0)


def test_identity_of_large_parameters():
    """The fingerprint samples indices exactly even past float32's integer range (2**24)."""
    from calm.hf import model_identity

    model = tiny_lm("llama", 32, 1)
    big = torch.nn.Parameter(torch.zeros(2**24 + 5))
    model.register_parameter("big", big)
    first = model_identity(model)["weights_fingerprint"]
    with torch.no_grad():
        big[-1] = 1.0  # the last element is always sampled
    assert model_identity(model)["weights_fingerprint"] != first


def test_rope_blocks_causal_padding_and_cache(pair):
    model = CALM(*pair, CALMConfig(rope=True))
    randomize_blocks(model)
    plain = CALM(*pair)
    plain.blocks.load_state_dict(model.blocks.state_dict())
    ids = random_ids(2, 8)
    assert not torch.allclose(model(ids).logits, plain(ids).logits)  # rope changes the blocks
    changed = ids.clone()
    changed[:, 5:] = 9
    torch.testing.assert_close(
        model(ids).logits[:, :5], model(changed).logits[:, :5], atol=1e-6, rtol=0
    )
    left, lmask = torch.zeros_like(ids), torch.zeros_like(ids)
    left[1, 3:], lmask[1, 3:] = ids[1, :5], 1
    left[0], lmask[0] = ids[0], 1
    right, rmask = left.clone(), lmask.clone()
    right[1], rmask[1] = 0, 0
    right[1, :5], rmask[1, :5] = ids[1, :5], 1
    lo = model(left, attention_mask=lmask).logits
    ro = model(right, attention_mask=rmask).logits
    torch.testing.assert_close(lo[lmask.bool()], ro[rmask.bool()], atol=1e-5, rtol=0)
    ids2, mask = left_padded()
    assert torch.equal(
        model.generate(ids2, attention_mask=mask, max_new_tokens=5, eos_token_id=2, pad_token_id=0),
        full_recompute_greedy(model, ids2, mask, 5),
    )


def test_rope_needs_causal_mode():
    with pytest.raises(ValueError, match="rope needs mode='causal'"):
        CALMConfig(rope=True, mode="encoder")


class _AllOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts `aten.all` (each one a host sync when read with bool()) while active."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket.__name__ == "all"
        return func(*args, **(kwargs or {}))


def test_generate_checks_padding_once_per_call(pair):
    """A padded batch is padded at every step: generate looks once (at the prompt), and its
    masks and calls trust that instead of checking each step (one sync per check on a GPU)."""
    anchor, aug = pair
    model = CALM(anchor, aug)
    randomize_blocks(model)
    ids, mask = left_padded()
    mask_kwargs = hf.mask_kwargs
    with _AllOps() as ops:
        mask_kwargs(mask, 0, padded=True)
        model._masks([mask], mask, 0, None, padded=True)
        model._masks([mask[:, :1]], mask[:, :1], 0, None, padded=False)
    assert ops.count == 0
    with _AllOps() as ops:
        assert mask_kwargs(mask, 0) != {}  # unknown: it looks
    assert ops.count == 1

    def count(n: int) -> int:
        with _AllOps() as ops:
            model.generate(ids, attention_mask=mask, max_new_tokens=n, eos_token_id=[])
        return ops.count

    assert count(6) == count(2)  # no check per step
