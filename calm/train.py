"""The training loop, and only the loop: `calm.train` updates a model's trainable parameters.

One plain loop for every model the experiments train: a composition (`calm.CALM`, causal or
encoder mode; only its blocks train), a peft model of the anchor (its adapters), or a Hugging Face
model trained in full (every parameter with requires_grad). `batch_size` is the global batch (all
processes, all accumulation micro-steps); the loss of a step is the sum of token losses over the
global batch divided by its number of target tokens, so 1 process and N processes (DDP, or FSDP2
shards, through `accelerate launch`) compute the same step. The run directory it writes is
described in `calm.run`; checkpoints in `calm.checkpoint`.

Why one file of a little over 500 lines: it is the one loop, whose steps (resume, wrap for the
processes, step, evaluate, checkpoint, stop on a signal) share the state of `_Run` and read best
in order; what is not the loop lives in `calm.trainee` (what trains and how it is fed and saved),
`calm.run`, `calm.checkpoint`, `calm.data` and `calm.plots`.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from calm import hf
from calm.checkpoint import (
    atomic_write_text,
    load_trainer_state,
    prune,
    publish,
    restore_rng,
    save_rng,
    save_trainer_state,
)
from calm.config import TrainConfig
from calm.data import Encoded, collate, encode, epoch_batches
from calm.errors import UserError
from calm.model import next_token_loss
from calm.plots import plot_losses
from calm.progress import bar
from calm.run import Run
from calm.trainee import Trainee, local, sharded

# TrainConfig (calm.config) and plot_losses (calm.plots) stay importable from here: users did.
__all__ = ["NonFiniteLossError", "TrainConfig", "TrainResult", "lr_factor", "plot_losses", "train"]


@dataclass(frozen=True)
class TrainResult:
    """Where a call to `train` stopped and its final metrics."""

    step: int
    train_loss: float | None  # mean loss of the last logging window
    eval_loss: float | None  # at the last evaluation
    best_eval_loss: float | None
    best_step: int | None
    skipped_steps: int  # steps skipped for a non-finite loss
    interrupted: bool  # stopped by a signal or `stop_after` before the end
    checkpoint: str  # the checkpoint written last
    output_dir: str


class NonFiniteLossError(FloatingPointError):
    """Raised when `max_bad_steps` steps in a row had a NaN or infinite loss."""


def lr_factor(step: int, warmup: int, total: int, schedule: str, min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier after `step` optimizer updates: linear warmup over `warmup`
    steps, then `schedule` ("cosine", "linear" or "constant") down to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * decay


class _Signals:
    """SIGINT/SIGTERM set a flag (the loop checkpoints and returns); a second one is fatal."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum
        signal.signal(signum, self.previous.get(signum, signal.SIG_DFL))

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class _Run:
    """State of one call to `train`; the loop itself is `_Run.loop`."""

    def __init__(self, trainee: Trainee, data: Encoded, eval_data, cfg: TrainConfig, tokenizer):
        from accelerate import Accelerator

        self.cfg = cfg
        self.data = data
        self.eval_data = eval_data
        self.trainee = trainee
        self.model = trainee.model
        self.pad_id, self.aug_pad_ids = trainee.pad_ids(tokenizer)
        self.run = Run(cfg.output_dir)
        self.acc = Accelerator()
        self.world = self.acc.num_processes
        self.rank = self.acc.process_index
        self.main = self.acc.is_main_process
        self._epochs: dict[int, list[list[int]]] = {}
        self.pieces = cfg.grad_accum * self.world
        if cfg.batch_size % self.pieces:
            raise UserError(
                f"batch_size={cfg.batch_size} must be a multiple of grad_accum x processes = "
                f"{cfg.grad_accum} x {self.world}."
            )
        self.batches_per_epoch = len(self.epoch(0))
        if self.batches_per_epoch == 0:
            raise UserError(
                f"The data set has {len(data)} examples, fewer than one batch of {self.pieces} "
                f"(grad_accum x processes); add data or lower grad_accum."
            )
        limits = [] if cfg.max_steps is None else [cfg.max_steps]
        if cfg.epochs is not None:
            limits.append(max(1, round(cfg.epochs * self.batches_per_epoch)))
        self.total = min(limits)
        self.sharded = sharded(self.acc, cfg.aug_cache)
        self.cache = None
        if cfg.aug_cache != "none":
            root = self.run.aug_cache_dir if cfg.aug_cache == "disk" else None
            self.cache = trainee.aug_cache(cfg.aug_cache, cfg.cache_dtype, data, root, self.rank)
        self.step = self.skipped = self.bad_in_row = 0
        self.best_eval: float | None = None
        self.best_step: int | None = None
        self.last_eval: float | None = None
        self.window: list[float] = []
        self.last_train_loss: float | None = None
        self.last_checkpoint = ""

    def wrap(self) -> None:
        """Wrap the model for the processes (DDP, or FSDP2 shards); the optimizer and schedule."""
        cfg = self.cfg
        optimizer = torch.optim.AdamW(
            self.trainee.params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay
        )
        self.ddp, self.optimizer = self.trainee.prepare(self.acc, optimizer, self.sharded)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_factor(s, cfg.warmup_steps, self.total, cfg.schedule, cfg.min_lr_ratio),
        )

    # ---------------------------------------------------------------- data

    def epoch(self, e: int) -> list[list[int]]:
        if e not in self._epochs:  # the batches of one epoch at a time
            c, lengths = self.cfg, self.data.lengths()
            batches = epoch_batches(
                lengths, c.batch_size, c.seed, e, c.bucket_by_length, self.pieces
            )
            self._epochs = {e: batches}
        return self._epochs[e]

    def my_pieces(self, batch: list[int]) -> list[list[int]]:
        pieces = [batch[k :: self.pieces] for k in range(self.pieces)]
        return [pieces[m * self.world + self.rank] for m in range(self.cfg.grad_accum)]

    def _device_batch(self, data: Encoded, indices: list[int]) -> dict:
        """Collated examples on this process's device (with the augmenting inputs, if any)."""
        batch = collate(data, indices, self.pad_id, self.aug_pad_ids)
        return {
            k: [x.to(self.acc.device) for x in v] if isinstance(v, list) else v.to(self.acc.device)
            for k, v in batch.items()
        }

    def _autocast(self):
        return torch.autocast(
            self.acc.device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16"
        )

    def _all_sum(self, values: list) -> list[float]:
        """Each value (a float or a 0-dim tensor) summed over the processes; one host sync."""
        device = self.acc.device
        t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
        if self.world > 1:
            torch.distributed.all_reduce(t)
        return t.tolist()

    @staticmethod
    def _logits(output) -> torch.Tensor:
        return output.logits if hasattr(output, "logits") else output

    # ---------------------------------------------------------------- one step

    def train_step(self, batch: list[int]) -> tuple[float, int]:
        """Forward/backward over this process's share of a global batch, then one update.
        Returns the global loss and the number of real tokens processed by all processes."""
        n_targets = self.data.num_targets(batch)
        pieces = self.my_pieces(batch)
        # summed on the device: the step reads them back once, with the gradients' finiteness
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.acc.device)
        tokens = torch.zeros((), dtype=torch.float64, device=self.acc.device)
        for m, indices in enumerate(pieces):
            inputs = self._device_batch(self.data, indices)
            tokens += inputs["attention_mask"].sum()
            kwargs = self.trainee.inputs(inputs)
            if self.cache is not None:
                kwargs["aug_states"] = self.cache.batch_states(self.model, indices, inputs)
            last = m == len(pieces) - 1
            with contextlib.nullcontext() if last else self.acc.no_sync(self.ddp):
                with self._autocast():
                    logits = self._logits(self.ddp(**kwargs))
                loss = next_token_loss(logits, inputs["labels"], reduction="sum") / n_targets
                self.acc.backward(loss * self.world)
            loss_sum += loss.detach().double()
        params = self.trainee.params
        grads = [local(p.grad) for p in params if p.grad is not None]
        # Non-finite gradients are summed over processes so that all skip alike (a sharding
        # engine gives each process only its shard of them).
        finite = torch.stack([torch.isfinite(g).all() for g in grads]).all() if grads else True
        bad = torch.logical_not(torch.as_tensor(finite))
        loss_total, tokens_total, bad = self._all_sum([loss_sum, tokens, bad])
        if math.isfinite(loss_total) and bad == 0:
            if self.cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.bad_in_row = 0
        else:
            self.skipped += 1
            self.bad_in_row += 1
        self.optimizer.zero_grad(set_to_none=True)
        return loss_total, int(tokens_total)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Token-weighted mean loss over the eval set, split across processes."""
        data = self.eval_data
        order = sorted(range(len(data)), key=lambda i: len(data.input_ids[i]))
        mine = order[self.rank :: self.world]
        self.model.eval()
        total = count = 0.0
        for start in range(0, len(mine), self.cfg.batch_size):
            indices = mine[start : start + self.cfg.batch_size]
            inputs = self._device_batch(data, indices)
            with self._autocast():
                logits = self._logits(self.model(**self.trainee.inputs(inputs)))
            total += float(next_token_loss(logits, inputs["labels"], reduction="sum"))
            count += data.num_targets(indices)
        self.model.train()
        total, count = self._all_sum([total, count])
        return total / count

    # ---------------------------------------------------------------- checkpoints

    def _state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.step // self.batches_per_epoch,
            "batch_in_epoch": self.step % self.batches_per_epoch,
            "skipped_steps": self.skipped,
            "bad_in_row": self.bad_in_row,
            "best_eval_loss": self.best_eval,
            "best_step": self.best_step,
            "eval_loss": self.last_eval,
            "train_loss": self.last_train_loss,
            "data_fingerprint": self.data.fingerprint(),
            "num_examples": len(self.data),
            "world_size": self.world,
            **self.trainee.identity(),
        }

    def save_checkpoint(self) -> None:
        """Write checkpoints/step-N in a temporary directory published at the end, so a crash
        leaves the previous checkpoints intact; then prune to the last `keep_last`."""
        root = self.run.checkpoints_dir
        name = f"step-{self.step:08d}"
        tmp = root / f".tmp-{name}"
        if self.main:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        self.acc.wait_for_everyone()
        save_rng(tmp, self.rank)
        weights, optimizer = self.trainee.gather(self.optimizer)
        self.acc.wait_for_everyone()
        if self.main:
            state = self._state()
            self.trainee.write(tmp, weights, state)
            save_trainer_state(tmp, optimizer, self.scheduler, state)
            publish(tmp, root / name)
            prune(root, self.cfg.keep_last)
        self.acc.wait_for_everyone()
        self.last_checkpoint = str(root / name)

    def save_best(self) -> None:
        weights, _ = self.trainee.gather()
        if not self.main:
            return
        tmp = self.run.dir / ".tmp-best"
        shutil.rmtree(tmp, ignore_errors=True)
        self.trainee.write(tmp, weights, self._state())  # the card states this step's numbers
        atomic_write_text(
            tmp / "state.json", json.dumps({"step": self.step, "eval_loss": self.best_eval})
        )
        publish(tmp, self.run.best_dir)

    def restore(self, directory: Path, force: bool) -> None:
        """Load the model of checkpoint `directory` (whole: before `wrap`), refused (unless
        `force`) when the data, the number of processes or the model differ from the run's."""
        state = json.loads((directory / "state.json").read_text())
        problems = []
        if state["data_fingerprint"] != self.data.fingerprint():
            problems.append("the training data differ")
        if state["world_size"] != self.world:
            problems.append(f"it ran on {state['world_size']} processes, this on {self.world}")
        problems += self.trainee.problems(directory, state)
        if problems and not force:
            raise UserError(
                f"Cannot resume from {directory}: {'; '.join(problems)}; pass force=True "
                "(--force) to resume anyway, or train into a new output_dir."
            )
        self.trainee.load(directory, state, force)

    def resume(self, directory: Path) -> None:
        """Continue from the checkpoint `directory` (after `restore` and `wrap`): the optimizer,
        schedule, random generators and counters."""
        state = load_trainer_state(directory, self.optimizer, self.scheduler)
        restore_rng(directory, self.rank)
        self.step = state["step"]
        self.skipped = state["skipped_steps"]
        self.bad_in_row = state["bad_in_row"]
        self.best_eval, self.best_step = state["best_eval_loss"], state["best_step"]
        self.last_eval, self.last_train_loss = state["eval_loss"], state["train_loss"]
        self.last_checkpoint = str(directory)

    # ---------------------------------------------------------------- logging

    def log(self, record: dict[str, Any]) -> None:
        if self.main:
            self.run.append_metrics(record)

    def say(self, text: str) -> None:
        if self.main:
            print(f"calm.train: {text}", file=sys.stderr, flush=True)

    # ---------------------------------------------------------------- the loop

    def loop(self, signals: _Signals, on_step: Callable[[int, float], Any] | None) -> bool:
        """Train until the end, `stop_after`, a signal or `on_step`; True if stopped early."""
        cfg = self.cfg
        progress = bar(
            total=self.total,
            initial=self.step,
            disable=not (cfg.progress and self.main),
            desc="train",
            dynamic_ncols=True,
        )
        self.model.train()
        try:
            while self.step < self.total:
                t0 = time.perf_counter()
                e, b = divmod(self.step, self.batches_per_epoch)
                loss, tokens = self.train_step(self.epoch(e)[b])
                self.step += 1
                if self.bad_in_row >= cfg.max_bad_steps:
                    raise NonFiniteLossError(
                        f"The loss was NaN or infinite for {self.bad_in_row} steps in a row "
                        f"(up to step {self.step}); lower the learning rate or check the data."
                    )
                self.after_step(loss, tokens / (time.perf_counter() - t0), progress)
                done = False
                if on_step is not None:
                    done = bool(on_step(self.step, loss))
                    self.model.train()  # it may have evaluated the model
                stop = self._all_sum([float(signals.received is not None), float(done)])
                if stop[1] > 0:
                    break
                stop_after = cfg.stop_after is not None and self.step >= cfg.stop_after
                if (stop[0] > 0 or stop_after) and self.step < self.total:
                    self.save_checkpoint()
                    return True
                if cfg.save_every is not None and self.step % cfg.save_every == 0:
                    self.save_checkpoint()
            if not self.last_checkpoint.endswith(f"step-{self.step:08d}"):
                self.save_checkpoint()
            return False
        finally:
            progress.close()

    def after_step(self, loss: float, tokens_per_s: float, progress) -> None:
        """Log the step, and evaluate when it is time (saving `best/` on a new best)."""
        cfg = self.cfg
        lr = self.scheduler.get_last_lr()[0]
        if math.isfinite(loss):
            self.window.append(loss)
        progress.update(1)
        progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}")
        if self.step % cfg.log_every == 0 or self.step == self.total:
            if self.window:
                self.last_train_loss = sum(self.window) / len(self.window)
            epoch = round(self.step / self.batches_per_epoch, 4)
            record = {"step": self.step, "epoch": epoch, "loss": loss, "lr": lr}
            record.update(tokens_per_s=round(tokens_per_s, 1), skipped_steps=self.skipped)
            self.log(record)
            self.window = []
        every = cfg.eval_every
        if self.eval_data is not None and (
            self.step == self.total or (every is not None and self.step % every == 0)
        ):
            self.last_eval = self.evaluate()
            self.log({"step": self.step, "eval_loss": self.last_eval})
            progress.write(f"step {self.step}: eval loss {self.last_eval:.4f}")
            if self.best_eval is None or self.last_eval < self.best_eval:
                self.best_eval, self.best_step = self.last_eval, self.step
                self.save_best()


def _prepare(run: _Run, resume: bool, force: bool) -> None:
    """Restore the newest checkpoint when resuming (or seed a fresh run), wrap the model; write
    the config."""
    cfg, out = run.cfg, run.run
    existing = out.checkpoints()
    if existing and not resume:
        raise UserError(
            f"{out.dir} already holds checkpoints; pass resume=True (--resume) to continue that "
            "run, or choose a new output_dir."
        )
    if existing:
        out.check_config(cfg, force)
        run.restore(existing[-1], force)
    run.wrap()  # after the model is restored whole, before the optimizer state is
    if existing:
        run.resume(existing[-1])
        run.say(f"resumed from {existing[-1]} (step {run.step} of {run.total})")
        if run.main:
            out.truncate_metrics(run.step)
    else:
        torch.manual_seed(cfg.seed + run.rank)
    if run.main:
        out.dir.mkdir(parents=True, exist_ok=True)
        for stale in out.checkpoints_dir.glob(".tmp-*"):  # left by a crash while saving
            shutil.rmtree(stale)
        if not existing:
            out.metrics_path.unlink(missing_ok=True)
        atomic_write_text(out.config_path, cfg.to_json())
        for d in (run.data, run.eval_data):
            if d is not None and (d.num_truncated or d.num_dropped):
                run.say(
                    f"{d.name}: {d.num_truncated} examples cut to max_length={cfg.max_length}, "
                    f"{d.num_dropped} dropped for having no target token left"
                )
    run.acc.wait_for_everyone()


def train(
    model: torch.nn.Module,
    train_data,
    eval_data=None,
    config: TrainConfig | None = None,
    tokenizer=None,
    resume: bool = False,
    *,
    force: bool = False,
    on_step: Callable[[int, float], bool | None] | None = None,
) -> TrainResult:
    """Train the trainable parameters of `model` in place on `train_data`.

    model: a `calm.CALM` (its composition blocks train; in encoder mode the augmenting models
    read each record's prompt), or another model with `save_pretrained` (a peft model: its
    adapters train; a Hugging Face model: every parameter with requires_grad trains).
    train_data / eval_data: a JSONL path, a list of dicts or a `datasets.Dataset` (see
    `calm.data`); `tokenizer` is the anchor's, needed for text records, unless the model was built
    with `tokenizers=calm.TokenizerPair(...)`: then the pair tokenizes the text for every model
    and `tokenizer` is not used. With `resume`, continue from the newest checkpoint in
    `config.output_dir` (refused if the config, data or models differ, unless `force`); without
    it, an output_dir that already holds checkpoints is refused. `on_step(step, loss)` runs after
    every optimizer step (on every process; it may evaluate the model); returning True ends the
    training there, with a checkpoint. The model's train/eval mode is restored at the end.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError("config must be a calm.TrainConfig(output_dir=..., max_steps=..., ...).")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch module, got {type(model).__name__}.")
    trainee = Trainee(model)
    cfg = config
    read = dict(tokenizer=tokenizer, max_length=cfg.max_length, truncation=cfg.truncation)
    read.update(pair=trainee.pair, encoder=trainee.encoder)
    data = encode(train_data, **read)
    evals = encode(eval_data, name="eval data", **read) if eval_data is not None else None
    was_training = model.training
    run = _Run(trainee, data, evals, cfg, tokenizer)
    try:
        _prepare(run, resume, force)
        with (
            _Signals() as signals,
            hf.checkpointed_layers(trainee.layers_model(), cfg.gradient_checkpointing),
        ):
            interrupted = run.loop(signals, on_step)
    finally:
        model.train(was_training)
    if signals.received is not None:
        run.say(f"stopped by signal {signals.received}; checkpoint {run.last_checkpoint}")
    if run.main:
        plot_losses(run.run.dir)
    return TrainResult(
        step=run.step,
        train_loss=run.last_train_loss,
        eval_loss=run.last_eval,
        best_eval_loss=run.best_eval,
        best_step=run.best_step,
        skipped_steps=run.skipped,
        interrupted=interrupted,
        checkpoint=run.last_checkpoint,
        output_dir=str(run.run.dir),
    )
