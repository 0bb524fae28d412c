"""The training loop of a composition: AdamW over the composition parameters, resumable runs.

One plain loop. `batch_size` is the global batch (all processes, all accumulation micro-steps);
the loss of a step is the sum of token losses over the global batch divided by its number of
target tokens, so 1 process and N processes (DDP through `accelerate launch`) compute the same
step. Run directory layout:

  train_config.json                the TrainConfig of the run
  metrics.jsonl                    one JSON record per logged step / evaluation
  loss.png                         train/eval loss curves, written at the end
  checkpoints/step-00000010/       composition (CALM.from_pretrained loads it), trainer_state.pt,
                                   rng-rank*.pt, state.json; the last `keep_last` are kept
  best/                            composition with the lowest eval loss so far
  aug_cache/                       augmenting states on disk (aug_cache="disk" only)
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from calm import hf
from calm.checkpoint import _identity_mismatch, atomic_write, atomic_write_text, read_record
from calm.data import IGNORE, TRUNCATION, Encoded, collate, encode, epoch_batches
from calm.model import CALM, AugStates

SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("fp32", "bf16")
CACHES = ("none", "memory", "disk")
CACHE_DTYPES = ("float32", "bfloat16", "float16")
CONFIG_NAME = "train_config.json"
# Fields that only steer this invocation; they may differ when resuming.
RUN_CONTROL = ("output_dir", "stop_after", "progress", "log_every", "save_every", "keep_last")


@dataclass(frozen=True)
class TrainConfig:
    """How a composition is trained. Steps are optimizer steps over the global batch."""

    output_dir: str
    learning_rate: float = 1e-4
    warmup_steps: int = 0
    schedule: str = "cosine"  # decay after warmup: cosine or linear to 0, or constant
    batch_size: int = 8  # global: examples per optimizer step, over processes and micro-steps
    grad_accum: int = 1  # micro-steps per optimizer step (per process)
    max_steps: int | None = None  # stop after this many steps (and/or `epochs`; first reached)
    epochs: float | None = None  # stop after this many passes over the data
    max_length: int | None = 512  # tokens per example; longer ones follow `truncation`
    truncation: str = "right"  # "right": cut and count; "error": refuse the data set
    grad_clip: float | None = 1.0  # max global gradient norm; None disables clipping
    weight_decay: float = 0.0
    seed: int = 0  # data order and dropout
    eval_every: int | None = None  # steps between evaluations (and at the end) if eval data
    save_every: int | None = None  # steps between checkpoints (one is always written at the end)
    log_every: int = 1  # steps between metrics.jsonl records
    keep_last: int = 2  # checkpoints kept besides best/
    precision: str = "fp32"  # "fp32", or "bf16" autocast
    aug_cache: str = "none"  # reuse augmenting states across epochs: "none", "memory", "disk"
    cache_dtype: str = "float32"  # dtype of cached states (bfloat16/float16 halve the memory)
    bucket_by_length: bool = False  # batch examples of similar length together
    gradient_checkpointing: bool = False  # recompute anchor layers in backward to save memory
    max_bad_steps: int = 5  # stop after this many non-finite losses in a row
    stop_after: int | None = None  # checkpoint and return after this step, as if interrupted
    progress: bool = True  # show a progress bar

    def __post_init__(self) -> None:
        def positive(name: str, allow_none: bool = False) -> None:
            v = getattr(self, name)
            if allow_none and v is None:
                return
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"TrainConfig.{name} must be positive, got {v!r}.")

        if not isinstance(self.output_dir, (str, os.PathLike)) or not str(self.output_dir):
            raise ValueError("TrainConfig.output_dir must name a directory.")
        object.__setattr__(self, "output_dir", str(self.output_dir))
        for name in ("learning_rate", "batch_size", "grad_accum", "log_every", "keep_last"):
            positive(name)
        for name in ("max_steps", "epochs", "max_length", "eval_every", "save_every"):
            positive(name, allow_none=True)
        positive("max_bad_steps")
        positive("stop_after", allow_none=True)
        positive("grad_clip", allow_none=True)
        if self.max_steps is None and self.epochs is None:
            raise ValueError("Set TrainConfig.max_steps or TrainConfig.epochs (or both).")
        if self.warmup_steps < 0 or self.weight_decay < 0:
            raise ValueError("warmup_steps and weight_decay must be >= 0.")
        for name, allowed in (
            ("schedule", SCHEDULES),
            ("precision", PRECISIONS),
            ("aug_cache", CACHES),
            ("cache_dtype", CACHE_DTYPES),
            ("truncation", TRUNCATION),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"TrainConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}."
                )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"Unknown TrainConfig fields {unknown}; known: {sorted(known)}.")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        return cls.from_dict(json.loads(text))


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


# --------------------------------------------------------------------------------- helpers


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Learning-rate multiplier after `step` optimizer updates."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies; logits (B, T, V), labels (B, T), -100 ignored."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        labels[:, 1:].flatten().to(logits.device),
        ignore_index=IGNORE,
        reduction="sum",
    )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoints of a run, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())


class AugCache:
    """Augmenting states per example, computed once and reused: in memory or on disk."""

    def __init__(self, kind: str, dtype: str, directory: Path | None) -> None:
        self.kind = kind
        self.dtype = getattr(torch, dtype)
        self.directory = directory
        self.memory: dict[int, dict[tuple[int, int], torch.Tensor]] = {}
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)

    def _file(self, index: int) -> Path:
        return self.directory / f"{index}.safetensors"

    def has(self, index: int) -> bool:
        return index in self.memory if self.kind == "memory" else self._file(index).is_file()

    def put(self, index: int, states: dict[tuple[int, int], torch.Tensor]) -> None:
        states = {k: v.detach().to("cpu", self.dtype).contiguous() for k, v in states.items()}
        if self.kind == "memory":
            self.memory[index] = states
        else:
            tensors = {f"{a}_{layer}": v for (a, layer), v in states.items()}
            atomic_write(self._file(index), lambda tmp: save_file(tensors, tmp))

    def get(self, index: int) -> dict[tuple[int, int], torch.Tensor]:
        if self.kind == "memory":
            return self.memory[index]
        raw = load_file(str(self._file(index)))
        return {tuple(int(x) for x in k.split("_")): v for k, v in raw.items()}

    def batch_states(self, model: CALM, indices: list[int], batch: dict) -> AugStates:
        """{(augment, layer): (B, S_i, A)} states of a right-padded batch (S_i = T when the
        models share the anchor's tokens): cached rows reused, the others computed."""
        aug_masks = batch.get("aug_attention_mask") or [batch["attention_mask"]] * len(
            model.augments
        )
        lengths = [m.sum(1).tolist() for m in aug_masks]  # per augment, per row
        if not all(self.has(i) for i in indices):
            states = model.augment_states(
                batch["input_ids"],
                batch["attention_mask"],
                batch.get("aug_input_ids"),
                batch.get("aug_attention_mask"),
            )
            for row, i in enumerate(indices):
                self.put(i, {k: v[row, : lengths[k[0]][row]] for k, v in states.items()})
            return states
        per_example = [self.get(i) for i in indices]
        B = len(indices)
        device = batch["input_ids"].device
        out: AugStates = {}
        for (a, layer), first in per_example[0].items():
            padded = torch.zeros(B, aug_masks[a].shape[1], first.shape[-1], dtype=first.dtype)
            for row, states in enumerate(per_example):
                padded[row, : lengths[a][row]] = states[(a, layer)]
            out[(a, layer)] = padded.to(device)
        return out


@contextlib.contextmanager
def anchor_checkpointing(model: CALM, enabled: bool = True):
    """Within this context, every anchor decoder layer's own `forward` runs under
    `torch.utils.checkpoint` (recomputed in backward, its activations not kept).

    Only the layer's `forward` is checkpointed, not its `__call__`: the composition's forward
    hooks, which add the cross-attention residual, run outside the checkpointed region, so the
    recomputation in backward (after `CALM.forward` has removed its hooks) is the anchor layer
    alone, exactly as in the first pass.
    """
    if not enabled:
        yield
        return
    from torch.utils.checkpoint import checkpoint

    layers = list(hf.decoder_layers(model.anchor))

    def wrap(forward):
        def checkpointed(*args, **kwargs):
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)

        return checkpointed

    own = [layer.__dict__.get("forward") for layer in layers]  # e.g. accelerate's device hooks
    for layer in layers:
        layer.forward = wrap(layer.forward)
    try:
        yield
    finally:
        for layer, forward in zip(layers, own):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


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


# --------------------------------------------------------------------------------- the run


class _Run:
    """State of one call to `train`; the loop itself is `_Run.loop`."""

    def __init__(self, model: CALM, data: Encoded, eval_data, cfg: TrainConfig, pad_id: int):
        from accelerate import Accelerator

        self.cfg = cfg
        self.data = data
        self.eval_data = eval_data
        self.pad_id = pad_id
        pair = model.tokenizers
        self.aug_pad_ids = tuple(side.pad_id for side in pair.augs) if pair is not None else ()
        self.out = Path(cfg.output_dir)
        self.acc = Accelerator()
        self.world = self.acc.num_processes
        self.rank = self.acc.process_index
        self.main = self.acc.is_main_process
        self.calm = model
        self._epochs: dict[int, list[list[int]]] = {}
        pieces = cfg.grad_accum * self.world
        if cfg.batch_size % pieces:
            raise ValueError(
                f"batch_size={cfg.batch_size} must be a multiple of grad_accum x processes = "
                f"{cfg.grad_accum} x {self.world}."
            )
        self.pieces = pieces
        self.batches_per_epoch = len(self.epoch(0))
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"The data set has {len(data)} examples, fewer than one batch of {pieces} "
                f"(grad_accum x processes); add data or lower grad_accum."
            )
        limits = []
        if cfg.max_steps is not None:
            limits.append(cfg.max_steps)
        if cfg.epochs is not None:
            limits.append(max(1, round(cfg.epochs * self.batches_per_epoch)))
        self.total = min(limits)
        self.ddp = self.acc.prepare_model(model)
        self.optimizer = torch.optim.AdamW(
            model.trainable_parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_factor(s, cfg.warmup_steps, self.total, cfg.schedule),
        )
        self.cache = None
        if cfg.aug_cache != "none":
            directory = None
            if cfg.aug_cache == "disk":
                key = hashlib.sha256(
                    json.dumps(
                        [data.fingerprint(), [hf.model_identity(a) for a in model.augments]]
                    ).encode()
                ).hexdigest()[:16]
                directory = self.out / "aug_cache" / f"{key}-rank{self.rank}"
            self.cache = AugCache(cfg.aug_cache, cfg.cache_dtype, directory)
        self.step = 0
        self.skipped = 0
        self.bad_in_row = 0
        self.best_eval: float | None = None
        self.best_step: int | None = None
        self.last_eval: float | None = None
        self.window: list[float] = []
        self.last_train_loss: float | None = None
        self.last_checkpoint = ""

    # ---------------------------------------------------------------- data

    def epoch(self, e: int) -> list[list[int]]:
        if e not in self._epochs:
            self._epochs = {
                e: epoch_batches(
                    self.data.lengths(),
                    self.cfg.batch_size,
                    self.cfg.seed,
                    e,
                    self.cfg.bucket_by_length,
                    min_size=self.pieces,
                )
            }
        return self._epochs[e]

    def my_pieces(self, batch: list[int]) -> list[list[int]]:
        pieces = [batch[k :: self.pieces] for k in range(self.pieces)]
        return [pieces[m * self.world + self.rank] for m in range(self.cfg.grad_accum)]

    def _device_batch(self, data: Encoded, indices: list[int]) -> dict:
        """Collated examples on this process's device (with the augmenting inputs of a pair)."""
        batch = collate(data, indices, self.pad_id, self.aug_pad_ids)
        return {
            k: [x.to(self.acc.device) for x in v] if isinstance(v, list) else v.to(self.acc.device)
            for k, v in batch.items()
        }

    @staticmethod
    def _model_inputs(batch: dict) -> dict:
        """The keyword arguments of `CALM.forward` in a collated batch (all but the labels)."""
        return {k: v for k, v in batch.items() if k != "labels"}

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
            states = self.cache.batch_states(self.calm, indices, inputs) if self.cache else None
            last = m == len(pieces) - 1
            with contextlib.nullcontext() if last else self.acc.no_sync(self.ddp):
                with self._autocast():
                    logits = self.ddp(**self._model_inputs(inputs), aug_states=states).logits
                loss = token_loss_sum(logits, inputs["labels"]) / n_targets
                self.acc.backward(loss * self.world)
            loss_sum += loss.detach().double()
        params = self.calm.trainable_parameters()
        grads = [p.grad for p in params if p.grad is not None]
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
        self.calm.eval()
        total = count = 0.0
        for start in range(0, len(mine), self.cfg.batch_size):
            indices = mine[start : start + self.cfg.batch_size]
            inputs = self._device_batch(data, indices)
            with self._autocast():
                logits = self.calm(**self._model_inputs(inputs)).logits
            total += float(token_loss_sum(logits, inputs["labels"]))
            count += data.num_targets(indices)
        self.calm.train()
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
        }

    def save_checkpoint(self) -> None:
        """Write checkpoints/step-N through a temporary directory renamed at the end, so a crash
        leaves the previous checkpoints intact; then prune to the last `keep_last`."""
        root = self.out / "checkpoints"
        name = f"step-{self.step:08d}"
        tmp = root / f".tmp-{name}"
        if self.main:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        self.acc.wait_for_everyone()
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        atomic_write(tmp / f"rng-rank{self.rank}.pt", lambda p: torch.save(rng, p))
        self.acc.wait_for_everyone()
        if self.main:
            self.calm.save_pretrained(tmp)
            trainer = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
            }
            atomic_write(tmp / "trainer_state.pt", lambda p: torch.save(trainer, p))
            atomic_write_text(tmp / "state.json", json.dumps(self._state(), indent=2))
            final = root / name
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(root)
            for old in checkpoints(self.out)[: -self.cfg.keep_last]:
                shutil.rmtree(old)
            self.last_checkpoint = str(final)
        self.acc.wait_for_everyone()
        self.last_checkpoint = str(root / name)

    def save_best(self) -> None:
        if not self.main:
            return
        tmp, best = self.out / ".tmp-best", self.out / "best"
        shutil.rmtree(tmp, ignore_errors=True)
        self.calm.save_pretrained(tmp)
        atomic_write_text(
            tmp / "state.json", json.dumps({"step": self.step, "eval_loss": self.best_eval})
        )
        old = self.out / ".old-best"
        if best.exists():
            os.replace(best, old)
        os.replace(tmp, best)
        shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(self.out)

    def restore(self, directory: Path, force: bool) -> None:
        state = json.loads((directory / "state.json").read_text())
        problems = []
        if state["data_fingerprint"] != self.data.fingerprint():
            problems.append("the training data differ")
        if state["world_size"] != self.world:
            problems.append(f"it ran on {state['world_size']} processes, this on {self.world}")
        record = read_record(directory)
        pairs = [("anchor", record["anchor"], self.calm.anchor)] + [
            (f"augmenting model {i}", saved, aug)
            for i, (saved, aug) in enumerate(zip(record["augments"], self.calm.augments))
        ]
        for role, saved, base in pairs:
            if _identity_mismatch(role, saved, hf.model_identity(base)):
                problems.append(f"the {role} differs")
        if problems and not force:
            raise ValueError(
                f"Cannot resume from {directory}: {'; '.join(problems)}; pass force=True "
                "(--force) to resume anyway, or train into a new output_dir."
            )
        weights = load_file(str(directory / "composition.safetensors"))
        ref = self.calm.trainable_parameters()[0]
        self.calm.blocks.load_state_dict(
            {k: v.to(ref.device, ref.dtype) for k, v in weights.items()}
        )
        trainer = torch.load(directory / "trainer_state.pt", weights_only=False)
        self.optimizer.load_state_dict(trainer["optimizer"])
        self.scheduler.load_state_dict(trainer["scheduler"])
        rng_file = directory / f"rng-rank{self.rank}.pt"
        if rng_file.is_file():
            rng = torch.load(rng_file, weights_only=False)
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        self.step = state["step"]
        self.skipped = state["skipped_steps"]
        self.bad_in_row = state["bad_in_row"]
        self.best_eval, self.best_step = state["best_eval_loss"], state["best_step"]
        self.last_eval, self.last_train_loss = state["eval_loss"], state["train_loss"]
        self.last_checkpoint = str(directory)

    # ---------------------------------------------------------------- logging

    def log(self, record: dict[str, Any]) -> None:
        if self.main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def say(self, text: str) -> None:
        if self.main:
            print(f"calm.train: {text}", file=sys.stderr, flush=True)

    # ---------------------------------------------------------------- the loop

    def loop(self, signals: _Signals) -> bool:
        """Train until the end, `stop_after`, or a signal; True if stopped early."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        bar = tqdm(
            total=self.total,
            initial=self.step,
            disable=not (cfg.progress and self.main),
            desc="train",
            dynamic_ncols=True,
        )
        self.calm.train()
        try:
            while self.step < self.total:
                t0 = time.perf_counter()
                e, b = divmod(self.step, self.batches_per_epoch)
                loss, tokens = self.train_step(self.epoch(e)[b])
                self.step += 1
                elapsed = time.perf_counter() - t0
                if self.bad_in_row >= cfg.max_bad_steps:
                    raise NonFiniteLossError(
                        f"The loss was NaN or infinite for {self.bad_in_row} steps in a row "
                        f"(up to step {self.step}); lower the learning rate or check the data."
                    )
                lr = self.scheduler.get_last_lr()[0]
                if math.isfinite(loss):
                    self.window.append(loss)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / elapsed:.0f}")
                if self.step % cfg.log_every == 0 or self.step == self.total:
                    if self.window:
                        self.last_train_loss = sum(self.window) / len(self.window)
                    self.log(
                        {
                            "step": self.step,
                            "epoch": round(self.step / self.batches_per_epoch, 4),
                            "loss": loss,
                            "lr": lr,
                            "tokens_per_s": round(tokens / elapsed, 1),
                            "skipped_steps": self.skipped,
                        }
                    )
                    self.window = []
                evaluate = self.eval_data is not None and (
                    self.step == self.total
                    or (cfg.eval_every is not None and self.step % cfg.eval_every == 0)
                )
                if evaluate:
                    self.last_eval = self.evaluate()
                    self.log({"step": self.step, "eval_loss": self.last_eval})
                    bar.write(f"step {self.step}: eval loss {self.last_eval:.4f}")
                    if self.best_eval is None or self.last_eval < self.best_eval:
                        self.best_eval, self.best_step = self.last_eval, self.step
                        self.save_best()
                stop = self._all_sum([float(signals.received is not None)])[0] > 0
                stop |= cfg.stop_after is not None and self.step >= cfg.stop_after
                if stop and self.step < self.total:
                    self.save_checkpoint()
                    return True
                if cfg.save_every is not None and self.step % cfg.save_every == 0:
                    self.save_checkpoint()
            if not self.last_checkpoint.endswith(f"step-{self.step:08d}"):
                self.save_checkpoint()
            return False
        finally:
            bar.close()


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records logged after `step` (by a run that died after its last checkpoint)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def plot_losses(output_dir: str | os.PathLike) -> Path:
    """Write `loss.png`: train (and eval) loss against step, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(output_dir)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and math.isfinite(r["loss"])]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    path = out / "loss.png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return path


def _pad_id(model: CALM, tokenizer) -> int:
    for source in (tokenizer, model.anchor.config):
        pad = getattr(source, "pad_token_id", None) if source is not None else None
        if isinstance(pad, int):
            return pad
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    return eos if isinstance(eos, int) else 0


def train(
    model: CALM,
    train_data,
    eval_data=None,
    config: TrainConfig | None = None,
    tokenizer=None,
    resume: bool = False,
    *,
    force: bool = False,
) -> TrainResult:
    """Train the composition parameters of `model` in place on `train_data`.

    train_data / eval_data: a JSONL path, a list of dicts or a `datasets.Dataset` (see
    `calm.data`); `tokenizer` is the anchor's, needed for text records, unless the model was built
    with `tokenizers=calm.TokenizerPair(...)`: then the pair tokenizes the text for every model and
    `tokenizer` is not used. With `resume`, continue
    from the newest checkpoint in `config.output_dir` (refused if the config, data or base models
    differ, unless `force`); without it, an output_dir that already holds checkpoints is refused.
    """
    if not isinstance(model, CALM):
        raise TypeError(f"model must be a calm.CALM, got {type(model).__name__}.")
    if not isinstance(config, TrainConfig):
        raise TypeError("config must be a calm.TrainConfig(output_dir=..., max_steps=..., ...).")
    if model.calm_config.mode != "causal":
        raise ValueError(
            'calm.train trains causal-mode compositions (CALMConfig(mode="causal")); encoder '
            "mode needs a separate augmenting prompt per example."
        )
    cfg = config
    pair = model.tokenizers
    data = encode(train_data, tokenizer, cfg.max_length, cfg.truncation, pair=pair)
    evals = None
    if eval_data is not None:
        evals = encode(
            eval_data, tokenizer, cfg.max_length, cfg.truncation, name="eval data", pair=pair
        )
    out = Path(cfg.output_dir)
    existing = checkpoints(out)
    if existing and not resume:
        raise ValueError(
            f"{out} already holds checkpoints; pass resume=True (--resume) to continue that run, "
            "or choose a new output_dir."
        )
    pad_id = pair.anchor.pad_id if pair is not None else _pad_id(model, tokenizer)
    run = _Run(model, data, evals, cfg, pad_id)
    config_path = out / CONFIG_NAME
    if resume and existing:
        saved = TrainConfig.from_json(config_path.read_text())
        differ = sorted(
            k for k, v in cfg.to_dict().items() if k not in RUN_CONTROL and saved.to_dict()[k] != v
        )
        if differ and not force:
            raise ValueError(
                f"Cannot resume {out}: the config differs from the checkpoint's in {differ}; "
                "use the same settings, or force=True (--force) to resume anyway."
            )
        run.restore(existing[-1], force)
        run.say(f"resumed from {existing[-1]} (step {run.step} of {run.total})")
        if run.main:
            _truncate_metrics(out / "metrics.jsonl", run.step)
    else:
        torch.manual_seed(cfg.seed + run.rank)
    if run.main:
        out.mkdir(parents=True, exist_ok=True)
        for stale in (out / "checkpoints").glob(".tmp-*"):  # left by a crash while saving
            shutil.rmtree(stale)
        if not (resume and existing):
            (out / "metrics.jsonl").unlink(missing_ok=True)
        atomic_write_text(config_path, cfg.to_json())
        for d in (data, evals):
            if d is not None and (d.num_truncated or d.num_dropped):
                run.say(
                    f"{d.name}: {d.num_truncated} examples cut to max_length={cfg.max_length}, "
                    f"{d.num_dropped} dropped for having no target token left"
                )
    run.acc.wait_for_everyone()
    with _Signals() as signals, anchor_checkpointing(model, cfg.gradient_checkpointing):
        interrupted = run.loop(signals)
    if signals.received is not None:
        run.say(f"stopped by signal {signals.received}; checkpoint {run.last_checkpoint}")
    if run.main:
        plot_losses(out)
    return TrainResult(
        step=run.step,
        train_loss=run.last_train_loss,
        eval_loss=run.last_eval,
        best_eval_loss=run.best_eval,
        best_step=run.best_step,
        skipped_steps=run.skipped,
        interrupted=interrupted,
        checkpoint=run.last_checkpoint,
        output_dir=str(out),
    )


def resolve_checkpoint(run_dir: str | os.PathLike, which: str = "last") -> Path:
    """The composition directory of a run: "last" (newest checkpoint), "best", or a path."""
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"Run directory {run} does not exist.")
    if which == "last":
        found = checkpoints(run)
        if not found:
            raise FileNotFoundError(f"{run} holds no checkpoint; train into it with `calm train`.")
        return found[-1]
    path = run / "best" if which == "best" else Path(which)
    if not (path / "composition.safetensors").is_file():
        raise FileNotFoundError(f"{path} holds no composition.safetensors.")
    return path
