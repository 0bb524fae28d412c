"""A run directory of `calm train` as an object: its files, its checkpoints, and loading it back.

  train_config.json                the TrainConfig of the run
  models.json                      where the base models and tokenizers came from (`calm train`)
  metrics.jsonl                    one JSON record per logged step / evaluation
  loss.png                         train/eval loss curves, written at the end
  checkpoints/step-00000010/       what the model saves (a composition: CALM.from_pretrained loads
                                   it; a peft adapter; a Hugging Face model), trainer_state.pt,
                                   rng-rank*.pt, state.json; the last `keep_last` are kept
  best/                            the model with the lowest eval loss so far, and its state.json
  aug_cache/                       augmenting states on disk (aug_cache="disk" only)

`load_run(directory)` rebuilds the trained composition on its base models, with its tokenizers.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from calm.checkpoint import (
    WEIGHTS_NAME,
    atomic_write_text,
    read_record,
    step_directories,
)
from calm.config import RUN_CONTROL, TrainConfig
from calm.errors import UserError

if TYPE_CHECKING:
    from calm.model import CALM
    from calm.tokenizers import TokenizerPair

CONFIG_NAME = "train_config.json"
MODELS_NAME = "models.json"
METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "loss.png"


class Run:
    """The files of one run directory (nothing is read or created until asked)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.dir = Path(directory)
        self.config_path = self.dir / CONFIG_NAME
        self.models_path = self.dir / MODELS_NAME
        self.metrics_path = self.dir / METRICS_NAME
        self.plot_path = self.dir / PLOT_NAME
        self.checkpoints_dir = self.dir / "checkpoints"
        self.best_dir = self.dir / "best"
        self.aug_cache_dir = self.dir / "aug_cache"

    def __repr__(self) -> str:
        return f"Run({str(self.dir)!r})"

    def checkpoints(self) -> list[Path]:
        """The complete checkpoints, oldest first."""
        return step_directories(self.checkpoints_dir)

    def resolve(self, which: str | os.PathLike = "last") -> Path:
        """A checkpoint directory: "last" (the newest), "best", or a path."""
        if not self.dir.is_dir():
            raise FileNotFoundError(f"Run directory {self.dir} does not exist.")
        if which == "last":
            found = self.checkpoints()
            if not found:
                raise FileNotFoundError(
                    f"{self.dir} holds no checkpoint; train into it with `calm train`."
                )
            return found[-1]
        path = self.best_dir if which == "best" else Path(which)
        if not (path / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"{path} holds no {WEIGHTS_NAME}.")
        return path

    def config(self) -> TrainConfig:
        return TrainConfig.from_json(self.config_path.read_text())

    def check_config(self, config: TrainConfig, force: bool = False) -> None:
        """Refuse (unless `force`) to resume this run with another config than its own, but for
        the fields that only steer one invocation (`RUN_CONTROL`)."""
        saved = self.config().to_dict()
        differ = sorted(
            k for k, v in config.to_dict().items() if k not in RUN_CONTROL and saved[k] != v
        )
        if differ and not force:
            raise UserError(
                f"Cannot resume {self.dir}: the config differs from the checkpoint's in {differ}; "
                "use the same settings, or force=True (--force) to resume anyway."
            )

    def metrics(self) -> list[dict[str, Any]]:
        """The records of metrics.jsonl (none when it does not exist)."""
        if not self.metrics_path.is_file():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines()]

    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_metrics(self, step: int) -> None:
        """Drop the records logged after `step` (by a run that died after its last checkpoint)."""
        if self.metrics_path.is_file():
            kept = [json.dumps(r) + "\n" for r in self.metrics() if r["step"] <= step]
            atomic_write_text(self.metrics_path, "".join(kept))

    def write_models(
        self,
        anchor: str,
        augments: list[str],
        tokenizer: str | None = None,
        aug_tokenizers: list[str] | None = None,
    ) -> dict[str, Any]:
        """Record where the base models (and tokenizers) came from, for `load_run`; returns the
        record. `aug_tokenizers`: only when the augmenting models read their own tokens."""
        models: dict[str, Any] = {
            "anchor": anchor,
            "augments": list(augments),
            "tokenizer": tokenizer or anchor,
        }
        if aug_tokenizers:
            models["aug_tokenizers"] = list(aug_tokenizers)
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.models_path, json.dumps(models, indent=2))
        return models

    def models(self) -> dict[str, Any] | None:
        """The record `write_models` wrote, or None."""
        if not self.models_path.is_file():
            return None
        return json.loads(self.models_path.read_text())

    def base_models(self, checkpoint: str | os.PathLike) -> dict[str, Any]:
        """Where the run's anchor, augmenting models and tokenizer came from: models.json, or
        else the names the checkpoint's composition record holds."""
        models = self.models()
        if models is not None:
            return models
        record = read_record(checkpoint)
        anchor = record["anchor"]["name_or_path"]
        return {
            "anchor": anchor,
            "augments": [a["name_or_path"] for a in record["augments"]],
            "tokenizer": anchor,
        }


def checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoints of a run, oldest first."""
    return Run(output_dir).checkpoints()


def resolve_checkpoint(run_dir: str | os.PathLike, which: str = "last") -> Path:
    """The checkpoint directory of a run: "last" (newest checkpoint), "best", or a path."""
    return Run(run_dir).resolve(which)


def base_models(run_dir: str | os.PathLike, checkpoint: str | os.PathLike) -> dict[str, Any]:
    """Where a run's anchor, augmenting models and tokenizer came from (`Run.base_models`)."""
    return Run(run_dir).base_models(checkpoint)


# --------------------------------------------------------------------------------- loading


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def resolve_source(source: str) -> str:
    """A local model directory as an absolute path (so the run dir records where it is); a hub id
    unchanged; a path-like string that names no directory is refused."""
    if os.path.isdir(source):
        return str(Path(source).resolve())
    if os.path.exists(source) or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise UserError(f"Model directory {source} does not exist.")
    return source


def load_model(source: str, role: str):
    """AutoModelForCausalLM.from_pretrained(source), with one-sentence errors."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    try:
        return AutoModelForCausalLM.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise UserError(f"Cannot load the {role} from {source}: {_first_line(e)}") from None


def load_tokenizer(source: str):
    """AutoTokenizer.from_pretrained(source), with one-sentence errors."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise UserError(f"Cannot load a tokenizer from {source}: {_first_line(e)}") from None


def make_pair(anchor_tokenizer, aug_tokenizers: list) -> TokenizerPair | None:
    """A `calm.TokenizerPair` of these tokenizers, or None when every augmenting one has the
    anchor's vocabulary (one shared token stream)."""
    from calm.tokenizers import TokenizerPair

    vocab = anchor_tokenizer.get_vocab()
    if all(t.get_vocab() == vocab for t in aug_tokenizers):
        return None
    try:
        return TokenizerPair(anchor_tokenizer, aug_tokenizers)
    except (TypeError, ValueError) as e:
        raise UserError(str(e)) from None


def tokenizer_pair(anchor_tokenizer, aug_srcs: list[str]) -> TokenizerPair | None:
    """`make_pair` of the anchor's tokenizer and those of the augmenting models at `aug_srcs`."""
    return make_pair(anchor_tokenizer, [load_tokenizer(s) for s in aug_srcs])


@dataclass(frozen=True)
class LoadedRun:
    """A trained composition loaded back from its run directory (`load_run`)."""

    model: CALM  # the composition, on its base models, in eval mode
    tokenizer: Any  # the anchor's
    aug_tokenizers: list  # the augmenting models' own, when they differ from the anchor's
    pair: TokenizerPair | None  # the TokenizerPair the composition reads through, if any
    checkpoint: Path  # the checkpoint directory it was loaded from


def load_run(
    run_dir: str | os.PathLike,
    checkpoint: str | os.PathLike = "last",
    anchor: str | None = None,
    augments: list[str] | None = None,
) -> LoadedRun:
    """Reload a `calm train` run in one call: its checkpoint `checkpoint` ("last", "best" or a
    path) on the base models it recorded, or on `anchor` / `augments` (paths or hub ids) given
    instead. A run trained with different tokenizers gets its TokenizerPair back (the augmenting
    tokenizers from the same places as their models)."""
    from calm.model import CALM

    run = Run(run_dir)
    path = run.resolve(checkpoint)
    models = run.base_models(path)
    anchor_src = resolve_source(anchor) if anchor else models["anchor"]
    aug_srcs = [resolve_source(a) for a in augments] if augments else models["augments"]
    tokenizer = load_tokenizer(anchor_src if anchor else models["tokenizer"])
    aug_tokenizers, pair = [], None
    if models.get("aug_tokenizers"):
        aug_tokenizers = [
            load_tokenizer(s) for s in (aug_srcs if augments else models["aug_tokenizers"])
        ]
        pair = make_pair(tokenizer, aug_tokenizers)
        if pair is None:
            aug_tokenizers = []
    anchor_model = load_model(anchor_src, "anchor")
    aug_models = [load_model(s, f"augmenting model {i}") for i, s in enumerate(aug_srcs)]
    model = CALM.from_pretrained(path, anchor_model, aug_models, tokenizers=pair).eval()
    return LoadedRun(model, tokenizer, aug_tokenizers, pair, path)
