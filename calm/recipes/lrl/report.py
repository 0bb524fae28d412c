"""The report of an lrl run: the table beside the paper's Tables 2 and 5, and a chart."""

from __future__ import annotations

from pathlib import Path

from calm.recipes.lrl.evaluation import metric_names

# The paper's FLORES-200 XX->En 5-shot chrF1 (PaLM2 models), by our row names: Table 2 is the
# mean of 10 low-resource languages (its skyline is mB trained on the whole NTL corpus, ours mB
# trained on D_C); Table 5 the mean of all 192 (no mA or mB column there).
PAPER = {
    "table2": {"mA": 37.2, "mB": 41.7, "calm_paper": 46.1, "finetune": 48.2},
    "table5": {
        "finetune": 62.1,
        "calm_paper": 60.5,
        "vanilla_mA": 59.2,
        "random_mA": 58.8,
        "lora_paper": 59.2,
    },
}


def _label(metric: str) -> str:
    if metric.endswith("_chrf1"):
        return f"{metric[: -len('_chrf1')].replace('_', '-')} chrF1"
    if metric.endswith("_chrf"):
        return f"{metric[: -len('_chrf')].replace('_', '-')} chrF"
    return f"{metric[: -len('_bpb')]} bits/byte"


def _value(metric: str, value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.3f}" if metric.endswith("_bpb") else f"{value:.1f}"


def _table(results: dict) -> list[str]:
    """One line a row: the paper's chrF1, our corpus chrF1 per language, then every metric."""
    variants = [v.replace("-", "_") for v in results["languages"]]
    metrics = metric_names(tuple(results["languages"]))
    corpus = [f"{v} chrF1 (corpus)" for v in results["languages"]]
    header = ["row", "paper T2", "paper T5", *corpus, *map(_label, metrics), "seconds"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    paper = results["paper"]
    for name, row in results["rows"].items():
        m = row["metrics"]
        cells = [
            _value("chrf", paper["table2"].get(name)),
            _value("chrf", paper["table5"].get(name)),
            *(_value("chrf", m.get(f"{v}_corpus_chrf1")) for v in variants),
            *(_value(k, m.get(k)) for k in metrics),
            f"{row['seconds']:.0f}",
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _paired(results: dict) -> list[str]:
    """calm_* minus each row, per metric: the difference and its paired 95% interval."""
    if not results["paired"]:
        return ["No paired differences: no calm row has run yet."]
    metrics = metric_names(tuple(results["languages"]))
    lines = ["| difference | " + " | ".join(map(_label, metrics)) + " |"]
    lines.append("|---" * (1 + len(metrics)) + "|")
    for key, deltas in results["paired"].items():
        cells = []
        for metric in metrics:
            d, digits = deltas.get(metric), 4 if metric.endswith("_bpb") else 1
            cells.append(
                ""
                if d is None
                else f"{d['delta']:+.{digits}f} [{d['ci95'][0]:+.{digits}f}, "
                f"{d['ci95'][1]:+.{digits}f}]"
            )
        lines.append(f"| {key.replace('-', ' minus ', 1)} | " + " | ".join(cells) + " |")
    return lines


def _build(results: dict) -> list[str]:
    """mA's build: its corpus and training, and its bits per byte before and after."""
    built = results.get("mA_build")
    if built is None:
        return ["mA has not been built in this directory (no row that needs it has run)."]
    m, train = built["metrics"], built["train"]
    langs = [v.split("-")[0] for v in results["languages"]]
    per = ", ".join(f"{s} {m[s + '_bpb_before']:.3f} -> {m[s + '_bpb_after']:.3f}" for s in langs)
    sizes = ", ".join(
        f"{v} {c['records']} pieces ({c['characters']} characters)"
        for v, c in built["corpus"]["languages"].items()
    )
    return [
        f"mA: {results['models']['mA']}, {train['steps']} steps on {sizes} "
        f"({built['seconds']:.0f} s); held-out bits per byte before -> after: {per}."
    ]


def results_markdown(results: dict) -> str:
    """results.md: the table, the paired differences, mA's build and what the run was."""
    cfg = results["config"]
    examples = ", ".join(f"{task} {n}" for task, n in results["limits"].items())
    dc = "; ".join(
        f"`{name}` {d['records']} records ({d['characters']} characters: low-resource "
        f"{d['low_resource']}, high-resource {d['high_resource']}, parallel {d['parallel']})"
        for name, d in results["dc"].items()
    )
    lora = results.get("lora")
    lines = [
        f"# Low-resource languages: CALM on pretrained models (seed {cfg['seed']})",
        "",
        *_table(results),
        "",
        "chrF and chrF1 are means of sentence-level scores (0-100), the corpus chrF1 is the "
        "paper's measure; the paper's columns are FLORES-200 means over 10 (T2) and 192 (T5) "
        "languages on PaLM2 models, not these languages. Differences (chrF points; bits per "
        "byte, lower is better) with paired bootstrap 95% intervals over the examples:",
        "",
        *_paired(results),
        "",
        f"Models: {', '.join(f'{k} = {v}' for k, v in results['models'].items())}.",
        *_build(results),
        f"D_C: {dc}; every trained row: {cfg['steps']} steps of {cfg['batch_size']} records.",
        f"Examples scored per task (the same for every row): {examples}. Greedy decoding, 5 shots.",
    ]
    if lora:
        lines.append(
            f"LoRA rank {lora['rank']}: {lora['parameters']} trainable parameters; CALM "
            f"{lora['calm_parameters']}."
        )
    return "\n".join([*lines, ""])


def plot(results: dict, path: Path) -> None:
    """Top: each metric per row. Bottom: calm_paper minus each row with its 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, metrics = results["rows"], metric_names(tuple(results["languages"]))
    paired = {k: d for k, d in results["paired"].items() if k.startswith("calm_paper-")}
    panels = 2 if paired else 1
    fig, axes = plt.subplots(panels, len(metrics), figsize=(3.0 * len(metrics), 3.2 * panels))
    axes = axes.reshape(panels, len(metrics))
    for j, metric in enumerate(metrics):
        ax = axes[0, j]
        names = [n for n, r in rows.items() if metric in r["metrics"]]
        values = [rows[n]["metrics"][metric] for n in names]
        colors = ["C3" if n.startswith("calm_") else "C0" for n in names]
        bars = ax.bar(range(len(names)), values, color=colors)
        ax.bar_label(bars, [f"{v:.3g}" for v in values], fontsize=6, padding=1)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
        ax.set_title(_label(metric), fontsize=9)
        if not paired:
            continue
        ax = axes[1, j]
        keys = [k for k, d in paired.items() if metric in d]
        deltas = [paired[k][metric] for k in keys]
        err = [
            [max(0.0, d["delta"] - d["ci95"][0]) for d in deltas],
            [max(0.0, d["ci95"][1] - d["delta"]) for d in deltas],
        ]
        ax.bar(range(len(keys)), [d["delta"] for d in deltas], yerr=err, capsize=3, color="C2")
        ax.axhline(0, color="black", lw=0.8)
        labels = [k.split("-", 1)[1] for k in keys]
        ax.set_xticks(range(len(keys)), labels, rotation=45, ha="right", fontsize=7)
        ax.set_title(f"calm_paper minus row: {_label(metric)}", fontsize=8)
    fig.suptitle(f"CALM low-resource languages (seed {results['config']['seed']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
