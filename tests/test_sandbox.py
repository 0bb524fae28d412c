"""The sandbox contains hostile programs, scores them as failures, and the harness goes on."""

from __future__ import annotations

import os
import sys
import tempfile

import pytest

from calm import sandbox
from calm.sandbox import execute

PRIVILEGED = sys.platform.startswith("linux") and os.geteuid() == 0
needs_root = pytest.mark.skipif(
    not PRIVILEGED, reason="file and /proc isolation needs root (uid switch and mount namespace)"
)


def _sandbox_processes() -> list[int]:
    """Live (not zombie) pids under one of the sandbox's fresh uids; without root, none."""
    if not PRIVILEGED:
        return []
    uids = range(sandbox._UID_BASE, sandbox._UID_BASE + sandbox._UID_SPAN)
    pids = [int(e) for e in os.listdir("/proc") if e.isdigit()]
    return [pid for pid in pids if _uid(pid) in uids and _state(pid) not in ("Z", "")]


def _uid(pid: int) -> int:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return -1


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def _harness_still_works() -> None:
    result = execute("print(sum(range(10)))")
    assert (result.status, result.stdout) == ("passed", "45\n")


def test_a_correct_program_passes_and_its_output_is_captured():
    result = execute("import sys\nprint('out')\nprint('err', file=sys.stderr)\n")
    assert result.status == "passed" and result.returncode == 0
    assert (result.stdout, result.stderr, result.truncated) == ("out\n", "err\n", False)


def test_an_exception_or_nonzero_exit_fails():
    assert execute("assert 1 == 2").status == "failed"
    assert execute("import sys; sys.exit(3)").status == "failed"


def test_non_string_program_is_rejected():
    with pytest.raises(TypeError, match="Python source"):
        execute(b"print(1)")


def test_infinite_loop_times_out():
    result = execute("while True:\n    pass\n", timeout=1.0)
    assert result.status == "timeout" and result.returncode is None
    assert result.duration < 5
    assert not _sandbox_processes()
    _harness_still_works()


@pytest.mark.parametrize("exit_call", ["import sys; sys.exit(0)", "import os; os._exit(0)"])
def test_early_exit_cannot_fake_success(exit_call):
    program = f"{exit_call}\nassert False, 'the tests below never ran'\n"
    result = execute(program)
    assert result.status == "failed"
    _harness_still_works()


def test_multi_gigabyte_allocation_fails_without_touching_the_machine():
    result = execute("x = bytearray(8 << 30)\nprint(len(x))\n", memory_mb=512)
    assert result.status == "failed"
    assert "MemoryError" in result.stderr
    _harness_still_works()


def test_output_flood_is_capped_and_fails():
    result = execute("while True:\n    print('x' * 10000)\n", timeout=3.0, file_size_mb=4)
    assert result.status in ("failed", "timeout")
    assert result.truncated and len(result.stdout) == 65_536
    _harness_still_works()


def test_environment_secrets_are_not_inherited(monkeypatch):
    monkeypatch.setenv("CALM_TEST_SECRET", "hunter2-secret")
    program = "import os\nprint(sorted(os.environ))\nprint(os.environ.get('CALM_TEST_SECRET'))\n"
    result = execute(program)
    assert result.status == "passed"
    assert "hunter2-secret" not in result.stdout and "CALM_TEST_SECRET" not in result.stdout
    _harness_still_works()


@needs_root
def test_other_processes_environment_is_unreadable(monkeypatch):
    monkeypatch.setenv("CALM_TEST_SECRET", "hunter2-secret")
    program = f"print(open('/proc/{os.getpid()}/environ', 'rb').read())\n"
    result = execute(program)
    assert result.status == "failed" and "hunter2-secret" not in result.stdout
    assert "PermissionError" in result.stderr


@needs_root
def test_files_outside_its_directory_cannot_be_deleted_written_or_read():
    project_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with (
        tempfile.TemporaryDirectory(dir=project_root) as inside,
        tempfile.TemporaryDirectory() as tmp,
    ):
        victims = [os.path.join(inside, "victim.txt"), os.path.join(tmp, "victim.txt")]
        for path in victims:
            with open(path, "w") as f:
                f.write("precious")
        for path in victims:
            for attack in (
                f"import os; os.remove({path!r})",
                f"open({path!r}, 'w').write('pwned')",
                f"print(open({path!r}).read())",
                f"import shutil; shutil.rmtree({os.path.dirname(path)!r})",
                f"open({os.path.join(os.path.dirname(path), 'new.txt')!r}, 'w').write('x')",
            ):
                result = execute(attack)
                assert result.status == "failed", attack
                assert "precious" not in result.stdout
        for path in victims:
            with open(path) as f:
                assert f.read() == "precious"
            assert os.listdir(os.path.dirname(path)) == ["victim.txt"]
    assert execute("open('/etc/calm-sandbox-test', 'w').write('x')").status == "failed"
    assert not os.path.exists("/etc/calm-sandbox-test")
    _harness_still_works()


def test_its_own_directory_is_writable_and_fresh():
    first = execute(
        "open('scratch.txt', 'w').write('x')\nimport os\nprint(sorted(os.listdir('.')))"
    )
    second = execute("import os\nprint(sorted(os.listdir('.')))")
    assert first.status == second.status == "passed"
    assert "scratch.txt" in first.stdout and "scratch.txt" not in second.stdout


@needs_root
def test_network_is_unreachable():
    program = "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)\n"
    result = execute(program)
    assert result.status == "failed"
    assert "unreachable" in result.stderr


@pytest.mark.parametrize("cgroups", [True, False], ids=["cgroups", "uid-only"])
def test_fork_bomb_is_contained_and_leaves_no_process(cgroups, monkeypatch):
    if not cgroups:  # where cgroups are not writable: the fresh uid's NPROC limit and kill(-1)
        if not PRIVILEGED:
            pytest.skip("without root there is no uid to fall back on")
        monkeypatch.setattr(sandbox, "_make_cgroups", lambda *args: None)
    # First a harmless probe: at most 64 sleeping children. It must hit the process limit,
    # otherwise the real bomb below is not run (it would not be contained).
    probe = (
        "import os, time\nn = 0\nfor _ in range(64):\n    try:\n        pid = os.fork()\n"
        "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(2)\n"
        "        os._exit(0)\n    n += 1\nprint(n)\n"
    )
    result = execute(probe, timeout=4.0, max_processes=16)
    assert result.status == "passed", result.stderr
    assert int(result.stdout) <= 16, "the process limit did not bind: refusing to run the fork bomb"
    assert not _sandbox_processes()
    # The bomb: every process forks (10 rounds: at most 1024 processes even if uncontained),
    # then spins until killed.
    bomb = (
        "import os\nfor _ in range(10):\n    try:\n        os.fork()\n    except OSError:\n"
        "        pass\nwhile True:\n    pass\n"
    )
    result = execute(bomb, timeout=2.0, max_processes=16)
    assert result.status in ("timeout", "failed")
    assert not _sandbox_processes()
    _harness_still_works()
