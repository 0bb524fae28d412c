"""The key-value arithmetic task (CALM paper, section 4.1, Table 1), registered as `kv`.

Seeded generators draw the map and every data set from it; `held_out_task` (and `calm eval
--task kv:<data set>`) scores greedy completions of expressions over the keys outside D_C.

Formats (one character per token; `W` = value width, `R` = result width, both zero padded):

    D_KV       a map key -> value; keys are 2-6 lowercase letters, values are the integers
               1..num_keys in a seeded random order (unique, as in the paper)
    KV-SUBS    prompt "abc+de-fgh="      completion "210+430-500"
    NUM-MATH   prompt "210+430-500="     completion "640|140"
    KV-MATH    prompt "abc+de-fgh="      completion "640|140"
    SUBS+MATH  prompt "abc+de-fgh="      completion "210+430-500=640|140"   (variant c)

Every number is written least significant digit first and zero padded to a fixed width (values
`W` digits, results `R`): 12 -> "210" when W = 3. With fixed widths, each digit of a result sits
at a constant distance from the digits it depends on, which small models learn quickly. The
numeric answer is a scratchpad of running results, one per operator: 12+34 = 46 -> "640",
46-5 = 41 -> "140"; the last chunk is the result (41). Expressions are drawn so that every running
result is non-negative (no sign to predict). Multiplication is not used at the default scale.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from calm.errors import UserError
from calm.tasks.registry import Example as TaskExample
from calm.tasks.registry import register

LETTERS = "abcdefghijklmnopqrstuvwxyz"
DIGITS = "0123456789"
SYMBOLS = "+-*=|"
VARIANTS = ("kv_subs", "kv_math", "subs_math")  # the D_C variants
DATA_SETS = ("kv_subs", "num_math", "kv_math")  # what is evaluated


@dataclass(frozen=True)
class KVScale:
    """The size of one key-value arithmetic task (the paper's: 25,000 keys, 3-6 per expression,
    operators +-*; docs/kv.md)."""

    num_keys: int = 200
    min_key_len: int = 2
    max_key_len: int = 6
    min_operands: int = 3
    max_operands: int = 3
    operators: str = "+-"
    map_seed: int = 0

    def __post_init__(self) -> None:
        if self.num_keys < 5:
            raise ValueError(f"num_keys must be at least 5, got {self.num_keys}.")
        if not 1 <= self.min_key_len <= self.max_key_len:
            raise ValueError("Key lengths must satisfy 1 <= min_key_len <= max_key_len.")
        if len(LETTERS) ** self.max_key_len < 2 * self.num_keys:
            raise ValueError(f"Keys of at most {self.max_key_len} letters are too few.")
        if not 2 <= self.min_operands <= self.max_operands:
            raise ValueError("Operand counts must satisfy 2 <= min_operands <= max_operands.")
        if not self.operators or set(self.operators) - set("+-*"):
            raise ValueError(f"operators must be a subset of '+-*', got {self.operators!r}.")

    @property
    def value_width(self) -> int:
        return len(str(self.num_keys))

    @property
    def result_width(self) -> int:
        biggest = self.num_keys**self.max_operands if "*" in self.operators else 0
        return len(str(max(self.num_keys * self.max_operands, biggest)))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Example:
    """One prompt/completion pair; `answer` is the integer result where the task has one."""

    prompt: str
    completion: str
    answer: int | None = None


@dataclass(frozen=True)
class Expression:
    """An expression over keys: operands are keys, `ops[i]` sits between operand i and i+1."""

    keys: tuple[str, ...]
    ops: tuple[str, ...]


@dataclass(frozen=True)
class KVTask:
    """A key-value map plus the formats of every data set drawn from it."""

    scale: KVScale = field(default_factory=KVScale)

    def __post_init__(self) -> None:
        rng = random.Random(self.scale.map_seed)
        keys: list[str] = []
        seen: set[str] = set()
        while len(keys) < self.scale.num_keys:
            n = rng.randint(self.scale.min_key_len, self.scale.max_key_len)
            key = "".join(rng.choice(LETTERS) for _ in range(n))
            if key not in seen:
                seen.add(key)
                keys.append(key)
        values = list(range(1, self.scale.num_keys + 1))
        rng.shuffle(values)
        object.__setattr__(self, "kv", dict(zip(keys, values, strict=True)))

    @property
    def keys(self) -> list[str]:
        return list(self.kv)

    # --- splits --------------------------------------------------------------------------------

    def split_keys(self, seed: int, fraction: float = 0.2) -> tuple[list[str], list[str]]:
        """Return (D_C keys, held-out keys): a seeded `fraction` of the keys and the rest."""
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"fraction must be in (0, 1), got {fraction}.")
        keys = sorted(self.kv)
        random.Random(f"split-{seed}").shuffle(keys)
        n = max(1, round(fraction * len(keys)))
        return sorted(keys[:n]), sorted(keys[n:])

    # --- expressions ---------------------------------------------------------------------------

    def evaluate(self, values: list[int], ops: tuple[str, ...]) -> list[int]:
        """Running results left to right (the scratchpad); every operator applies to the
        running result and the next value."""
        running = [values[0]]
        for op, v in zip(ops, values[1:], strict=True):
            r = running[-1]
            running.append(r + v if op == "+" else r - v if op == "-" else r * v)
        return running[1:]

    def sample_expression(self, rng: random.Random, keys: list[str]) -> Expression:
        """Draw an expression over `keys` whose running results are all non-negative."""
        while True:
            n = rng.randint(self.scale.min_operands, self.scale.max_operands)
            ks = tuple(rng.choice(keys) for _ in range(n))
            ops = tuple(rng.choice(self.scale.operators) for _ in range(n - 1))
            if min(self.evaluate([self.kv[k] for k in ks], ops)) >= 0:
                return Expression(ks, ops)

    def sample_expressions(self, n: int, keys: list[str], seed: int | str) -> list[Expression]:
        """`n` distinct expressions over `keys`, drawn with `seed`."""
        rng = random.Random(seed)
        out: dict[str, Expression] = {}
        for _ in range(100 * n):
            e = self.sample_expression(rng, keys)
            out.setdefault(self.key_string(e), e)
            if len(out) == n:
                return list(out.values())
        raise ValueError(f"Could not draw {n} distinct expressions from {len(keys)} keys.")

    # --- formatting ----------------------------------------------------------------------------

    def _join(self, operands: list[str], ops: tuple[str, ...]) -> str:
        parts = [operands[0]]
        for op, x in zip(ops, operands[1:], strict=True):
            parts += [op, x]
        return "".join(parts)

    def key_string(self, e: Expression) -> str:
        return self._join(list(e.keys), e.ops)

    def _values(self, e: Expression, values: Sequence[int] | None) -> list[int]:
        return [self.kv[k] for k in e.keys] if values is None else list(values)

    def value_string(self, e: Expression, values: Sequence[int] | None = None) -> str:
        """The substituted expression; `values` (one per operand) replace the map's values."""
        w = self.scale.value_width
        return self._join([str(v).zfill(w)[::-1] for v in self._values(e, values)], e.ops)

    def scratchpad(self, e: Expression, values: Sequence[int] | None = None) -> str:
        w = self.scale.result_width
        running = self.evaluate(self._values(e, values), e.ops)
        return "|".join(str(r).zfill(w)[::-1] for r in running)

    def result(self, e: Expression, values: Sequence[int] | None = None) -> int:
        return self.evaluate(self._values(e, values), e.ops)[-1]

    # --- data sets -----------------------------------------------------------------------------
    # Each takes optional `values` (one per operand) used instead of the map's: the labels of
    # expressions over strings that are not keys (see `fake_expressions`).

    def kv_subs(self, e: Expression, values: Sequence[int] | None = None) -> Example:
        return Example(self.key_string(e) + "=", self.value_string(e, values))

    def num_math(self, e: Expression, values: Sequence[int] | None = None) -> Example:
        return Example(
            self.value_string(e, values) + "=",
            self.scratchpad(e, values),
            self.result(e, values),
        )

    def kv_math(self, e: Expression, values: Sequence[int] | None = None) -> Example:
        return Example(self.key_string(e) + "=", self.scratchpad(e, values), self.result(e, values))

    def subs_math(self, e: Expression, values: Sequence[int] | None = None) -> Example:
        completion = self.value_string(e, values) + "=" + self.scratchpad(e, values)
        return Example(self.key_string(e) + "=", completion, self.result(e, values))

    def fake_expressions(self, n: int, seed: int | str) -> list[Expression]:
        """`n` expressions over random letter strings of key lengths that are not keys of the map
        (so they hold no key, held-out or not), with the task's operand counts and operators."""
        rng = random.Random(seed)
        s = self.scale

        def operand() -> str:
            while True:
                n = rng.randint(s.min_key_len, s.max_key_len)
                word = "".join(rng.choice(LETTERS) for _ in range(n))
                if word not in self.kv:
                    return word

        out = []
        for _ in range(n):
            k = rng.randint(s.min_operands, s.max_operands)
            ops = tuple(rng.choice(s.operators) for _ in range(k - 1))
            out.append(Expression(tuple(operand() for _ in range(k)), ops))
        return out

    def composition_data(self, variant: str, n: int, keys: list[str], seed: int) -> list[Example]:
        """D_C: `n` examples over `keys` in one of the three variants (see `VARIANTS`)."""
        if variant not in VARIANTS:
            raise ValueError(f"Unknown D_C variant {variant!r}; choose one of {VARIANTS}.")
        make = getattr(self, variant)
        return [make(e) for e in self.sample_expressions(n, keys, f"dc-{variant}-{seed}")]

    def random_numeric_expression(self, rng: random.Random) -> Example:
        """A NUM-MATH example over any values in [1, num_keys] (mB's pretraining data)."""
        n = self.scale.num_keys
        while True:
            k = rng.randint(self.scale.min_operands, self.scale.max_operands)
            values = [rng.randint(1, n) for _ in range(k)]
            ops = tuple(rng.choice(self.scale.operators) for _ in range(k - 1))
            running = self.evaluate(values, ops)
            if min(running) >= 0:
                break
        w, rw = self.scale.value_width, self.scale.result_width
        prompt = self._join([str(v).zfill(w)[::-1] for v in values], ops) + "="
        completion = "|".join(str(r).zfill(rw)[::-1] for r in running)
        return Example(prompt, completion, running[-1])


def parse_result(completion: str) -> int | None:
    """The final number of a scratchpad completion (after the last '=', last '|' chunk,
    digits reversed), or None when it is not a number."""
    chunk = completion.rsplit("=", 1)[-1].rsplit("|", 1)[-1].strip()
    if not chunk or not chunk.isdigit():
        return None
    return int(chunk[::-1])


def parse_subs(completion: str) -> str:
    """The substituted expression of a completion: the text before its first '='."""
    return completion.split("=", 1)[0].strip()


# --- evaluation --------------------------------------------------------------------------------

MATCHES = ("subs", "result", "exact")


def is_correct(match: str, completion: str, ex: Example) -> bool:
    """Whether `completion` answers `ex`: "subs" compares the text before the first '=' with the
    substitution, "result" the final number with the result, "exact" the whole completion."""
    if match == "subs":
        return parse_subs(completion) == ex.completion
    if match == "result":
        return parse_result(completion) == ex.answer
    return completion == ex.completion


@dataclass(frozen=True)
class KVEval:
    """Key-value examples as a `calm.evaluate` task: greedy completions up to EOS, scored by
    `match` (see `is_correct`); metrics {"accuracy": percent}, records {"id", "correct"}."""

    name: str
    items: tuple[Example, ...]
    match: str
    max_new_tokens: int
    version: str = "1"
    default_shots: int = 0
    max_shots: int = 0
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.match not in MATCHES:
            raise ValueError(f"match must be one of {MATCHES}, got {self.match!r}.")

    def examples(self, shots: int) -> list[TaskExample]:
        return [
            TaskExample(id=f"{self.name}/{i}", prompt=ex.prompt, reference=ex)
            for i, ex in enumerate(self.items)
        ]

    def score(self, examples: list[TaskExample], completions: list[list[str]]) -> tuple[dict, list]:
        records = [
            {"id": e.id, "correct": is_correct(self.match, cs[0], e.reference)}
            for e, cs in zip(examples, completions, strict=True)
        ]
        if not records:
            return {}, records
        return {"accuracy": 100.0 * sum(r["correct"] for r in records) / len(records)}, records


def max_new_tokens(scale: KVScale) -> int:
    """Room for the longest completion of any data set: substitution, '=', scratchpad, EOS."""
    n, w, rw = scale.max_operands, scale.value_width, scale.result_width
    return (w * n + n - 1) + (rw * (n - 1) + n - 2) + 2


def held_out_task(
    data_set: str,
    scale: KVScale | None = None,
    seed: int = 0,
    size: int = 300,
    keys: str = "held_out",
    draw: int | None = None,
) -> KVEval:
    """`size` expressions as `data_set` examples over the keys of the `seed` split: the held-out
    keys (default) or the D_C keys (`keys="dc"`); `draw` seeds the expressions (default `seed`).
    KV-SUBS is scored on the substitution, NUM-MATH and KV-MATH on the final number."""
    if data_set not in DATA_SETS:
        raise ValueError(f"Unknown key-value data set {data_set!r}; choose one of {DATA_SETS}.")
    if keys not in ("held_out", "dc"):
        raise ValueError(f'keys must be "held_out" or "dc", got {keys!r}.')
    task = KVTask(scale or KVScale())
    dc_keys, held_keys = task.split_keys(seed)
    draw = seed if draw is None else draw
    exprs = task.sample_expressions(
        size, held_keys if keys == "held_out" else dc_keys, f"eval-{draw}"
    )
    match = "subs" if data_set == "kv_subs" else "result"
    items = tuple(getattr(task, data_set)(e) for e in exprs)
    return KVEval(f"kv:{data_set}", items, match, max_new_tokens(task.scale))


def scale_of(directory: str | Path) -> KVScale:
    """The scale a key-value base model was trained at (its `pretrain.json`)."""
    path = Path(directory) / "pretrain.json"
    if not path.is_file():
        raise UserError(
            f"{path} does not exist; pass a base-model folder written by `calm pretrain kv`."
        )
    return KVScale(**json.loads(path.read_text())["config"]["scale"])


@register("kv", "key-value arithmetic: kv:kv_math|kv_subs|num_math, 300 held-out expressions")
def make(variant: str | None = None, data: str | None = None) -> KVEval:
    """The seed-0 evaluation set of `calm reproduce kv`; `data`: a base-model folder whose
    `pretrain.json` gives the map's scale (default: the shipped models' scale)."""
    variant = variant or "kv_math"
    if variant not in DATA_SETS:
        raise UserError(f"Unknown key-value data set {variant!r}; choose one of {DATA_SETS}.")
    return held_out_task(variant, scale_of(data) if data else None)
