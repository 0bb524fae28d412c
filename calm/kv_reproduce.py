"""Reproduce the paper's key-value arithmetic experiment (Table 1, with Table 5 analogues).

mB (the anchor: numeric arithmetic) is composed with mA (the augmenting model: a memorized
key-value map). The composition trains on D_C, examples over 20% of the keys, and is evaluated on
expressions over the other 80%. The composition training loop lives here (small and plain): it
caches the frozen augmenting states of D_C once and trains only the composition parameters.
"""

from __future__ import annotations

import copy
import json
import math
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast

from calm.config import CALMConfig
from calm.model import CALM
from calm.pretrain import (
    ModelShape,
    PretrainConfig,
    build_model,
    complete,
    encode_examples,
    pretrain,
)
from calm.tasks.kv import VARIANTS, Example, KVScale, KVTask, parse_result, parse_subs

ASSETS = Path(__file__).parent / "assets" / "kv"
TASKS = ("kv_subs", "num_math", "kv_math")
ABLATIONS = ("vanilla_mA", "random_mA", "encoder", "lora")
# Table 1 and Table 5 of the paper (accuracy as a fraction); Table 5 has no key-value rows.
PAPER = {
    "mA": {"kv_subs": 0.981, "num_math": 0.042, "kv_math": 0.007},
    "mB": {"kv_subs": 0.0, "num_math": 0.737, "kv_math": 0.0},
    "calm": {"kv_subs": 0.929, "num_math": 0.720, "kv_math": 0.843},
}
# The recipes of the shipped base models (`calm pretrain kv ...` with these settings).
# The shipped mB took a two-stage path (see its pretrain.json); this is its one-stage equivalent.
BASE_RECIPES = {
    "mA": PretrainConfig(model="mA", max_steps=3000, batch_size=64, target_accuracy=0.96),
    "mB": PretrainConfig(model="mB", max_steps=2500, batch_size=128, prefix_fraction=0.5),
    "vanilla_mA": PretrainConfig(
        model="vanilla_mA", max_steps=3000, batch_size=64, target_accuracy=0.96
    ),
}


@dataclass(frozen=True)
class ReproduceConfig:
    """One run of `calm reproduce kv`."""

    out_dir: str = "runs/kv"
    seed: int = 0
    variant: str = "subs_math"
    all_variants: bool = False
    ablations: bool = False
    bases_dir: str | None = None
    dc_size: int = 8000
    replay: float = 0.25
    steps: int = 600
    batch_size: int = 64
    learning_rate: float = 6e-3
    dropout: float = 0.1  # attention dropout in the blocks (and LoRA's); see docs/kv.md
    fake_keys: float = 0.25  # share of D_C over non-keys labelled by mA; see docs/kv.md
    warmup_steps: int = 30
    every: int = 1
    num_heads: int | None = None
    rope: bool = True  # rotary stream positions in the blocks (CALMConfig.rope); see docs/kv.md
    eval_size: int = 300
    threads: int = 2

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"Unknown D_C variant {self.variant!r}; choose one of {VARIANTS}.")
        if min(self.dc_size, self.steps, self.batch_size, self.eval_size) < 1:
            raise ValueError("dc_size, steps, batch_size and eval_size must be positive.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}.")
        if not 0.0 <= self.replay < 1.0:
            raise ValueError(f"replay must be in [0, 1), got {self.replay}.")
        if not 0.0 <= self.fake_keys or self.replay + self.fake_keys >= 1.0:
            raise ValueError(
                f"fake_keys must be >= 0 and leave room for key examples: replay {self.replay} "
                f"+ fake_keys {self.fake_keys} must be < 1."
            )

    @classmethod
    def quick(cls, **overrides) -> ReproduceConfig:
        """A few-minute smoke run: fewer steps, smaller evaluation sets."""
        return replace(cls(dc_size=1000, steps=150, eval_size=60), **overrides)


# --- base models ---------------------------------------------------------------------------


@dataclass
class Bases:
    """The shared tokenizer, the base models and the task they were trained on."""

    tokenizer: PreTrainedTokenizerFast
    models: dict[str, LlamaForCausalLM]
    scale: KVScale
    shape: ModelShape
    info: dict[str, dict]


def load_bases(directory: str | Path | None = None) -> Bases:
    """Load mA, mB and vanilla_mA (and their tokenizer) from `directory` (default: shipped)."""
    root = Path(directory) if directory is not None else ASSETS
    if not (root / "mA" / "pretrain.json").exists():
        raise FileNotFoundError(f"No key-value base models under {root}; run `calm pretrain`.")
    info = {}
    models = {}
    for name in ("mA", "mB", "vanilla_mA"):
        path = root / name
        if (path / "pretrain.json").exists():
            info[name] = json.loads((path / "pretrain.json").read_text())
            models[name] = LlamaForCausalLM.from_pretrained(path).eval()
    cfg = info["mA"]["config"]
    tokenizer = AutoTokenizer.from_pretrained(root / "mA")
    return Bases(tokenizer, models, KVScale(**cfg["scale"]), ModelShape(**cfg["shape"]), info)


def pretrain_bases(out_dir: Path, quick: bool = False) -> None:
    """Retrain the three base models with `BASE_RECIPES` (for `--from-scratch`)."""
    for name, recipe in BASE_RECIPES.items():
        steps = min(recipe.max_steps, 100) if quick else recipe.max_steps
        pretrain(replace(recipe, out_dir=str(out_dir / name), max_steps=steps, threads=2))


# --- evaluation ----------------------------------------------------------------------------


def eval_sets(task: KVTask, keys: list[str], n: int, seed: int) -> dict[str, list[Example]]:
    """The same `n` expressions over `keys` as KV-SUBS, NUM-MATH and KV-MATH examples."""
    exprs = task.sample_expressions(n, keys, f"eval-{seed}")
    return {t: [getattr(task, t)(e) for e in exprs] for t in TASKS}


def _correct(task: str, completion: str, ex: Example) -> bool:
    if task == "kv_subs":
        return parse_subs(completion) == ex.completion
    return parse_result(completion) == ex.answer


def evaluate(
    model, tokenizer, sets: dict[str, list[Example]], encoder: bool = False, samples: int = 3
) -> tuple[dict, dict]:
    """Accuracy of greedy decoding on each set (KV-SUBS: the text before the first '=' equals
    the substitution; NUM-MATH and KV-MATH: the final number equals the result), and the first
    `samples` "prompt -> completion" strings of each set."""
    longest = {name: max(len(ex.completion) for ex in exs) for name, exs in sets.items()}
    max_new = longest["kv_subs"] + longest["num_math"] + 2  # room for "subs=scratchpad" + EOS
    scores, shown = {}, {}
    for name, examples in sets.items():
        got = complete(model, tokenizer, [ex.prompt for ex in examples], max_new, encoder=encoder)
        hits = sum(_correct(name, g, ex) for g, ex in zip(got, examples, strict=True))
        scores[name] = hits / len(examples)
        shown[name] = [
            f"{ex.prompt} -> {g}" for ex, g in zip(examples[:samples], got, strict=False)
        ]
    return scores, shown


# --- composition training ------------------------------------------------------------------


def self_labelled(
    task: KVTask,
    mA: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    variant: str,
    n: int,
    seed: int,
) -> list[Example]:
    """`n` `variant` examples over strings that are not keys (`KVTask.fake_expressions`), each
    labelled with the values mA writes for it (greedy KV-SUBS) instead of the map's.

    mA's substitution of a non-key is whatever it makes of the string; the composition learns
    from these to pass on what mA writes, on as many distinct strings as it sees examples,
    where 40 D_C keys alone let the blocks store those keys' values (docs/kv.md). Expressions
    whose substitution does not parse as one value of the task's width per operand, with the
    prompt's operators, or whose running results go negative, are skipped; an mA that writes
    too few well-formed values (an undertrained one) yields fewer than `n` examples.
    """
    make = getattr(task, variant)
    width = task.scale.value_width
    max_new = (width + 1) * task.scale.max_operands + 1  # one value and an operator per operand
    out: list[Example] = []
    for attempt in range(5):
        exprs = task.fake_expressions(max(64, 2 * (n - len(out))), f"fake-{seed}-{attempt}")
        prompts = [task.key_string(e) + "=" for e in exprs]
        before = len(out)
        for e, got in zip(exprs, complete(mA, tokenizer, prompts, max_new), strict=True):
            subs = parse_subs(got)
            chunks = subs.replace("-", "+").replace("*", "+").split("+")
            if len(chunks) != len(e.keys) or not all(
                len(c) == width and c.isdigit() for c in chunks
            ):
                continue
            values = [int(c[::-1]) for c in chunks]
            if task.value_string(e, values) != subs or min(task.evaluate(values, e.ops)) < 0:
                continue
            out.append(make(e, values))
            if len(out) == n:
                return out
        if len(out) - before < len(exprs) // 20:  # under 5% well formed: mA is not the map's
            break
    return out


def dc_data(
    task: KVTask,
    dc_keys: list[str],
    variant: str,
    cfg: ReproduceConfig,
    mA: LlamaForCausalLM | None = None,
    tokenizer: PreTrainedTokenizerFast | None = None,
) -> list[Example]:
    """D_C: `variant` examples over the D_C keys, plus a `replay` share of NUM-MATH examples
    (the same kind of expressions, values substituted) that keep mB's own skill, plus a
    `fake_keys` share of examples over non-keys labelled by `mA` (`self_labelled`)."""
    n_replay = round(cfg.replay * cfg.dc_size)
    n_fake = round(cfg.fake_keys * cfg.dc_size)
    if n_fake and (mA is None or tokenizer is None):
        raise ValueError("D_C with fake_keys > 0 needs mA and its tokenizer to label them.")
    data = task.composition_data(variant, cfg.dc_size - n_replay - n_fake, dc_keys, cfg.seed)
    exprs = task.sample_expressions(n_replay, dc_keys, f"replay-{cfg.seed}")
    data += [task.num_math(e) for e in exprs]
    if n_fake:
        data += self_labelled(task, mA, tokenizer, variant, n_fake, cfg.seed)
    random.Random(cfg.seed).shuffle(data)
    return data


def _lr(step: int, cfg: ReproduceConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.learning_rate * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_on(
    model,
    parameters: Sequence[torch.nn.Parameter],
    tokenizer: PreTrainedTokenizerFast,
    data: Sequence[Example],
    cfg: ReproduceConfig,
    desc: str,
    encoder: bool = False,
    on_step: Callable[[int, list[float]], None] | None = None,
) -> list[float]:
    """Train `parameters` of `model` (a CALM or a LoRA-wrapped mB) on `data`; returns losses.

    For a causal CALM the frozen augmenting states of the whole of `data` are computed once.
    `on_step(step, losses)`, if given, runs after each optimizer step (it may evaluate the
    model; training mode is restored after it).
    """
    input_ids, mask, labels = encode_examples(tokenizer, data)  # (N, T) each
    extra: dict[str, torch.Tensor] = {}
    states = None
    if isinstance(model, CALM) and encoder:
        prompts = tokenizer([ex.prompt for ex in data], padding=True, return_tensors="pt")
        extra = {
            "aug_input_ids": prompts["input_ids"],
            "aug_attention_mask": prompts["attention_mask"],
        }
    elif isinstance(model, CALM):
        with torch.no_grad():
            chunks = [
                model.augment_states(input_ids[i : i + 512], mask[i : i + 512])
                for i in range(0, len(data), 512)
            ]
        states = {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}

    optimizer = torch.optim.AdamW(parameters, lr=cfg.learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(data), generator=generator)
    pos, losses = 0, []
    model.train()
    bar = tqdm(range(cfg.steps), desc=desc, leave=False, mininterval=2.0)
    for step in bar:
        if pos + cfg.batch_size > len(order):
            order, pos = torch.randperm(len(data), generator=generator), 0
        idx = order[pos : pos + cfg.batch_size]
        pos += cfg.batch_size
        kwargs = {k: v[idx] for k, v in extra.items()}
        if states is not None:
            kwargs["aug_states"] = {k: v[idx] for k, v in states.items()}
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, cfg)
        loss = model(
            input_ids=input_ids[idx], attention_mask=mask[idx], labels=labels[idx], **kwargs
        ).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if on_step is not None:
            on_step(step, losses)
            model.train()
    model.eval()
    return losses


def _lora_model(mB, target: int, dropout: float = 0.0):
    """mB wrapped with LoRA on every linear layer, rank chosen to match `target` parameters."""
    from peft import LoraConfig, get_peft_model

    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    per_rank = sum(
        m.in_features + m.out_features
        for name, m in mB.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in modules
    )
    rank = max(1, round(target / per_rank))
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=modules, lora_dropout=dropout)
    return get_peft_model(copy.deepcopy(mB), config), rank


# --- the experiment ------------------------------------------------------------------------


def run_reproduction(cfg: ReproduceConfig, bases: Bases | None = None, log=print) -> dict:
    """Run the experiment; write results.json, results.md and results.png to `cfg.out_dir`."""
    torch.set_num_threads(cfg.threads)
    start = time.time()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bases = bases if bases is not None else load_bases(cfg.bases_dir)
    tok, mA, mB = bases.tokenizer, bases.models["mA"], bases.models["mB"]
    task = KVTask(bases.scale)
    dc_keys, held_keys = task.split_keys(cfg.seed)
    sets = eval_sets(task, held_keys, cfg.eval_size, cfg.seed)
    log(
        f"scale: {bases.scale.num_keys} keys, {bases.scale.max_operands} keys per expression, "
        f"'{bases.scale.operators}'; D_C over {len(dc_keys)} keys; "
        f"evaluating {cfg.eval_size} expressions over the other {len(held_keys)}"
    )
    rows: dict[str, dict] = {}
    extra: dict[str, dict] = {}
    samples: dict[str, dict] = {}

    def write() -> dict:
        results = {
            "rows": rows,
            "paper": PAPER,
            "variant": cfg.variant,
            "scale": bases.scale.to_dict(),
            "dc_keys": len(dc_keys),
            "held_out_keys": len(held_keys),
            "seed": cfg.seed,
            "config": asdict(cfg),
            "bases": {
                k: {x: v[x] for x in ("steps", "seconds", "gate_accuracy")}
                for k, v in bases.info.items()
            },
            **extra,
            "samples": samples,
            "seconds": round(time.time() - start, 1),
        }
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        (out / "results.md").write_text(results_markdown(results))
        return results

    def record(name: str, t0: float, result: tuple[dict, dict], **info) -> None:
        scores, samples[name] = result
        rows[name] = {**{k: round(v, 4) for k, v in scores.items()}, "seconds": 0.0}
        rows[name]["seconds"] = round(time.time() - t0, 1)
        rows[name].update(info)
        accs = "  ".join(f"{k} {100 * scores[k]:5.1f}%" for k in TASKS)
        log(f"{name:>16}: {accs}  ({rows[name]['seconds']:.0f} s)")
        write()

    for name, model in (("mA", mA), ("mB", mB)):
        t0 = time.time()
        record(name, t0, evaluate(model, tok, sets))

    dc_sets: dict[str, list] = {}

    def dc_for(variant: str) -> list:
        """D_C of `variant`, built once: every row trained on it gets the same examples (the
        fake-key share labelled by the shipped mA, whatever the row's augmenting model)."""
        if variant not in dc_sets:
            data = dc_data(task, dc_keys, variant, cfg, mA, tok)
            operand = [re.match("[a-z]*", ex.prompt)[0] for ex in data]
            counts = {
                "keys": sum(w in task.kv for w in operand),
                "replay": sum(not w for w in operand),
                "fake": sum(bool(w) and w not in task.kv for w in operand),
            }
            extra.setdefault("dc_examples", {})[variant] = counts
            log(
                f"D_C ({variant}): {counts['keys']} examples over the D_C keys, {counts['replay']} "
                f"NUM-MATH replay, {counts['fake']} over non-keys labelled by mA"
            )
            dc_sets[variant] = data
        return dc_sets[variant]

    def compose(aug, variant: str, mode: str = "causal", seed: int = cfg.seed):
        torch.manual_seed(seed)
        rope = cfg.rope and mode == "causal"
        config = CALMConfig(
            every=cfg.every, num_heads=cfg.num_heads, mode=mode, rope=rope, dropout=cfg.dropout
        )
        model = CALM(mB, aug, config)
        data = dc_for(variant)
        losses = train_on(
            model,
            model.trainable_parameters(),
            tok,
            data,
            cfg,
            desc=f"compose ({variant}, {mode})",
            encoder=mode == "encoder",
        )
        result = evaluate(model, tok, sets, encoder=mode == "encoder")
        n = model.num_trainable_parameters()
        model.remove()
        return result, round(sum(losses[-20:]) / len(losses[-20:]), 4), n

    variants = VARIANTS if cfg.all_variants else (cfg.variant,)
    calm_params = 0
    for variant in variants:
        t0 = time.time()
        result, loss, calm_params = compose(mA, variant)
        record(f"calm_{variant}", t0, result, variant=variant, final_loss=loss)
    rows["calm"] = dict(rows[f"calm_{cfg.variant}"])
    samples["calm"] = samples[f"calm_{cfg.variant}"]
    if not cfg.all_variants:
        del rows[f"calm_{cfg.variant}"]
    extra["calm_parameters"] = calm_params

    if cfg.ablations:
        ablation_augs = {
            "vanilla_mA": bases.models.get("vanilla_mA"),
            "random_mA": build_model(tok, bases.shape, seed=1000 + cfg.seed).eval(),
        }
        for name, aug in ablation_augs.items():
            if aug is None:
                raise FileNotFoundError("The vanilla mA base model is missing from the bases.")
            t0 = time.time()
            result, loss, _ = compose(aug, cfg.variant)
            record(name, t0, result, variant=cfg.variant, final_loss=loss)
        t0 = time.time()
        result, loss, _ = compose(mA, cfg.variant, mode="encoder")
        record("encoder", t0, result, variant=cfg.variant, final_loss=loss)

        t0 = time.time()
        torch.manual_seed(cfg.seed)
        lora, rank = _lora_model(mB, calm_params, cfg.dropout)
        params = [p for p in lora.parameters() if p.requires_grad]
        data = dc_for(cfg.variant)
        losses = train_on(lora, params, tok, data, cfg, desc=f"LoRA r={rank} on mB")
        record(
            "lora",
            t0,
            evaluate(lora, tok, sets),
            variant=cfg.variant,
            rank=rank,
            parameters=sum(p.numel() for p in params),
            final_loss=round(sum(losses[-20:]) / len(losses[-20:]), 4),
        )

    results = write()
    plot(results, out / "results.png")
    return results


def results_markdown(results: dict) -> str:
    """Table 1 shaped: rows are models, columns are data sets, paper numbers beside ours."""
    names = {"kv_subs": "KV-SUBS", "num_math": "NUM-MATH", "kv_math": "KV-MATH"}
    head = "| row | " + " | ".join(f"{names[t]} ours | {names[t]} paper" for t in TASKS)
    lines = [
        f"# Key-value arithmetic (seed {results['seed']}, D_C variant `{results['variant']}`)",
        "",
        head + " | seconds |",
        "|---" * (2 + 2 * len(TASKS)) + "|",
    ]
    for name, row in results["rows"].items():
        paper = results["paper"].get(name, {})
        cells = []
        for t in TASKS:
            cells.append(f"{100 * row[t]:.1f}")
            cells.append(f"{100 * paper[t]:.1f}" if t in paper else "")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {row['seconds']:.0f} |")
    s = results["scale"]
    lines += [
        "",
        f"Scale: {s['num_keys']} keys, {s['max_operands']} keys per expression, operators "
        f"`{s['operators']}`; D_C spans {results['dc_keys']} keys, evaluation uses expressions "
        f"over the other {results['held_out_keys']}. Total {results['seconds']:.0f} s.",
        "",
    ]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """A grouped bar chart: one group per data set, one bar per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(2.2 + 1.3 * len(rows), 3.6))
    for i, (name, row) in enumerate(rows.items()):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(TASKS))]
        values = [100 * row[t] for t in TASKS]
        bars = ax.bar(xs, values, width, label=name)
        ax.bar_label(bars, [f"{v:.0f}" for v in values], fontsize=6, padding=1)
        paper = results["paper"].get(name, {})
        for x, t in zip(xs, TASKS):  # the paper's number for this row, as a black tick
            if t in paper:
                ax.plot([x - width / 2, x + width / 2], [100 * paper[t]] * 2, color="black", lw=1.5)
    ax.plot([], [], color="black", lw=1.5, label="paper")
    ax.set_xticks(range(len(TASKS)), ["KV-SUBS", "NUM-MATH", "KV-MATH"])
    ax.set_ylabel("accuracy on held-out keys (%)")
    ax.set_ylim(0, 108)
    ax.set_title(f"CALM key-value arithmetic (D_C: {results['variant']}, seed {results['seed']})")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = [
    "ABLATIONS",
    "BASE_RECIPES",
    "ReproduceConfig",
    "load_bases",
    "pretrain_bases",
    "run_reproduction",
]
