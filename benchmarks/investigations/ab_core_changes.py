"""Same-process A/Bs of changes to the core, each side timed interleaved with the other.

    python -m benchmarks.investigations.ab_core_changes OUT.json           # no-padding fast paths
    python -m benchmarks.investigations.ab_core_changes --base C OUT.json  # core at commit C vs now

Fast paths (commits 320fa0d, 92ee96f): the current core, and the same core with the replaced
functions restored (the cross-attention mask always built; attention_mask/position_ids always
passed to the base models).

--base: calm/{hf,generation,cross_attention,model}.py as of COMMIT (read with `git show`) loaded
as a second package next to the working tree's, both on the same base models with the same block
weights, timed together with the plain-torch reference and the two models' own cached greedy
loops, so each side's ratio to the bound comes from the same run. Checks first that both sides
give the same loss and generate the same tokens.
"""

import argparse
import functools
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import torch

from benchmarks import measure, reference, run
from calm import CALM, CALMConfig, hf
from calm.cross_attention import attention_mask as build_mask

ROOT = Path(__file__).resolve().parents[2]
CORE = ("hf", "generation", "cross_attention", "model")  # in import order

new_mask_kwargs, new_masks = hf.mask_kwargs, CALM._masks


def old_mask_kwargs(m, past, padded=None):
    return {"attention_mask": m, "position_ids": hf.position_ids(m, past)}


def old_masks(self, key_masks, query_mask, past_length, visible=None, padded=None):
    query_valid = query_mask[:, past_length:].bool()
    offset = past_length if self.calm_config.mode == "causal" else None
    built, out = {}, []
    for k in key_masks:
        if id(k) not in built:
            built[id(k)] = build_mask(k.bool(), query_valid, offset)
        out.append(built[id(k)])
    return out


def variant(old, fn):
    def call():
        hf.mask_kwargs, CALM._masks = (
            (old_mask_kwargs, old_masks) if old else (new_mask_kwargs, new_masks)
        )
        try:
            return fn()
        finally:
            hf.mask_kwargs, CALM._masks = new_mask_kwargs, new_masks

    return call


def compare(s: run.Setup, reps: int, n: int) -> dict:
    a, g = run.models(s)
    m = CALM(a, g, CALMConfig(init="default"))
    ids = run.random_ids(s, s.batch, s.seq)
    step = run.calm_step(m, ids)
    prompt = run.random_ids(s, 1, s.prompt, seed=1)

    def gen():
        return m.generate(prompt, max_new_tokens=n, eos_token_id=[])

    if not torch.equal(variant(True, gen)(), variant(False, gen)()):
        raise RuntimeError("the old and new paths generate different tokens")
    t = measure.interleaved(
        {
            "step_old": variant(True, step),
            "step_new": variant(False, step),
            "gen_old": variant(True, gen),
            "gen_new": variant(False, gen),
        },
        reps,
    )
    return {
        "step_ms_old": 1e3 * measure.median(t["step_old"]),
        "step_ms_new": 1e3 * measure.median(t["step_new"]),
        "step_speedup": measure.paired_ratio(t["step_old"], t["step_new"]),
        "gen_tps_old": n / measure.median(t["gen_old"]),
        "gen_tps_new": n / measure.median(t["gen_new"]),
        "gen_speedup": measure.paired_ratio(t["gen_old"], t["gen_new"]),
        "mem_old": measure.peak_memory(variant(True, step)),
        "mem_new": measure.peak_memory(variant(False, step)),
    }


def core_at(commit: str) -> types.ModuleType:
    """The core modules as of `commit`, as a package `calm_at_<commit>` (the rest is shared)."""
    name = f"calm_at_{commit}"
    package = types.ModuleType(name)
    package.__path__ = []
    sys.modules[name] = package
    for mod in CORE:
        src = subprocess.run(
            ["git", "show", f"{commit}:calm/{mod}.py"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for dep in CORE:
            src = src.replace(f"from calm.{dep} import", f"from {name}.{dep} import")
            src = src.replace(f"from calm import {dep}\n", f"from {name} import {dep}\n")
        module = types.ModuleType(f"{name}.{mod}")
        sys.modules[module.__name__] = module
        exec(compile(src, f"{commit}:calm/{mod}.py", "exec"), module.__dict__)
        setattr(package, mod, module)
    return package


def against(base: types.ModuleType, s: run.Setup, reps: int, n: int) -> dict:
    """Training step and generation of the core at `base` and now, with their bounds."""
    anchor, aug = run.models(s)
    ids = run.random_ids(s, s.batch, s.seq)
    out = {"new_tokens": n}
    # Training: the headline config (the reference's exact math) and the default config.
    fns = {}
    for label, config in (
        ("", CALMConfig(norm=False, init="default")),
        ("default_", CALMConfig(init="default")),
    ):
        new = CALM(anchor, aug, config)
        old = base.model.CALM(anchor, aug, config)
        old.blocks.load_state_dict(new.blocks.state_dict())
        loss_new, loss_old = new(ids, labels=ids).loss, old(ids, labels=ids).loss
        if not torch.equal(loss_new, loss_old):
            raise RuntimeError(f"{label}config: the two cores give different losses")
        fns[f"{label}old"] = run.calm_step(old, ids)
        fns[f"{label}new"] = run.calm_step(new, ids)
        if not label:
            ref = reference.ReferenceStep(anchor, aug, new.connections, reference.blocks_like(new))
            fns["reference"] = functools.partial(ref, ids)
    t = measure.interleaved(fns, reps)
    for key in ("old", "new", "default_old", "default_new"):
        out[f"step_ms_{key}"] = 1e3 * measure.median(t[key])
        out[f"step_ratio_{key}"] = measure.paired_ratio(t[key], t["reference"])
    out["step_ms_reference"] = 1e3 * measure.median(t["reference"])
    out["step_speedup"] = measure.paired_ratio(t["old"], t["new"])
    out["default_step_speedup"] = measure.paired_ratio(t["default_old"], t["default_new"])

    # Generation: the default config, as in run.py.
    new = CALM(anchor, aug, CALMConfig(init="default"))
    old = base.model.CALM(anchor, aug, CALMConfig(init="default"))
    old.blocks.load_state_dict(new.blocks.state_dict())
    prompt = run.random_ids(s, 1, s.prompt, seed=1)
    gens = {
        "anchor": lambda: reference.greedy_cached(anchor, prompt, n),
        "aug": lambda: reference.greedy_cached(aug, prompt, n),
        "old": lambda: old.generate(prompt, max_new_tokens=n, eos_token_id=[]),
        "new": lambda: new.generate(prompt, max_new_tokens=n, eos_token_id=[]),
    }
    if not torch.equal(gens["old"](), gens["new"]()):
        raise RuntimeError("the two cores generate different tokens")
    t = measure.interleaved(gens, max(3, reps // 3))
    tps = {k: n / measure.median(v) for k, v in t.items()}
    bound = 1 / (1 / tps["anchor"] + 1 / tps["aug"])
    for key in ("old", "new"):
        out[f"gen_tps_{key}"] = tps[key]
        out[f"gen_ratio_{key}"] = tps[key] / bound
        # the same ratio per rep, from neighbouring measurements
        out[f"gen_ratio_{key}_paired"] = measure.median(
            [(a + g) / c for a, g, c in zip(t["anchor"], t["aug"], t[key])]
        )
    out["gen_tps_bound"] = bound
    out["gen_speedup"] = measure.paired_ratio(t["old"], t["new"])
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="JSON file to write")
    parser.add_argument("--base", help="commit whose core to compare against the working tree")
    parser.add_argument("--configs", default="small,mid", help="comma-separated: small, mid")
    args = parser.parse_args()
    torch.set_num_threads(1)
    setups = {s.name: s for s in run.FULL}
    chosen = [setups[name] for name in args.configs.split(",")]
    reps = {"small": 90, "mid": 21}  # generation: a third of these
    if args.base:
        base = core_at(args.base)
        res = {"base": args.base, "load_at_start": [round(x, 2) for x in os.getloadavg()]}
        res.update({s.name: against(base, s, reps[s.name], 64) for s in chosen})
        res["load_at_end"] = [round(x, 2) for x in os.getloadavg()]
    else:
        res = {s.name: compare(s, {"small": 15, "mid": 7}[s.name], 64) for s in chosen}
    print(json.dumps(res, indent=1))
    Path(args.out).write_text(json.dumps(res, indent=1))
