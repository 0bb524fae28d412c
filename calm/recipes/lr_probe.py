"""Choosing a recipe's learning rates: each trained row at each rate, trained and not scored.

A probe of row R at rate r is a row of its own (`R-lr<r>`) in OUT/lr_probe, run by a `Runner`
(read back when finished, resumed when interrupted): it trains R exactly as R would train, with
R's config but its "lr", and its result is its loss curve. The criterion is the mean training
loss over the last `PROBE_WINDOW` steps: when every record is drawn once (the recipes' D_C holds
at least steps x batch records), each step's loss is measured before the model trains on its
batch, a progressive validation on the train split that reads no dev or test example.

    report = run_probe("runs/lrl", rows, ["calm_paper"], (3e-4, 1e-3))
    report["calm_paper"]["best_lr"]     # the rate with the lowest last-window loss
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from calm.checkpoint import atomic_write_text
from calm.errors import UserError
from calm.recipes.runner import Row, RowContext, Runner, read_json

PROBE_WINDOW = 10  # steps averaged at each end of a probe's loss curve


def loss_curve(train_dir: Path) -> list[float]:
    """The training loss of each step in a `calm.train` run directory's metrics.jsonl (the
    last line logged for a step wins: a resumed run logs the steps after its checkpoint again)."""
    losses: dict[int, float] = {}
    path = Path(train_dir) / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else ():
        entry = json.loads(line)
        if "loss" in entry and "step" in entry:
            losses[int(entry["step"])] = float(entry["loss"])
    return [losses[step] for step in sorted(losses)]


def trained_only(ctx: RowContext, trained: dict) -> dict:
    """A probe row's result: the mean training loss over the first and the last `PROBE_WINDOW`
    steps (each batch's loss before its update: on records the model has not trained on while
    every record is drawn once), and the last step's."""
    curve = loss_curve(ctx.train_dir)
    if not curve:
        raise RuntimeError(f"{ctx.train_dir} holds no training loss.")
    window = min(PROBE_WINDOW, len(curve))
    metrics = {
        "loss_first": sum(curve[:window]) / window,
        "loss_last": sum(curve[-window:]) / window,
        "loss_final": curve[-1],
    }
    return {"metrics": metrics, "train": trained, "loss": curve}


def probe_rows(rows: Iterable[Row], learning_rates: Iterable[float]) -> list[Row]:
    """For each row, one row per learning rate that only trains it: named `<row>-lr<lr>`, keyed
    by the row's config with its "lr" replaced. A row that does not train is refused."""
    probes = []
    for row in rows:
        if row.train_only is None:
            raise UserError(
                f"Row {row.name} does not train; a learning-rate probe needs rows that do."
            )
        for lr in learning_rates:
            config = {**row.config, "lr": lr, "probe": "training loss only"}
            probes.append(Row(f"{row.name}-lr{lr:g}", config, row.train_only(lr)))
    return probes


def run_probe(
    out_dir: str | os.PathLike,
    rows: Iterable[Row],
    names: Iterable[str],
    learning_rates: Iterable[float],
    log: Callable[[str], None] | None = None,
) -> dict:
    """Train the rows named (each must train) at each learning rate, without scoring, in
    OUT/lr_probe (a runner of `probe_rows`: finished probes are read back, an interrupted one
    resumes); write lr_probe.json and lr_probe.md there (keeping the entries of rows probed
    by earlier invocations) and return that report (`probe_report`'s shape)."""
    names, rates = list(names), list(learning_rates)
    known = {row.name: row for row in rows}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UserError(f"Unknown rows {', '.join(unknown)}; choose from {', '.join(known)}.")
    out = Path(out_dir) / "lr_probe"
    runner = Runner(out, probe_rows([known[n] for n in names], rates), log=log)
    runner.run()
    report = probe_report(runner.results(), names, rates)
    report = {**(read_json(out / "lr_probe.json") or {}), **report}  # rows probed earlier stay
    atomic_write_text(out / "lr_probe.json", json.dumps(report, indent=2) + "\n")
    (out / "lr_probe.md").write_text(probe_markdown(report))
    return report


def parse_learning_rates(text: str) -> tuple[float, ...]:
    """`--lr-probe 3e-4,1e-3` as a tuple of positive floats."""
    try:
        rates = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"--lr-probe takes comma-separated learning rates, got {text!r}.") from None
    if not rates or min(rates) <= 0:
        raise UserError(f"--lr-probe takes positive learning rates, got {text!r}.")
    return rates


def probe_report(results: dict, rows: Iterable[str], learning_rates: Iterable[float]) -> dict:
    """Per probed row, each learning rate's losses and the one with the lowest `loss_last`."""
    report = {}
    for name in rows:
        runs = {
            lr: results["rows"][f"{name}-lr{lr:g}"]
            for lr in learning_rates
            if f"{name}-lr{lr:g}" in results["rows"]
        }
        if runs:
            best = min(runs, key=lambda lr: runs[lr]["metrics"]["loss_last"])
            per_lr = {
                f"{lr:g}": {**r["metrics"], "seconds": r["seconds"]} for lr, r in runs.items()
            }
            report[name] = {"best_lr": best, "learning_rates": per_lr}
    return report


def probe_markdown(report: dict) -> str:
    lines = [
        "# Learning-rate probe",
        "",
        f"Mean training loss over the first and the last {PROBE_WINDOW} steps (each batch before "
        "its update), and the last step's; the lowest last-window loss is marked.",
        "",
        "| row | lr | loss first | loss last | loss final | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for name, entry in report.items():
        for lr, m in entry["learning_rates"].items():
            mark = " **best**" if float(lr) == entry["best_lr"] else ""
            lines.append(
                f"| {name} | {lr}{mark} | {m['loss_first']:.4f} | {m['loss_last']:.4f} | "
                f"{m['loss_final']:.4f} | {m['seconds']:.0f} |"
            )
    return "\n".join(lines) + "\n"
