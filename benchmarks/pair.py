"""Two models with different tokenizers: the code experiment's composition, timed as run.py does.

Config "gemma3-270m+qwen2.5-coder-0.5b" (`REAL_PAIR`): mB, Gemma-3-270M (the anchor), composed
with mA, Qwen2.5-Coder-0.5B-Instruct (augmenting), through a `calm.TokenizerPair`, with the
connections and heads of `calm reproduce code` (`CALMConfig(every=CodeConfig.every)`, the
anchor's number of heads: 6 blocks). It runs in the full mode when both checkpoints are
converted (`python tools/hub_offline.py model gemma3-270m qwen2.5-coder-0.5b`).

- Training step: CALM (forward with labels, backward, AdamW on the blocks) on one text of
  `seq` anchor tokens against `reference.ReferenceStep` given the same batch's anchor ids,
  augmenting ids and `aug_visible`. The alignment (`pair(texts)`) is computed once, outside the
  timed region, for both (CALM takes a pair's batch as is); `alignment_ms` is its own time.
- Generation: `CALM.generate` with the pair (greedy, batch 1) against the bound
  1 / (1/tps_anchor + 1/tps_aug), each model alone running a plain greedy loop with its own KV
  cache on its own prompt ids; beside them the two models alternated token by token with no
  blocks and no text sync (`reference.alternated_greedy(..., aug_ids=...)`). The prompt's
  alignment is again computed once, outside; the text sync of every decoded token (decode,
  re-tokenize, commit: `TextStream.append`) is inside `generate`, so it is in CALM's time, and
  `text_sync_ms_per_token` measures it in one more call.

tests/test_benchmarks.py runs `section` on small random models with two tiny tokenizers.
"""

from __future__ import annotations

import inspect
import textwrap
import time
from dataclasses import asdict, dataclass

import torch

from benchmarks import measure, reference
from calm import CALM, TokenizerPair, hf
from calm.tokenizers import TextStream


@dataclass(frozen=True)
class PairSetup:
    """One pair config: the two models (tools/hub_offline.py names), the training batch (one
    text of `seq` anchor tokens), the generation length, and the reps."""

    name: str
    anchor: str
    aug: str
    seq: int
    new_tokens: int
    reps: int
    gen_reps: int


def _recipe():
    """The code experiment's checkpoints by role and its `CodeConfig` (imported when used)."""
    from calm.recipes.code.models import CHECKPOINTS
    from calm.recipes.code.reproduce import CodeConfig

    return CHECKPOINTS, CodeConfig()


# One text of 128 anchor tokens (a step takes ~3 s here in float32, one thread); 32 greedy
# tokens after a 19-token prompt (alone, the anchor takes ~77 ms a token, the augmenting model
# ~123 ms): ~4 min in all on 2 cores under load (docs/benchmarks.md).
REAL_PAIR = PairSetup(
    "gemma3-270m+qwen2.5-coder-0.5b",
    "gemma3-270m",
    "qwen2.5-coder-0.5b",
    seq=128,
    new_tokens=32,
    reps=8,
    gen_reps=8,
)
TRAIN_TEXT = inspect.getsource(textwrap)  # Python source, as the recipe's D_C
PROMPT = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'


def available(s: PairSetup = REAL_PAIR) -> bool:
    from tools import hub_offline

    return hub_offline.available(s.anchor) and hub_offline.available(s.aug)


def convert_command(s: PairSetup = REAL_PAIR) -> str:
    return f"python tools/hub_offline.py model {s.anchor} {s.aug}"


def load(s: PairSetup, target):
    """(anchor, aug, pair): the converted checkpoints in eval mode on the target, and the pair of
    their tokenizers as the recipe builds it (each with a pad token)."""
    from transformers import AutoModelForCausalLM

    from calm.recipes.pretrained import load_tokenizer, with_pad
    from calm.run import make_pair
    from tools import hub_offline

    checkpoints, _ = _recipe()
    if (s.anchor, s.aug) != (checkpoints["mB"], checkpoints["mA"]):
        raise ValueError(f"{s.name} is not the code recipe's pair {checkpoints}.")
    paths = [str(hub_offline.model_dir(name)) for name in (s.anchor, s.aug)]
    dtype = getattr(torch, target.dtype)
    anchor, aug = (
        AutoModelForCausalLM.from_pretrained(p).eval().to(target.device, dtype) for p in paths
    )
    anchor_tok, aug_tok = (with_pad(load_tokenizer(p)) for p in paths)
    return anchor, aug, make_pair(anchor_tok, [aug_tok])


def composition(anchor, aug, pair: TokenizerPair, target, **kwargs) -> CALM:
    """The code recipe's composition (`calm reproduce code`: every=CodeConfig.every, the
    anchor's heads, blocks initialised after torch.manual_seed(CodeConfig.seed)) in the target's
    dtype, with `kwargs` on top (norm, init)."""
    _, cfg = _recipe()
    torch.manual_seed(cfg.seed)
    return CALM(anchor, aug, target.config(every=cfg.every, **kwargs), tokenizers=pair)


def pair_step(model: CALM, batch: dict, labels: torch.Tensor):
    """One CALM training step on a pair's batch: forward with labels, backward, AdamW."""
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)

    def step() -> float:
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def train(s: PairSetup, anchor, aug, pair: TokenizerPair, text: str, target) -> dict:
    """CALM step (norm=False, init="default": the reference's exact math; and the default
    config) against `ReferenceStep` on one text of at most `s.seq` anchor tokens."""
    start = time.perf_counter()
    batch = pair([text], max_length=s.seq)
    alignment_s = time.perf_counter() - start
    batch = batch.to(target.device)
    if not bool(batch["attention_mask"].all()) or not bool(batch["aug_attention_mask"][0].all()):
        raise ValueError("the reference takes unpadded batches: one text, no padding.")
    ids, aug_ids, visible = batch["input_ids"], batch["aug_input_ids"][0], batch["aug_visible"][0]
    labels = pair.labels(batch)
    model = composition(anchor, aug, pair, target, norm=False, init="default")
    default = composition(anchor, aug, pair, target, init="default")
    blocks = reference.blocks_like(model).to(target.device, getattr(torch, target.dtype))
    ref = reference.ReferenceStep(anchor, aug, model.connections, blocks)
    with torch.no_grad():
        calm_loss = model(**batch, labels=labels).loss.item()
        ref_loss = ref.loss(ids, aug_ids, visible).item()
    fns = {
        "calm": pair_step(model, batch, labels),
        "reference": lambda: ref(ids, aug_ids, visible),
        "calm_default_config": pair_step(default, batch, labels),
    }
    t = measure.interleaved(fns, s.reps, sync=target.sync)
    return {
        "connections": len(model.connections),
        "heads": model.blocks[0].num_heads,
        "anchor_tokens": ids.shape[1],
        "aug_tokens": aug_ids.shape[1],
        "alignment_ms": 1e3 * alignment_s,
        "calm_ms": 1e3 * measure.median(t["calm"]),
        "reference_ms": 1e3 * measure.median(t["reference"]),
        "calm_default_config_ms": 1e3 * measure.median(t["calm_default_config"]),
        "ratio": measure.paired_ratio(t["calm"], t["reference"]),
        "ratio_default_config": measure.paired_ratio(t["calm_default_config"], t["reference"]),
        "loss": calm_loss,
        "loss_abs_diff_vs_reference": abs(calm_loss - ref_loss),
    }


class StreamTimer:
    """Total seconds spent in TextStream.append (decode, re-tokenize, commit) while active."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._append = TextStream.append

    def __enter__(self):
        timer = self

        def append(stream, *args):
            start = time.perf_counter()
            try:
                return timer._append(stream, *args)
            finally:
                timer.seconds += time.perf_counter() - start

        TextStream.append = append
        return self

    def __exit__(self, *exc) -> None:
        TextStream.append = self._append


def generation(s: PairSetup, anchor, aug, pair: TokenizerPair, prompt: str, target) -> dict:
    """`CALM.generate` with the pair against each model alone, whole calls timed in turn."""
    batch = pair([prompt]).to(target.device)
    ids, aug_ids = batch["input_ids"], batch["aug_input_ids"][0]
    n = s.new_tokens
    model = composition(anchor, aug, pair, target, init="default")
    kw = dict(max_new_tokens=n, eos_token_id=[])
    t = measure.interleaved(
        {
            "anchor": lambda: reference.greedy_cached(anchor, ids, n),
            "aug": lambda: reference.greedy_cached(aug, aug_ids, n),
            "alternated": lambda: reference.alternated_greedy(anchor, aug, ids, n, aug_ids=aug_ids),
            "calm": lambda: model.generate(**batch, **kw),
        },
        s.gen_reps,
        sync=target.sync,
    )
    calls: list[int] = []  # the augmenting model's forward calls in one generate
    handle = hf.backbone(aug).register_forward_pre_hook(lambda *_: calls.append(1))
    with StreamTimer() as timer:
        start = time.perf_counter()
        out = model.generate(**batch, **kw)
        call_s = time.perf_counter() - start
    handle.remove()
    full = pair.extend(batch, out[:, ids.shape[1] :])
    alone = [a + b for a, b in zip(t["anchor"], t["aug"], strict=True)]
    tps = {k: n / measure.median(v) for k, v in t.items()}
    return {
        "new_tokens": n,
        "reps": s.gen_reps,
        "prompt_tokens": ids.shape[1],
        "prompt_aug_tokens": aug_ids.shape[1],
        # the augmenting tokens of the prompt and the generated text (those CALM's aug reads)
        "aug_tokens_of_text": full["aug_input_ids"][0].shape[1],
        # CALM's augmenting forward calls (the prompt's included): one per step that commits
        # tokens (a finished word), against one per token for the bound's augmenting model
        "aug_calls": len(calls),
        "tps_anchor": tps["anchor"],
        "tps_aug": tps["aug"],
        "tps_bound": 1 / (1 / tps["anchor"] + 1 / tps["aug"]),
        "tps_alternated": tps["alternated"],
        "tps_calm": tps["calm"],
        "ratio_to_bound": measure.paired_ratio(alone, t["calm"]),
        "alternated_to_bound": measure.paired_ratio(alone, t["alternated"]),
        "ratio_to_alternated": measure.paired_ratio(t["alternated"], t["calm"]),
        "text_sync_ms_per_token": 1e3 * timer.seconds / n,
        "text_sync_share": timer.seconds / call_s,
        "text": full["texts"][0],
    }


def section(s: PairSetup, anchor, aug, pair: TokenizerPair, target, text=TRAIN_TEXT) -> dict:
    """The pair's training step and generation; `kind` tells it from run.py's configs."""
    return {
        "kind": "tokenizer pair",
        "setup": asdict(s),
        "train": train(s, anchor, aug, pair, text, target),
        "generate": generation(s, anchor, aug, pair, PROMPT, target),
    }


def markdown_rows(configs: dict) -> list[str]:
    """The table of the pair configs in `configs` (none: no lines)."""
    rows = [(name, c) for name, c in configs.items() if c.get("kind") == "tokenizer pair"]
    if not rows:
        return []
    lines = [
        "",
        "## Different tokenizers (TokenizerPair)",
        "",
        "| config | step / ref | step / ref (default cfg) | loss diff | step ms: CALM, ref | "
        "gen / bound | alternated / bound | gen / alternated | tok/s: anchor, aug, CALM | "
        "text sync ms/token | CALM's aug calls (new tokens) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, c in rows:
        tr, g = c["train"], c["generate"]
        lines.append(
            f"| {name} | {tr['ratio']:.3f} | {tr['ratio_default_config']:.3f} | "
            f"{tr['loss_abs_diff_vs_reference']:.1e} | {tr['calm_ms']:.0f}, "
            f"{tr['reference_ms']:.0f} | {g['ratio_to_bound']:.3f} | "
            f"{g['alternated_to_bound']:.3f} | {g['ratio_to_alternated']:.3f} | "
            f"{g['tps_anchor']:.1f}, {g['tps_aug']:.1f}, {g['tps_calm']:.1f} | "
            f"{g['text_sync_ms_per_token']:.2f} | {g['aug_calls']} ({g['new_tokens']}) |"
        )
    return lines
