"""The layout holds at run time: the pure modules import without torch, and `calm.train` stays the
function whatever was imported first."""

import subprocess
import sys
import textwrap

BLOCK_TORCH = textwrap.dedent(
    """
    import importlib.abc, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers", "numpy", "safetensors"):
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Block())
    """
)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_pure_modules_import_without_torch():
    done = _run(
        """
        import calm, calm.config, calm.layer_map, calm.sandbox, calm.errors
        c = calm.config.CALMConfig(every=2)
        assert calm.config.CALMConfig.from_json(c.to_json()) == c
        assert calm.layer_map.default_connections(8, 12)[0].anchor_layer == 5
        assert calm.CALMConfig is calm.config.CALMConfig
        print("ok")
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_the_command_line_help_loads_no_model_library():
    """`calm --help` and each command's --help build every parser without torch (a fast help)."""
    done = _run(
        """
        import calm.cli
        for argv in (["--help"], ["pretrain", "--help"], ["reproduce", "--help"]):
            try:
                calm.cli.main(argv)
            except SystemExit as e:
                assert e.code == 0, (argv, e.code)
        print("ok")
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("ok")


def test_blocking_really_blocks():
    done = _run("import calm.model")
    assert done.returncode != 0 and "blocked in this test" in done.stderr


def test_calm_train_is_the_function_whatever_was_imported_first():
    code = """
    import calm.train
    from calm.train import TrainConfig
    import calm
    assert callable(calm.train) and calm.train.__name__ == "train", calm.train
    assert calm.TrainConfig is TrainConfig
    print("ok")
    """
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr


def test_public_api_names():
    import calm

    assert sorted(calm.__all__) == sorted([*calm._EXPORTS, "__version__"])
    for name in calm.__all__:
        assert getattr(calm, name) is not None
    assert set(dir(calm)) >= set(calm.__all__)
