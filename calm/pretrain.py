"""Pretrain the two key-value base models (mA: KV-SUBS only, mB: numeric arithmetic only).

A plain torch loop over freshly drawn examples: loss on completion tokens only, AdamW, warmup +
cosine schedule, periodic greedy-decoding evaluation on held-out expressions, resumable
checkpoints. Both models are small `LlamaForCausalLM`s that share one character-level tokenizer.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from calm.tasks.kv import DIGITS, LETTERS, SYMBOLS, Example, Expression, KVScale, KVTask

SPECIAL = ("[PAD]", "[BOS]", "[EOS]", "[UNK]")
BASE_MODELS = ("mA", "mB", "vanilla_mA")


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character: letters, digits, operators, '=', '|', plus BOS/EOS/PAD/UNK."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL + tuple(LETTERS + DIGITS + SYMBOLS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", special_tokens=[("[BOS]", vocab["[BOS]"])]
    )
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="[BOS]",
        eos_token="[EOS]",
        pad_token="[PAD]",
        unk_token="[UNK]",
        padding_side="left",
    )


@dataclass(frozen=True)
class ModelShape:
    """The Llama shape of one base model."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    max_positions: int = 64


def build_model(tokenizer: PreTrainedTokenizerFast, shape: ModelShape, seed: int):
    """A freshly initialized small Llama causal LM over `tokenizer`'s vocabulary."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_heads,
        max_position_embeddings=shape.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


@dataclass(frozen=True)
class PretrainConfig:
    """How one base model is trained (`model`: which data it sees, see `BASE_MODELS`)."""

    model: str = "mA"
    out_dir: str = "runs/pretrain/mA"
    scale: KVScale = field(default_factory=KVScale)
    shape: ModelShape = field(default_factory=ModelShape)
    max_steps: int = 6000
    batch_size: int = 128
    learning_rate: float = 2e-3
    warmup_steps: int = 200
    weight_decay: float = 0.01
    seed: int = 0
    eval_every: int = 250
    eval_size: int = 300
    save_every: int = 250
    target_accuracy: float = 0.99
    lookup_fraction: float = 0.5
    prefix_fraction: float = 0.0
    threads: int = 1

    def __post_init__(self) -> None:
        if self.model not in BASE_MODELS:
            raise ValueError(f"Unknown base model {self.model!r}; choose one of {BASE_MODELS}.")
        if self.max_steps < 1 or self.batch_size < 1:
            raise ValueError("max_steps and batch_size must be positive.")

    def to_dict(self) -> dict:
        return asdict(self)


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


def eval_examples(task: KVTask, model: str, n: int) -> list[Example]:
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


def encode_examples(
    tokenizer: PreTrainedTokenizerFast, examples: Sequence[Example]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, labels); labels only on completion + EOS."""
    rows, labels = [], []
    for ex in examples:
        prompt = tokenizer(ex.prompt)["input_ids"]  # [BOS] + prompt
        completion = tokenizer(ex.completion, add_special_tokens=False)["input_ids"]
        ids = prompt + completion + [tokenizer.eos_token_id]
        rows.append(ids)
        labels.append([-100] * len(prompt) + completion + [tokenizer.eos_token_id])
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    label_ids = torch.tensor([la + [-100] * (width - len(la)) for la in labels])
    return input_ids, mask, label_ids  # (B, T) each


@torch.no_grad()
def complete(
    model,
    tokenizer: PreTrainedTokenizerFast,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 256,
    encoder: bool = False,
) -> list[str]:
    """Greedy completions of `prompts` (left-padded batches), decoded up to EOS.

    `encoder`: `model` is a CALM in encoder mode; its augmenting models read the prompt only.
    """
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            batch = tokenizer(list(prompts[i : i + batch_size]), padding=True, return_tensors="pt")
            aug = {}
            if encoder:
                aug = {
                    "aug_input_ids": batch["input_ids"],
                    "aug_attention_mask": batch["attention_mask"],
                }
            ids = model.generate(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                **aug,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            new = ids[:, batch["input_ids"].shape[1] :]
            out += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        model.train(was_training)
    return out


def exact_match(model, tokenizer, examples: Sequence[Example]) -> float:
    """Fraction of examples whose greedy completion equals the reference completion."""
    max_new = max(len(ex.completion) for ex in examples) + 1
    got = complete(model, tokenizer, [ex.prompt for ex in examples], max_new)
    return sum(g == ex.completion for g, ex in zip(got, examples, strict=True)) / len(examples)


# --- training ----------------------------------------------------------------------------------


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


def _lr_at(step: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _log(out: Path, record: dict, verbose: bool) -> None:
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    if verbose:
        print(" ".join(f"{k}={v}" for k, v in record.items()), flush=True)


def pretrain(cfg: PretrainConfig, verbose: bool = True) -> dict:
    """Train one base model, resuming from `out_dir/checkpoint` when present; returns the summary
    also written to `out_dir/pretrain.json` next to the model and tokenizer."""
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    task = KVTask(cfg.scale)
    tokenizer = build_tokenizer()
    draw = training_source(task, cfg.model, cfg.lookup_fraction, cfg.prefix_fraction)
    gate = eval_examples(task, cfg.model, cfg.eval_size)
    gate_prompts = {ex.prompt for ex in gate}

    model = build_model(tokenizer, cfg.shape, cfg.seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay
    )
    step, elapsed, best = 0, 0.0, 0.0
    ckpt = out / "checkpoint.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed, best = state["step"], state["elapsed"], state["best"]
        if verbose:
            print(f"resumed {cfg.model} at step {step}", flush=True)

    model.train()
    accuracy = best
    start = time.time() - elapsed
    while step < cfg.max_steps and accuracy < cfg.target_accuracy:
        rng = random.Random(f"{cfg.seed}-{step}")
        batch: list[Example] = []
        while len(batch) < cfg.batch_size:
            ex = draw(rng)
            if ex.prompt not in gate_prompts:
                batch.append(ex)
        input_ids, mask, labels = encode_examples(tokenizer, batch)
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, cfg)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            accuracy = exact_match(model, tokenizer, gate)
            best = max(best, accuracy)
            record = {
                "step": step,
                "loss": round(loss.item(), 4),
                "accuracy": round(accuracy, 4),
                "seconds": round(time.time() - start, 1),
            }
            _log(out, record, verbose)
        if step % cfg.save_every == 0:
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "step": step,
                "elapsed": time.time() - start,
                "best": best,
            }
            torch.save(state, out / "checkpoint.tmp")
            (out / "checkpoint.tmp").replace(ckpt)

    accuracy = exact_match(model, tokenizer, gate)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    summary = {
        "model": cfg.model,
        "trained_on": {"mA": "kv_subs", "mB": "num_math", "vanilla_mA": "kv_subs (map_seed 1)"}[
            cfg.model
        ],
        "steps": step,
        "seconds": round(time.time() - start, 1),
        "gate_accuracy": round(accuracy, 4),
        "gate_examples": len(gate),
        "parameters": sum(p.numel() for p in model.parameters()),
        "command": command_line(cfg),
        "config": cfg.to_dict(),
    }
    (out / "pretrain.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
