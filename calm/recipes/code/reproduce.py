"""Reproduce the paper's code experiment (Tables 4 and 5) on real pretrained models.

mB (the anchor, Gemma-3-270M, general) is composed with mA (Qwen2.5-Coder-0.5B-Instruct, code)
through a `TokenizerPair`, and trained on D_C (train-side standard-library Python, `data.py`).
Every row runs through `calm.recipes.runner.Runner` (a finished row is read back, an interrupted
one resumes from its checkpoint), trains through `calm.train` and is scored through
`calm.evaluate` on the same fixed subsets with greedy decoding (`evaluation.py`):

    mA, mB       each alone, untrained
    calm         mB composed with mA
    lora         LoRA on mB with as many trainable parameters as calm (the closest rank)
    finetune     mB fully fine-tuned on D_C (the skyline)
    vanilla_mA   mB composed with SmolLM2-135M in mA's place
    random_mA    mB composed with mA's architecture at random weights (seeded)

All trained rows see the same D_C records in the same order, for the same steps, batch, length
and schedule (linear warmup, then cosine to zero); the learning rate is set per kind of
parameters (blocks, adapters, every weight). results.json holds every row's metrics and seconds,
and calm minus each other row with a paired bootstrap 95% interval over the examples.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

import calm
from calm.errors import UserError
from calm.recipes.code.data import dc_records, source_root
from calm.recipes.code.evaluation import TASKS, TaskData, score_row
from calm.recipes.code.models import Models, load_models
from calm.recipes.code.report import PAPER, plot, results_markdown
from calm.recipes.experiment import TrainedRows
from calm.recipes.lr_probe import run_probe
from calm.recipes.pretrained import DTYPES, lora_rank, random_like
from calm.recipes.runner import Row, RowContext, Runner, write_results

ROWS = ("mA", "mB", "calm", "lora", "finetune", "vanilla_mA", "random_mA")
# Examples scored per task: the full CPU run's fixed subsets (see docs/code.md for the budget).
LIMITS = {"humaneval": 20, "mbpp-like": 10, "code-to-text": 30, "code-bpb": 30, "text-bpb": 20}
QUICK_LIMITS = {"humaneval": 2, "mbpp-like": 1, "code-to-text": 2, "code-bpb": 2, "text-bpb": 1}


@dataclass(frozen=True)
class CodeConfig:
    """One run of `calm reproduce code`."""

    out_dir: str = "runs/code"
    seed: int = 0  # D_C's draw, the block and LoRA initialisation, the data order, random_mA
    rows: tuple[str, ...] | None = None  # None: every row
    steps: int = 30  # optimizer steps of every trained row; D_C = steps x batch_size records
    batch_size: int = 8
    max_length: int = 256  # anchor tokens per record
    chunk_chars: int = 800  # D_C pieces: at most this many characters, cut at line ends
    warmup_steps: int = 3
    lr_calm: float = 3e-4  # the composition blocks (calm, vanilla_mA, random_mA)
    lr_lora: float = 3e-4  # the LoRA adapters
    lr_finetune: float = 2e-5  # every weight of mB
    every: int = 4  # the default rule connects every 4th augmenting layer (the paper's n/4)
    limits: dict[str, int | None] = field(default_factory=lambda: dict(LIMITS))
    max_new_tokens: int = 192  # HumanEval and mbpp-like completions (code-to-text: its own 64)
    eval_batch_size: int = 4
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 2
    save_every: int = 10  # steps between checkpoints (an interrupted row resumes from the last)
    progress: bool = True

    def __post_init__(self) -> None:
        if min(self.steps, self.batch_size, self.max_length, self.chunk_chars) < 1:
            raise UserError("steps, batch_size, max_length and chunk_chars must be positive.")
        if min(self.max_new_tokens, self.eval_batch_size, self.threads, self.save_every) < 1:
            raise UserError("max_new_tokens, eval_batch_size, threads and save_every must be >= 1.")
        if self.dtype not in DTYPES:
            raise UserError(f"dtype must be one of {DTYPES}, got {self.dtype!r}.")
        if set(self.limits) != set(TASKS) or any(
            n is not None and n < 1 for n in self.limits.values()
        ):
            raise UserError(f"limits must give each of {TASKS} a positive count or None (all).")
        unknown = sorted(set(self.rows or ()) - set(ROWS))
        if unknown:
            raise UserError(f"Unknown rows {', '.join(unknown)}; choose from {', '.join(ROWS)}.")

    @classmethod
    def quick(cls, **overrides) -> CodeConfig:
        """Every row at tiny limits: a smoke run of the whole path in minutes."""
        quick = dict(steps=2, batch_size=2, max_length=64, warmup_steps=1, max_new_tokens=32)
        return replace(cls(limits=dict(QUICK_LIMITS), **quick), **overrides)

    def eval_settings(self, data: TaskData) -> dict:
        """What decides every row's scores besides its model (part of each row's config)."""
        keys = ("limits", "max_new_tokens", "eval_batch_size", "device", "dtype", "seed")
        return {k: getattr(self, k) for k in keys} | {"data": asdict(data)}


class Experiment(TrainedRows):
    """The models, the tasks and D_C of one run, and the function of each row."""

    def __init__(self, cfg: CodeConfig, models: Models, data: TaskData) -> None:
        self.cfg, self.models, self.data = cfg, models, data
        self.tasks = data.tasks()
        root = source_root(data.python_root)
        size = cfg.steps * cfg.batch_size
        self.dc, self.dc_info = dc_records(root, size, cfg.chunk_chars, cfg.seed)
        tok = models.tokenizers["mB"]
        self.dc_info["anchor_tokens"] = sum(
            min(len(tok(r["text"])["input_ids"]) + 1, cfg.max_length) for r in self.dc
        )

    # ---------------------------------------------------------------- pieces of a row

    def train_config(self, learning_rate: float) -> calm.TrainConfig:
        """How every trained row trains (`RowContext.train` sets the output directory)."""
        cfg = self.cfg
        return calm.TrainConfig(
            output_dir="unused",
            learning_rate=learning_rate,
            warmup_steps=cfg.warmup_steps,
            schedule="cosine",
            batch_size=cfg.batch_size,
            max_steps=cfg.steps,
            max_length=cfg.max_length,
            seed=cfg.seed,
            save_every=cfg.save_every,
            keep_last=1,
            precision="bf16" if cfg.dtype == "bfloat16" else "fp32",
            progress=cfg.progress,
        )

    def score(self, ctx: RowContext, model, tokenizer) -> dict:
        cfg = self.cfg
        return score_row(
            model,
            tokenizer,
            self.tasks,
            cfg.limits,
            ctx.directory,
            max_new_tokens=cfg.max_new_tokens,
            batch_size=cfg.eval_batch_size,
            seed=cfg.seed,
            progress=cfg.progress,
        )

    def train(self, ctx: RowContext, model, learning_rate: float, dc: str | None = None) -> dict:
        """Train `model` on D_C (the one there is) through `calm.train` (resuming); what the
        loop ended at."""
        tok = self.models.tokenizers["mB"]
        result = ctx.train(model, self.dc, self.train_config(learning_rate), tokenizer=tok)
        return {"steps": result.step, "final_loss": result.train_loss}

    def composition(self, aug, aug_role: str) -> calm.CALM:
        """mB composed with `aug`, read through the pair of mB's and `aug_role`'s tokenizers."""
        torch.manual_seed(self.cfg.seed)
        config = calm.CALMConfig(every=self.cfg.every)
        return calm.CALM(self.models.mB, aug, config, tokenizers=self.models.pair(aug_role))

    def calm_parameters(self) -> int:
        """The composition's trainable parameter count (the target of the LoRA row)."""
        model = self.composition(self.models.mA, "mA")
        try:
            return model.num_trainable_parameters()
        finally:
            model.remove()

    # ---------------------------------------------------------------- rows

    def alone(self, role: str) -> Callable[[RowContext], dict]:
        def run(ctx: RowContext) -> dict:
            model = getattr(self.models, role)
            return self.score(ctx, model, self.models.tokenizers[role])

        return run

    def make(self, aug_role: str, random: bool = False) -> Callable[[], calm.CALM]:
        """How a composition row builds its model: mB with the model of `aug_role` (its
        architecture at seeded random weights when `random`)."""

        def make() -> calm.CALM:
            aug = getattr(self.models, aug_role)
            aug = random_like(aug, seed=1000 + self.cfg.seed) if random else aug
            return self.composition(aug, aug_role)

        return make

    def rows(self) -> tuple[list[Row], dict]:
        """The rows, each with the config that keys it, and the LoRA rank it was matched to."""
        cfg, ids = self.cfg, self.models.identity
        evals = cfg.eval_settings(self.data)
        train = {
            "steps": cfg.steps,
            "batch_size": cfg.batch_size,
            "max_length": cfg.max_length,
            "warmup_steps": cfg.warmup_steps,
            "dc": {k: self.dc_info[k] for k in ("records", "chunk_chars", "sha256")},
        }
        composed = {"every": cfg.every}
        target = self.calm_parameters()
        rank = lora_rank(self.models.mB, target)
        lora = {"rank": rank, "rank_for_parameters": target}

        def keyed(models: dict, **more) -> dict:
            return {"models": models, "eval": evals, **more}

        rows = [
            Row("mA", keyed({"mA": ids["mA"]}), self.alone("mA")),
            Row("mB", keyed({"mB": ids["mB"]}), self.alone("mB")),
            Row(
                "calm",
                keyed(
                    {"mB": ids["mB"], "mA": ids["mA"]}, train=train, calm=composed, lr=cfg.lr_calm
                ),
                self.composed(self.make("mA")),
                lambda lr: self.composed(self.make("mA"), lr=lr, score=False),
            ),
            Row(
                "lora",
                keyed({"mB": ids["mB"]}, train=train, lora=lora, lr=cfg.lr_lora),
                self.lora(rank),
                lambda lr: self.lora(rank, lr=lr, score=False),
            ),
            Row(
                "finetune",
                keyed({"mB": ids["mB"]}, train=train, lr=cfg.lr_finetune),
                self.finetune(),
                lambda lr: self.finetune(lr=lr, score=False),
            ),
            Row(
                "vanilla_mA",
                keyed(
                    {"mB": ids["mB"], "vanilla_mA": ids["vanilla_mA"]},
                    train=train,
                    calm=composed,
                    lr=cfg.lr_calm,
                ),
                self.composed(self.make("vanilla_mA")),
                lambda lr: self.composed(self.make("vanilla_mA"), lr=lr, score=False),
            ),
            Row(
                "random_mA",
                keyed(
                    {
                        "mB": ids["mB"],
                        "random_mA": f"{ids['mA']} architecture, seed {1000 + cfg.seed}",
                    },
                    train=train,
                    calm=composed,
                    lr=cfg.lr_calm,
                ),
                self.composed(self.make("mA", random=True)),
                lambda lr: self.composed(self.make("mA", random=True), lr=lr, score=False),
            ),
        ]
        return rows, {"rank": rank, "calm_parameters": target, "lr": cfg.lr_lora}


def _limits(cfg: CodeConfig, rows: dict) -> dict[str, int]:
    """Examples scored per task (the same for every row): what a finished row scored, else the
    configured count (None, every example, counts as 0 until a row has run)."""
    scored = next((r["examples"] for r in rows.values() if "examples" in r), {})
    return {t: scored.get(t, n or 0) for t, n in cfg.limits.items()}


PROBED = ("calm", "lora", "finetune")  # --lr-probe's rows when --rows is not given


def run_lr_probe(
    cfg: CodeConfig,
    learning_rates: tuple[float, ...],
    load: Callable[[CodeConfig], Models] | None = None,
    data: TaskData | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Train each selected trained row (`cfg.rows`, default `PROBED`) at each learning rate,
    without scoring, in OUT/lr_probe; write lr_probe.json and lr_probe.md there and return the
    report (`calm.recipes.runner.run_probe`)."""
    torch.set_num_threads(cfg.threads)
    models = load(cfg) if load is not None else load_models(cfg.device, cfg.dtype)
    rows, _ = Experiment(cfg, models, data or TaskData()).rows()
    return run_probe(cfg.out_dir, rows, cfg.rows or PROBED, learning_rates, log)


def run_code(
    cfg: CodeConfig,
    load: Callable[[CodeConfig], Models] | None = None,
    data: TaskData | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Run the rows of `cfg.rows` (all when None) not finished yet in `cfg.out_dir`, then write
    results.json, results.md and results.png over every finished row; returns the results.
    `load` gives the models (default: the converted checkpoints), `data` the tasks' data."""
    started = time.time()
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    models = load(cfg) if load is not None else load_models(cfg.device, cfg.dtype)
    data = data or TaskData()
    experiment = Experiment(cfg, models, data)
    rows, lora = experiment.rows()
    runner = Runner(out, rows, log=log)
    runner.run(rows=list(cfg.rows) if cfg.rows else None)
    results = runner.results(config=asdict(cfg))
    results["paired"] = runner.paired("calm", seed=cfg.seed)
    results["limits"] = _limits(cfg, results["rows"])
    results["models"] = dict(models.identity)
    results["dc"] = experiment.dc_info
    if "lora" in results["rows"]:
        lora["parameters"] = results["rows"]["lora"]["parameters"]
        results["lora"] = lora
    results["paper"] = PAPER
    write_results(out, results, results_markdown, plot, started)
    return results
