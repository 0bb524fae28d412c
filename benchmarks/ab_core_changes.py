"""A/B of the no-padding fast paths (commits 320fa0d, 92ee96f) against the paths they replaced.

    python benchmarks/ab_core_changes.py OUT.json

In one process, interleaved: the current core, and the same core with the replaced functions
restored (the cross-attention mask always built; attention_mask/position_ids always passed to
the base models). Checks that both generate the same tokens first.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import measure  # noqa: E402
import run  # noqa: E402
import torch  # noqa: E402

import calm.model as cm  # noqa: E402
from calm import CALM, CALMConfig, hf  # noqa: E402
from calm.cross_attention import attention_mask as build_mask  # noqa: E402

new_mask_kwargs, new_masks = cm._mask_kwargs, CALM._masks


def old_mask_kwargs(m, past):
    return {"attention_mask": m, "position_ids": hf.position_ids(m, past)}


def old_masks(self, key_masks, query_mask, past_length, visible=None):
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
        cm._mask_kwargs, CALM._masks = (
            (old_mask_kwargs, old_masks) if old else (new_mask_kwargs, new_masks)
        )
        try:
            return fn()
        finally:
            cm._mask_kwargs, CALM._masks = new_mask_kwargs, new_masks

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


if __name__ == "__main__":
    torch.set_num_threads(1)
    res = {s.name: compare(s, reps, 64) for s, reps in ((run.FULL[0], 15), (run.FULL[1], 7))}
    print(json.dumps(res, indent=1))
    Path(sys.argv[1]).write_text(json.dumps(res, indent=1))
