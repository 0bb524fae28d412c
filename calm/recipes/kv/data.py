"""D_C, the composition's training data: examples over the D_C keys, replay, and non-keys.

Every row of `calm reproduce kv` (CALM and its ablations) trains on the same D_C: a `variant`
share over the 20% D_C keys, a `replay` share of NUM-MATH examples that keeps mB's own skill, and
a `fake_keys` share of expressions over strings that are not keys, labelled with what mA writes
for them (docs/kv.md, "D_C variants").
"""

from __future__ import annotations

import random
import re
from typing import TYPE_CHECKING

from calm.eval import generate_completions
from calm.tasks.kv import Example, KVTask, parse_subs
from calm.tasks.registry import Example as TaskExample

if TYPE_CHECKING:
    from calm.recipes.kv.reproduce import ReproduceConfig


def greedy(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy completions of `prompts` up to EOS (batches of 256, decoded without specials)."""
    examples = [TaskExample(id=str(i), prompt=p, reference=None) for i, p in enumerate(prompts)]
    completions = generate_completions(
        model,
        tokenizer,
        examples,
        max_new_tokens=max_new_tokens,
        stop=(),
        batch_size=256,
        progress=False,
    )
    return [c[0] for c in completions]


def self_labelled(task: KVTask, mA, tokenizer, variant: str, n: int, seed: int) -> list[Example]:
    """`n` `variant` examples over strings that are not keys (`KVTask.fake_expressions`), each
    labelled with the values mA writes for it (greedy KV-SUBS) instead of the map's.

    mA's substitution of a non-key is whatever it makes of the string; the composition learns
    from these to pass on what mA writes, on as many distinct strings as it sees examples,
    where 40 D_C keys alone let the blocks store those keys' values (docs/kv.md). Expressions
    whose substitution does not parse as one value of the task's width per operand, with the
    prompt's operators, or whose running results go negative, are skipped; an mA that writes
    too few well-formed values (an undertrained one) yields fewer than `n` examples.
    """
    make = getattr(task, variant)
    width = task.scale.value_width
    max_new = (width + 1) * task.scale.max_operands + 1  # one value and an operator per operand
    out: list[Example] = []
    for attempt in range(5):
        exprs = task.fake_expressions(max(64, 2 * (n - len(out))), f"fake-{seed}-{attempt}")
        prompts = [task.key_string(e) + "=" for e in exprs]
        before = len(out)
        for e, got in zip(exprs, greedy(mA, tokenizer, prompts, max_new), strict=True):
            subs = parse_subs(got)
            chunks = subs.replace("-", "+").replace("*", "+").split("+")
            if len(chunks) != len(e.keys) or not all(
                len(c) == width and c.isdigit() for c in chunks
            ):
                continue
            values = [int(c[::-1]) for c in chunks]
            if task.value_string(e, values) != subs or min(task.evaluate(values, e.ops)) < 0:
                continue
            out.append(make(e, values))
            if len(out) == n:
                return out
        if len(out) - before < len(exprs) // 20:  # under 5% well formed: mA is not the map's
            break
    return out


def dc_data(
    task: KVTask,
    dc_keys: list[str],
    variant: str,
    cfg: ReproduceConfig,
    mA=None,
    tokenizer=None,
) -> list[Example]:
    """D_C: `variant` examples over the D_C keys, plus a `replay` share of NUM-MATH examples
    (the same kind of expressions, values substituted) that keep mB's own skill, plus a
    `fake_keys` share of examples over non-keys labelled by `mA` (`self_labelled`)."""
    n_replay = round(cfg.replay * cfg.dc_size)
    n_fake = round(cfg.fake_keys * cfg.dc_size)
    if n_fake and (mA is None or tokenizer is None):
        raise ValueError("D_C with fake_keys > 0 needs mA and its tokenizer to label them.")
    data = task.composition_data(variant, cfg.dc_size - n_replay - n_fake, dc_keys, cfg.seed)
    exprs = task.sample_expressions(n_replay, dc_keys, f"replay-{cfg.seed}")
    data += [task.num_math(e) for e in exprs]
    if n_fake:
        data += self_labelled(task, mA, tokenizer, variant, n_fake, cfg.seed)
    random.Random(cfg.seed).shuffle(data)
    return data


def dc_counts(task: KVTask, data: list[Example]) -> dict[str, int]:
    """How many D_C examples are over keys, NUM-MATH replay, or over non-keys."""
    operand = [re.match("[a-z]*", ex.prompt)[0] for ex in data]
    return {
        "keys": sum(w in task.kv for w in operand),
        "replay": sum(not w for w in operand),
        "fake": sum(bool(w) and w not in task.kv for w in operand),
    }


def records(data: list[Example]) -> list[dict]:
    """D_C as `calm.train` records: the loss falls on the completion (and EOS) only."""
    return [{"prompt": ex.prompt, "completion": ex.completion} for ex in data]
