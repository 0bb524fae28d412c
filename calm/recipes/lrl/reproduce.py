"""Reproduce the paper's low-resource-language experiment (Tables 2 and 5) on real models.

mA is SmolLM2-135M trained in full (next-token loss) on the train-side low-resource text of the
chosen languages (`data.ma_records`): built once, before the rows, as the one row of its own
runner in OUT/build (read back while its config, corpus and package versions are unchanged).
mB (Gemma-3-270M, general) is composed with mA through a `TokenizerPair` and trained on D_C
(`data.dc_records`). Every row runs through `calm.recipes.runner.Runner`, trains through
`calm.train` and is scored through `calm.evaluate` (`evaluation.py`):

    copy_source, random_reference   the floors: the source sentence; another test reference
    mA, mB                          each alone, untrained here
    calm_paper, calm_parallel       mB composed with mA, trained on D_C `paper` / `parallel`
    lora_paper, lora_parallel       LoRA on mB with as many trainable parameters as calm
    finetune                        mB fully fine-tuned on D_C `paper` (a cheap skyline)
    vanilla_mA                      mB composed with SmolLM2-135M untrained on the languages
    random_mA                       mB composed with SmolLM2's architecture at random weights

All trained rows train for the same steps, batch, length and schedule; results.json holds every
row's metrics and seconds, and calm_paper (and calm_parallel) minus each other row, and mB minus
each floor, with a paired bootstrap 95% interval over the examples.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

import calm
from calm.errors import UserError
from calm.recipes.experiment import TrainedRows
from calm.recipes.lr_probe import run_probe
from calm.recipes.lrl.data import LrlData, dc_records, ma_records
from calm.recipes.lrl.evaluation import FLOORS, KINDS, build_tasks, score_row
from calm.recipes.lrl.models import Models, load_built, load_models, versions
from calm.recipes.lrl.report import PAPER, plot, results_markdown
from calm.recipes.pretrained import DTYPES, full_copy, lora_rank, random_like
from calm.recipes.runner import (
    Row,
    RowContext,
    Runner,
    write_results,
)
from calm.tasks.translation import LANGUAGES

ROWS = (
    "copy_source",
    "random_reference",
    "mA",
    "mB",
    "calm_paper",
    "calm_parallel",
    "lora_paper",
    "lora_parallel",
    "finetune",
    "vanilla_mA",
    "random_mA",
)
NEEDS_MA = ("mA", "calm_paper", "calm_parallel")  # the rows that build (or read back) mA
LANGUAGE_DEFAULT = ("bn-en", "ur-en")
# Examples scored per task kind and language: the full CPU run's (see docs/lrl.md).
LIMITS = {"translation": 300, "lrl-bpb": 40, "text-bpb": 20}
QUICK_LIMITS = {"translation": 2, "lrl-bpb": 1, "text-bpb": 1}


@dataclass(frozen=True)
class LrlConfig:
    """One run of `calm reproduce lrl`."""

    out_dir: str = "runs/lrl"
    languages: tuple[str, ...] = LANGUAGE_DEFAULT  # translation variants SRC-TGT
    seed: int = 0  # D_C's draws, the block and LoRA initialisation, the data order, random_mA
    rows: tuple[str, ...] | None = None  # None: every row
    steps: int = 30  # optimizer steps of every trained row
    batch_size: int = 8
    max_length: int = 256  # anchor tokens per record
    chunk_chars: int = 300  # corpus and D_C pieces: at most this many characters, at verse ends
    warmup_steps: int = 3
    lr_calm: float = 3e-4  # the composition blocks (calm_*, vanilla_mA, random_mA)
    lr_lora: float = 3e-4  # the LoRA adapters
    lr_finetune: float = 2e-5  # every weight of mB
    ma_steps: int = 200  # mA's build: optimizer steps over its corpus (1,600 records, ~26%)
    ma_max_length: int = 512  # mA tokens per record (SmolLM2 spends 1.8 tokens a Bengali char)
    ma_warmup_steps: int = 10
    lr_ma: float = 3e-4  # every weight of SmolLM2 while mA is built
    dc_fraction: float = 0.05  # D_C `paper`: this share of mA's pieces per language
    parallel_pairs: int = 1000  # D_C `parallel`: aligned train pairs per language (all if fewer)
    every: int = 4  # the default rule connects every 4th augmenting layer (the paper's n/4)
    limits: dict[str, int | None] = field(default_factory=lambda: dict(LIMITS))
    max_new_tokens: int = 96  # a translation stops at its line end or here
    eval_batch_size: int = 4
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 2
    save_every: int = 10  # steps between checkpoints (an interrupted row resumes from the last)
    progress: bool = True

    def __post_init__(self) -> None:
        sizes = (self.steps, self.batch_size, self.max_length, self.chunk_chars, self.ma_steps)
        if min(*sizes, self.ma_max_length, self.parallel_pairs) < 1:
            raise UserError("Steps, batch size, lengths, chunk_chars and pairs must be positive.")
        if min(self.max_new_tokens, self.eval_batch_size, self.threads, self.save_every) < 1:
            raise UserError("max_new_tokens, eval_batch_size, threads and save_every must be >= 1.")
        if not 0 < self.dc_fraction <= 1:
            raise UserError(f"dc_fraction must be in (0, 1], got {self.dc_fraction}.")
        if self.dtype not in DTYPES:
            raise UserError(f"dtype must be one of {DTYPES}, got {self.dtype!r}.")
        if set(self.limits) != set(KINDS) or any(
            n is not None and n < 1 for n in self.limits.values()
        ):
            raise UserError(f"limits must give each of {KINDS} a positive count or None (all).")
        unknown = sorted(set(self.languages) - set(LANGUAGES))
        if unknown or not self.languages or len(set(self.languages)) < len(self.languages):
            raise UserError(
                f"--lang takes distinct pairs of {', '.join(LANGUAGES)}, got "
                f"{', '.join(self.languages) or 'none'}."
            )
        unknown = sorted(set(self.rows or ()) - set(ROWS))
        if unknown:
            raise UserError(f"Unknown rows {', '.join(unknown)}; choose from {', '.join(ROWS)}.")

    @classmethod
    def quick(cls, **overrides) -> LrlConfig:
        """Every row at tiny limits: a smoke run of the whole path in minutes."""
        quick = dict(steps=2, batch_size=2, max_length=64, warmup_steps=1, max_new_tokens=16)
        quick |= dict(ma_steps=2, ma_max_length=64, ma_warmup_steps=1)
        return replace(cls(limits=dict(QUICK_LIMITS), **quick), **overrides)

    def eval_settings(self, data: LrlData) -> dict:
        """What decides every row's scores besides its model (part of each row's config)."""
        keys = ("languages", "limits", "max_new_tokens", "eval_batch_size", "device", "dtype")
        return {k: getattr(self, k) for k in keys} | {"seed": self.seed, "data": asdict(data)}


class Experiment(TrainedRows):
    """The models, tasks, mA's corpus and the D_C variants of one run, and each row's function."""

    def __init__(self, cfg: LrlConfig, models: Models, data: LrlData) -> None:
        self.cfg, self.models, self.data = cfg, models, data
        self.tasks = build_tasks(cfg.languages, data)
        self.ma, self.ma_info = ma_records(cfg.languages, data, cfg.chunk_chars)
        self.dc = dc_records(
            cfg.languages,
            data,
            chunk_chars=cfg.chunk_chars,
            fraction=cfg.dc_fraction,
            pairs=cfg.parallel_pairs,
            seed=cfg.seed,
        )
        self.build_runner: Runner | None = None
        self._mA = None

    # ---------------------------------------------------------------- pieces of a row

    def train_config(self, learning_rate: float, build: bool = False) -> calm.TrainConfig:
        """How every trained row (or, with `build`, mA's build) trains."""
        cfg = self.cfg
        return calm.TrainConfig(
            output_dir="unused",  # `RowContext.train` sets it
            learning_rate=learning_rate,
            warmup_steps=cfg.ma_warmup_steps if build else cfg.warmup_steps,
            schedule="cosine",
            batch_size=cfg.batch_size,
            max_steps=cfg.ma_steps if build else cfg.steps,
            max_length=cfg.ma_max_length if build else cfg.max_length,
            seed=cfg.seed,
            save_every=cfg.save_every,
            keep_last=1,
            precision="bf16" if cfg.dtype == "bfloat16" else "fp32",
            progress=cfg.progress,
        )

    def score(self, ctx: RowContext | Path, model, tokenizer, tasks=None, floor=None) -> dict:
        cfg = self.cfg
        return score_row(
            model,
            tokenizer,
            tasks or self.tasks,
            cfg.limits,
            ctx if isinstance(ctx, Path) else ctx.directory,
            floor=floor,
            max_new_tokens=cfg.max_new_tokens,
            batch_size=cfg.eval_batch_size,
            seed=cfg.seed,
            progress=cfg.progress,
        )

    def train(self, ctx: RowContext, model, learning_rate: float, dc: str) -> dict:
        """Train `model` on D_C `dc` through `calm.train` (resuming); what the loop ended at."""
        tok = self.models.tokenizers["mB"]
        records = self.dc[dc][0]
        result = ctx.train(model, records, self.train_config(learning_rate), tokenizer=tok)
        return {"steps": result.step, "final_loss": result.train_loss, "dc": dc}

    def composition(self, aug) -> calm.CALM:
        """mB composed with `aug` (a model of vanilla mA's tokenizer) through their pair."""
        torch.manual_seed(self.cfg.seed)
        config = calm.CALMConfig(every=self.cfg.every)
        return calm.CALM(self.models.mB, aug, config, tokenizers=self.models.pair())

    def calm_parameters(self) -> int:
        """The composition's trainable parameter count (mA shares vanilla mA's architecture)."""
        model = self.composition(self.models.vanilla_mA)
        try:
            return model.num_trainable_parameters()
        finally:
            model.remove()

    # ---------------------------------------------------------------- mA, built once

    def build_row(self) -> Row:
        """mA's build as a row of its own runner: keyed by its base model, corpus, training
        settings and package versions."""
        cfg = self.cfg
        config = {
            "base": self.models.identity["vanilla_mA"],
            "corpus": self.ma_info,
            "train": {
                "steps": cfg.ma_steps,
                "batch_size": cfg.batch_size,
                "max_length": cfg.ma_max_length,
                "warmup_steps": cfg.ma_warmup_steps,
                "lr": cfg.lr_ma,
                "seed": cfg.seed,
            },
            "versions": versions(),
            "eval": cfg.eval_settings(self.data),
        }
        return Row("mA", config, self.build)

    def build(self, ctx: RowContext) -> dict:
        """Train vanilla mA in full on mA's corpus and save it; lrl bits per byte before/after."""
        base, tok = self.models.vanilla_mA, self.models.tokenizers["vanilla_mA"]
        tasks = {n: t for n, t in self.tasks.items() if n.startswith("lrl-bpb:")}
        before = self.score(ctx.directory / "before", base, tok, tasks)
        model = full_copy(base)
        result = ctx.train(model, self.ma, self.train_config(self.cfg.lr_ma, True), tokenizer=tok)
        model.save_pretrained(ctx.directory / "model")
        p = next(base.parameters())
        model = model.to(device=p.device, dtype=p.dtype).requires_grad_(False).eval()
        after = self.score(ctx.directory / "after", model, tok, tasks)
        metrics = {f"{k}_before": v for k, v in before["metrics"].items()}
        metrics |= {f"{k}_after": v for k, v in after["metrics"].items()}
        train = {"steps": result.step, "final_loss": result.train_loss}
        return {"metrics": metrics, "train": train, "corpus": self.ma_info}

    def mA(self):
        """The built mA (loaded once from OUT/build/rows/mA/model)."""
        if self._mA is None:
            if self.build_runner is None or self.build_runner.record("mA") is None:
                raise RuntimeError("mA is used before it is built.")
            path = self.build_runner.directory("mA") / "model"
            self._mA = load_built(path, like=self.models.mB)
        return self._mA

    # ---------------------------------------------------------------- rows

    def floor(self, name: str) -> Callable[[RowContext], dict]:
        return lambda ctx: self.score(ctx, None, None, floor=name)

    def alone(self, role: str) -> Callable[[RowContext], dict]:
        def run(ctx: RowContext) -> dict:
            if role == "mA":
                return self.score(ctx, self.mA(), self.models.tokenizers["vanilla_mA"])
            return self.score(ctx, self.models.mB, self.models.tokenizers["mB"])

        return run

    def make(self, aug: str) -> Callable[[], calm.CALM]:
        """How a composition row builds its model: mB with `aug` ("mA", "vanilla_mA" or
        "random_mA")."""

        def make() -> calm.CALM:
            model = {
                "mA": self.mA,
                "vanilla_mA": lambda: self.models.vanilla_mA,
                "random_mA": lambda: random_like(self.models.vanilla_mA, 1000 + self.cfg.seed),
            }[aug]()
            return self.composition(model)

        return make

    def rows(self, build_key: str) -> tuple[list[Row], dict]:
        """The rows, each with the config that keys it, and the LoRA rank it was matched to."""
        cfg, ids = self.cfg, self.models.identity
        evals = cfg.eval_settings(self.data)
        mA = f"{ids['vanilla_mA']} trained on the corpus (build {build_key})"
        random_mA = f"{ids['vanilla_mA']} architecture, seed {1000 + cfg.seed}"
        train = {
            dc: {
                "steps": cfg.steps,
                "batch_size": cfg.batch_size,
                "max_length": cfg.max_length,
                "warmup_steps": cfg.warmup_steps,
                "dc": {k: info[k] for k in ("records", "fraction", "chunk_chars", "sha256")},
            }
            for dc, (_, info) in self.dc.items()
        }
        target = self.calm_parameters()
        rank = lora_rank(self.models.mB, target)
        lora = {"rank": rank, "rank_for_parameters": target}
        composed = {"every": cfg.every}

        def keyed(models: dict, **more) -> dict:
            return {"models": models, "eval": evals, **more}

        def calm_row(name: str, aug: str, aug_id: str, dc: str) -> Row:
            models = {"mB": ids["mB"], aug: aug_id}
            config = keyed(models, train=train[dc], calm=composed, lr=cfg.lr_calm)
            return Row(
                name,
                config,
                self.composed(self.make(aug), dc),
                lambda lr: self.composed(self.make(aug), dc, lr, score=False),
            )

        def lora_row(dc: str) -> Row:
            config = keyed({"mB": ids["mB"]}, train=train[dc], lora=lora, lr=cfg.lr_lora)
            return Row(
                f"lora_{dc}",
                config,
                self.lora(rank, dc),
                lambda lr: self.lora(rank, dc, lr, score=False),
            )

        rows = [Row(name, keyed({}, floor=name), self.floor(name)) for name in FLOORS]
        rows += [
            Row("mA", keyed({"mA": mA}), self.alone("mA")),
            Row("mB", keyed({"mB": ids["mB"]}), self.alone("mB")),
            calm_row("calm_paper", "mA", mA, "paper"),
            calm_row("calm_parallel", "mA", mA, "parallel"),
            lora_row("paper"),
            lora_row("parallel"),
            Row(
                "finetune",
                keyed({"mB": ids["mB"]}, train=train["paper"], lr=cfg.lr_finetune),
                self.finetune("paper"),
                lambda lr: self.finetune("paper", lr, score=False),
            ),
            calm_row("vanilla_mA", "vanilla_mA", ids["vanilla_mA"], "paper"),
            calm_row("random_mA", "random_mA", random_mA, "paper"),
        ]
        return rows, {"rank": rank, "calm_parameters": target, "lr": cfg.lr_lora}


def _limits(rows: dict) -> dict[str, int]:
    """Examples scored per task (the same for every model row): those of a finished row that
    ran every task, else of any finished row."""
    scored = sorted((r.get("examples", {}) for r in rows.values()), key=len, reverse=True)
    return scored[0] if scored else {}


def _paired(runner: Runner, seed: int) -> dict:
    """calm_paper minus each other row, calm_parallel minus each row but calm_paper, and mB
    minus each floor (whether the anchor translates the language at all)."""
    paired = runner.paired("calm_paper", seed=seed)
    later = runner.paired("calm_parallel", seed=seed)
    paired |= {k: v for k, v in later.items() if k != "calm_parallel-calm_paper"}
    anchor = runner.paired("mB", seed=seed)
    return paired | {k: v for k, v in anchor.items() if k.split("-", 1)[1] in FLOORS}


def run_lrl(
    cfg: LrlConfig,
    load: Callable[[LrlConfig], Models] | None = None,
    data: LrlData | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Build mA if a selected row needs it and it is not built, run the rows of `cfg.rows` (all
    when None) not finished yet in `cfg.out_dir`, then write results.json, results.md and
    results.png over every finished row; returns the results. `load` gives the models (default:
    the converted checkpoints), `data` the languages' data (default: the cache)."""
    started = time.time()
    out = Path(cfg.out_dir)
    experiment, models = _prepare(cfg, load, data, log, set(cfg.rows or ROWS) & set(NEEDS_MA))
    rows, lora = experiment.rows(experiment.build_runner.keys["mA"])
    runner = Runner(out, rows, log=log)
    runner.run(rows=list(cfg.rows) if cfg.rows else None)
    results = runner.results(config=asdict(cfg))
    results["languages"] = list(cfg.languages)
    results["paired"] = _paired(runner, cfg.seed)
    results["limits"] = _limits(results["rows"])  # examples scored per task
    results["models"] = dict(models.identity)
    built = experiment.build_runner.record("mA")
    if built is not None:
        results["models"]["mA"] = f"{models.identity['vanilla_mA']} + build {built['key']}"
        keep = ("metrics", "train", "corpus", "seconds", "key")
        results["mA_build"] = {k: built[k] for k in keep}
    results["dc"] = {name: info for name, (_, info) in experiment.dc.items()}
    if "lora_paper" in results["rows"]:
        lora["parameters"] = results["rows"]["lora_paper"]["parameters"]
        results["lora"] = lora
    results["paper"] = PAPER
    write_results(out, results, results_markdown, plot, started)
    return results


def _prepare(cfg: LrlConfig, load, data, log, build: bool) -> tuple[Experiment, Models]:
    """The run's models, data and experiment, with mA built first when `build`."""
    torch.set_num_threads(cfg.threads)
    models = load(cfg) if load is not None else load_models(cfg.device, cfg.dtype)
    experiment = Experiment(cfg, models, data or LrlData())
    build_row = experiment.build_row()
    experiment.build_runner = Runner(Path(cfg.out_dir) / "build", [build_row], log=log)
    if build:
        experiment.build_runner.run()
    return experiment, models


PROBED = ("calm_paper", "lora_paper", "finetune")  # --lr-probe's rows when --rows is not given


def run_lr_probe(
    cfg: LrlConfig,
    learning_rates: tuple[float, ...],
    load: Callable[[LrlConfig], Models] | None = None,
    data: LrlData | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Train each selected trained row (`cfg.rows`, default `PROBED`) at each learning rate,
    without scoring, in OUT/lr_probe (a runner: finished probes are read back); write
    lr_probe.json and lr_probe.md there and return the report: per row, each rate's mean
    training loss over the first and last steps, and the rate with the lowest last loss."""
    names = tuple(cfg.rows or PROBED)
    experiment, _ = _prepare(cfg, load, data, log, bool(set(names) & set(NEEDS_MA)))
    rows, _ = experiment.rows(experiment.build_runner.keys["mA"])
    return run_probe(cfg.out_dir, rows, names, learning_rates, log)


def parse_languages(values: list[str] | None) -> tuple[str, ...]:
    """`--lang bn-en ur-en` (or `--lang bn-en,ur-en`) as a tuple (None: the default pair)."""
    if values is None:
        return LANGUAGE_DEFAULT
    return tuple(v.strip() for value in values for v in value.split(",") if v.strip())
