"""Score any causal LM (Hugging Face, peft, or `calm.CALM`) on one registered task.

    result = calm.evaluate(model, "humaneval", tokenizer=tok, limit=20)
    result.write("results.json")   # + results.md (a table) + results.samples.jsonl (per example)

Generation is batched with left padding through `model.generate(input_ids, attention_mask,
max_new_tokens, do_sample, temperature, top_p, eos_token_id, pad_token_id)`, the signature HF,
peft and CALM share; every model whose `generate` takes `stop_strings` (HF, peft, CALM) also gets
the task's stop strings so each row stops early (with a Hugging Face tokenizer); a CALM built
with a TokenizerPair gets the pair's aligned batch, and its completions are decoded with
`tokenizer` (the anchor's). Greedy by default; with `num_samples > 1` (pass@k) sampling is
seeded per batch. Each completion is cut at the task's first stop string before scoring.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from calm import __version__, hf
from calm.checkpoint import atomic_write_text
from calm.errors import UserError
from calm.likelihood import text_nll
from calm.model import CALM
from calm.progress import bar
from calm.tasks.registry import Example, Task, check_shots, cut_at_stop, get_task


@dataclass(frozen=True)
class EvalResult:
    """Metrics of one model on one task, with everything needed to reproduce them."""

    task: str
    metrics: dict[str, float]
    metadata: dict[str, Any]
    samples: list[dict]  # one record per example: prompt, completions, task-specific scores

    def to_dict(self) -> dict:
        return {"task": self.task, "metrics": self.metrics, "metadata": self.metadata}

    def to_markdown(self) -> str:
        """A one-row markdown table: model, task, shots, limit, then each metric."""
        names = list(self.metrics)
        model = self.metadata["model"].get("name") or self.metadata["model"].get("class")
        cells = [model, self.task, str(self.metadata["shots"]), str(self.metadata["limit"])]
        cells += [
            f"{self.metrics[k]:.2f}" if k.startswith(("chrf", "acc")) else f"{self.metrics[k]:.3f}"
            for k in names
        ]
        header = ["model", "task", "shots", "limit", *names]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join([*lines, "| " + " | ".join(cells) + " |"]) + "\n"

    def write(self, path: str | Path) -> tuple[Path, Path, Path]:
        """Write `path` (JSON), `path` with .md (table) and .samples.jsonl (per example)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        md, samples = path.with_suffix(".md"), path.with_suffix(".samples.jsonl")
        path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")
        md.write_text(self.to_markdown())
        with open(samples, "w", encoding="utf-8") as f:
            for record in self.samples:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        return path, md, samples


def _base_identity(model: Any) -> dict:
    """Class, name or path, config hash (`hf.model_identity`'s) and parameter count of one model."""
    identity = {"class": type(model).__name__}
    if getattr(model, "config", None) is not None:
        hashed = hf.model_identity(model, weights=False)
        identity["name_or_path"] = hashed["name_or_path"]
        identity["config_sha256"] = hashed["config_hash"]
    if hasattr(model, "parameters"):
        identity["num_parameters"] = sum(p.numel() for p in model.parameters())
    return identity


def evaluated_identity(model: Any, name: str | None = None) -> dict:
    """Who was evaluated: the model's identity and, for CALM, its anchor, augments, connections."""
    if isinstance(model, CALM):
        return {
            "name": name,
            "class": "CALM",
            "anchor": _base_identity(model.anchor),
            "augments": [_base_identity(a) for a in model.augments],
            "connections": [dataclasses.asdict(c) for c in model.connections],
            "num_trainable_parameters": model.num_trainable_parameters(),
        }
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    identity = {"name": name, **_base_identity(base)}
    if base is not model:
        identity["wrapper"] = type(model).__name__
        identity["adapters"] = sorted(getattr(model, "peft_config", {}) or {})
    return identity


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {"python": platform.python_version(), "calm": __version__}
    for dist in ("torch", "transformers", "peft", "sacrebleu", "tokenizers"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return versions


def _device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


class Journal:
    """An append-only JSONL file of the batches a generation has finished, so that an
    interrupted `evaluate` continues where it stopped: its first line is the key of everything
    that decides the completions (model weights, task, examples, decoding), each further line
    one batch {"batch", "completions", "seconds"}. A file with another key is started afresh; a
    line cut short by a kill is ignored."""

    def __init__(self, path: str | Path, key: str) -> None:
        self.path, self.key = Path(path), key
        self._done: dict[int, list[str]] = {}
        self.seconds = 0.0  # the generation time of the batches read back
        lines = self.path.read_text(encoding="utf-8").splitlines() if self.path.exists() else []
        kept = [json.dumps({"key": key})]
        if lines and self._parse(lines[0]) == {"key": key}:
            for line in lines[1:]:
                entry = self._parse(line)
                if entry is not None and {"batch", "completions", "seconds"} <= set(entry):
                    self._done[int(entry["batch"])] = list(entry["completions"])
                    self.seconds += float(entry["seconds"])
                    kept.append(line)
        # rewritten whole: a torn last line would otherwise swallow the next batch appended
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, "\n".join(kept) + "\n")
        self._last = time.time()

    @staticmethod
    def _parse(line: str) -> dict | None:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            return None
        return entry if isinstance(entry, dict) else None

    def batches(self) -> dict[int, list[str]]:
        return dict(self._done)

    def add(self, batch: int, completions: list[str]) -> None:
        now = time.time()
        entry = {"batch": batch, "completions": completions, "seconds": round(now - self._last, 3)}
        self._last = now
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def _journal_key(model: Any, task: Task, examples: list[Example], settings: dict) -> str:
    """What decides a generation's completions: the model's weights, the task and its
    examples' prompts, and the decoding settings."""
    prompts = hashlib.sha256("\x00".join(e.prompt for e in examples).encode()).hexdigest()
    weights = hf.weights_fingerprint(model) if isinstance(model, torch.nn.Module) else None
    what = {"weights": weights, "task": [task.name, task.version], "prompts": prompts, **settings}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def generate_completions(
    model: Any,
    tokenizer: Any,
    examples: list[Example],
    *,
    max_new_tokens: int,
    stop: tuple[str, ...],
    batch_size: int = 8,
    num_samples: int = 1,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
    progress: bool = True,
    journal: Journal | None = None,
) -> list[list[str]]:
    """`num_samples` completions per example, each cut at the first stop string; with a
    `journal`, each batch's completions are appended to it as they are made, and the batches it
    already holds are not generated again."""
    if tokenizer.pad_token_id is None:
        raise UserError("The tokenizer has no pad token; set tokenizer.pad_token first.")
    sampling = num_samples > 1
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": sampling,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if sampling:
        kwargs |= {"temperature": temperature, "top_p": top_p}
    params = inspect.signature(model.generate).parameters
    takes_stop = "stop_strings" in params or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
    )
    if takes_stop and stop and isinstance(tokenizer, PreTrainedTokenizerBase):
        kwargs |= {"stop_strings": list(stop), "tokenizer": tokenizer}
    device = _device(model)
    pair = model.tokenizers if isinstance(model, CALM) else None  # different tokenizers
    jobs = [(i, e.prompt) for i, e in enumerate(examples) for _ in range(num_samples)]
    # Longest prompts first: less padding per batch, and an early out-of-memory.
    jobs.sort(key=lambda job: -len(job[1]))
    out: list[list[str]] = [[] for _ in examples]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    done = journal.batches() if journal is not None else {}
    try:
        shown = bar(total=len(jobs), desc="generating", unit="sample", disable=not progress)
        for b, start in enumerate(range(0, len(jobs), batch_size)):
            batch = jobs[start : start + batch_size]
            if b in done:  # generated by an earlier, interrupted call
                for (i, _), text in zip(batch, done[b]):
                    out[i].append(text)
                shown.update(len(batch))
                continue
            prompts = [p for _, p in batch]
            if pair is not None:  # the composition's own aligned batch, left-padded
                enc = pair(prompts).to(device)
            else:
                enc = tokenizer(prompts, return_tensors="pt", padding=True)
                enc = {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}
            if sampling:
                torch.manual_seed(seed * 1_000_003 + b)
            with torch.no_grad():
                ids = model.generate(**enc, **kwargs)
            new = ids[:, enc["input_ids"].shape[1] :]
            texts = [
                cut_at_stop(tokenizer.decode(row, skip_special_tokens=True), stop) for row in new
            ]
            for (i, _), text in zip(batch, texts):
                out[i].append(text)
            if journal is not None:
                journal.add(b, texts)
            shown.update(len(batch))
        shown.close()
    finally:
        tokenizer.padding_side = side
    return out


def _decoding(likelihood: bool, num_samples: int, temperature: float, top_p: float) -> dict:
    """How the results were produced: likelihood, greedy, or sampling with its settings."""
    if likelihood:
        return {"scoring": "likelihood"}
    sampling = {"temperature": temperature, "top_p": top_p} if num_samples > 1 else {}
    return {"greedy": num_samples == 1} | sampling


def evaluate(
    model: Any,
    task: str | Task,
    *,
    tokenizer: Any,
    shots: int | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    num_samples: int = 1,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
    max_new_tokens: int | None = None,
    data: str | None = None,
    model_name: str | None = None,
    progress: bool = True,
    journal: str | Path | None = None,
) -> EvalResult:
    """Generate for the first `limit` test examples of `task` and score them (a likelihood
    task, such as code-bpb: score how likely the model finds each reference instead).

    `task` is a registry name (`calm eval --list`) or a task object; `data` replaces the task's
    default data source. `num_samples > 1` samples (temperature, top_p, seeded) for pass@k.
    With `journal` (a file path), a generation task appends each finished batch to that file
    and a later call with the same model weights, examples and decoding skips those batches:
    an interrupted evaluation resumes; the file is removed when the call ends.
    """
    task = get_task(task, data=data) if isinstance(task, str) else task
    shots = check_shots(task, shots)
    if limit is not None and limit < 1:
        raise UserError(f"limit must be a positive number of examples, got {limit}.")
    if num_samples < 1 or batch_size < 1:
        raise UserError(
            f"num_samples and batch_size must be at least 1, got {num_samples} and {batch_size}."
        )
    examples = task.examples(shots)[:limit]
    started = time.time()
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    likelihood = getattr(task, "scoring", "generate") == "likelihood"
    try:
        if likelihood:
            pairs = [(e.prompt, e.reference) for e in examples]
            outputs = text_nll(model, tokenizer, pairs, batch_size=batch_size, progress=progress)
        else:
            decoding = dict(
                max_new_tokens=max_new_tokens or task.max_new_tokens,
                stop=task.stop,
                batch_size=batch_size,
                num_samples=num_samples,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
            )
            if journal is not None:
                key = _journal_key(model, task, examples, dict(decoding, stop=list(task.stop)))
                journal = Journal(journal, key)
            outputs = generate_completions(
                model, tokenizer, examples, **decoding, progress=progress, journal=journal
            )
    finally:
        if was_training:
            model.train()
    generation_seconds = time.time() - started
    if isinstance(journal, Journal):
        generation_seconds += journal.seconds  # the batches earlier calls generated
        journal.remove()
    metrics, records = task.score(examples, outputs)
    samples = [
        {"prompt": e.prompt, **({"scored": o} if likelihood else {"completions": o}), **r}
        for e, o, r in zip(examples, outputs, records)
    ]
    metadata = {
        "model": evaluated_identity(model, model_name),
        "task": task.name,
        "task_version": task.version,
        "shots": shots,
        "limit": limit,
        "num_examples": len(examples),
        "num_samples": num_samples,
        "decoding": _decoding(likelihood, num_samples, temperature, top_p),
        "max_new_tokens": max_new_tokens or task.max_new_tokens,
        "seed": seed,
        "batch_size": batch_size,
        "versions": _versions(),
        "platform": platform.platform(),
        "argv": sys.argv,
        "generation_seconds": round(generation_seconds, 1),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return EvalResult(task=task.name, metrics=metrics, metadata=metadata, samples=samples)
