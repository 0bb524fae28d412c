"""calm on an accelerator: the composition on CALM_TEST_DEVICE (default "cuda") agrees with the CPU.

Skipped where that device is missing (CI). To check the test logic on a CPU-only machine:
    CALM_TEST_DEVICE=cpu python -m pytest -q tests/test_device.py
Tiny random models from conftest; float32 results are compared with the CPU to 1e-4, greedy
tokens by teacher forcing (the generated token must be the full recomputation's argmax up to 1e-4
in logit, so a near-tie rounded differently on the device cannot fail a test); bfloat16 results
only for shape and finiteness.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, randomize_blocks, tiny_lm
from test_train import records  # pre-tokenized examples, loss on their second half

from calm import CALM, CALMConfig, hf
from calm.train import TrainConfig, train

DEVICE = os.environ.get("CALM_TEST_DEVICE", "cuda")
CPU = torch.device("cpu")
ATOL = 1e-4  # float32 logits, device vs CPU (tiny models: logits are about 0.1 in size)
MARGIN = 1e-4  # greedy: the generated token's logit is at most this far below the maximum


def _available(name: str) -> bool:
    try:
        kind = torch.device(name).type
    except (RuntimeError, ValueError):
        return False
    if kind == "cpu":
        return True
    backend = getattr(torch, kind, None)
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        return False
    try:
        torch.empty(0, device=name)
    except (RuntimeError, AssertionError):
        return False
    return True


pytestmark = pytest.mark.skipif(
    not _available(DEVICE),
    reason=f"device {DEVICE!r} (CALM_TEST_DEVICE) is not available here; "
    "CALM_TEST_DEVICE=cpu runs these tests on the CPU",
)


@pytest.fixture(scope="module")
def dev() -> torch.device:
    """DEVICE with its index filled in (tensors report cuda:0, never cuda)."""
    return torch.empty(0, device=DEVICE).device


# ----------------------------------------------------------------------------- helpers


def base_pair(device, dtype=torch.float32):
    """The conftest pair (4-layer width-32 anchor, 8-layer width-24 augment) on `device`."""
    anchor = tiny_lm("llama", 32, 4, seed=0, dtype=dtype).to(device)
    aug = tiny_lm("llama", 24, 8, seed=1, dtype=dtype).to(device)
    return anchor, aug


def composed(device, config: CALMConfig | None = None, dtype=torch.float32) -> CALM:
    """A composition built on base models already on `device`, with random non-zero blocks (the
    same values on every device: randomize_blocks draws them on the CPU)."""
    model = CALM(*base_pair(device, dtype), config)
    randomize_blocks(model)
    return model


def ids_on(device, batch=3, length=7, seed=0, padded=True):
    """Random ids and mask on `device`; with `padded`, row r is left-padded by 2r tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        for row in range(1, batch):
            mask[row, : row * 2] = 0
            ids[row, : row * 2] = 0
    return ids.to(device), mask.to(device)


def assert_on(tensors_or_params, device) -> None:
    for t in tensors_or_params:
        assert t.device == device, (t.shape, t.device, device)


def check_greedy(model, ids, mask, out, max_new, eos=(2,), pad=0, forward=None) -> None:
    """`out` = model.generate(ids, mask, max_new_tokens=max_new, greedy) is what re-running the
    whole sequence every step gives (the approach of test_model.full_recompute_greedy, with
    teacher forcing): each new token of an unfinished row is the argmax of the full forward over
    the prompt and the tokens before it, up to MARGIN; finished rows carry `pad`; generation
    stops early only when every row has finished.

    forward(prefix_ids, prefix_mask) -> last-position logits (B, V); default: the model's."""
    if forward is None:

        def forward(x, m):
            return model(x, attention_mask=m).logits[:, -1]

    B, n = ids.shape
    assert out.shape[0] == B and n < out.shape[1] <= n + max_new, out.shape
    assert out.device == ids.device
    assert torch.equal(out[:, :n], ids)
    eos_t = torch.tensor(list(eos), dtype=torch.long, device=out.device)
    done = torch.zeros(B, dtype=torch.bool, device=out.device)
    with torch.no_grad():
        for j in range(out.shape[1] - n):
            prefix_mask = torch.cat([mask, torch.ones_like(out[:, n : n + j])], 1)
            logits = forward(out[:, : n + j], prefix_mask).float()
            token = out[:, n + j]
            chosen = logits.gather(1, token[:, None])[:, 0]
            shortfall = logits.max(-1).values - chosen
            live = ~done
            assert bool((shortfall[live] <= MARGIN).all()), (j, shortfall.tolist())
            assert bool((token[done] == pad).all()), (j, token.tolist())
            done |= torch.isin(token, eos_t)
    if out.shape[1] < n + max_new:
        assert bool(done.all()), "generation stopped before max_new_tokens with rows unfinished"


# ----------------------------------------------------------------------------- 1. forward


@pytest.mark.parametrize("rope", [False, True], ids=["plain", "rope"])
def test_forward_matches_cpu(dev, rope):
    config = CALMConfig(rope=rope)
    cpu_model = composed(CPU, config)
    model = composed(dev, config)
    # Built from base models on the device, the blocks are created there (anchor's device).
    assert_on(model.trainable_parameters(), dev)
    assert_on(model.parameters(), dev)
    for a, b in zip(cpu_model.trainable_parameters(), model.trainable_parameters()):
        assert torch.equal(a, b.cpu())
    ids, mask = ids_on(CPU)
    labels = ids.masked_fill(mask == 0, -100)
    want = cpu_model(ids, attention_mask=mask, labels=labels)
    got = model(ids.to(dev), attention_mask=mask.to(dev), labels=labels.to(dev))
    assert got.logits.device == dev and got.loss.device == dev
    real = mask.bool()
    torch.testing.assert_close(got.logits.cpu()[real], want.logits[real], atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(got.loss.cpu(), want.loss, atol=ATOL, rtol=ATOL)
    with model.disable_composition():  # composition matters on the device too
        plain = model(ids.to(dev), attention_mask=mask.to(dev)).logits
    assert not torch.allclose(plain[real.to(dev)], got.logits[real.to(dev)], atol=1e-3)
    # The training cache: augmenting states computed once on the device, reused.
    states = model.augment_states(ids.to(dev), mask.to(dev))
    assert_on(states.values(), dev)
    reused = model(ids.to(dev), attention_mask=mask.to(dev), aug_states=states).logits
    torch.testing.assert_close(reused, got.logits, atol=1e-6, rtol=0)


def test_checkpoint_moves_between_devices(dev, tmp_path):
    """Saved on the device, loaded on the CPU, and the other way round: same composition."""
    model = composed(dev)
    ids, mask = ids_on(CPU)
    on_dev = model(ids.to(dev), attention_mask=mask.to(dev)).logits.cpu()
    model.save_pretrained(tmp_path / "from_dev")
    cpu_model = CALM.from_pretrained(tmp_path / "from_dev", *base_pair(CPU))
    assert_on(cpu_model.trainable_parameters(), CPU)
    for a, b in zip(model.trainable_parameters(), cpu_model.trainable_parameters()):
        assert torch.equal(a.cpu(), b)
    on_cpu = cpu_model(ids, attention_mask=mask).logits
    torch.testing.assert_close(on_dev, on_cpu, atol=ATOL, rtol=ATOL)
    cpu_model.save_pretrained(tmp_path / "from_cpu")
    back = CALM.from_pretrained(tmp_path / "from_cpu", *base_pair(dev))
    assert_on(back.trainable_parameters(), dev)
    again = back(ids.to(dev), attention_mask=mask.to(dev)).logits.cpu()
    torch.testing.assert_close(again, on_dev, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- 2. generate


@pytest.mark.parametrize("padded", [True, False], ids=["left-padded", "unpadded"])
@pytest.mark.parametrize("rope", [False, True], ids=["plain", "rope"])
def test_generate_matches_full_recomputation(dev, padded, rope):
    model = composed(dev, CALMConfig(rope=rope))
    ids, mask = ids_on(dev, padded=padded)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=2, pad_token_id=0)
    check_greedy(model, ids, mask, out, 6)
    # The caches live on the device as well: the CPU composition writes the same tokens, up to
    # near-ties (checked by teacher forcing on the CPU model).
    cpu_model = composed(CPU, CALMConfig(rope=rope))
    check_greedy(cpu_model, ids.cpu(), mask.cpu(), out.cpu(), 6)


def test_generate_stops_at_eos_and_pads(dev):
    model = composed(dev)
    ids, mask = ids_on(dev)
    n = ids.shape[1]
    free = model.generate(
        ids, attention_mask=mask, max_new_tokens=5, eos_token_id=[], pad_token_id=0
    )
    assert free.shape == (3, n + 5)
    eos = int(free[0, n])  # row 0 writes this first: make it the end token
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=5, eos_token_id=eos, pad_token_id=0
    )
    assert out.device == dev
    assert int(out[0, n]) == eos
    assert bool((out[0, n + 1 :] == 0).all())
    check_greedy(model, ids, mask, out, 5, eos=(eos,), pad=0)
    # Every row ends at once when the end token is whatever each row writes first: stop early.
    firsts = free[:, n].tolist()
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=5, eos_token_id=firsts, pad_token_id=0
    )
    assert out.shape == (3, n + 1)
    assert torch.equal(out, free[:, : n + 1])


def test_sampling_with_a_device_generator(dev):
    model = composed(dev)
    ids, mask = ids_on(dev)

    def sample(seed):
        g = torch.Generator(device=dev).manual_seed(seed)
        return model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=5,
            do_sample=True,
            top_k=10,
            top_p=0.9,
            temperature=0.8,
            generator=g,
            eos_token_id=[],
            pad_token_id=0,
        )

    first = sample(0)
    assert first.device == dev and first.shape == (3, 12)
    assert torch.equal(first, sample(0))
    assert bool(((first[:, 7:] >= 0) & (first[:, 7:] < VOCAB)).all())


# ----------------------------------------------------------------------------- 3. bfloat16


@pytest.mark.parametrize("comp_dtype", ["float32", "bfloat16"])
def test_bf16_base_models(dev, comp_dtype):
    model = composed(dev, CALMConfig(dtype=comp_dtype), dtype=torch.bfloat16)
    anchor, aug = model.anchor, model.augments[0]
    assert hf.model_dtype(anchor) == torch.bfloat16 and hf.model_dtype(aug) == torch.bfloat16
    dtype = getattr(torch, comp_dtype)
    for p in model.trainable_parameters():
        assert p.device == dev and p.dtype == dtype
    model.train()
    ids, mask = ids_on(dev)
    out = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    assert out.logits.shape == (3, 7, VOCAB) and out.logits.device == dev
    assert torch.isfinite(out.logits[mask.bool()]).all()
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for p in model.trainable_parameters():
        assert p.grad is not None and p.grad.dtype == dtype and p.grad.device == dev
        assert torch.isfinite(p.grad).all()
    assert any(float(p.grad.abs().sum()) > 0 for p in model.trainable_parameters())
    for m in (anchor, aug):
        for name, p in m.named_parameters():
            assert p.grad is None and not p.requires_grad, name
    model.eval()
    gen = model.generate(
        ids, attention_mask=mask, max_new_tokens=4, eos_token_id=[], pad_token_id=0
    )
    assert gen.shape == (3, 11) and gen.device == dev
    assert torch.equal(gen[:, :7], ids)
    assert bool(((gen[:, 7:] >= 0) & (gen[:, 7:] < VOCAB)).all())


# ----------------------------------------------------------------------------- 4. training


def mean_loss(model: CALM, data: list[dict], device) -> float:
    """Token-weighted mean next-token loss over `data`, one example at a time."""
    total = count = 0.0
    with torch.no_grad():
        for r in data:
            ids = torch.tensor([r["input_ids"]], device=device)
            labels = torch.tensor([r["labels"]], device=device)
            logits = model(ids).logits[0, :-1].float()
            target = labels[0, 1:]
            keep = target != -100
            total += float(F.cross_entropy(logits[keep], target[keep], reduction="sum"))
            count += int(keep.sum())
    return total / count


@pytest.mark.parametrize(
    "precision,aug_cache", [("fp32", "none"), ("fp32", "memory"), ("bf16", "none")]
)
def test_train_on_device_and_load_on_cpu(dev, tmp_path, precision, aug_cache):
    # calm.train has no device option: accelerate's Accelerator picks the device (cuda when
    # present) and prepare_model moves the whole composition there. Run it only where that is
    # DEVICE's kind (e.g. not CALM_TEST_DEVICE=cpu on a machine with a GPU).
    from accelerate import PartialState

    picked = PartialState().device
    if picked.type != dev.type:
        pytest.skip(f"accelerate trains on {picked}, not on {DEVICE}; calm.train takes no device")
    anchor, aug = base_pair(dev)
    model = CALM(anchor, aug, CALMConfig(init="default"))
    data = records(8)
    before_loss = mean_loss(model, data, dev)
    before = [p.detach().clone() for p in model.trainable_parameters()]
    config = TrainConfig(
        output_dir=str(tmp_path / "run"),
        learning_rate=1e-2,
        batch_size=4,
        max_steps=8,
        schedule="constant",
        precision=precision,
        aug_cache=aug_cache,
        progress=False,
    )
    result = train(model, data, config=config)
    assert result.step == 8 and result.skipped_steps == 0 and not result.interrupted
    assert math.isfinite(result.train_loss)
    # Still where it was: on the device, base models included; only the blocks changed.
    assert_on(model.parameters(), dev)
    assert all(not torch.equal(a, p) for a, p in zip(before, model.trainable_parameters()))
    assert all(p.dtype == torch.float32 for p in model.trainable_parameters())
    model.eval()
    after_loss = mean_loss(model, data, dev)
    assert after_loss < before_loss, (before_loss, after_loss)
    # The checkpoint written on the device loads on the CPU and gives the same logits.
    cpu_model = CALM.from_pretrained(result.checkpoint, *base_pair(CPU))
    assert_on(cpu_model.trainable_parameters(), CPU)
    ids, mask = ids_on(CPU)
    want = model(ids.to(dev), attention_mask=mask.to(dev)).logits.cpu()
    got = cpu_model(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=ATOL, rtol=ATOL)


# ----------------------------------------------------------------------------- 5. mixed placement


@pytest.mark.parametrize("on_cpu", ["augment", "anchor"])
def test_mixed_placement(dev, on_cpu):
    """One model on the CPU, the other on DEVICE: augmenting inputs go to the augmenting model's
    device, its states to the anchor's (the blocks live with the anchor)."""
    reference = composed(dev)
    anchor, aug = base_pair(dev)
    if on_cpu == "anchor":
        anchor = anchor.to(CPU)
    else:
        aug = aug.to(CPU)
    model = CALM(anchor, aug)
    randomize_blocks(model)
    home = hf.model_device(anchor)
    assert_on(model.trainable_parameters(), home)
    ids, mask = ids_on(CPU)
    want = reference(ids.to(dev), attention_mask=mask.to(dev)).logits.cpu()
    labels = ids.masked_fill(mask == 0, -100).to(home)
    out = model(ids.to(home), attention_mask=mask.to(home), labels=labels)
    assert out.logits.device == home
    real = mask.bool()
    torch.testing.assert_close(out.logits.cpu()[real], want[real], atol=ATOL, rtol=ATOL)
    out.loss.backward()
    for p in model.trainable_parameters():
        assert p.grad is not None and p.grad.device == home
    model.zero_grad(set_to_none=True)
    gen = model.generate(
        ids.to(home), attention_mask=mask.to(home), max_new_tokens=5, eos_token_id=2, pad_token_id=0
    )
    assert gen.device == home
    check_greedy(model, ids.to(home), mask.to(home), gen, 5)


# ----------------------------------------------------------------------------- 6. tokenizers


def test_tokenizer_pair_on_device(dev):
    """Different tokenizers (trained offline by tests/test_tokenizers.py's builders): forward
    equal to the CPU, cached generation equal to full recomputation, on DEVICE."""
    from test_tokenizers import SAMPLES, byte_bpe, unigram

    from calm import TokenizerPair

    anchor_tok, aug_tok = unigram(), byte_bpe()
    pair = TokenizerPair(anchor_tok, aug_tok)

    def build(device):
        anchor = tiny_lm("llama", 32, 4, seed=3, vocab=len(anchor_tok)).to(device)
        aug = tiny_lm("llama", 24, 4, seed=4, vocab=len(aug_tok)).to(device)
        model = CALM(anchor, aug, CALMConfig(every=2), tokenizers=pair)
        randomize_blocks(model, seed=3)
        return model

    cpu_model, model = build(CPU), build(dev)
    assert_on(model.parameters(), dev)
    prompts = [SAMPLES["english"][:23], SAMPLES["code"][:40], "Moni"]
    batch = pair(prompts)
    on_dev = batch.to(dev)
    assert on_dev["input_ids"].device == dev and on_dev["aug_input_ids"][0].device == dev
    labels = pair.labels(batch)
    want = cpu_model(**batch, labels=labels)
    got = model(**on_dev, labels=labels.to(dev))
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got.logits.cpu()[real], want.logits[real], atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(got.loss.cpu(), want.loss, atol=ATOL, rtol=ATOL)

    steps = 8
    out = model.generate(**on_dev, max_new_tokens=steps, eos_token_id=[], pad_token_id=0)
    n = batch["input_ids"].shape[1]
    assert out.device == dev and out.shape == (3, n + steps)

    def forward(prefix, prefix_mask):  # the prompts' texts extended as generate extends them
        ref = pair.extend(batch, prefix[:, n:].cpu()).to(dev)
        return model(**ref).logits[:, -1]

    check_greedy(
        model, on_dev["input_ids"], on_dev["attention_mask"], out, steps, eos=(), forward=forward
    )
    final = pair.extend(batch, out[:, n:].cpu())
    assert all(t.startswith(p) for t, p in zip(final["texts"], prompts))


# ----------------------------------------------------------------------------- 7. wrong device


@pytest.mark.skipif(DEVICE.split(":")[0] == "cpu", reason="needs a device other than the CPU")
def test_inputs_on_the_wrong_device_are_refused(dev):
    model = composed(dev)
    ids, mask = ids_on(CPU)
    with pytest.raises(ValueError, match=r"input_ids is on cpu but the model that reads it is on"):
        model(ids, attention_mask=mask)
    with pytest.raises(ValueError, match=r"input_ids is on cpu .* move it with \.to\("):
        model.generate(ids, attention_mask=mask, max_new_tokens=2)
    cpu_model = composed(CPU)
    with pytest.raises(ValueError, match=rf"input_ids is on {dev.type}"):
        cpu_model(ids.to(dev), attention_mask=mask.to(dev))
    # A sampling generator must live where the anchor samples.
    with pytest.raises(ValueError, match=r"generator is on cpu but the anchor samples on"):
        model.generate(ids.to(dev), max_new_tokens=2, do_sample=True, generator=torch.Generator())
    # Labels are moved to the logits' device: CPU labels are accepted.
    out = model(ids.to(dev), attention_mask=mask.to(dev), labels=ids.masked_fill(mask == 0, -100))
    assert out.loss.device == dev and torch.isfinite(out.loss)
