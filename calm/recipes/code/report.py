"""The report of a code run: Table 4 as markdown beside the paper's numbers, and a chart."""

from __future__ import annotations

from pathlib import Path

from calm.recipes.code.evaluation import METRICS

# Tables 4 and 5 of the paper (PaLM2 models; pass@1 as a fraction, code-to-text corpus chrF1 on
# CodeXGLUE Python); Table 5 gives only HumanEval and MBPP for vanilla mA, random mA and LoRA.
PAPER = {
    "mA": {"humaneval_pass1": 0.195, "mbpp_like_pass1": 0.280, "code_to_text_corpus_chrf1": 28.0},
    "mB": {"humaneval_pass1": 0.164, "mbpp_like_pass1": 0.286, "code_to_text_corpus_chrf1": 30.4},
    "calm": {
        "humaneval_pass1": 0.225,
        "mbpp_like_pass1": 0.322,
        "code_to_text_corpus_chrf1": 30.5,
    },
    "finetune": {
        "humaneval_pass1": 0.243,
        "mbpp_like_pass1": 0.430,
        "code_to_text_corpus_chrf1": 18.9,
    },
    "vanilla_mA": {"humaneval_pass1": 0.200, "mbpp_like_pass1": 0.280},
    "random_mA": {"humaneval_pass1": 0.201, "mbpp_like_pass1": 0.270},
    "lora": {"humaneval_pass1": 0.183, "mbpp_like_pass1": 0.287},
}
LABELS = {
    "humaneval_pass1": "HumanEval pass@1",
    "mbpp_like_pass1": "mbpp-like pass@1",
    "code_to_text_chrf": "code-to-text chrF",
    "code_bpb": "code bits/byte",
    "text_bpb": "text bits/byte",
}
PERCENT = ("humaneval_pass1", "mbpp_like_pass1")  # fractions, shown as percentages


def _cell(metric: str, value: float | None) -> str:
    if value is None:
        return ""
    return f"{100 * value:.1f}" if metric in PERCENT else f"{value:.3f}"


def _table(results: dict) -> list[str]:
    """One line a row: ours beside the paper's for the paper's three columns, then ours only."""
    lines = [
        "| row | HumanEval pass@1 % | paper | mbpp-like pass@1 % | paper (MBPP) | code-to-text "
        "chrF1 (corpus) | paper | code-to-text chrF (sentence mean) | code bpb | text bpb | "
        "seconds |",
        "|---" * 11 + "|",
    ]
    for name, row in results["rows"].items():
        m, paper = row["metrics"], results["paper"].get(name, {})
        cells = [
            _cell("humaneval_pass1", m.get("humaneval_pass1")),
            _cell("humaneval_pass1", paper.get("humaneval_pass1")),
            _cell("mbpp_like_pass1", m.get("mbpp_like_pass1")),
            _cell("mbpp_like_pass1", paper.get("mbpp_like_pass1")),
            f"{m['code_to_text_corpus_chrf1']:.1f}" if "code_to_text_corpus_chrf1" in m else "",
            f"{paper['code_to_text_corpus_chrf1']:.1f}"
            if "code_to_text_corpus_chrf1" in paper
            else "",
            f"{m['code_to_text_chrf']:.1f}" if "code_to_text_chrf" in m else "",
            _cell("code_bpb", m.get("code_bpb")),
            _cell("text_bpb", m.get("text_bpb")),
            f"{row['seconds']:.0f}",
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _paired(results: dict) -> list[str]:
    """CALM minus each row, per metric: the difference and its paired 95% interval."""
    if not results["paired"]:
        return ["No paired differences: the calm row has not run yet."]
    lines = ["| calm minus | " + " | ".join(LABELS[m] for m in METRICS) + " |"]
    lines.append("|---" * (1 + len(METRICS)) + "|")
    for key, deltas in results["paired"].items():
        cells = []
        for metric in METRICS:
            d = deltas.get(metric)
            scale = 100 if metric in PERCENT else 1
            digits = 1 if metric in PERCENT + ("code_to_text_chrf",) else 4
            cells.append(
                ""
                if d is None
                else f"{scale * d['delta']:+.{digits}f} [{scale * d['ci95'][0]:+.{digits}f}, "
                f"{scale * d['ci95'][1]:+.{digits}f}]"
            )
        lines.append(f"| {key.split('-', 1)[1]} | " + " | ".join(cells) + " |")
    return lines


def results_markdown(results: dict) -> str:
    """results.md: the table, the paired differences, and what the run was."""
    cfg, dc = results["config"], results["dc"]
    lora = results.get("lora", {})
    limits = ", ".join(f"{task} {n}" for task, n in results["limits"].items())
    lines = [
        f"# Code: CALM on pretrained models (seed {cfg['seed']})",
        "",
        *_table(results),
        "",
        "Differences in points (pass@1 in percentage points, chrF in chrF points, bits per byte "
        "as is; lower bits per byte is better), with paired bootstrap 95% intervals over the "
        "examples:",
        "",
        *_paired(results),
        "",
        f"Models: {', '.join(f'{k} = {v}' for k, v in results['models'].items())}.",
        f"D_C: {dc['records']} records ({dc['characters']} characters, {dc['anchor_tokens']} "
        f"anchor tokens at most {cfg['max_length']} each) from {dc['files']} train-side files; "
        f"every trained row: {cfg['steps']} steps of {cfg['batch_size']} records.",
        f"Examples scored per task (the same for every row): {limits}. Greedy decoding.",
    ]
    if lora:
        lines.append(
            f"LoRA rank {lora['rank']}: {lora['parameters']} trainable parameters; CALM "
            f"{lora['calm_parameters']}."
        )
    lines += [
        "",
        "The paper's numbers are PaLM2 models on HumanEval, MBPP and CodeXGLUE code-to-text "
        "(Python); mbpp-like and code-to-text here are stand-ins (docs/code.md).",
        "",
    ]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Top: each metric per row. Bottom: CALM minus each row with its 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, paired = results["rows"], results["paired"]
    panels = 2 if paired else 1
    fig, axes = plt.subplots(panels, len(METRICS), figsize=(3.0 * len(METRICS), 3.0 * panels))
    axes = axes.reshape(panels, len(METRICS))
    for j, metric in enumerate(METRICS):
        ax = axes[0, j]
        names = [n for n, r in rows.items() if metric in r["metrics"]]
        scale = 100 if metric in PERCENT else 1  # pass@1 in percent
        values = [scale * rows[n]["metrics"][metric] for n in names]
        bars = ax.bar(
            range(len(names)), values, color=["C3" if n == "calm" else "C0" for n in names]
        )
        ax.bar_label(bars, [f"{v:.3g}" for v in values], fontsize=6, padding=1)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
        ax.set_title(LABELS[metric] + (" (%)" if scale == 100 else ""), fontsize=9)
        if not paired:
            continue
        ax = axes[1, j]
        keys = [k for k, d in paired.items() if metric in d]
        deltas = [paired[k][metric] for k in keys]
        mid = [scale * d["delta"] for d in deltas]
        err = [
            [scale * max(0.0, d["delta"] - d["ci95"][0]) for d in deltas],
            [scale * max(0.0, d["ci95"][1] - d["delta"]) for d in deltas],
        ]
        ax.bar(range(len(keys)), mid, yerr=err, capsize=3, color="C2")
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(
            range(len(keys)),
            [k.split("-", 1)[1] for k in keys],
            rotation=45,
            ha="right",
            fontsize=7,
        )
        ax.set_title(f"calm minus row: {LABELS[metric]}", fontsize=8)
    fig.suptitle(f"CALM code experiment (seed {results['config']['seed']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
