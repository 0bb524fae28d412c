"""Runs a recipe's rows, each once: a finished row is read back, an interrupted one resumes.

A recipe is a list of rows (mA, mB, calm, lora, ...): each trains through `calm.train` and
scores through `calm.evaluate`. A full run takes hours and spans several invocations, so
`Runner.run` works row by row in OUT/rows/<row>/:

  result.json      the finished row: what its function returned (its "metrics", and any
                   "per_example" values for the paired table), its config and key, its seconds
                   summed over segments, the calm version and commit, the host of each segment
  progress.json    an unfinished row: its key and the segments run so far (seconds, host);
                   rewritten every `heartbeat` seconds, so a killed invocation loses little time
  train/           `RowContext.train` trains here with resume=True: the loop's own checkpoints
  ...              anything else the row writes (samples, evaluation files)

A row is keyed by a hash of the canonical JSON of its name and its config (every setting that
changes its result; not the code, not settings such as save_every that only steer one
invocation). On a rerun a row whose result has the same key is not called again; one whose
config changed is recomputed from scratch: the log names the changed settings, the old
result.json is kept as OUT/stale/<row>/<old key>.json and the rest of its directory (checkpoints
included) is deleted. One invocation at a time: a second one on the same OUT is refused.

    runner = Runner("runs/code", [Row("mB", {"model": mB_path}, score_mB),
                                  Row("calm", {"model": mB_path, "steps": 400}, train_calm)])
    runner.run(rows=["calm"])            # None: every row
    results = runner.results(config=asdict(cfg))   # {"rows": {...}, "config": {...}}
    results["paired"] = runner.paired("calm")      # {"calm-mB": {"metric": {"delta", "ci95"}}}
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from calm import __version__
from calm.checkpoint import atomic_write_text
from calm.errors import UserError
from calm.recipes.bootstrap import RESAMPLES, paired_deltas

if TYPE_CHECKING:
    from calm.config import TrainConfig
    from calm.train import TrainResult

RESULT_NAME = "result.json"
PROGRESS_NAME = "progress.json"
# what the runner adds to a row's result; a row's function may not return these keys
BOOKKEEPING = ("row", "key", "config", "seconds", "segments", "calm", "host", "finished")


class RowInterrupted(KeyboardInterrupt):
    """Training stopped before its end (a signal or `stop_after`): the row is not finished, and
    the next invocation resumes it from its checkpoint. A KeyboardInterrupt, so that it ends the
    run (the command line reports it as interrupted) and no `except Exception` swallows it."""


@dataclass(frozen=True)
class Row:
    """One row of an experiment: `run(ctx)` returns {"metrics": {name: float}, ...} (other JSON
    keys are kept; "per_example": {metric: [values] or {"num": [...], "den": [...]}} feeds
    `Runner.paired` and stays out of `Runner.results`)."""

    name: str
    config: dict  # every setting that changes the row's result (JSON values)
    run: Callable[[RowContext], dict]
    # a trained row: learning rate -> a function that only trains it (`trained_only`'s result)
    train_only: Callable[[float], Callable[[RowContext], dict]] | None = None


@dataclass(frozen=True)
class RowContext:
    """What a row's function gets: its directory, where it trains, and whether it resumes."""

    name: str
    config: dict
    directory: Path  # OUT/rows/<row>/, kept across invocations until the row's config changes
    train_dir: Path  # directory/"train": `train` (or calm.train(..., resume=True)) uses it
    resume: bool  # an earlier invocation began this row with the same config
    log: Callable[[str], None]  # the runner's log, the row's name in front

    def train(self, model, train_data, config: TrainConfig, **kwargs: Any) -> TrainResult:
        """`calm.train(model, train_data, config=config, resume=True, **kwargs)` into
        `train_dir` (whatever `config.output_dir` says): it continues from the newest checkpoint
        there. Raises `RowInterrupted` when the loop stopped before its end."""
        import calm

        config = dataclasses.replace(config, output_dir=str(self.train_dir))
        result = calm.train(model, train_data, config=config, resume=True, **kwargs)
        if result.interrupted:
            raise RowInterrupted(
                f"training of row {self.name} stopped at step {result.step} (checkpoint "
                f"{result.checkpoint})"
            )
        return result


def row_key(name: str, config: dict) -> str:
    """The hash of the canonical JSON (sorted keys, no spaces) of a row's name and config."""
    try:
        text = json.dumps(
            {"row": name, "config": config},
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
            allow_nan=False,
        )
    except (TypeError, ValueError) as e:
        raise TypeError(f"The config of row {name!r} must hold JSON values only: {e}.") from None
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def calm_source() -> dict[str, str | None]:
    """The calm version, and the git commit of its source tree (with "-dirty" when tracked files
    differ from it; None outside a git checkout)."""
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit and git("status", "--porcelain", "--untracked-files=no"):
        commit += "-dirty"
    return {"version": __version__, "commit": commit}


def host() -> dict[str, Any]:
    """The machine a segment ran on: name, platform, CPUs, Python, and torch's threads and
    accelerator when torch is loaded."""
    info: dict[str, Any] = {
        "name": platform.node(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["accelerator"] = torch.cuda.get_device_name()
    return info


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_json(path: Path) -> dict | None:
    """A JSON file's object, or None when there is no such file."""
    return json.loads(path.read_text()) if path.is_file() else None


def _changed(old: dict, new: dict) -> list[str]:
    return sorted(k for k in old.keys() | new.keys() if old.get(k, ...) != new.get(k, ...))


class _Clock:
    """A segment's seconds, saved in progress.json at its start, every `every` seconds (a
    daemon thread: a killed process loses at most that much) and at its end."""

    def __init__(self, path: Path, state: dict, every: float) -> None:
        self.path, self.state, self.every = path, state, every
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def __enter__(self) -> _Clock:
        self.t0 = time.monotonic()
        self.save()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.save()

    def _beat(self) -> None:
        while not self.stop.wait(self.every):
            self.save()

    def save(self) -> None:
        self.state["segments"][-1]["seconds"] = round(time.monotonic() - self.t0, 3)
        atomic_write_text(self.path, json.dumps(self.state, indent=2))

    @property
    def seconds(self) -> float:
        return round(sum(s["seconds"] for s in self.state["segments"]), 3)


class Runner:
    """The rows of one experiment in `out_dir`; `run` computes those not finished yet."""

    def __init__(
        self,
        out_dir: str | os.PathLike,
        rows: Iterable[Row],
        log: Callable[[str], None] | None = None,
        heartbeat: float = 30.0,
    ) -> None:
        self.out = Path(out_dir)
        self.rows = list(rows)
        self.log = log or (lambda text: print(text, file=sys.stderr, flush=True))
        self.heartbeat = heartbeat
        self.keys: dict[str, str] = {}
        for row in self.rows:
            if not row.name.replace("_", "").replace("-", "").replace(".", "").isalnum():
                raise ValueError(f"Row name {row.name!r} must be letters, digits, '_', '-', '.'.")
            if row.name in self.keys:
                raise ValueError(f"Two rows are named {row.name!r}.")
            self.keys[row.name] = row_key(row.name, row.config)

    def directory(self, name: str) -> Path:
        return self.out / "rows" / name

    def select(self, names: Iterable[str] | None) -> list[Row]:
        """The rows named (all when None), in the runner's order; an unknown name is refused."""
        if names is None:
            return list(self.rows)
        names = list(names)
        unknown = [n for n in names if n not in self.keys]
        if unknown:
            raise UserError(
                f"Unknown row{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                f"choose from {', '.join(self.keys)}."
            )
        return [row for row in self.rows if row.name in names]

    def record(self, name: str) -> dict | None:
        """The stored result of row `name` if it finished with its current config, else None."""
        record = read_json(self.directory(name) / RESULT_NAME)
        return record if record is not None and record["key"] == self.keys[name] else None

    def run(self, rows: Iterable[str] | None = None) -> dict[str, dict]:
        """Compute the selected rows (all when None) that have no current result, in order, and
        return the result of each selected row. An exception in a row ends the run (its time is
        kept and its checkpoints resume it next time)."""
        selected = self.select(rows)
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / ".lock", "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.seek(0)
                raise UserError(
                    f"{self.out} is in use by another invocation ({lock.read().strip()}); "
                    "wait for it to end or stop it."
                ) from None
            lock.truncate(0)
            lock.write(f"pid {os.getpid()} on {platform.node()}")
            lock.flush()
            return {row.name: self._row(row) for row in selected}

    def _row(self, row: Row) -> dict:
        """The row's current result: read back, or computed (resuming its unfinished segments)."""
        directory, key = self.directory(row.name), self.keys[row.name]
        old = read_json(directory / RESULT_NAME)
        if old is not None and old["key"] == key:
            self.log(f"row {row.name}: finished earlier ({old['seconds']:.0f} s), read back")
            return old
        progress = read_json(directory / PROGRESS_NAME)
        if old is not None:
            stale = self.out / "stale" / row.name / f"{old['key']}.json"
            stale.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(directory / RESULT_NAME, stale)
            self.log(
                f"row {row.name}: config changed ({', '.join(_changed(old['config'], row.config))})"
                f"; recomputing it, the old result kept as {stale}"
            )
            shutil.rmtree(directory)
            progress = None
        elif progress is not None and progress["key"] != key:
            changed = ", ".join(_changed(progress["config"], row.config))
            self.log(f"row {row.name}: config changed ({changed}); restarting it from scratch")
            shutil.rmtree(directory)
            progress = None
        elif progress is None and directory.exists():
            shutil.rmtree(directory)  # left before any progress was recorded
        return self._compute(row, key, progress)

    def _compute(self, row: Row, key: str, progress: dict | None) -> dict:
        directory = self.directory(row.name)
        directory.mkdir(parents=True, exist_ok=True)
        earlier = progress["segments"] if progress else []
        segment = {"started": _now(), "seconds": 0.0, "host": host(), "calm": calm_source()}
        state = {"row": row.name, "key": key, "config": row.config, "segments": [*earlier, segment]}
        ctx = RowContext(
            name=row.name,
            config=row.config,
            directory=directory,
            train_dir=directory / "train",
            resume=bool(earlier),
            log=lambda text: self.log(f"row {row.name}: {text}"),
        )
        done = sum(s["seconds"] for s in earlier)
        ctx.log(
            f"resuming (segment {len(earlier) + 1}, {done:.0f} s so far)" if earlier else "start"
        )
        clock = _Clock(directory / PROGRESS_NAME, state, self.heartbeat)
        try:
            with clock:
                out = row.run(ctx)
        except BaseException as e:
            ctx.log(
                f"stopped after {clock.seconds:.0f} s ({type(e).__name__}: {e}); rerun to resume"
            )
            raise
        record = self._checked(row, out)
        record.update(
            row=row.name,
            key=key,
            config=row.config,
            seconds=clock.seconds,
            segments=state["segments"],
            calm=segment["calm"],
            host=segment["host"],
            finished=_now(),
        )
        atomic_write_text(directory / RESULT_NAME, json.dumps(record, indent=2) + "\n")
        (directory / PROGRESS_NAME).unlink()
        ctx.log(f"finished in {clock.seconds:.0f} s: {record['metrics']}")
        return record

    @staticmethod
    def _checked(row: Row, out: Any) -> dict:
        """What a row's function returned, refused unless a JSON dict with numeric "metrics"."""
        if not isinstance(out, dict) or not isinstance(out.get("metrics"), dict):
            raise TypeError(f"Row {row.name!r} must return a dict with a 'metrics' dict.")
        if not all(isinstance(v, (int, float)) for v in out["metrics"].values()):
            raise TypeError(f"Row {row.name!r} returned non-numeric metrics {out['metrics']}.")
        reserved = sorted(set(out) & set(BOOKKEEPING))
        if reserved:
            raise TypeError(f"Row {row.name!r} returned keys the runner writes: {reserved}.")
        try:
            return json.loads(json.dumps(out))
        except (TypeError, ValueError) as e:
            raise TypeError(f"Row {row.name!r} returned a result that is not JSON: {e}.") from None

    def results(self, config: dict | None = None) -> dict:
        """Every row finished with its current config, in the runner's order, in the shape of
        results.json: {"rows": {row: {"metrics", "seconds", ...}}, "config": config}; a row's
        other returned keys are kept but for "per_example" (see `record`)."""
        rows = {}
        for row in self.rows:
            record = self.record(row.name)
            if record is not None:
                extra = {k: v for k, v in record.items() if k not in BOOKKEEPING}
                extra.pop("per_example", None)
                rows[row.name] = {**extra, "seconds": record["seconds"]}
        return {"rows": rows, "config": dict(config or {})}

    def paired(self, row: str, seed: int = 0, resamples: int = RESAMPLES) -> dict[str, dict]:
        """{"<row>-<other>": {metric: {"delta", "ci95", "n"}}} against every other finished row,
        over the metrics both hold per example (`calm.recipes.bootstrap.paired_deltas`)."""
        self.select([row])
        mine = self.record(row)
        if mine is None or "per_example" not in mine:
            return {}
        out = {}
        for other in self.rows:
            theirs = self.record(other.name) if other.name != row else None
            if theirs is not None and "per_example" in theirs:
                deltas = paired_deltas(mine["per_example"], theirs["per_example"], seed, resamples)
                out[f"{row}-{other.name}"] = deltas
        return out


def parse_rows(text: str | None, choices: tuple[str, ...]) -> tuple[str, ...] | None:
    """`--rows calm,mB` as a tuple of row names (None: every row); the runner checks the names
    against its rows."""
    if text is None:
        return None
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise UserError(f"--rows names no row; choose from {', '.join(choices)}.")
    return names


def write_results(out: Path, results: dict, markdown, plot, started: float | None = None) -> None:
    """A recipe's results in `out`: results.json (atomically), results.md (`markdown(results)`)
    and results.png (`plot(results, path)`). Adds "samples" (each row's samples.jsonl),
    "lr_probe" (OUT/lr_probe/lr_probe.json, when a probe ran there) and, given the invocation's
    start time, "seconds_this_invocation"."""
    results["samples"] = {r: f"rows/{r}/samples.jsonl" for r in results["rows"]}
    probe = read_json(Path(out) / "lr_probe" / "lr_probe.json")
    if probe is not None:
        results["lr_probe"] = probe
    if started is not None:
        results["seconds_this_invocation"] = round(time.time() - started, 1)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))
    plot(results, out / "results.png")
