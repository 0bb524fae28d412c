"""calm.evaluate: the same harness scores an HF model, a peft model, a CALM and a stand-in."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import pytest
import torch
import transformers as T

import calm
from calm import hf
from calm.errors import UserError
from calm.eval import evaluate
from calm.tasks.registry import Example, cut_at_stop, get_task, list_tasks

PAD, EOS = 0, 1


class ByteTokenizer:
    """A lossless byte-level tokenizer stand-in: id = byte + 2; 0 pads, 1 ends."""

    pad_token_id, eos_token_id, pad_token = PAD, EOS, "<pad>"
    vocab_size = 258

    def __init__(self) -> None:
        self.padding_side = "right"

    def __call__(self, texts, return_tensors="pt", padding=True):
        rows = [[b + 2 for b in t.encode()] for t in texts]
        width = max(map(len, rows))
        ids, mask = [], []
        for r in rows:
            fill = [PAD] * (width - len(r))
            ids.append(fill + r if self.padding_side == "left" else r + fill)
            m = [0] * len(fill)
            mask.append(m + [1] * len(r) if self.padding_side == "left" else [1] * len(r) + m)
        return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}

    def encode(self, text: str) -> list[int]:
        return [b + 2 for b in text.encode()]

    def decode(self, ids, skip_special_tokens=True) -> str:
        return bytes(int(i) - 2 for i in ids if int(i) > 1).decode(errors="replace")


class CannedModel:
    """A stand-in model whose `generate` (CALM's signature) answers each prompt from a table."""

    def __init__(self, answers: dict[str, str], tokenizer: ByteTokenizer) -> None:
        self.answers, self.tok = answers, tokenizer

    def generate(
        self, input_ids, attention_mask=None, max_new_tokens=20, do_sample=False,
        temperature=1.0, top_k=None, top_p=None, eos_token_id=None, pad_token_id=None,
    ):  # fmt: skip
        rows = []
        for ids in input_ids:
            prompt = self.tok.decode(ids)
            new = self.tok.encode(self.answers.get(prompt, ""))[:max_new_tokens]
            rows.append(new + [PAD] * (max_new_tokens - len(new)))
        return torch.cat([input_ids, torch.tensor(rows, dtype=torch.long)], dim=1)


@dataclass(frozen=True)
class EchoTask:
    """A tiny task: continue the prompt; exact match with the reference."""

    name: str = "echo"
    version: str = "1"
    default_shots: int = 0
    max_shots: int = 0
    max_new_tokens: int = 6
    stop: tuple[str, ...] = ("\n",)

    def examples(self, shots: int) -> list[Example]:
        return [Example(id=str(i), prompt=f"say {w}:", reference=w) for i, w in enumerate("abc")]

    def score(self, examples, completions):
        records = [
            {"id": e.id, "ok": cs[0].strip() == e.reference} for e, cs in zip(examples, completions)
        ]
        return {"accuracy": 100.0 * sum(r["ok"] for r in records) / len(records)}, records


def tiny_llama(seed: int, layers: int = 2) -> T.LlamaForCausalLM:
    return hf.tiny_llama(
        ByteTokenizer.vocab_size, 32, layers, kv_heads=2, max_positions=256, seed=seed,
        eos_token_id=EOS, bos_token_id=EOS,
    )  # fmt: skip


def test_registry_lists_every_task_and_refuses_unknown_names():
    names = {t.name for t in list_tasks()}
    assert {"humaneval", "mbpp-like", "code-to-text", "translation", "gsm8k", "mgsm"} <= names
    with pytest.raises(UserError, match="Unknown task 'nope'"):
        get_task("nope")
    with pytest.raises(UserError, match="Unknown MGSM language"):
        get_task("mgsm:xx")
    with pytest.raises(UserError, match="no variants"):
        get_task("humaneval:foo")
    with pytest.raises(UserError, match="does not exist; pass --data"):
        get_task("humaneval", data="/nonexistent/HumanEval.jsonl")


def test_cut_at_stop_uses_the_earliest_stop_string():
    assert cut_at_stop("abc\ndef\nclass", ("\nclass", "\nd")) == "abc"
    assert cut_at_stop("abc", ("x",)) == "abc"


def test_a_perfect_and_an_empty_stand_in_score_100_and_0():
    tok = ByteTokenizer()
    perfect = CannedModel({f"say {w}:": f" {w}\nmore" for w in "abc"}, tok)
    result = evaluate(perfect, EchoTask(), tokenizer=tok, progress=False)
    assert result.metrics == {"accuracy": 100.0}
    assert [s["completions"] for s in result.samples] == [[" a"], [" b"], [" c"]]
    silent = evaluate(CannedModel({}, tok), EchoTask(), tokenizer=tok, progress=False)
    assert silent.metrics == {"accuracy": 0.0}


def test_results_carry_what_reproduces_them_and_are_written(tmp_path):
    tok = ByteTokenizer()
    model = tiny_llama(0)
    result = evaluate(
        model, EchoTask(), tokenizer=tok, limit=2, seed=3, model_name="tiny", progress=False
    )
    meta = result.metadata
    assert (meta["task"], meta["task_version"], meta["shots"], meta["limit"], meta["seed"]) == (
        "echo", "1", 0, 2, 3,
    )  # fmt: skip
    assert meta["num_examples"] == 2 and len(result.samples) == 2
    assert meta["model"]["name"] == "tiny" and meta["model"]["class"] == "LlamaForCausalLM"
    assert meta["model"]["num_parameters"] == sum(p.numel() for p in model.parameters())
    # The one model-identity hash: the config hash of hf.model_identity, as checkpoints record it.
    assert meta["model"]["config_sha256"] == hf.model_identity(model)["config_hash"]
    assert set(meta["model"]) == {
        "name",
        "class",
        "name_or_path",
        "config_sha256",
        "num_parameters",
    }
    assert {"torch", "transformers", "calm", "python"} <= set(meta["versions"])
    path, md, samples = result.write(tmp_path / "out" / "results.json")
    saved = json.loads(path.read_text())
    assert saved["metrics"] == result.metrics and saved["metadata"]["seed"] == 3
    assert md.read_text().startswith("| model | task | shots | limit | accuracy |")
    lines = samples.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["prompt"] == "say a:"


def test_greedy_is_deterministic_and_sampling_is_seeded():
    tok = ByteTokenizer()
    model = tiny_llama(1)
    runs = [evaluate(model, EchoTask(), tokenizer=tok, progress=False).samples for _ in range(2)]
    assert runs[0] == runs[1]
    sample = [
        evaluate(model, EchoTask(), tokenizer=tok, num_samples=3, seed=s, progress=False).samples
        for s in (7, 7, 8)
    ]
    assert sample[0] == sample[1] and sample[0] != sample[2]
    assert all(len(s["completions"]) == 3 for s in sample[0])


class SlowCannedModel(CannedModel):
    def generate(self, *args, **kwargs):
        time.sleep(0.025)
        return super().generate(*args, **kwargs)


def test_the_progress_bar_redraws_rarely_in_a_log(capsys):
    tok = ByteTokenizer()
    model = SlowCannedModel({f"say {w}:": f" {w}" for w in "abc"}, tok)
    evaluate(model, EchoTask(), tokenizer=tok, batch_size=1, num_samples=12)
    err = capsys.readouterr().err  # not a terminal: 36 updates in ~1 s, drawn at start and end
    assert "generating" in err and "36/36" in err and err.count("\r") <= 3, err.count("\r")


def test_batching_and_padding_side_are_restored():
    tok = ByteTokenizer()
    model = tiny_llama(2)
    one = evaluate(model, EchoTask(), tokenizer=tok, batch_size=1, progress=False)
    assert tok.padding_side == "right"
    assert len(one.samples) == 3


def test_a_peft_model_is_evaluated_through_the_same_harness():
    peft = pytest.importorskip("peft")
    tok = ByteTokenizer()
    base = tiny_llama(3)
    lora = peft.get_peft_model(
        base, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    result = evaluate(lora, EchoTask(), tokenizer=tok, progress=False)
    assert result.metadata["model"]["wrapper"] == "PeftModelForCausalLM"
    assert result.metadata["model"]["adapters"] == ["default"]
    # LoRA starts as a no-op (B = 0), so its greedy completions equal the base model's.
    with lora.disable_adapter():
        plain = evaluate(lora, EchoTask(), tokenizer=tok, progress=False)
    assert [s["completions"] for s in result.samples] == [s["completions"] for s in plain.samples]


def test_a_calm_composition_is_evaluated_and_equals_its_anchor_at_init():
    tok = ByteTokenizer()
    anchor, augment = tiny_llama(4, layers=4), tiny_llama(5, layers=4)
    composed = calm.CALM(anchor, augment, calm.CALMConfig())
    result = evaluate(composed, EchoTask(), tokenizer=tok, progress=False)
    alone = evaluate(anchor, EchoTask(), tokenizer=tok, progress=False)
    assert result.metadata["model"]["class"] == "CALM"
    assert result.metadata["model"]["anchor"]["class"] == "LlamaForCausalLM"
    assert len(result.metadata["model"]["connections"]) == len(composed.connections)
    assert [s["completions"] for s in result.samples] == [s["completions"] for s in alone.samples]


def test_bad_arguments_are_refused():
    tok = ByteTokenizer()
    with pytest.raises(UserError, match="limit"):
        evaluate(CannedModel({}, tok), EchoTask(), tokenizer=tok, limit=0)
    with pytest.raises(UserError, match="shots"):
        evaluate(CannedModel({}, tok), EchoTask(), tokenizer=tok, shots=2)
    with pytest.raises(UserError, match="batch_size"):
        evaluate(CannedModel({}, tok), EchoTask(), tokenizer=tok, batch_size=0)


def _smollm2_or_skip():
    from tools import hub_offline

    if not hub_offline.available("smollm2-135m"):
        pytest.skip(
            "SmolLM2-135M is not converted: run `python tools/hub_offline.py model smollm2-135m`"
        )
    pytest.importorskip("sacrebleu")
    path = str(hub_offline.model_dir("smollm2-135m"))
    return path, T.AutoTokenizer.from_pretrained(path)


@pytest.mark.slow
def test_real_smollm2_runs_tasks_and_its_composition_equals_it_at_init():
    path, tok = _smollm2_or_skip()
    anchor = T.AutoModelForCausalLM.from_pretrained(path).eval()
    augment = T.AutoModelForCausalLM.from_pretrained(path).eval()
    augment.model.layers = augment.model.layers[:8]  # a shallower, different augmenting model
    augment.config.num_hidden_layers = 8
    task = get_task("mgsm:en")
    alone = evaluate(
        anchor, task, tokenizer=tok, limit=2, shots=1, max_new_tokens=24, progress=False
    )
    composed = calm.CALM(anchor, augment, calm.CALMConfig())
    both = evaluate(
        composed, task, tokenizer=tok, limit=2, shots=1, max_new_tokens=24, progress=False
    )
    assert [s["completions"] for s in both.samples] == [s["completions"] for s in alone.samples]
    assert all(s["completions"][0].strip() for s in alone.samples)
    assert set(alone.metrics) == {"accuracy"}


def _saved_tiny_model(directory, seed: int, layers: int = 4) -> str:
    """A tiny Llama and a lossless byte-level HF tokenizer saved in `directory`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": PAD, "<eos>": EOS} | {c: i + 2 for i, c in enumerate(sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = T.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")
    tok.save_pretrained(directory)
    tiny_llama(seed, layers).save_pretrained(directory)
    return str(directory)


def _write_math_data(root):
    (root / "gsm8k").mkdir(parents=True)
    (root / "mgsm").mkdir()
    row = {"question": "One plus one?", "answer": "1+1=2\n#### 2"}
    for name in ("train", "test"):
        (root / "gsm8k" / f"{name}.jsonl").write_text(json.dumps(row) + "\n")
    (root / "mgsm" / "mgsm_sw.tsv").write_text("Moja jumlisha moja?\t2\n")
    return str(root)


def test_cli_lists_tasks_and_refuses_bad_input(capsys):
    from calm.cli import main

    assert main(["eval", "--list"]) == 0
    assert "humaneval" in capsys.readouterr().out
    assert main(["eval", "--task", "humaneval"]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["eval", "--task", "nope", "--model", "x"]) == 2
    assert "Unknown task" in capsys.readouterr().err


def test_cli_evaluates_a_model_and_a_composition(tmp_path, capsys):
    from calm.cli import main

    data = _write_math_data(tmp_path / "data")
    anchor = _saved_tiny_model(tmp_path / "anchor", seed=6)
    common = ["--data", data, "--limit", "1", "--shots", "1", "--max-new-tokens", "5"]
    out = tmp_path / "model.json"
    assert main(["eval", "--task", "mgsm:sw", "--model", anchor, *common, "--out", str(out)]) == 0
    assert "| anchor | mgsm:sw | 1 | 1 |" in capsys.readouterr().out
    alone = json.loads(out.with_suffix(".samples.jsonl").read_text())

    augment = _saved_tiny_model(tmp_path / "augment", seed=7)
    composed = calm.CALM(
        T.AutoModelForCausalLM.from_pretrained(anchor),
        T.AutoModelForCausalLM.from_pretrained(augment),
        calm.CALMConfig(),
    )
    run = tmp_path / "run"
    composed.save_pretrained(run / "checkpoints" / "step-1")
    (run / "checkpoints" / "step-1" / "state.json").write_text("{}")
    out = tmp_path / "composition.json"
    assert (
        main(["eval", "--task", "mgsm:sw", "--composition", str(run), *common, "--out", str(out)])
        == 0
    )
    saved = json.loads(out.read_text())
    assert saved["metadata"]["model"]["class"] == "CALM"
    both = json.loads(out.with_suffix(".samples.jsonl").read_text())
    assert both["completions"] == alone["completions"]  # zero-initialized: equals the anchor


def test_a_composition_gets_the_tasks_stop_strings_as_a_hugging_face_model_does():
    import functools

    from test_tokenizers import byte_bpe

    tok = byte_bpe()
    anchor = hf.tiny_llama(len(tok), 32, 4, kv_heads=2, seed=4)
    composed = calm.CALM(anchor, hf.tiny_llama(len(tok), 32, 4, kv_heads=2, seed=5))
    seen: dict = {}
    real = composed.generate

    @functools.wraps(real)
    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    composed.generate = spy
    evaluate(composed, EchoTask(), tokenizer=tok, progress=False)
    assert seen["stop_strings"] == ["\n"] and seen["tokenizer"] is tok


class _Killed(Exception):
    pass


def _counting(model, fail_at: int | None = None) -> list:
    """Count `model.generate`'s calls (raise `_Killed` at call `fail_at`)."""
    calls, generate = [], type(model).generate.__get__(model)

    def counted(*args, **kwargs):
        calls.append(1)
        if len(calls) == fail_at:
            raise _Killed
        return generate(*args, **kwargs)

    model.generate = counted
    return calls


def test_a_journal_resumes_an_interrupted_generation_and_only_with_the_same_key(tmp_path):
    tok = ByteTokenizer()
    model, other = tiny_llama(3), tiny_llama(4)
    settings = dict(tokenizer=tok, batch_size=1, num_samples=2, seed=5, progress=False)
    whole = evaluate(model, EchoTask(), **settings)  # 3 examples x 2 samples: 6 batches
    journal = tmp_path / "echo.partial.jsonl"

    def killed_after_3_batches():
        _counting(model, fail_at=4)
        with pytest.raises(_Killed):
            evaluate(model, EchoTask(), journal=journal, **settings)

    killed_after_3_batches()
    assert len(journal.read_text().splitlines()) == 1 + 3  # the key, then 3 batches
    with open(journal, "a") as f:
        f.write('{"batch": 3, "complet')  # a line cut short by the kill: ignored
    _counting(model, fail_at=2)  # resumed, then killed again after one more batch
    with pytest.raises(_Killed):
        evaluate(model, EchoTask(), journal=journal, **settings)
    assert len(journal.read_text().splitlines()) == 1 + 4  # the torn line did not eat batch 4
    calls = _counting(model)
    resumed = evaluate(model, EchoTask(), journal=journal, **settings)
    assert len(calls) == 2  # only the batches not in the journal
    assert resumed.samples == whole.samples and resumed.metrics == whole.metrics
    assert not journal.exists()  # removed once the evaluation ended

    killed_after_3_batches()  # then other weights: the journal is started afresh
    calls = _counting(other)
    evaluate(other, EchoTask(), journal=journal, **settings)
    assert len(calls) == 6
    killed_after_3_batches()  # then other decoding (the seed): started afresh
    calls = _counting(model)
    evaluate(model, EchoTask(), journal=journal, **settings | {"seed": 6})
    assert len(calls) == 6
