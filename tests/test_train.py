"""calm.train on tiny CPU models: exact resume, atomic saves, signals, faults, cache, Trainer."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, tiny_lm

from calm import CALM, CALMConfig
from calm.run import checkpoints
from calm.train import NonFiniteLossError, TrainConfig, train

TESTS = Path(__file__).parent


def make_model(dropout: float = 0.1) -> CALM:
    anchor, aug = tiny_lm("llama", 32, 4, seed=0), tiny_lm("llama", 24, 8, seed=1)
    return CALM(anchor, aug, CALMConfig(dropout=dropout, init="default"))


def records(n: int = 12, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(4, 12, (1,), generator=g))
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        labels = [-100] * (length // 2) + ids[length // 2 :]
        out.append({"input_ids": ids, "labels": labels})
    return out


def config(tmp_path, name: str, **kw) -> TrainConfig:
    base = dict(
        output_dir=str(tmp_path / name),
        learning_rate=1e-2,
        batch_size=4,
        max_steps=6,
        warmup_steps=2,
        progress=False,
    )
    return TrainConfig(**{**base, **kw})


def losses(run_dir) -> dict[int, float]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def weights(model: CALM) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.trainable_parameters()]


def test_config_json_round_trip_and_validation(tmp_path):
    cfg = config(tmp_path, "a", schedule="linear", epochs=2.5, aug_cache="memory")
    assert TrainConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="schedule must be one of"):
        config(tmp_path, "a", schedule="step")
    with pytest.raises(ValueError, match="batch_size must be positive"):
        config(tmp_path, "a", batch_size=0)
    with pytest.raises(ValueError, match="max_steps or TrainConfig.epochs"):
        TrainConfig(output_dir="x")
    with pytest.raises(ValueError, match="Unknown TrainConfig fields"):
        TrainConfig.from_dict({"output_dir": "x", "max_steps": 1, "lr": 1})


def test_trains_only_the_composition_and_writes_the_run_dir(tmp_path):
    model = make_model()
    base = {n: p.clone() for n, p in model.named_parameters() if not n.startswith("blocks.")}
    before = weights(model)
    cfg = config(tmp_path, "run", eval_every=3, save_every=2, keep_last=2)
    result = train(model, records(), records(4, seed=9), cfg)
    assert result.step == 6 and not result.interrupted and result.skipped_steps == 0
    assert result.eval_loss is not None and result.best_eval_loss <= result.eval_loss
    for n, p in model.named_parameters():
        if not n.startswith("blocks."):
            assert torch.equal(p, base[n]), n
    assert all(not torch.equal(a, b) for a, b in zip(before, weights(model)))
    run = Path(cfg.output_dir)
    assert [p.name for p in checkpoints(run)] == ["step-00000004", "step-00000006"]
    assert (run / "loss.png").stat().st_size > 0 and (run / "best" / "state.json").is_file()
    assert sorted(losses(run)) == list(range(1, 7))
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals if "eval_loss" in r] == [3, 6]
    loaded = CALM.from_pretrained(result.checkpoint, *make_pair())
    for a, b in zip(weights(model), weights(loaded)):
        assert torch.equal(a, b)


def make_pair():
    return tiny_lm("llama", 32, 4, seed=0), tiny_lm("llama", 24, 8, seed=1)


def test_resume_is_bitwise_exact(tmp_path):
    data = records(10)
    full_model = make_model()
    train(full_model, data, config=config(tmp_path, "full", max_steps=6))

    model = make_model()
    first = train(model, data, config=config(tmp_path, "split", max_steps=6, stop_after=3))
    assert first.interrupted and first.step == 3
    model = make_model()  # a fresh process would rebuild the composition from scratch
    second = train(model, data, config=config(tmp_path, "split", max_steps=6), resume=True)
    assert second.step == 6 and not second.interrupted
    assert losses(tmp_path / "split") == losses(tmp_path / "full")
    for a, b in zip(weights(full_model), weights(model)):
        assert torch.equal(a, b)


def test_bf16_autocast_with_gradient_checkpointing_trains(tmp_path):
    model = make_model(dropout=0.0)
    before = weights(model)
    result = train(
        model, records(8), config=config(tmp_path, "bf16", max_steps=2, precision="bf16")
    )
    assert result.skipped_steps == 0
    assert all(math.isfinite(v) for v in losses(tmp_path / "bf16").values())
    assert all(p.dtype == torch.float32 for p in model.trainable_parameters())
    assert all(not torch.equal(a, b) for a, b in zip(before, weights(model)))


def test_resume_refusals(tmp_path):
    data = records(8)
    train(make_model(), data, config=config(tmp_path, "r", max_steps=4, stop_after=2))
    with pytest.raises(ValueError, match="already holds checkpoints; pass resume=True"):
        train(make_model(), data, config=config(tmp_path, "r", max_steps=4))
    with pytest.raises(ValueError, match=r"differs from the checkpoint's in \['learning_rate'\]"):
        train(
            make_model(),
            data,
            config=config(tmp_path, "r", max_steps=4, learning_rate=1.0),
            resume=True,
        )
    with pytest.raises(ValueError, match="the training data differ"):
        cfg = config(tmp_path, "r", max_steps=4)
        train(make_model(), records(8, seed=5), config=cfg, resume=True)
    cfg = config(tmp_path, "r", max_steps=4, learning_rate=1e-3)
    assert train(make_model(), data, config=cfg, resume=True, force=True).step == 4


@pytest.mark.slow
def test_crash_while_saving_keeps_previous_checkpoint(tmp_path, monkeypatch):
    data = records(8)
    cfg = config(tmp_path, "crash", max_steps=6, save_every=2)
    real_save = torch.save
    calls = {"n": 0}

    def crashing_save(obj, path, *a, **kw):
        if "trainer_state" in str(path):
            calls["n"] += 1
            if calls["n"] == 2:  # the step-4 checkpoint, after its composition was written
                with open(path, "wb") as f:
                    f.write(b"torn")
                raise OSError("disk full")
        return real_save(obj, path, *a, **kw)

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        train(make_model(), data, config=cfg)
    monkeypatch.setattr(torch, "save", real_save)
    kept = checkpoints(cfg.output_dir)
    assert [p.name for p in kept] == ["step-00000002"]
    loaded = CALM.from_pretrained(kept[0], *make_pair())
    assert loaded.num_trainable_parameters() > 0
    result = train(make_model(), data, config=cfg, resume=True)
    assert result.step == 6
    leftovers = [p.name for p in (Path(cfg.output_dir) / "checkpoints").glob(".tmp-*")]
    assert leftovers == []
    reference = make_model()
    train(reference, data, config=config(tmp_path, "ref", max_steps=6))
    assert losses(cfg.output_dir) == losses(tmp_path / "ref")


def test_nonfinite_gradient_with_finite_loss_is_skipped(tmp_path):
    model = make_model(dropout=0.0)
    weight = model.blocks[0].o.weight
    calls = {"n": 0}

    def poison(grad):
        calls["n"] += 1
        return grad * float("inf") if calls["n"] == 2 else grad

    weight.register_hook(poison)
    result = train(model, records(8), config=config(tmp_path, "inf", max_steps=4))
    assert calls["n"] == 4
    assert result.skipped_steps == 1 and result.step == 4
    assert all(torch.isfinite(p).all() for p in model.trainable_parameters())


def test_nonfinite_losses_skipped_then_fatal(tmp_path):
    model = make_model(dropout=0.0)
    forward = model.forward
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        out = forward(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            out.logits = out.logits * float("nan")
        return out

    model.forward = flaky
    result = train(model, records(8), config=config(tmp_path, "nan", max_steps=4))
    assert result.skipped_steps == 1 and result.step == 4
    assert all(torch.isfinite(p).all() for p in model.trainable_parameters())

    model = make_model(dropout=0.0)
    with torch.no_grad():
        model.blocks[0].proj.weight.fill_(float("inf"))
    cfg = config(tmp_path, "inf", max_steps=20, max_bad_steps=3)
    with pytest.raises(NonFiniteLossError, match="NaN or infinite for 3 steps in a row"):
        train(model, records(8), config=cfg)


def test_loss_counts_only_labelled_tokens(tmp_path):
    """The first step's loss is the mean cross-entropy over completion tokens only."""
    import torch.nn.functional as F

    data = records(8)
    model = make_model(dropout=0.0)
    total = count = all_total = all_count = 0.0
    with torch.no_grad():
        for r in data:
            ids = torch.tensor([r["input_ids"]])
            logits = model(ids).logits[0, :-1]
            targets = torch.tensor(r["labels"][1:])
            keep = targets != -100
            total += float(F.cross_entropy(logits[keep], targets[keep], reduction="sum"))
            count += int(keep.sum())
            all_total += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            all_count += ids.shape[1] - 1
    train(model, data, config=config(tmp_path, "m", batch_size=8, max_steps=1))
    first = losses(tmp_path / "m")[1]
    assert first == pytest.approx(total / count, abs=1e-5)
    assert abs(first - all_total / all_count) > 1e-3


def test_gradient_checkpointing_gives_the_same_gradients():
    from calm import hf

    model = make_model(dropout=0.0)
    ids = torch.randint(3, VOCAB, (2, 9))

    def grads():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return [p.grad.clone() for p in model.trainable_parameters()]

    plain = grads()
    layers = list(hf.decoder_layers(model.anchor))
    calls = [0] * len(layers)
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
    inner = [0] * len(layers)
    originals = [layer.forward for layer in layers]
    for i, layer in enumerate(layers):  # counts runs of the layer body, first pass and recompute
        layer.forward = lambda *a, i=i, **k: (
            inner.__setitem__(i, inner[i] + 1),
            originals[i](*a, **k),
        )[1]
    with hf.checkpointed_layers(model.anchor):
        checkpointed = grads()
    assert calls == [1] * len(layers)
    first = min(c.anchor_layer for c in model.connections)
    assert inner[first + 1 :] == [2] * (len(layers) - first - 1)  # recomputed in backward
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert any(float(g.abs().sum()) > 0 for g in plain)


def test_augmenting_states_reuse(pair):
    model = make_model(dropout=0.0)
    ids = torch.randint(3, VOCAB, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    states = model.augment_states(ids, mask)
    assert set(states) == {(c.augment, c.aug_layer) for c in model.connections}
    direct = model(ids, attention_mask=mask).logits
    reused = model(ids, attention_mask=mask, aug_states=states).logits
    assert torch.equal(direct, reused)


@pytest.mark.parametrize(
    "kind,dtype,atol", [("memory", "float32", 1e-5), ("disk", "bfloat16", 2e-2)]
)
def test_cache_gives_the_same_training(tmp_path, kind, dtype, atol):
    data = records(8)
    plain, cached = make_model(dropout=0.0), make_model(dropout=0.0)
    train(plain, data, config=config(tmp_path, "plain", epochs=3, max_steps=None))
    cfg = config(tmp_path, kind, epochs=3, max_steps=None, aug_cache=kind, cache_dtype=dtype)
    train(cached, data, config=cfg)
    for a, b in zip(weights(plain), weights(cached)):
        torch.testing.assert_close(a, b, atol=atol, rtol=0)
    if kind == "disk":
        assert len(list((Path(cfg.output_dir) / "aug_cache").glob("*/*.safetensors"))) == 8


@pytest.mark.slow
def test_sigint_checkpoints_and_exits_cleanly(tmp_path):
    out = tmp_path / "sig"
    script = textwrap.dedent(
        f"""
        import sys, json
        sys.path.insert(0, {str(TESTS)!r})
        from test_train import make_model, records
        from calm.train import TrainConfig, train
        cfg = TrainConfig(output_dir={str(out)!r}, max_steps=100000, batch_size=4,
                          progress=False)
        r = train(make_model(), records(), config=cfg)
        print(json.dumps({{"step": r.step, "interrupted": r.interrupted}}))
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (
        (out / "metrics.jsonl").is_file() and len(losses(out)) >= 2
    ):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["interrupted"] and result["step"] >= 2
    assert checkpoints(out)[-1].name == f"step-{result['step']:08d}"
    assert "stopped by signal" in stderr


def run_trainer(model: CALM, out) -> None:
    from transformers import Trainer, TrainingArguments

    from calm.data import collate, encode

    data = encode(records(8))
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=4,
        max_steps=3,
        learning_rate=1e-2,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=[{"index": i} for i in range(len(data))],
        data_collator=lambda batch: collate(data, [r["index"] for r in batch], pad_id=0),
    )
    trainer.train()


def test_trains_under_transformers_trainer(tmp_path):
    model = make_model(dropout=0.0)
    base = {n: p.clone() for n, p in model.named_parameters() if not n.startswith("blocks.")}
    before = weights(model)
    run_trainer(model, tmp_path / "hf")
    for n, p in model.named_parameters():
        if not n.startswith("blocks."):
            assert torch.equal(p, base[n]), n
    assert all(not torch.equal(a, b) for a, b in zip(before, weights(model)))


# ------------------------------------------------------------------ the other kinds of model


def lora_model(seed: int = 0, base_seed: int = 0):
    """The tiny anchor with LoRA adapters (their initialisation drawn with `seed`)."""
    from peft import LoraConfig, get_peft_model

    base = tiny_lm("llama", 32, 4, seed=base_seed)
    torch.manual_seed(seed)
    return get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))


def trainable(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters() if p.requires_grad]


def test_lora_model_trains_its_adapters_and_resumes_exactly(tmp_path):
    data = records(10)
    full = lora_model()
    frozen = {n: p.clone() for n, p in full.named_parameters() if not p.requires_grad}
    before = trainable(full)
    result = train(full, data, config=config(tmp_path, "full", max_steps=6))
    assert result.step == 6 and result.skipped_steps == 0
    for n, p in full.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), n
    assert any(not torch.equal(a, b) for a, b in zip(before, trainable(full)))
    saved = {p.name for p in Path(result.checkpoint).iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "state.json"} <= saved
    assert "trainer_state.pt" in saved and "composition.safetensors" not in saved

    first = train(lora_model(), data, config=config(tmp_path, "split", max_steps=6, stop_after=3))
    assert first.interrupted and first.step == 3
    resumed = lora_model(seed=7)  # other adapter initialisation: the checkpoint replaces it
    second = train(resumed, data, config=config(tmp_path, "split", max_steps=6), resume=True)
    assert second.step == 6
    assert losses(tmp_path / "split") == losses(tmp_path / "full")
    for a, b in zip(trainable(full), trainable(resumed)):
        assert torch.equal(a, b)

    other = lora_model(seed=7, base_seed=99)  # another base model under the adapters
    mine = trainable(other)
    with pytest.raises(ValueError, match="Cannot resume .* the model differs"):
        train(other, data, config=config(tmp_path, "split", max_steps=6), resume=True)
    for a, b in zip(mine, trainable(other)):  # refused: its own adapter weights are back
        assert torch.equal(a, b)


def test_full_fine_tune_trains_and_its_checkpoint_reloads(tmp_path):
    from transformers import AutoModelForCausalLM

    def fine_tuned():  # the tiny anchor, all but its embeddings trainable
        model = tiny_lm("llama", 32, 4, seed=0)
        model.model.embed_tokens.weight.requires_grad_(False)
        return model

    data = records(10)
    model = fine_tuned()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train(model, data, config=config(tmp_path, "ft", max_steps=4))
    assert result.step == 4 and not model.training  # its eval mode is restored
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (n == "model.embed_tokens.weight"), n
    assert (Path(result.checkpoint) / "config.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(result.checkpoint)
    for (n, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), n

    train(fine_tuned(), data, config=config(tmp_path, "s", max_steps=4, stop_after=2))
    fresh = fine_tuned()
    train(fresh, data, config=config(tmp_path, "s", max_steps=4), resume=True)
    assert losses(tmp_path / "s") == losses(tmp_path / "ft")
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="aug_cache keeps a composition's"):
        train(fresh, data, config=config(tmp_path, "c", aug_cache="memory"))


def test_lora_and_fine_tune_train_alike_with_gradient_checkpointing(tmp_path):
    for make in (lora_model, lambda: tiny_lm("llama", 32, 4, seed=0)):
        plain, checkpointed = make(), make()
        train(plain, records(8), config=config(tmp_path, "p", max_steps=2))
        cfg = config(tmp_path, "g", max_steps=2, gradient_checkpointing=True)
        train(checkpointed, records(8), config=cfg)
        for a, b in zip(trainable(plain), trainable(checkpointed)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        for name in ("p", "g"):
            shutil.rmtree(tmp_path / name)


def test_encoder_mode_composition_reads_the_prompt(tmp_path):
    from calm.data import collate, encode
    from calm.recipes.kv.bases import build_tokenizer

    tok = build_tokenizer()
    data = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(4) for b in range(3)]
    encoded = encode(data, tok, encoder=True)
    pad = tok.pad_token_id
    batch = collate(encoded, range(len(data)), pad_id=pad, aug_pad_ids=[pad])
    assert batch["aug_input_ids"][0][0].tolist() == tok(data[0]["prompt"])["input_ids"]
    model = CALM(*make_pair(), CALMConfig(mode="encoder", init="default"))
    with torch.no_grad():  # the first step's loss: one batch of all the data, prompts to mA
        want = float(model(**batch).loss)
    before = weights(model)
    cfg = config(tmp_path, "enc", batch_size=len(data), max_steps=3)
    assert train(model, data, config=cfg, tokenizer=tok).step == 3
    assert losses(cfg.output_dir)[1] == pytest.approx(want, abs=1e-5)
    assert all(not torch.equal(a, b) for a, b in zip(before, weights(model)))
    with pytest.raises(ValueError, match="encoder mode the augmenting models read the prompt"):
        train(model, [{"text": "1+2=3"}] * 4, config=config(tmp_path, "bad"), tokenizer=tok)


def test_min_lr_ratio_is_the_floor_of_the_decay(tmp_path):
    from calm.train import lr_factor

    assert lr_factor(0, 2, 10, "cosine", 0.1) == 0.5  # warmup ignores the floor
    assert lr_factor(10, 2, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(6, 2, 10, "cosine", 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(6, 2, 10, "linear", 0.2) == pytest.approx(0.2 + 0.8 * 0.5)
    assert lr_factor(6, 2, 10, "cosine") == lr_factor(6, 2, 10, "cosine", 0.0) == 0.5
    cfg = config(tmp_path, "floor", max_steps=4, warmup_steps=1, min_lr_ratio=0.25)
    train(make_model(), records(8), config=cfg)
    lines = (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()
    lrs = [json.loads(x)["lr"] for x in lines]
    assert lrs[-1] == pytest.approx(0.25 * cfg.learning_rate)
    with pytest.raises(ValueError, match="min_lr_ratio must be in"):
        config(tmp_path, "x", min_lr_ratio=1.5)


def test_on_step_can_end_the_training(tmp_path):
    model = make_model()
    model.eval()
    seen = []

    def on_step(step: int, loss: float) -> bool:
        seen.append((step, model.training))
        model.eval()  # as an evaluation would; the loop puts it back in training mode
        return step == 3

    result = train(model, records(8), config=config(tmp_path, "cb", max_steps=6), on_step=on_step)
    assert seen == [(1, True), (2, True), (3, True)]
    assert result.step == 3 and not result.interrupted
    assert checkpoints(result.output_dir)[-1].name == "step-00000003"
    assert not model.training
