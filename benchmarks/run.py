"""Benchmark CALM against its plain-torch bound and against calm-pytorch; write JSON and markdown.

    python -m benchmarks [--quick] [--out DIR] [--threads N] [--device cuda] [--dtype bfloat16]
                         [--configs mid,large]

Writes DIR/bench.json, DIR/bench.md and DIR/scaling.png (DIR/bench.partial.json after each config
until then, for a run cut short). `--configs` picks configs by name; scaling runs on the last
random-model config picked (none when only real checkpoints are picked: no scaling, no plot).
The real checkpoints run in the full mode only, when converted: "smollm2-135m-x2" (`REAL`) and
"gemma3-270m+qwen2.5-coder-0.5b" (`pair.REAL_PAIR`: two tokenizers, see benchmarks/pair.py).
Every ratio compares functions timed in the same run, interleaved rep by rep (see measure.py).
Nothing here asserts a timing. On a GPU (`--device cuda`) the configs are `GPU` below
(mid, and a large pair that fills the GPU better), each timed call ends with a device
synchronisation, and peak memory is the CUDA allocator's.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # calm-pytorch's sampler draws a progress bar

import torch  # noqa: E402

import calm  # noqa: E402
from benchmarks import measure, pair, peers, reference  # noqa: E402
from calm import CALM, CALMConfig, Connection, hf  # noqa: E402


@dataclass(frozen=True)
class Target:
    """Where the models run: a torch device and the dtype of both models and the blocks."""

    device: str = "cpu"
    dtype: str = "float32"

    @property
    def sync(self):
        return measure.synchronizer(self.device)

    def config(self, **kwargs) -> CALMConfig:
        return CALMConfig(dtype=self.dtype, **kwargs)


CPU = Target()


@dataclass(frozen=True)
class Setup:
    """One benchmark configuration: two random Llama models, a batch, a generation length."""

    name: str
    vocab: int
    anchor_width: int
    anchor_layers: int
    aug_width: int
    aug_layers: int
    heads: int
    batch: int
    seq: int
    prompt: int
    new_tokens: int
    reps: int
    checkpoint: str | None = None  # a tools/hub_offline.py model used as anchor and augment
    gen_reps: int | None = None  # generation reps against the bound (default 2 * reps // 3)

    @property
    def bound_reps(self) -> int:
        return self.gen_reps if self.gen_reps is not None else max(2, 2 * self.reps // 3)

    @property
    def lockstep_reps(self) -> int:
        return max(2, self.bound_reps // 2)


# gen_reps: generation reps against the bound. Single whole-call reps vary by +-15% on the
# 2-core VM here, so many; a small config's 64 tokens take ~0.3 s a call, mid's 256 ~3 s.
FULL = (
    Setup("small", 512, 64, 4, 48, 8, 4, 4, 64, 16, 64, 15, gen_reps=30),
    Setup("mid", 2048, 256, 8, 192, 8, 8, 4, 128, 16, 256, 9, gen_reps=10),
)
NO_PEER = "calm-pytorch is not installed (pip install calm-pytorch)"
QUICK = (Setup("small", 512, 64, 4, 48, 8, 4, 2, 32, 8, 8, 3),)
# SmolLM2-135M (30 layers, width 576) composed with a second copy of itself: the one real model
# here whose tokenizer another real model shares is itself. Run only when already converted.
REAL = Setup(
    "smollm2-135m-x2", 49152, 576, 30, 576, 30, 9, 1, 32, 16, 16, 15, "smollm2-135m", gen_reps=8
)
# On a GPU: mid as on CPU (small models: launch-bound), and a ~1.1B anchor (width 2048, 16 layers)
# with a ~0.2B augmenting model (width 1024, 12 layers) on batches of 8 x 512 tokens.
GPU = (
    Setup("mid", 2048, 256, 8, 192, 8, 8, 4, 128, 16, 256, 10, gen_reps=6),
    Setup("large", 32000, 2048, 16, 1024, 12, 16, 8, 512, 32, 64, 10, gen_reps=4),
)


def random_llama(s: Setup, width: int, layers: int, seed: int):
    """A random Llama of the setup's vocabulary and heads (4x-wide MLP, 2,048 positions)."""
    return hf.tiny_llama(
        s.vocab, width, layers, s.heads, intermediate_size=4 * width, max_positions=2048, seed=seed
    )


def models(s: Setup, target: Target = CPU):
    if s.checkpoint is not None:
        from transformers import AutoModelForCausalLM

        from tools import hub_offline

        path = hub_offline.model_dir(s.checkpoint)
        load = AutoModelForCausalLM.from_pretrained
        anchor, aug = load(path).eval(), load(path).eval()
    else:
        with torch.device(target.device):  # initialised where they run (faster on a GPU)
            anchor = random_llama(s, s.anchor_width, s.anchor_layers, seed=0)
            aug = random_llama(s, s.aug_width, s.aug_layers, seed=1)
    dtype = getattr(torch, target.dtype)
    return anchor.to(target.device, dtype), aug.to(target.device, dtype)


def real_available() -> bool:
    from tools import hub_offline

    return hub_offline.available(REAL.checkpoint)


def random_ids(s: Setup, batch: int, length: int, seed: int = 0, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, s.vocab, (batch, length), generator=g).to(device)


def calm_step(model: CALM, ids: torch.Tensor, aug_states=None):
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)

    def step() -> float:
        loss = model(ids, labels=ids, aug_states=aug_states).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def leaks(logits_fn, ids: torch.Tensor) -> bool:
    """True if the logits before the last position change when only the last token changes
    (exactly on CPU; on a GPU, whose kernels may round a row differently when others change, by
    more than 1e-3 of the logits' scale)."""
    other = ids.clone()
    other[:, -1] = (other[:, -1] + 1) % ids.max().item() + 3
    a, b = logits_fn(ids)[:, :-1].float(), logits_fn(other)[:, :-1].float()
    if ids.device.type == "cpu":
        return not torch.equal(a, b)
    return (a - b).abs().max().item() > 1e-3 * a.abs().max().item()


def train(s: Setup, anchor, aug, connections=None, target: Target = CPU) -> dict:
    """CALM step (norm=False: the reference's exact math; and the default config) vs reference."""
    config = target.config(norm=False, init="default", connections=connections)
    model = CALM(anchor, aug, config)
    default = CALM(anchor, aug, target.config(init="default", connections=connections))
    blocks = reference.blocks_like(model).to(target.device, getattr(torch, target.dtype))
    ref = reference.ReferenceStep(anchor, aug, model.connections, blocks)
    ids = random_ids(s, s.batch, s.seq, device=target.device)
    same_loss = abs(model(ids, labels=ids).loss.item() - ref.loss(ids).item())
    fns = {"calm": calm_step(model, ids), "reference": lambda: ref(ids)}
    fns["calm_default_config"] = calm_step(default, ids)
    t = measure.interleaved(fns, s.reps, sync=target.sync)
    return {
        "connections": len(model.connections),
        "calm_ms": 1e3 * measure.median(t["calm"]),
        "reference_ms": 1e3 * measure.median(t["reference"]),
        "calm_default_config_ms": 1e3 * measure.median(t["calm_default_config"]),
        "ratio": measure.paired_ratio(t["calm"], t["reference"]),
        "ratio_default_config": measure.paired_ratio(t["calm_default_config"], t["reference"]),
        "loss_abs_diff_vs_reference": same_loss,
        "_fns": fns,
    }


def section(s: Setup, with_peer: bool, target: Target = CPU) -> dict:
    """Every measurement of one config, in this order: training step and its peak memory against
    the reference, the augmenting-state cache, generation against its bound, causality, the peer."""
    anchor, aug = models(s, target)
    out: dict = {"setup": asdict(s)}
    tr = train(s, anchor, aug, target=target)
    fns = tr.pop("_fns")
    out["train"] = tr
    out["memory"] = memory(fns, target)
    model = CALM(anchor, aug, target.config(init="default"))
    ids = random_ids(s, s.batch, s.seq, device=target.device)
    out["aug_cache"] = aug_cache(s, model, ids, target)
    out["generate"] = generation(s, model, anchor, aug, target)
    out["causal"] = {"calm_leaks": leaks(lambda x: model(x).logits.detach(), ids)}
    if with_peer:
        out["peer_calm_pytorch"] = peer_section(s, anchor, aug, model.connections, target)
    return out


def memory(fns: dict, target: Target) -> dict:
    """Peak memory of one training step of CALM (both configs) against the reference's."""
    mem = {name: measure.peak_memory(fn, device=target.device) for name, fn in fns.items()}
    return {
        "calm_peak_bytes": mem["calm"],
        "reference_peak_bytes": mem["reference"],
        "calm_default_config_peak_bytes": mem["calm_default_config"],
        "ratio": mem["calm"] / mem["reference"],
        "ratio_default_config": mem["calm_default_config"] / mem["reference"],
    }


def aug_cache(s: Setup, model: CALM, ids: torch.Tensor, target: Target) -> dict:
    """A later epoch's training step with the augmenting states computed once, against without."""
    states = model.augment_states(ids)
    t = measure.interleaved(
        {"without": calm_step(model, ids), "with": calm_step(model, ids, states)},
        s.reps,
        sync=target.sync,
    )
    return {
        "step_ms_without": 1e3 * measure.median(t["without"]),
        "step_ms_with": 1e3 * measure.median(t["with"]),
        "speedup": measure.paired_ratio(t["without"], t["with"]),
    }


def generation(s: Setup, model: CALM, anchor, aug, target: Target) -> dict:
    """Generation with both caches against each model alone (the bound), whole calls timed in turn.

    Beside them, the two models alternated token by token with no blocks, which any composed
    decode must do: it splits CALM's gap into the cost of alternating and the blocks' own work.
    Then token by token (Lockstep), and against full recomputation (few reps: slow, large speedup).
    """
    sync = target.sync
    prompt = random_ids(s, 1, s.prompt, seed=1, device=target.device)
    n = s.new_tokens
    results = {}

    def run(name, fn):
        def call():
            results[name] = fn()

        return call

    calm_gen = run("calm", lambda: model.generate(prompt, max_new_tokens=n, eos_token_id=[]))
    t = measure.interleaved(
        {
            "anchor": lambda: reference.greedy_cached(anchor, prompt, n),
            "aug": lambda: reference.greedy_cached(aug, prompt, n),
            "alternated": lambda: reference.alternated_greedy(anchor, aug, prompt, n),
            "calm": calm_gen,
        },
        s.bound_reps,
        sync=sync,
    )
    alone = [a + b for a, b in zip(t["anchor"], t["aug"], strict=True)]

    def lockstep(generate) -> dict[str, float]:
        """Seconds per call of `generate` and of each model's own loop, timed token by token."""
        loops = {
            "anchor": reference.greedy_steps(anchor, prompt, n),
            "aug": reference.greedy_steps(aug, prompt, n),
        }
        timer = reference.Lockstep(loops, sync=sync)
        timer.start()
        generate(prompt, max_new_tokens=n, eos_token_id=[], streamer=timer)
        return {name: sum(ts) for name, ts in timer.times.items()}

    def lockstep_ratio(generate, reps: int) -> float:
        lockstep(generate)  # warm-up
        per_rep = [lockstep(generate) for _ in range(reps)]
        return measure.median([(r["anchor"] + r["aug"]) / r["calm"] for r in per_rep])

    r = measure.interleaved(
        {
            "calm": calm_gen,
            "recompute": run("recompute", lambda: reference.greedy_recompute(model, prompt, n)),
        },
        max(2, s.reps // 3),
        sync=sync,
    )
    tps = {k: n / measure.median(v) for k, v in t.items()}
    return {
        "new_tokens": n,
        "reps": s.bound_reps,
        "tps_anchor": tps["anchor"],
        "tps_aug": tps["aug"],
        "tps_bound": 1 / (1 / tps["anchor"] + 1 / tps["aug"]),
        "tps_alternated": tps["alternated"],
        "tps_calm": tps["calm"],
        "tps_recompute": n / measure.median(r["recompute"]),
        # per rep: (anchor alone + aug alone) / CALM, measured next to each other; the median
        "ratio_to_bound": measure.paired_ratio(alone, t["calm"]),
        # the same for the two models alternated with no blocks, and CALM against those
        "alternated_to_bound": measure.paired_ratio(alone, t["alternated"]),
        "ratio_to_alternated": measure.paired_ratio(t["alternated"], t["calm"]),
        # token by token: each model's own loop advanced one token after each CALM token, so
        # its steps run alternated too; the control puts the alternated models in CALM's place
        "ratio_to_bound_lockstep": lockstep_ratio(model.generate, s.lockstep_reps),
        "lockstep_control_ratio": lockstep_ratio(
            lambda *a, **k: reference.alternated_greedy(anchor, aug, *a, **k),
            max(2, s.lockstep_reps // 3),
        ),
        "speedup_vs_recompute": measure.paired_ratio(r["recompute"], r["calm"]),
        "cached_matches_recompute": torch.equal(results["calm"], results["recompute"]),
    }


def peer_section(s: Setup, anchor, aug, connections, target: Target) -> dict:
    """calm-pytorch on copies of the same models (its hooks stay on the models it wraps)."""
    peer = peers.build(copy.deepcopy(anchor), copy.deepcopy(aug), connections)
    peer.to(getattr(torch, target.dtype))
    ids = random_ids(s, s.batch, s.seq)
    model = CALM(anchor, aug, target.config(init="default", connections=connections))
    fns = {"calm": calm_step(model, ids), "peer": peers.step_fn(peer, ids)}
    t = measure.interleaved(fns, s.reps)
    mem_calm = measure.peak_memory(fns["calm"])
    mem_peer = measure.peak_memory(fns["peer"])
    prompt = random_ids(s, 1, s.prompt, seed=1)
    n = s.new_tokens
    g = measure.interleaved(
        {
            "calm": lambda: model.generate(prompt, max_new_tokens=n, eos_token_id=[]),
            "peer": lambda: peers.generate(peer, prompt, n),
        },
        max(1, s.reps // 3),
    )
    peers.randomize(peer)
    return {
        "version": peers.version(),
        "step_ms": 1e3 * measure.median(t["peer"]),
        "calm_step_ms": 1e3 * measure.median(t["calm"]),
        "step_ratio_peer_over_calm": measure.paired_ratio(t["peer"], t["calm"]),
        "peak_bytes": mem_peer,
        "calm_peak_bytes": mem_calm,
        "tps": n / measure.median(g["peer"]),
        "calm_tps": n / measure.median(g["calm"]),
        "leaks": leaks(lambda x: peers.logits(peer, x), ids),
        "cached_matches_recompute": None,
        "notes": (
            "no KV cache: generate re-runs the whole anchor each step, and the augmenting model "
            "reads only the prompt (the paper's 'mA as encoder' ablation); its forward hooks "
            "stay on the models it wraps (they fail when run alone afterwards), so it runs on "
            "copies; default config (pre-RMSNorm, gated value heads) vs our default config"
        ),
    }


def scaling(s: Setup, lengths, counts, target: Target = CPU) -> dict:
    """Step time of CALM and the reference against sequence length and number of connections."""
    anchor, aug = models(s, target)
    rows = []
    for seq in lengths:
        r = train(Setup(**{**asdict(s), "seq": seq}), anchor, aug, target=target)
        r.pop("_fns")
        rows.append({"seq": seq, **r})
    by_length = rows
    rows = []
    n_anchor, n_aug = s.anchor_layers, s.aug_layers
    for n in counts:
        conns = tuple(
            Connection(round((k + 1) * n_anchor / n) - 1, round((k + 1) * n_aug / n) - 1)
            for k in range(n)
        )
        r = train(s, anchor, aug, conns, target)
        r.pop("_fns")
        rows.append({"n_connections": n, **r})
    return {"by_seq": by_length, "by_connections": rows}


def plot(sc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, rows, key, label in (
        (axes[0], sc["by_seq"], "seq", "sequence length"),
        (axes[1], sc["by_connections"], "n_connections", "connections"),
    ):
        x = [r[key] for r in rows]
        for col, name in (("calm_ms", "CALM"), ("reference_ms", "plain-torch reference")):
            ax.plot(x, [r[col] for r in rows], marker="o", label=name)
        ax.set_xlabel(label)
        ax.set_ylabel("training step (ms)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def markdown(report: dict) -> str:
    lines = [
        f"# calm benchmarks ({report['mode']})",
        "",
        f"{report['machine']}; {report['device']}, {report['dtype']}; "
        f"torch {report['torch']}, {report['threads']} thread(s); "
        f"load average at start {report['load_at_start']}, at end {report['load_at_end']}.",
    ]
    same = {name: c for name, c in report["configs"].items() if c.get("kind") is None}
    if same:
        lines += one_tokenizer_rows(same, report["peer_note"])
    lines += pair.markdown_rows(report["configs"])
    if "tokenizer_pair_note" in report:
        lines += ["", report["tokenizer_pair_note"] + "."]
    sc = report.get("scaling")
    if sc is None:
        return "\n".join(lines) + "\n"
    lines += ["", f"## Scaling ({sc['config']} config)", "", "| seq | CALM ms | ref ms | ratio |"]
    lines.append("|---|---|---|---|")
    for r in sc["by_seq"]:
        lines.append(
            f"| {r['seq']} | {r['calm_ms']:.1f} | {r['reference_ms']:.1f} | {r['ratio']:.3f} |"
        )
    lines += ["", "| connections | CALM ms | ref ms | ratio |", "|---|---|---|---|"]
    for r in sc["by_connections"]:
        lines.append(
            f"| {r['n_connections']} | {r['calm_ms']:.1f} | {r['reference_ms']:.1f} | "
            f"{r['ratio']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def one_tokenizer_rows(configs: dict, peer_note: str) -> list[str]:
    """The tables of the configs whose two models share a tokenizer: ours, then the peer's."""
    lines = [
        "",
        "| config | step / ref | step / ref (default cfg) | peak mem / ref | gen / bound | "
        "alternated / bound | gen / alternated | gen / bound (token by token; control) | "
        "gen speedup vs recompute | aug-cache speedup | cached == recompute | leaks |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, c in configs.items():
        g = c["generate"]
        lines.append(
            f"| {name} | {c['train']['ratio']:.3f} | {c['train']['ratio_default_config']:.3f} | "
            f"{c['memory']['ratio']:.3f} | {g['ratio_to_bound']:.3f} | "
            f"{g['alternated_to_bound']:.3f} | {g['ratio_to_alternated']:.3f} | "
            f"{g['ratio_to_bound_lockstep']:.3f}; {g['lockstep_control_ratio']:.3f} | "
            f"{g['speedup_vs_recompute']:.2f} ({g['new_tokens']} tokens) | "
            f"{c['aug_cache']['speedup']:.2f} | {g['cached_matches_recompute']} | "
            f"{c['causal']['calm_leaks']} |"
        )
    lines += [
        "",
        "## Peer: calm-pytorch",
        "",
        "| config | step: peer / ours | peak mem: peer / ours | gen tok/s: ours, peer | "
        "peer leaks | peer cached == recompute |",
        "|---|---|---|---|---|---|",
    ]
    for name, c in configs.items():
        p = c.get("peer_calm_pytorch")
        if p is None:
            note = peer_note or "not run on this config (time)"
            lines.append(f"| {name} | skipped: {note} | | | | |")
            continue
        lines.append(
            f"| {name} | {p['step_ratio_peer_over_calm']:.2f} | "
            f"{p['peak_bytes'] / p['calm_peak_bytes']:.2f} | "
            f"{p['calm_tps']:.1f}, {p['tps']:.1f} | {p['leaks']} | no cache |"
        )
    return lines


def headline(report: dict, setups) -> None:
    """The top-level numbers: mid's, else the last random-model config's, else the first config
    run (a real one: it has no memory, recompute or aug-cache numbers when it is the pair)."""
    configs = report["configs"]
    if not configs:
        return
    head = "mid" if "mid" in configs else setups[-1].name if setups else next(iter(configs))
    c = report["configs"][head]
    report["headline_config"] = head
    report["train_step_ratio"] = c["train"]["ratio"]
    report["generate_ratio"] = c["generate"]["ratio_to_bound"]
    if "memory" in c:
        report["peak_memory_ratio"] = c["memory"]["ratio"]
        report["generate_speedup_vs_recompute"] = c["generate"]["speedup_vs_recompute"]
        report["aug_cache_speedup"] = c["aug_cache"]["speedup"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few reps (CI)")
    parser.add_argument("--out", default="bench_out", help="output directory")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the GPU configs)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--configs", help="comma-separated config names to run (default: all)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    target = Target(args.device, args.dtype)
    gpu = torch.device(args.device).type == "cuda"
    if gpu and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch.")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    setups = QUICK if args.quick else GPU if gpu else FULL
    real = [REAL.name, pair.REAL_PAIR.name]  # real checkpoints: full mode only, when converted
    names = args.configs.split(",") if args.configs else [s.name for s in setups] + real
    if args.configs:
        unknown = set(names) - {s.name for s in setups} - set(real)
        if unknown:
            parser.error(
                f"--configs: no config {sorted(unknown)} here; choose from "
                f"{[s.name for s in setups] + real}."
            )
        setups = tuple(s for s in setups if s.name in names)
    with_peer = peers.available() and not gpu  # calm-pytorch's comparison is CPU-only here
    machine = f"{platform.machine()} {os.cpu_count()} CPUs"
    if gpu:
        machine += ", " + torch.cuda.get_device_name(torch.device(args.device))
    report: dict = {
        "mode": "quick" if args.quick else "full",
        "calm_version": calm.__version__,
        "torch": torch.__version__,
        "machine": machine,
        "device": args.device,
        "dtype": args.dtype,
        "threads": args.threads,
        "load_at_start": [round(x, 2) for x in os.getloadavg()],
        "peer_note": "" if with_peer else "not run on a GPU" if gpu else NO_PEER,
        "configs": {},
    }
    for s in setups:
        report["configs"][s.name] = section(s, with_peer, target)
        (out / "bench.partial.json").write_text(json.dumps(report, indent=2))  # if cut off
    if not args.quick and REAL.name in names and real_available():
        report["configs"][REAL.name] = section(REAL, with_peer=False, target=target)
    else:
        report["real_pair_note"] = "skipped: quick mode, or SmolLM2-135M not converted (" + (
            "python tools/hub_offline.py model smollm2-135m)"
        )
    tokenizer_pair = pair.REAL_PAIR
    if not args.quick and tokenizer_pair.name in names and pair.available(tokenizer_pair):
        anchor, aug, tokenizers = pair.load(tokenizer_pair, target)
        section_ = pair.section(tokenizer_pair, anchor, aug, tokenizers, target)
        report["configs"][tokenizer_pair.name] = section_
        del anchor, aug
        (out / "bench.partial.json").write_text(json.dumps(report, indent=2))
    else:
        why = (
            "quick mode"
            if args.quick
            else "not picked"
            if tokenizer_pair.name not in names
            else f"not converted ({pair.convert_command(tokenizer_pair)})"
        )
        report["tokenizer_pair_note"] = f"{tokenizer_pair.name} skipped: {why}"
    if setups:
        last = setups[-1]  # the largest config: scaling is measured on it
        lengths = (16, 32) if args.quick else (128, 256, 512, 1024) if gpu else (32, 64, 128, 256)
        counts = (1, 2) if args.quick else (1, 2, 4, 8)
        report["scaling"] = {"config": last.name, **scaling(last, lengths, counts, target)}
    report["load_at_end"] = [round(x, 2) for x in os.getloadavg()]
    headline(report, setups)
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    (out / "bench.partial.json").unlink(missing_ok=True)
    (out / "bench.md").write_text(markdown(report))
    if "scaling" in report:
        plot(report["scaling"], out / "scaling.png")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
