"""calm.lm_eval: a composition as a model of lm-evaluation-harness. At init it scores exactly like
its anchor under the harness's own `hf` model (log-likelihoods, rolling windows, greedy
generations; one token stream and a TokenizerPair); perturbed blocks change the scores, and those
are the composition's own; `simple_evaluate(model="calm")` and the command line load a
`calm train` run. Offline: tasks are YAML over JSONL written here."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_blocks
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from test_tokenizers import byte_bpe, lm, unigram
from test_train import config as train_config

from calm import CALM, CALMConfig, TokenizerPair
from calm.errors import UserError
from calm.lm_eval import CALMLM, main
from calm.run import Run, load_model, load_run
from calm.train import train

ROOT = Path(__file__).parent.parent
MAX_LENGTH = 24  # small enough that long requests are cut and rolling strings take windows
LONG = "the river and the stone and the cloud " * 3  # over MAX_LENGTH tokens
CONTEXTS = ["The quick brown", "def add(a, b): ", "", LONG, "Hello world", "Hello world"]
CONTINUATIONS = [" fox", "return a+b", "hello", " end", " a", " b"]
ROLLING = [LONG + "tiger", "short", "def add(a, b):\n    return a+b"]
PROMPTS = ["The quick brown", "def add(a, b):", "Hello", "x = 1\ny ="]
STOPS = {"until": ["\n", "o"], "max_gen_toks": 6}

MC = [
    {"question": "Is the river wet?", "choices": ["yes", "no", "maybe"], "answer": 0},
    {"question": "2 + 2 =", "choices": ["3", "4"], "answer": 1},
    {"question": "The capital of Malawi is", "choices": ["Lilongwe", "Blantyre"], "answer": 0},
]
GEN = [
    {"prompt": "Say river: ", "target": "river"},
    {"prompt": "def f(x):\n    return", "target": " x"},
    {"prompt": "Hello, my name is", "target": " Tom"},
]


def _yaml(name: str, data: Path, cache: Path, body: str) -> str:
    """A task over the JSONL file `data`, read by `datasets` into `cache`."""
    head = f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
    return head + f"  cache_dir: {cache}\ntest_split: test\n" + textwrap.dedent(body)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    """A multiple-choice and a generate_until task over local JSONL (lm-eval's --include_path)."""
    root = tmp_path_factory.mktemp("tasks")
    for name, rows in (("mc", MC), ("gen", GEN)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cache = root / "hf_cache"
    mc = """\
        output_type: multiple_choice
        doc_to_text: "Q: {{question}}\\nA:"
        doc_to_choice: choices
        doc_to_target: answer
        metric_list:
          - metric: acc
        """
    gen = """\
        output_type: generate_until
        doc_to_text: "{{prompt}}"
        doc_to_target: "{{target}}"
        generation_kwargs:
          until: ["\\n", "."]
          max_gen_toks: 8
          do_sample: false
        metric_list:
          - metric: exact_match
        """
    (root / "calm_test_mc.yaml").write_text(_yaml("calm_test_mc", root / "mc.jsonl", cache, mc))
    (root / "calm_test_gen.yaml").write_text(_yaml("calm_test_gen", root / "gen.jsonl", cache, gen))
    return root


@pytest.fixture(scope="module")
def tok():
    return byte_bpe()


@pytest.fixture(scope="module")
def bases(tok):
    """(anchor, augment) over the byte-level BPE's tokens."""
    return lm(len(tok), 32, 4, 0), lm(len(tok), 24, 8, 1)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test here reaches the network: lm-eval reads the local tasks and data only."""

    def refuse(self, address):
        raise OSError(f"a test tried to connect to {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def ll_requests() -> list[Instance]:
    pairs = zip(CONTEXTS, CONTINUATIONS)
    return [Instance("loglikelihood", {}, (c, x), i) for i, (c, x) in enumerate(pairs)]


def rolling_requests() -> list[Instance]:
    return [Instance("loglikelihood_rolling", {}, (s,), i) for i, s in enumerate(ROLLING)]


def gen_requests() -> list[Instance]:
    return [Instance("generate_until", {}, (p, dict(STOPS)), i) for i, p in enumerate(PROMPTS)]


def hf_lm(anchor, tok, batch_size: int = 3) -> HFLM:
    return HFLM(
        pretrained=anchor, tokenizer=tok, batch_size=batch_size, device="cpu", max_length=MAX_LENGTH
    )


def assert_same_scores(got, want) -> None:
    assert len(got) == len(want)
    for (a, greedy_a), (b, greedy_b) in zip(got, want):
        assert a == pytest.approx(b, abs=1e-4) and greedy_a == greedy_b


def test_requests_score_like_the_anchor_under_hf(tok, bases):
    """Empty context, trailing whitespace, left truncation, shared contexts, rolling windows and
    stop strings, in other batches than `hf`'s (order restored)."""
    model = CALM(*bases, CALMConfig())
    ours, theirs = CALMLM(model, tok, batch_size=2, max_length=MAX_LENGTH), hf_lm(bases[0], tok)
    assert_same_scores(ours.loglikelihood(ll_requests()), theirs.loglikelihood(ll_requests()))
    rolled = ours.loglikelihood_rolling(rolling_requests())
    assert rolled == pytest.approx(theirs.loglikelihood_rolling(rolling_requests()), abs=1e-4)
    assert len(ours.tok_encode(ROLLING[0])) > MAX_LENGTH  # so it took several windows
    generated = ours.generate_until(gen_requests())
    assert generated == theirs.generate_until(gen_requests())
    assert all("\n" not in g and "o" not in g for g in generated)
    no_bos = CALMLM(model, tok, max_length=MAX_LENGTH, add_bos_token=False)
    bare = HFLM(pretrained=bases[0], tokenizer=tok, device="cpu", max_length=MAX_LENGTH,
                add_bos_token=False)  # fmt: skip
    scores = no_bos.loglikelihood(ll_requests()[:2])
    assert_same_scores(scores, bare.loglikelihood(ll_requests()[:2]))
    assert scores[0][0] != pytest.approx(ours.loglikelihood(ll_requests()[:1])[0][0], abs=1e-3)


def test_tasks_score_like_the_anchor_under_hf(tok, bases, tasks):
    """A multiple-choice and a generate_until task from YAML, sample by sample."""
    model = CALM(*bases, CALMConfig())
    ours = evaluate(CALMLM(model, tok, batch_size=2), tasks)
    theirs = evaluate(HFLM(pretrained=bases[0], tokenizer=tok, batch_size=3, device="cpu"), tasks)
    assert responses(ours) == pytest.approx(responses(theirs), abs=1e-4)
    assert generations(ours) == generations(theirs)
    assert (
        ours["results"]["calm_test_mc"]["acc,none"] == theirs["results"]["calm_test_mc"]["acc,none"]
    )


def evaluate(lm, tasks: Path, **kw) -> dict:
    return simple_evaluate(
        model=lm,
        tasks=["calm_test_mc", "calm_test_gen"],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        log_samples=True,
        **kw,
    )


def responses(results) -> list[float]:
    """The log-likelihood of every choice of every multiple-choice sample."""
    samples = results["samples"]["calm_test_mc"]
    return [resp[0] for s in samples for resp in s["filtered_resps"]]


def generations(results) -> list[str]:
    return [s["filtered_resps"][0] for s in results["samples"]["calm_test_gen"]]


def composed_log_probs(model, batch, k: int) -> torch.Tensor:
    """log p of the last k tokens of a one-row batch, by the composition's forward."""
    with torch.no_grad():
        logits = F.log_softmax(model(**batch).logits[0], dim=-1)
    ids = batch["input_ids"][0]
    return logits[-k - 1 : -1].gather(1, ids[-k:, None]).sum()


def window_log_probs(model, text: str, k: int, length: int) -> torch.Tensor:
    """log p of the last k tokens of `text` in a window of its last length + 1 anchor tokens
    (the last not fed), each anchor token seeing the augmenting tokens it sees in the whole text,
    of which the augmenting model reads the last `length`."""
    whole = model.tokenizers([text])
    start = whole["input_ids"].shape[1] - length - 1
    assert start > 0, "the text fits: nothing is cut"
    visible = whole["aug_visible"][0][:, start:-1]
    end = int(visible.max())
    cut = end - length
    assert cut > 0, "the augmenting side fits: nothing is cut"
    batch = {
        "input_ids": whole["input_ids"][:, start:-1],
        "aug_input_ids": [whole["aug_input_ids"][0][:, cut:end]],
        "aug_visible": [(visible - cut).clamp(min=0)],
    }
    with torch.no_grad():
        logits = F.log_softmax(model(**batch).logits[0], dim=-1)
    ids = whole["input_ids"][0, -k:]
    return logits[-k:].gather(1, ids[:, None]).sum()


def recomputed_greedy(model, tok, prompt: str, steps: int) -> str:
    """Greedy continuation of `prompt` by full recomputation (no cache), cut at the stops."""
    ids = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    text = tok.decode(ids[0, -steps:], skip_special_tokens=True)
    for stop in STOPS["until"]:
        text = text.split(stop)[0]
    return text


def test_perturbed_composition_scores_its_own_way(tok, bases, tasks):
    model = CALM(*bases, CALMConfig())
    randomize_blocks(model)
    ours = CALMLM(model, tok, batch_size=2, max_length=MAX_LENGTH)
    scores = ours.loglikelihood(ll_requests())
    anchor = hf_lm(bases[0], tok).loglikelihood(ll_requests())
    assert all(abs(a - b) > 1e-3 for (a, _), (b, _) in zip(scores, anchor))
    whole = torch.tensor([tok.encode(CONTEXTS[0] + CONTINUATIONS[0])])
    k = len(whole[0]) - len(tok.encode(CONTEXTS[0]))
    want = composed_log_probs(model, {"input_ids": whole}, k)
    assert scores[0][0] == pytest.approx(float(want), abs=1e-4)
    steps = STOPS["max_gen_toks"]
    assert ours.generate_until(gen_requests()) == [
        recomputed_greedy(model, tok, p, steps) for p in PROMPTS
    ]
    perturbed = evaluate(CALMLM(model, tok, batch_size=2), tasks)
    at_init = evaluate(CALMLM(CALM(*bases, CALMConfig()), tok, batch_size=2), tasks)
    assert all(abs(a - b) > 1e-3 for a, b in zip(responses(perturbed), responses(at_init)))


@pytest.fixture(scope="module")
def paired(tok):
    """(anchor, augment, pair): the augmenting model reads another tokenizer (SentencePiece-style
    Unigram)."""
    aug_tok = unigram()
    return lm(len(tok), 32, 4, 0), lm(len(aug_tok), 24, 4, 1), TokenizerPair(tok, aug_tok)


def test_a_tokenizer_pair_scores_like_the_anchor_at_init(tok, paired):
    anchor, aug, pair = paired
    model = CALM(anchor, aug, CALMConfig(every=2), tokenizers=pair)
    ours, theirs = CALMLM(model, tok, batch_size=2, max_length=MAX_LENGTH), hf_lm(anchor, tok)
    assert_same_scores(ours.loglikelihood(ll_requests()), theirs.loglikelihood(ll_requests()))
    rolled = ours.loglikelihood_rolling(rolling_requests())
    assert rolled == pytest.approx(theirs.loglikelihood_rolling(rolling_requests()), abs=1e-4)
    # prompts that fit: a pair cuts a long prompt as text, `hf` cuts its tokens
    assert ours.generate_until(gen_requests()) == theirs.generate_until(gen_requests())


def test_a_perturbed_tokenizer_pair_reads_the_pairs_alignment(tok, paired):
    """Each score is the composition's forward over `pair(context + continuation)`, and each
    generation its own `generate` of the prompt alone, cut at the first stop string."""
    anchor, aug, pair = paired
    model = CALM(anchor, aug, CALMConfig(every=2), tokenizers=pair)
    randomize_blocks(model)
    ours = CALMLM(model, tok, batch_size=3, max_length=MAX_LENGTH)
    scores = ours.loglikelihood(ll_requests())
    for (context, continuation), (score, _) in zip(zip(CONTEXTS, CONTINUATIONS), scores):
        whole = ours.tok_encode(context + continuation)
        if len(whole) > MAX_LENGTH:
            continue  # cut to a window: the forward below would see the whole text
        if context:  # trailing whitespace moves to the continuation, as lm-eval splits
            k = len(ours._encode_pair(context, continuation)[1])
        else:
            k = len(ours.tok_encode(continuation, add_special_tokens=False))
        want = composed_log_probs(model, pair([context + continuation]), k)
        assert score == pytest.approx(float(want), abs=1e-4)
    anchor_scores = hf_lm(anchor, tok).loglikelihood(ll_requests())
    assert abs(scores[0][0] - anchor_scores[0][0]) > 1e-3
    k = len(ours._encode_pair(CONTEXTS[3], CONTINUATIONS[3])[1])
    want = window_log_probs(model, CONTEXTS[3] + CONTINUATIONS[3], k, MAX_LENGTH)
    assert scores[3][0] == pytest.approx(float(want), abs=1e-4)
    want = []
    for prompt in PROMPTS:
        batch = pair([prompt])
        out = model.generate(**batch, max_new_tokens=6, stop_strings=STOPS["until"] + ["</s>"])
        text = tok.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        for stop in STOPS["until"]:
            text = text.split(stop)[0]
        want.append(text)
    assert ours.generate_until(gen_requests()) == want


DATA = [{"prompt": f"say {w}:", "completion": f" {w}"} for w in ("river", "stone", "cloud")] * 2


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tok, bases) -> Path:
    """A run directory as `calm train` writes it: two steps, a best checkpoint, models.json."""
    root = tmp_path_factory.mktemp("run")
    paths = []
    for name, base in zip(("anchor", "aug"), bases):
        base.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        paths.append(str(root / name))
    model = CALM(*[load_model(p, "model") for p in paths], CALMConfig(init="default"))
    cfg = train_config(root, "out", max_steps=2, eval_every=1, save_every=1, warmup_steps=0)
    train(model, DATA, DATA[:2], config=cfg, tokenizer=tok)
    Run(cfg.output_dir).write_models(paths[0], paths[1:], paths[0])
    return Path(cfg.output_dir)


def test_simple_evaluate_loads_a_run_by_name(run_dir, tasks, tok):
    by_name = evaluate("calm", tasks, model_args=f"run={run_dir},checkpoint=best,batch_size=2")
    loaded = load_run(run_dir, checkpoint="best")
    direct = evaluate(CALMLM(loaded.model, loaded.tokenizer, batch_size=2), tasks)
    assert responses(by_name) == pytest.approx(responses(direct), abs=1e-6)
    assert generations(by_name) == generations(direct)
    trainable = loaded.model.num_trainable_parameters()
    assert by_name["config"]["calm_trainable_parameters"] == trainable
    last = evaluate("calm", tasks, model_args={"run": str(run_dir), "device": "cpu"})
    assert last["config"]["model_args"]["run"] == str(run_dir)
    assert get_model("calm") is CALMLM and get_model("hf") is HFLM


def test_model_args_reach_the_model(run_dir):
    lm_ = CALMLM.create_from_arg_string(
        f"run={run_dir},checkpoint=best,dtype=bfloat16,device=cpu,max_length=32,max_gen_toks=4",
        {"batch_size": 3, "max_batch_size": 64, "device": None},
    )
    assert (lm_.max_length, lm_.max_gen_toks, lm_.batch_size) == (32, 4, 3)
    assert (
        lm_.model.anchor.dtype == torch.bfloat16 and lm_.model.augments[0].dtype == torch.bfloat16
    )
    assert all(p.dtype == torch.float32 for p in lm_.model.trainable_parameters())
    ((score, _),) = lm_.loglikelihood(ll_requests()[:1])
    assert score < 0

    def generate(**kw):
        kwargs = {"until": [], **kw}
        return lm_.generate_until([Instance("generate_until", {}, ("say river:", kwargs), 0)])

    assert generate() == generate(max_gen_toks=4) != generate(max_gen_toks=8)


def test_command_line_loads_a_run(run_dir, tasks, tmp_path, monkeypatch):
    """`calm-lm-eval` is lm-eval's own command line (flags, task paths, output) with "calm"."""
    out = tmp_path / "results"
    argv = ["calm-lm-eval", "--model", "calm", "--model_args", f"run={run_dir},checkpoint=best"]
    argv += ["--tasks", "calm_test_mc", "--include_path", str(tasks)]  # default device: cuda:0
    argv += ["--batch_size", "2", "--output_path", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    # the harness indexes its own thousands of task files first (11 s here): only ours here
    monkeypatch.setattr(TaskManager.__init__, "__defaults__", (None, None, False, None))
    main()
    (written,) = out.rglob("results_*.json")
    results = json.loads(written.read_text())
    direct = evaluate(CALMLM(load_run(run_dir, "best").model, load_run(run_dir).tokenizer), tasks)
    assert results["results"]["calm_test_mc"]["acc,none"] == pytest.approx(
        direct["results"]["calm_test_mc"]["acc,none"]
    )
    assert results["config"]["model"] == "calm"


@pytest.mark.slow
def test_installed_console_script(run_dir, tasks, tmp_path):
    """The script `pip install -e .` installs (pyproject's [project.scripts])."""
    script = Path(sys.executable).parent / "calm-lm-eval"
    if not script.exists():
        pytest.skip("calm-lm-eval is not installed here; run pip install -e '.[dev]'")
    cmd = [str(script), "--model", "calm", "--model_args", f"run={run_dir}", "--tasks"]
    cmd += ["calm_test_gen", "--include_path", str(tasks), "--device", "cpu", "--limit", "2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "calm_test_gen" in done.stdout and "exact_match" in done.stdout


@pytest.mark.slow
def test_importing_calm_leaves_lm_eval_alone_and_registers_calm_after_hf():
    """`import calm` does not import lm-eval; importing calm.lm_eval first still leaves the
    harness's own models reachable (its registry imports them only when empty)."""
    code = (
        "import sys, calm; calm.CALM; assert 'lm_eval' not in sys.modules, 'imported'\n"
        "import calm.lm_eval\n"
        "from lm_eval.api.registry import get_model\n"
        "assert get_model('calm') is calm.lm_eval.CALMLM and get_model('hf').__name__ == 'HFLM'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]


def test_bad_input_is_one_sentence(tok, bases, paired, run_dir):
    model = CALM(*bases, CALMConfig())
    with pytest.raises(UserError, match="Unknown model_args \\['pretrained'\\]"):
        CALMLM.create_from_arg_string(f"run={run_dir},pretrained=gpt2")
    with pytest.raises(UserError, match="need run=RUN_DIR"):
        CALMLM.create_from_arg_string("checkpoint=best")
    with pytest.raises(UserError, match="dtype must name a torch dtype"):
        CALMLM.create_from_arg_string(f"run={run_dir},dtype=float33")
    with pytest.raises(UserError, match="batch_size must be a positive integer"):
        CALMLM(model, tok, batch_size="auto")
    with pytest.raises(TypeError, match="scores a calm.CALM"):
        CALMLM(bases[0], tok)
    encoder = CALM(*bases, CALMConfig(mode="encoder"))
    with pytest.raises(UserError, match="causal compositions only"):
        CALMLM(encoder, tok)
    anchor, aug, pair = paired
    with pytest.raises(UserError, match="differs from the anchor side"):
        CALMLM(CALM(anchor, aug, CALMConfig(every=2), tokenizers=pair), unigram())
    lm_ = CALMLM(model, tok, max_length=MAX_LENGTH)
    too_long = [Instance("generate_until", {}, ("hi", {"max_gen_toks": MAX_LENGTH}), 0)]
    with pytest.raises(UserError, match="leaves no room for a prompt"):
        lm_.generate_until(too_long)
    beams = [Instance("generate_until", {}, ("hi", {"num_beams": 2}), 0)]
    with pytest.raises(UserError, match="drop \\['num_beams'\\]"):
        lm_.generate_until(beams)
