"""Reproduce the paper's key-value arithmetic experiment (Table 1, with Table 5 analogues).

mB (the anchor: numeric arithmetic) is composed with mA (the augmenting model: a memorized
key-value map). The composition trains on D_C, examples over 20% of the keys, and is evaluated on
expressions over the other 80%. Built from the library only: every row (CALM, and with
`ablations` vanilla mA, random mA, mA as encoder, LoRA on mB) trains through `calm.train` on the
same D_C (`data.py`) and is scored through `calm.evaluate` on the registered `kv` task.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

import calm
from calm.errors import UserError
from calm.recipes.kv.bases import Bases, build_model, load_bases
from calm.recipes.kv.data import dc_counts, dc_data, records
from calm.recipes.kv.report import PAPER, plot, results_markdown
from calm.tasks.kv import DATA_SETS, VARIANTS, KVTask, held_out_task

ABLATIONS = ("vanilla_mA", "random_mA", "encoder", "lora")
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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
            raise UserError(f"Unknown D_C variant {self.variant!r}; choose one of {VARIANTS}.")
        if min(self.dc_size, self.steps, self.batch_size, self.eval_size) < 1:
            raise UserError("dc_size, steps, batch_size and eval_size must be positive.")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}.")
        if self.learning_rate <= 0:
            raise UserError(f"learning_rate must be positive, got {self.learning_rate}.")
        if not 0.0 <= self.replay < 1.0:
            raise UserError(f"replay must be in [0, 1), got {self.replay}.")
        if not 0.0 <= self.fake_keys or self.replay + self.fake_keys >= 1.0:
            raise UserError(
                f"fake_keys must be >= 0 and leave room for key examples: replay {self.replay} "
                f"+ fake_keys {self.fake_keys} must be < 1."
            )

    @classmethod
    def quick(cls, **overrides) -> ReproduceConfig:
        """A few-minute smoke run: fewer steps, smaller evaluation sets."""
        return replace(cls(dc_size=1000, steps=150, eval_size=60), **overrides)

    def train_config(self, output_dir: Path, aug_cache: str) -> calm.TrainConfig:
        """How every row trains on D_C: AdamW, warmup then cosine to 0, clipped gradients."""
        return calm.TrainConfig(
            output_dir=str(output_dir),
            learning_rate=self.learning_rate,
            warmup_steps=self.warmup_steps,
            schedule="cosine",
            batch_size=self.batch_size,
            max_steps=self.steps,
            max_length=None,
            seed=self.seed,
            aug_cache=aug_cache,
        )


def score(model, tokenizer, scale, seed: int, size: int, samples: int = 3) -> tuple[dict, dict]:
    """Greedy accuracy of `model` on KV-SUBS, NUM-MATH and KV-MATH over the held-out keys of
    split `seed` (`calm.evaluate` on `calm.tasks.kv.held_out_task`), and the first `samples`
    "prompt -> completion" strings of each."""
    scores, shown = {}, {}
    for data_set in DATA_SETS:
        task = held_out_task(data_set, scale, seed, size)
        result = calm.evaluate(model, task, tokenizer=tokenizer, batch_size=256, progress=False)
        scores[data_set] = sum(r["correct"] for r in result.samples) / len(result.samples)
        first = result.samples[:samples]
        shown[data_set] = [f"{r['prompt']} -> {r['completions'][0]}" for r in first]
    return scores, shown


def lora_model(mB, target: int, dropout: float = 0.0):
    """A copy of mB with LoRA on every linear layer, its rank chosen to match `target`
    trainable parameters; returns (model, rank)."""
    from peft import LoraConfig, get_peft_model

    per_rank = sum(
        m.in_features + m.out_features
        for name, m in mB.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LORA_MODULES
    )
    rank = max(1, round(target / per_rank))
    config = LoraConfig(
        r=rank, lora_alpha=rank, target_modules=list(LORA_MODULES), lora_dropout=dropout
    )
    return get_peft_model(copy.deepcopy(mB), config), rank


class _PromptAugmented(torch.nn.Module):
    """An encoder-mode CALM whose augmenting models read the prompt when `calm.evaluate`
    generates (it passes the anchor's batch only)."""

    def __init__(self, model: calm.CALM) -> None:
        super().__init__()
        self.model = model

    def generate(self, input_ids, attention_mask=None, **kwargs):
        return self.model.generate(
            input_ids,
            attention_mask,
            aug_input_ids=input_ids,
            aug_attention_mask=attention_mask,
            **kwargs,
        )


class Experiment:
    """One run: the bases, the key split, D_C, and the rows written so far to results.json."""

    def __init__(self, cfg: ReproduceConfig, bases: Bases, log) -> None:
        self.cfg, self.bases, self.log = cfg, bases, log
        self.start = time.time()
        self.out = Path(cfg.out_dir)
        self.tok = bases.tokenizer
        self.task = KVTask(bases.scale)
        self.dc_keys, self.held_keys = self.task.split_keys(cfg.seed)
        self.rows: dict[str, dict] = {}
        self.samples: dict[str, dict] = {}
        self.extra: dict[str, dict] = {}
        self.dc_sets: dict[str, list] = {}

    def write(self) -> dict:
        """results.json and results.md as they stand (rewritten after each row)."""
        cfg, bases = self.cfg, self.bases
        results = {
            "rows": self.rows,
            "paper": PAPER,
            "variant": cfg.variant,
            "scale": bases.scale.to_dict(),
            "dc_keys": len(self.dc_keys),
            "held_out_keys": len(self.held_keys),
            "seed": cfg.seed,
            "config": asdict(cfg),
            "bases": {
                k: {x: v[x] for x in ("steps", "seconds", "gate_accuracy")}
                for k, v in bases.info.items()
            },
            **self.extra,
            "samples": self.samples,
            "seconds": round(time.time() - self.start, 1),
        }
        (self.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        (self.out / "results.md").write_text(results_markdown(results))
        return results

    def record(self, name: str, t0: float, model, **info) -> None:
        """Score `model` and write its row (accuracies, seconds since `t0`, `info`)."""
        cfg = self.cfg
        scores, self.samples[name] = score(
            model, self.tok, self.bases.scale, cfg.seed, cfg.eval_size
        )
        self.rows[name] = {k: round(v, 4) for k, v in scores.items()}
        self.rows[name]["seconds"] = round(time.time() - t0, 1)
        self.rows[name].update(info)
        accs = "  ".join(f"{k} {100 * scores[k]:5.1f}%" for k in DATA_SETS)
        self.log(f"{name:>16}: {accs}  ({self.rows[name]['seconds']:.0f} s)")
        self.write()

    def dc(self, variant: str) -> list:
        """D_C of `variant`, built once: every row trained on it gets the same examples (the
        fake-key share labelled by the shipped mA, whatever the row's augmenting model)."""
        if variant not in self.dc_sets:
            mA = self.bases.models["mA"]
            data = dc_data(self.task, self.dc_keys, variant, self.cfg, mA, self.tok)
            counts = dc_counts(self.task, data)
            self.extra.setdefault("dc_examples", {})[variant] = counts
            self.log(
                f"D_C ({variant}): {counts['keys']} examples over the D_C keys, "
                f"{counts['replay']} NUM-MATH replay, {counts['fake']} over non-keys labelled by mA"
            )
            self.dc_sets[variant] = data
        return self.dc_sets[variant]

    def train(self, name: str, model, variant: str, aug_cache: str = "none") -> float:
        """Train `model` on D_C of `variant` through `calm.train` into out/train/<name>;
        returns the mean loss of the last 20 steps."""
        directory = self.out / "train" / name
        shutil.rmtree(directory, ignore_errors=True)  # a row always trains afresh
        config = self.cfg.train_config(directory, aug_cache)
        losses: list[float] = []
        result = calm.train(
            model,
            records(self.dc(variant)),
            config=config,
            tokenizer=self.tok,
            on_step=lambda step, loss: losses.append(loss),
        )
        if result.interrupted:
            raise KeyboardInterrupt(f"{name}: training stopped at step {result.step} by a signal.")
        return round(sum(losses[-20:]) / len(losses[-20:]), 4)

    def compose(self, name: str, aug, variant: str, mode: str = "causal") -> int:
        """Train and score the composition of mB with `aug`; returns its parameter count."""
        cfg, t0 = self.cfg, time.time()
        torch.manual_seed(cfg.seed)
        config = calm.CALMConfig(
            every=cfg.every,
            num_heads=cfg.num_heads,
            mode=mode,
            rope=cfg.rope and mode == "causal",
            dropout=cfg.dropout,
        )
        model = calm.CALM(self.bases.models["mB"], aug, config)
        try:
            cache = "memory" if mode == "causal" else "none"
            loss = self.train(name, model, variant, cache)
            scored = model if mode == "causal" else _PromptAugmented(model)
            self.record(name, t0, scored, variant=variant, final_loss=loss)
            return model.num_trainable_parameters()
        finally:
            model.remove()

    def lora(self, parameters: int) -> None:
        """The LoRA row: mB with as many trainable parameters as the composition."""
        t0 = time.time()
        torch.manual_seed(self.cfg.seed)
        model, rank = lora_model(self.bases.models["mB"], parameters, self.cfg.dropout)
        loss = self.train("lora", model, self.cfg.variant)
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.record(
            "lora",
            t0,
            model,
            variant=self.cfg.variant,
            rank=rank,
            parameters=trained,
            final_loss=loss,
        )


def run_reproduction(cfg: ReproduceConfig, bases: Bases | None = None, log=print) -> dict:
    """Run the experiment; write results.json, results.md and results.png to `cfg.out_dir`."""
    torch.set_num_threads(cfg.threads)
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    run = Experiment(cfg, bases if bases is not None else load_bases(cfg.bases_dir), log)
    scale = run.bases.scale
    log(
        f"scale: {scale.num_keys} keys, {scale.max_operands} keys per expression, "
        f"'{scale.operators}'; D_C over {len(run.dc_keys)} keys; "
        f"evaluating {cfg.eval_size} expressions over the other {len(run.held_keys)}"
    )
    for name in ("mA", "mB"):
        run.record(name, time.time(), run.bases.models[name])

    mA = run.bases.models["mA"]
    for variant in VARIANTS if cfg.all_variants else (cfg.variant,):
        parameters = run.compose(f"calm_{variant}", mA, variant)
    run.rows["calm"] = dict(run.rows[f"calm_{cfg.variant}"])
    run.samples["calm"] = run.samples[f"calm_{cfg.variant}"]
    if not cfg.all_variants:
        del run.rows[f"calm_{cfg.variant}"]
    run.extra["calm_parameters"] = parameters

    if cfg.ablations:
        vanilla = run.bases.models.get("vanilla_mA")
        if vanilla is None:
            raise UserError("The vanilla_mA base model is missing from the bases directory.")
        random_mA = build_model(run.tok, run.bases.shape, seed=1000 + cfg.seed).eval()
        run.compose("vanilla_mA", vanilla, cfg.variant)
        run.compose("random_mA", random_mA, cfg.variant)
        run.compose("encoder", mA, cfg.variant, mode="encoder")
        run.lora(parameters)

    results = run.write()
    plot(results, run.out / "results.png")
    return results
