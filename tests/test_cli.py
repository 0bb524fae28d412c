"""The `calm` command line end to end on tiny saved models: train, info, generate, bad input."""

from __future__ import annotations

import argparse
import json

import pytest
from conftest import tiny_lm

from calm.cli import build_parser, main
from calm.recipes.kv.bases import build_tokenizer


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tok = build_tokenizer()
    for name, (width, layers, seed) in {"anchor": (32, 4, 0), "aug": (24, 8, 1)}.items():
        tiny_lm("llama", width, layers, seed).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    lines = [
        json.dumps({"prompt": f"{a}+{b}=", "completion": str(a + b)})
        for a in range(6)
        for b in range(4)
    ]
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    (root / "dev.jsonl").write_text("\n".join(lines[:6]) + "\n")
    return root


def train_args(ws, out, *extra):
    return [
        "train",
        "--anchor", str(ws / "anchor"),
        "--augment", str(ws / "aug"),
        "--data", str(ws / "train.jsonl"),
        "--eval-data", str(ws / "dev.jsonl"),
        "--out", str(out),
        "--batch-size", "4",
        "--max-steps", "4",
        "--save-every", "2",
        "--lr", "1e-3",
        "--no-progress",
        *extra,
    ]  # fmt: skip


def one_error_line(capsys, command: str, pattern: str) -> None:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"calm {command}: error:"), err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert pattern in err, err


def test_train_info_generate(workspace, capsys):
    out = workspace / "runs" / "a"
    assert main(train_args(workspace, out)) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["step"] == 4 and result["eval_loss"] is not None
    assert (out / "loss.png").is_file() and (out / "metrics.jsonl").is_file()
    assert json.loads((out / "models.json").read_text())["anchor"] == str(workspace / "anchor")

    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["checkpoints"] == ["step-00000002", "step-00000004"]
    assert info["trainable_parameters"] > 0 and info["last_train"]["step"] == 4
    assert info["base_models"]["augments"] == [str(workspace / "aug")]
    assert main(["info", str(out)]) == 0
    assert "trainable:" in capsys.readouterr().out

    assert main(["generate", str(out), "--prompt", "3+4=", "--max-new-tokens", "5"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("3+4=") and text.endswith("\n")
    assert main(["generate", str(out), "--prompt", "1+1=", "--checkpoint", "best"]) == 0

    assert main(train_args(workspace, out)) == 2
    one_error_line(capsys, "train", "already holds checkpoints")
    assert main(train_args(workspace, out, "--seed", "3", "--resume")) == 2
    one_error_line(capsys, "train", "differs from the checkpoint's in ['seed']")


def test_train_generate_with_different_tokenizers(workspace, tmp_path, capsys):
    """An augmenting model with its own tokenizer: `calm train` pairs the tokenizers itself, and
    `calm generate` / `calm info` rebuild the pair from the run directory."""
    from test_tokenizers import byte_bpe, lm

    aug_tok = byte_bpe()
    lm(len(aug_tok), 24, 4, 1).save_pretrained(tmp_path / "aug_bpe")
    aug_tok.save_pretrained(tmp_path / "aug_bpe")
    out = tmp_path / "run"
    args = train_args(workspace, out)
    args[args.index("--augment") + 1] = str(tmp_path / "aug_bpe")
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["step"] == 4 and result["eval_loss"] is not None
    models = json.loads((out / "models.json").read_text())
    assert models["aug_tokenizers"] == [str(tmp_path / "aug_bpe")]

    assert main(["info", str(out)]) == 0
    assert "tokenizers:   paired" in capsys.readouterr().out
    assert main(["generate", str(out), "--prompt", "3+4=", "--max-new-tokens", "5"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("3+4=") and text.endswith("\n")

    (out / "models.json").write_text(json.dumps({**models, "aug_tokenizers": None}))
    assert main(["generate", str(out), "--prompt", "3+4="]) == 2
    one_error_line(capsys, "generate", "TokenizerPair")


def test_every_option_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("train", "generate", "info"):
        command = sub.choices[name]
        assert command.description
        for action in command._actions:
            assert action.help and "\n" not in action.help, (name, action.dest)


def test_bad_input_is_one_line(workspace, tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing")]) == 2
    one_error_line(capsys, "info", "does not exist")
    (tmp_path / "empty").mkdir()
    assert main(["generate", str(tmp_path / "empty"), "--prompt", "x"]) == 2
    one_error_line(capsys, "generate", "holds no checkpoint")

    args = train_args(workspace, tmp_path / "r")
    args[args.index("--data") + 1] = str(tmp_path / "nope.jsonl")
    assert main(args) == 2
    one_error_line(capsys, "train", "no such file")

    args = train_args(workspace, tmp_path / "r")
    args[args.index("--anchor") + 1] = str(tmp_path / "no-model")
    assert main(args) == 2
    one_error_line(capsys, "train", "does not exist")

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ab"}\n{oops\n')
    args = train_args(workspace, tmp_path / "r")
    args[args.index("--data") + 1] = str(bad)
    assert main(args) == 2
    one_error_line(capsys, "train", "bad.jsonl, line 2: not valid JSON")

    args = train_args(workspace, tmp_path / "r", "--truncation", "error", "--max-length", "3")
    assert main(args) == 2
    one_error_line(capsys, "train", "more than max_length=3")

    with pytest.raises(SystemExit) as exit_info:
        main([*train_args(workspace, tmp_path / "r"), "--no-such-option"])
    assert exit_info.value.code == 2
    assert "--no-such-option" in capsys.readouterr().err


def test_a_bug_shows_its_traceback_and_bad_input_one_line(monkeypatch, capsys):
    """Only UserError (and missing paths) are the user's: any other exception propagates."""
    import calm.commands.info as info
    from calm.errors import UserError

    def bug(args):
        raise ValueError("an internal inconsistency")

    monkeypatch.setattr(info, "run", bug)
    with pytest.raises(ValueError, match="internal inconsistency"):
        main(["info", "somewhere"])

    def bad_input(args):
        raise UserError("the run directory holds no checkpoint; train into it first.")

    monkeypatch.setattr(info, "run", bad_input)
    assert main(["info", "somewhere"]) == 2
    one_error_line(capsys, "info", "holds no checkpoint")
