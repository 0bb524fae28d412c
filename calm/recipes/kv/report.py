"""The report of a key-value run: Table 1 as markdown beside the paper's numbers, and a chart."""

from __future__ import annotations

from pathlib import Path

from calm.tasks.kv import DATA_SETS

# Table 1 and Table 5 of the paper (accuracy as a fraction); Table 5 has no key-value rows.
PAPER = {
    "mA": {"kv_subs": 0.981, "num_math": 0.042, "kv_math": 0.007},
    "mB": {"kv_subs": 0.0, "num_math": 0.737, "kv_math": 0.0},
    "calm": {"kv_subs": 0.929, "num_math": 0.720, "kv_math": 0.843},
}


def results_markdown(results: dict) -> str:
    """Table 1 shaped: rows are models, columns are data sets, paper numbers beside ours."""
    names = {"kv_subs": "KV-SUBS", "num_math": "NUM-MATH", "kv_math": "KV-MATH"}
    head = "| row | " + " | ".join(f"{names[t]} ours | {names[t]} paper" for t in DATA_SETS)
    lines = [
        f"# Key-value arithmetic (seed {results['seed']}, D_C variant `{results['variant']}`)",
        "",
        head + " | seconds |",
        "|---" * (2 + 2 * len(DATA_SETS)) + "|",
    ]
    for name, row in results["rows"].items():
        paper = results["paper"].get(name, {})
        cells = []
        for t in DATA_SETS:
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
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(DATA_SETS))]
        values = [100 * row[t] for t in DATA_SETS]
        bars = ax.bar(xs, values, width, label=name)
        ax.bar_label(bars, [f"{v:.0f}" for v in values], fontsize=6, padding=1)
        paper = results["paper"].get(name, {})
        for x, t in zip(xs, DATA_SETS):  # the paper's number for this row, as a black tick
            if t in paper:
                ax.plot([x - width / 2, x + width / 2], [100 * paper[t]] * 2, color="black", lw=1.5)
    ax.plot([], [], color="black", lw=1.5, label="paper")
    ax.set_xticks(range(len(DATA_SETS)), ["KV-SUBS", "NUM-MATH", "KV-MATH"])
    ax.set_ylabel("accuracy on held-out keys (%)")
    ax.set_ylim(0, 108)
    ax.set_title(f"CALM key-value arithmetic (D_C: {results['variant']}, seed {results['seed']})")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
