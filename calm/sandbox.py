"""Run one untrusted Python program in a contained child process and report how it ended.

`execute(program, timeout)` writes the program into a fresh temporary directory and runs it with
the current interpreter in a new session, under a wall-clock timeout and rlimits (CPU time,
address space, file size, process count, no core dumps, few open files), with a stripped
environment. It returns "passed" only when the program ran to its last statement and exited 0:
a `sys.exit(0)` or `os._exit(0)` half way through does not count (the in-sandbox runner reports
completion on a private pipe with a per-run nonce).

When the caller is root on Linux, the child is also, before it runs any untrusted code:
  - put into fresh pids and memory cgroups (v1 or v2, where writable): a hard cap on the number
    of processes and on the total memory of everything it spawns, and a reliable way to kill it all;
  - moved into new mount and network namespaces: no network at all; the caller's home, the
    caller's working directory, the project checkout, /tmp, /var/tmp and /dev/shm are replaced by
    empty tmpfs mounts (the interpreter's own install prefix is mounted back read-only), so project
    files and other jobs' scratch files are invisible;
  - switched to a fresh unprivileged uid/gid used by nothing else, so RLIMIT_NPROC binds (it does
    not bind root), it cannot write root's files, signal other processes or undo the mounts.
After the run every process left in its cgroup, and every process of its uid, is SIGKILLed.

Without root only the rlimits, the new session, the temporary directory and the stripped
environment apply (see docs/eval.md for what that does not protect against).

Child mode: `python -I sandbox.py --child SPEC_JSON` is the bootstrap that sets all of the above
up inside the child and then execs the runner; the library never calls it with user input.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

_UID_BASE = 1_770_000_000  # fresh uids for sandboxed children: far above any real account
_UID_SPAN = 100_000_000
_counter = itertools.count()

# Runs inside the sandbox as the unprivileged uid: executes program.py in a fresh __main__
# namespace and, only if it finished without raising (SystemExit included), writes the nonce.
_RUNNER = r"""
import os, sys
_r, _w = int(sys.argv[1]), int(sys.argv[2])
_nonce = os.read(_r, 64)
os.close(_r)
with open("program.py", encoding="utf-8") as _f:
    _code = compile(_f.read(), "program.py", "exec")
del _f, _r
sys.argv = ["program.py"]
try:
    exec(_code, {"__name__": "__main__", "__file__": "program.py", "__builtins__": __builtins__})
except SystemExit as _e:
    os._exit(_e.code if isinstance(_e.code, int) and _e.code != 0 else 1)
sys.stdout.flush()
sys.stderr.flush()
os.write(_w, _nonce)
os._exit(0)
"""


class SandboxError(RuntimeError):
    """The sandbox itself could not be set up (not a verdict on the program)."""


@dataclass(frozen=True)
class SandboxResult:
    """How one sandboxed program ended."""

    status: str  # "passed" | "failed" | "timeout"
    returncode: int | None  # None when the run was killed at the wall-clock timeout
    stdout: str  # at most `max_output` bytes, decoded with replacement
    stderr: str
    truncated: bool  # True when stdout or stderr was cut at `max_output`
    duration: float  # wall-clock seconds
    isolation: tuple[str, ...]  # the mechanisms that were applied, e.g. ("rlimits", "netns")


@dataclass(frozen=True)
class _Cgroups:
    dirs: tuple[str, ...]

    def procs(self) -> list[int]:
        pids: list[int] = []
        for d in self.dirs:
            try:
                with open(os.path.join(d, "cgroup.procs")) as f:
                    pids += [int(x) for x in f.read().split()]
            except OSError:
                pass
        return pids

    def kill_all(self) -> None:
        for d in self.dirs:
            if os.path.exists(os.path.join(d, "cgroup.kill")):
                _write(os.path.join(d, "cgroup.kill"), "1")
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            pids = self.procs()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.01)

    def remove(self) -> None:
        for d in self.dirs:
            for _ in range(100):
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _make_cgroups(name: str, max_processes: int, memory_bytes: int) -> _Cgroups | None:
    """Create pids and memory cgroups for one run; None when this machine does not allow it."""
    made: list[str] = []
    try:
        if os.path.isfile("/sys/fs/cgroup/cgroup.controllers"):  # unified (v2)
            with open("/sys/fs/cgroup/cgroup.subtree_control") as f:
                enabled = f.read().split()
            if "pids" not in enabled:
                return None
            d = f"/sys/fs/cgroup/{name}"
            os.mkdir(d)
            made.append(d)
            _write(f"{d}/pids.max", str(max_processes))
            if "memory" in enabled:
                _write(f"{d}/memory.max", str(memory_bytes))
                _write(f"{d}/memory.swap.max", "0")
        else:  # v1: one hierarchy per controller
            if not os.path.isdir("/sys/fs/cgroup/pids"):
                return None
            d = f"/sys/fs/cgroup/pids/{name}"
            os.mkdir(d)
            made.append(d)
            _write(f"{d}/pids.max", str(max_processes))
            if os.path.isdir("/sys/fs/cgroup/memory"):
                d = f"/sys/fs/cgroup/memory/{name}"
                os.mkdir(d)
                made.append(d)
                _write(f"{d}/memory.limit_in_bytes", str(memory_bytes))
    except OSError:
        _Cgroups(tuple(made)).remove()
        return None
    return _Cgroups(tuple(made))


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of `uid` (a helper that becomes `uid` and calls kill(-1))."""
    code = f"import os,signal;os.setgroups([]);os.setgid({uid});os.setuid({uid});"
    code += "\ntry:\n os.kill(-1, signal.SIGKILL)\nexcept ProcessLookupError:\n pass"
    subprocess.run([sys.executable, "-I", "-S", "-c", code], check=False, timeout=10)


def _uid_processes(uid: int) -> list[int]:
    """Pids whose real uid is `uid` (read from /proc)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def _hideable(path: str) -> bool:
    """A directory that may be covered with an empty tmpfs (never /, /dev, /proc or /sys)."""
    real = os.path.realpath(path)
    return (
        os.path.isdir(real)
        and real not in ("/", "/dev")
        and real.split("/")[1] not in ("proc", "sys")
    )


def _project_root() -> str | None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return root if os.path.isfile(os.path.join(root, "pyproject.toml")) else None


def _read_capped(path: str, cap: int) -> tuple[str, bool]:
    with open(path, "rb") as f:
        data = f.read(cap + 1)
    return data[:cap].decode("utf-8", errors="replace"), len(data) > cap


def execute(
    program: str,
    timeout: float = 5.0,
    *,
    memory_mb: int = 1024,
    max_processes: int = 32,
    file_size_mb: int = 16,
    max_output: int = 65_536,
    hide: tuple[str, ...] = (),
) -> SandboxResult:
    """Run `program` (Python source) in the sandbox and return how it ended.

    `memory_mb` caps the address space of each process and (with cgroups) the total of all of
    them; `max_processes` caps processes and threads; `file_size_mb` caps any file it writes and
    its stdout/stderr; `max_output` bytes of each stream are returned. `hide` adds directories to
    hide (root only).
    """
    if not isinstance(program, str):
        raise TypeError(f"program must be a str of Python source, got {type(program).__name__}.")
    if timeout <= 0 or memory_mb <= 0 or max_processes <= 0 or file_size_mb <= 0:
        raise ValueError("timeout, memory_mb, max_processes and file_size_mb must be positive.")
    privileged = sys.platform.startswith("linux") and os.geteuid() == 0
    n = next(_counter)
    uid = _UID_BASE + (os.getpid() * 1000 + n) % _UID_SPAN
    host_dir, work = _scratch(program, uid if privileged else None)
    cgroups = None
    if privileged:
        cgroups = _make_cgroups(f"calm-sandbox-{os.getpid()}-{n}", max_processes, memory_mb << 20)
    spec = _child_spec(work, uid, privileged, cgroups, hide)
    spec |= {
        "cpu_seconds": int(timeout) + 1,
        "memory_bytes": memory_mb << 20,
        "file_bytes": file_size_mb << 20,
        "max_processes": max_processes,
    }
    nonce = secrets.token_hex(16).encode()
    try:
        returncode, reported, duration = _run_child(
            spec, nonce, host_dir, timeout, cgroups, uid if privileged else None
        )
        stdout, cut_out = _read_capped(os.path.join(host_dir, "stdout"), max_output)
        stderr, cut_err = _read_capped(os.path.join(host_dir, "stderr"), max_output)
    finally:
        if cgroups:
            cgroups.remove()
        shutil.rmtree(host_dir, ignore_errors=True)
    if returncode is None or returncode == -signal.SIGXCPU:
        status = "timeout"
    elif returncode == 0 and reported == nonce:
        status = "passed"
    else:
        status = "failed"
    isolation = ["rlimits", "session", "tmpdir", "env"]
    if privileged:
        isolation += ["uid", "mountns", "netns"] + (["cgroups"] if cgroups else [])
    return SandboxResult(
        status=status,
        returncode=returncode,
        stdout=stdout,
        stderr=stderr,
        truncated=cut_out or cut_err,
        duration=duration,
        isolation=tuple(isolation),
    )


def _run_child(
    spec: dict,
    nonce: bytes,
    host_dir: str,
    timeout: float,
    cgroups: _Cgroups | None,
    uid: int | None,
) -> tuple[int | None, bytes, float]:
    """Start the bootstrap on `spec`, wait at most `timeout` seconds, kill what is left, and return
    (returncode or None at the timeout, what the runner reported on its pipe, wall seconds).
    Output goes to host_dir/stdout and host_dir/stderr."""
    nonce_r, nonce_w = os.pipe()
    done_r, done_w = os.pipe()
    setup_r, setup_w = os.pipe()  # the bootstrap reports a failed set-up here, never the program
    os.write(nonce_w, nonce)
    os.close(nonce_w)
    argv = [sys.executable, "-I", "-B", os.path.abspath(__file__), "--child", json.dumps(spec)]
    argv += [str(nonce_r), str(done_w), str(setup_w)]
    out_path, err_path = os.path.join(host_dir, "stdout"), os.path.join(host_dir, "stderr")
    start = time.monotonic()
    returncode: int | None = None
    try:
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=_child_env(spec["work"], spec["privileged"]),
                cwd=spec["work"],
                start_new_session=True,
                pass_fds=(nonce_r, done_w, setup_w),
            )
        os.close(nonce_r)
        os.close(done_w)
        os.close(setup_w)
        try:
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            returncode = None
        finally:
            _end(proc, cgroups, uid)
        duration = time.monotonic() - start
        setup_error = _read_ready(setup_r, 4096).decode(errors="replace")
        if setup_error:
            raise SandboxError(
                f"The sandbox could not isolate the program ({setup_error.strip()}); it needs "
                "Linux mount/network namespaces and setuid as root, or an unprivileged caller."
            )
        return returncode, _read_ready(done_r, 64), duration
    finally:
        os.close(done_r)
        os.close(setup_r)


def _scratch(program: str, uid: int | None) -> tuple[str, str]:
    """(host_dir, work): a fresh directory whose `work/` holds program.py, owned by `uid` if given.
    The child sees only `work/`; its stdout and stderr files go next to it, never visible inside."""
    host_dir = tempfile.mkdtemp(prefix="calm-sandbox-")
    work = os.path.join(host_dir, "work")
    os.mkdir(work)
    with open(os.path.join(work, "program.py"), "w", encoding="utf-8") as f:
        f.write(program)
    if uid is not None:
        os.chown(work, uid, uid)
        os.chown(os.path.join(work, "program.py"), uid, uid)
    return host_dir, work


def _child_spec(
    work: str, uid: int, privileged: bool, cgroups: _Cgroups | None, hide: tuple[str, ...]
) -> dict:
    """What the bootstrap sets up: identity, cgroups, the directories to hide and to keep."""
    hidden = [os.path.expanduser("~"), os.getcwd(), "/tmp", "/var/tmp", "/dev/shm", *hide]
    if _project_root():
        hidden.append(_project_root())
    return {
        "privileged": privileged,
        "uid": uid,
        "cgroups": list(cgroups.dirs) if cgroups else [],
        "hide": sorted({os.path.realpath(p) for p in hidden if _hideable(p)}),
        "keep": sorted({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix)}),
        "work": work,
    }


def _child_env(work: str, privileged: bool) -> dict[str, str]:
    """The child's whole environment: nothing of the caller's is passed on."""
    return {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "HOME": "/tmp/sandbox" if privileged else work,
        "PYTHONHASHSEED": "0",
        "PYTHONIOENCODING": "utf-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _end(proc: subprocess.Popen, cgroups: _Cgroups | None, uid: int | None) -> None:
    """Kill the child's session, then everything left in its cgroups (or, without cgroups, every
    process of its uid when it had one), and reap the child."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if cgroups:
        cgroups.kill_all()
    elif uid is not None:
        for _ in range(20):
            if not _uid_processes(uid):
                break
            _kill_uid(uid)
    proc.wait()


def _read_ready(fd: int, n: int) -> bytes:
    """Up to `n` bytes already written to pipe `fd`, without waiting (b"" when none)."""
    os.set_blocking(fd, False)
    try:
        return os.read(fd, n)
    except BlockingIOError:
        return b""


def _libc_call(name: str, *args) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if getattr(libc, name)(*args) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{name} failed: {os.strerror(errno)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    _libc_call("mount", enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data))


def _isolate_filesystem(spec: dict) -> str:
    """In new mount+net namespaces: hide directories behind tmpfs, re-expose the interpreter."""
    ms_rdonly, ms_nosuid, ms_nodev, ms_remount, ms_bind, ms_rec, ms_private = (
        1,
        2,
        4,
        32,
        4096,
        16384,
        1 << 18,
    )
    _libc_call("unshare", 0x00020000 | 0x40000000)  # CLONE_NEWNS | CLONE_NEWNET
    _mount(None, "/", None, ms_rec | ms_private)
    keep_fds = {p: os.open(p, os.O_RDONLY | os.O_DIRECTORY) for p in spec["keep"]}
    work_fd = os.open(spec["work"], os.O_RDONLY | os.O_DIRECTORY)
    hidden: list[str] = []
    for path in sorted(spec["hide"], key=len):
        if any(path == h or path.startswith(h + "/") for h in hidden):
            continue
        _mount("tmpfs", path, "tmpfs", ms_nosuid | ms_nodev, "size=16m,mode=755")
        hidden.append(path)
    for path, fd in keep_fds.items():
        if any(path == h or path.startswith(h + "/") for h in hidden):
            os.makedirs(path, exist_ok=True)
            _mount(f"/proc/self/fd/{fd}", path, None, ms_bind | ms_rec)
            _mount(None, path, None, ms_remount | ms_bind | ms_rdonly)
        os.close(fd)
    work = "/tmp/sandbox"
    os.makedirs(work, exist_ok=True)
    _mount(f"/proc/self/fd/{work_fd}", work, None, ms_bind)
    os.close(work_fd)
    return work


def _child(spec: dict, nonce_fd: int, done_fd: int, setup_fd: int) -> None:
    """Bootstrap inside the child: cgroups, namespaces, rlimits, uid; then exec the runner."""
    import resource

    os.set_inheritable(setup_fd, False)  # closed by exec: the program never holds it
    try:
        work = spec["work"]
        if spec["privileged"]:
            for d in spec["cgroups"]:
                _write(os.path.join(d, "cgroup.procs"), str(os.getpid()))
            work = _isolate_filesystem(spec)
            os.setgroups([])
            os.setgid(spec["uid"])
            os.setuid(spec["uid"])
        os.chdir(work)
        limits = {
            resource.RLIMIT_CPU: spec["cpu_seconds"],
            resource.RLIMIT_AS: spec["memory_bytes"],
            resource.RLIMIT_FSIZE: spec["file_bytes"],
            resource.RLIMIT_NPROC: spec["max_processes"],
            resource.RLIMIT_CORE: 0,
            resource.RLIMIT_NOFILE: 64,
        }
        if not spec["privileged"]:  # NPROC counts all of this user's processes: allow for them
            limits[resource.RLIMIT_NPROC] += len(_uid_processes(os.getuid()))
        for which, value in limits.items():
            resource.setrlimit(which, (value, value))
        os.set_inheritable(nonce_fd, True)
        os.set_inheritable(done_fd, True)
        os.execv(
            sys.executable,
            [sys.executable, "-I", "-B", "-c", _RUNNER, str(nonce_fd), str(done_fd)],
        )
    except BaseException as e:  # noqa: BLE001 - any failure here is a set-up failure
        os.write(setup_fd, f"{type(e).__name__}: {e}".encode())
        os._exit(121)


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "--child":
    _child(json.loads(sys.argv[2]), *map(int, sys.argv[3:]))
