"""Pretrain one key-value base model from scratch (mA: KV-SUBS, mB: arithmetic, vanilla_mA).

This is the one training loop outside `calm.train`, and it stays apart for what it does that
`calm.train` does not: it trains a whole model from random weights on an endless stream (each
step draws a fresh batch from the task's generator, seeded by the step, so no data set exists to
epoch over or fingerprint), and it stops at a target greedy accuracy on a gate set (a decoding
evaluation every `eval_every` steps, not an eval loss). Everything else is the library's:
`calm.data` batches the examples, `calm.train.lr_factor` is the schedule (warmup, cosine to a
floor of `MIN_LR_RATIO` of the peak), `calm.evaluate` scores the gate. Checkpoints
(`checkpoint.pt`) make it resumable.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

import calm
from calm.data import collate, encode
from calm.recipes.kv.bases import build_model, build_tokenizer
from calm.recipes.kv.settings import BASE_RECIPES, PretrainConfig
from calm.tasks.kv import LETTERS, Example, Expression, KVEval, KVScale, KVTask
from calm.train import lr_factor

MIN_LR_RATIO = 0.1  # the cosine decays to this fraction of the peak learning rate


# --- data ------------------------------------------------------------------------------------


def training_source(
    task: KVTask, model: str, lookup_fraction: float = 0.0, prefix_fraction: float = 0.0
) -> Callable[[random.Random], Example]:
    """The example generator each base model trains on.

    mA: KV-SUBS over all keys. mB: NUM-MATH over any values. vanilla_mA: KV-SUBS over a different
    key-value map (same architecture, same format, other knowledge). For mA and vanilla_mA a
    `lookup_fraction` of the examples are single-key substitutions ("abc=" -> "210"), which
    teach the map directly before the model has learned to find the i-th key of an expression.
    For mB a `prefix_fraction` of the NUM-MATH prompts are preceded by a distractor of random
    letter strings that are never keys ("qzv+rt-wkp=210+430-500="), so that mB computes on a
    numeric expression wherever it starts in the stream; it is never shown a key or its value.
    """
    if model == "mB":
        return lambda rng: _with_prefix(task, rng, prefix_fraction)
    source = task if model == "mA" else KVTask(KVScale(**{**task.scale.to_dict(), "map_seed": 1}))

    def draw(rng: random.Random) -> Example:
        if rng.random() < lookup_fraction:
            return source.kv_subs(Expression((rng.choice(source.keys),), ()))
        return source.kv_subs(source.sample_expression(rng, source.keys))

    return draw


def _with_prefix(task: KVTask, rng: random.Random, prefix_fraction: float) -> Example:
    ex = task.random_numeric_expression(rng)
    if rng.random() >= prefix_fraction:
        return ex
    scale, words = task.scale, []
    while len(words) < ex.prompt.count("+") + ex.prompt.count("-") + 1:
        n = rng.randint(scale.min_key_len, scale.max_key_len)
        word = "".join(rng.choice(LETTERS) for _ in range(n))
        if word not in task.kv:
            words.append(word)
    distractor = "".join(w + rng.choice(scale.operators) for w in words)[:-1]
    return Example(distractor + "=" + ex.prompt, ex.completion, ex.answer)


def gate_examples(task: KVTask, model: str, n: int) -> list[Example]:
    """The held-out gate set of a base model (never drawn in its training)."""
    draw = training_source(task, model)
    rng = random.Random(f"gate-{model}")
    out: dict[str, Example] = {}
    for _ in range(100 * n):
        ex = draw(rng)
        out.setdefault(ex.prompt, ex)
        if len(out) == n:
            break
    return list(out.values())


def gate_task(model: str, examples: list[Example]) -> KVEval:
    """The gate as a `calm.evaluate` task: the greedy completion must equal the reference."""
    longest = max(len(ex.completion) for ex in examples)
    return KVEval(f"kv-gate:{model}", tuple(examples), "exact", longest + 1)


def gate_accuracy(model, tokenizer, gate: KVEval) -> float:
    """The fraction of the gate set `model` completes exactly (greedy)."""
    result = calm.evaluate(model, gate, tokenizer=tokenizer, batch_size=256, progress=False)
    return sum(r["correct"] for r in result.samples) / len(result.samples)


# --- training --------------------------------------------------------------------------------


def command_line(cfg: PretrainConfig) -> str:
    """The `calm pretrain` command that trains a model with `cfg`."""
    s, k = cfg.shape, cfg.scale
    return (
        f"calm pretrain kv {cfg.model} --out {cfg.out_dir} --max-steps {cfg.max_steps} "
        f"--batch-size {cfg.batch_size} --lr {cfg.learning_rate} --warmup-steps {cfg.warmup_steps} "
        f"--seed {cfg.seed} --eval-size {cfg.eval_size} --target-accuracy {cfg.target_accuracy} "
        f"--lookup-fraction {cfg.lookup_fraction} --prefix-fraction {cfg.prefix_fraction} "
        f"--hidden-size {s.hidden_size} "
        f"--layers {s.num_layers} --heads {s.num_heads} --num-keys {k.num_keys} "
        f"--operands {k.max_operands} --threads {cfg.threads}"
    )


def _log(out: Path, record: dict, verbose: bool) -> None:
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    if verbose:
        print(" ".join(f"{k}={v}" for k, v in record.items()), flush=True)


def training_batch(draw, cfg: PretrainConfig, step: int, tokenizer, held: set[str]) -> dict:
    """The fresh batch of `step` (seeded by it, gate prompts excluded), right-padded."""
    rng = random.Random(f"{cfg.seed}-{step}")
    records: list[dict] = []
    while len(records) < cfg.batch_size:
        ex = draw(rng)
        if ex.prompt not in held:
            records.append({"prompt": ex.prompt, "completion": ex.completion})
    data = encode(records, tokenizer, name=f"step {step}")
    return collate(data, range(len(data)), tokenizer.pad_token_id)  # (B, T) each


def _save_checkpoint(out: Path, model, optimizer, step: int, elapsed: float, best: float) -> None:
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "elapsed": elapsed,
        "best": best,
    }
    torch.save(state, out / "checkpoint.tmp")
    (out / "checkpoint.tmp").replace(out / "checkpoint.pt")


def pretrain(cfg: PretrainConfig, verbose: bool = True) -> dict:
    """Train one base model, resuming from `out_dir/checkpoint.pt` when present; returns the
    summary also written to `out_dir/pretrain.json` next to the model and tokenizer."""
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    task = KVTask(cfg.scale)
    tokenizer = build_tokenizer()
    draw = training_source(task, cfg.model, cfg.lookup_fraction, cfg.prefix_fraction)
    examples = gate_examples(task, cfg.model, cfg.eval_size)
    gate, held = gate_task(cfg.model, examples), {ex.prompt for ex in examples}

    model = build_model(tokenizer, cfg.shape, cfg.seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay
    )
    step, elapsed, best = 0, 0.0, 0.0
    if (out / "checkpoint.pt").exists():
        state = torch.load(out / "checkpoint.pt", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed, best = state["step"], state["elapsed"], state["best"]
        if verbose:
            print(f"resumed {cfg.model} at step {step}", flush=True)

    model.train()
    accuracy = best
    start = time.time() - elapsed
    while step < cfg.max_steps and accuracy < cfg.target_accuracy:
        factor = lr_factor(step, cfg.warmup_steps, cfg.max_steps, "cosine", MIN_LR_RATIO)
        for group in optimizer.param_groups:
            group["lr"] = cfg.learning_rate * factor
        loss = model(**training_batch(draw, cfg, step, tokenizer, held)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            accuracy = gate_accuracy(model, tokenizer, gate)
            model.train()
            best = max(best, accuracy)
            seconds = round(time.time() - start, 1)
            record = {"step": step, "loss": round(loss.item(), 4), "accuracy": round(accuracy, 4)}
            _log(out, {**record, "seconds": seconds}, verbose)
        if step % cfg.save_every == 0:
            _save_checkpoint(out, model, optimizer, step, time.time() - start, best)

    accuracy = gate_accuracy(model, tokenizer, gate)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    trained_on = {"mA": "kv_subs", "mB": "num_math", "vanilla_mA": "kv_subs (map_seed 1)"}
    summary = {
        "model": cfg.model,
        "trained_on": trained_on[cfg.model],
        "steps": step,
        "seconds": round(time.time() - start, 1),
        "gate_accuracy": round(accuracy, 4),
        "gate_examples": len(examples),
        "parameters": sum(p.numel() for p in model.parameters()),
        "command": command_line(cfg),
        "config": cfg.to_dict(),
    }
    (out / "pretrain.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def pretrain_bases(out_dir: Path, quick: bool = False) -> None:
    """Retrain the three base models with `BASE_RECIPES` into `out_dir/<name>`."""
    for name, recipe in BASE_RECIPES.items():
        steps = min(recipe.max_steps, 100) if quick else recipe.max_steps
        pretrain(replace(recipe, out_dir=str(out_dir / name), max_steps=steps, threads=2))
