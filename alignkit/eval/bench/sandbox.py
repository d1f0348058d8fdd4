"""Run a generated Python program in a separate process, with a time limit and no network.

    result = run_program("assert 1 + 1 == 2\\n", timeout=5.0)
    result.status        # "passed" | "failed" | "timeout"
    result.isolation     # what contained it (see below)

A program passes only if it RAN TO ITS END: the guard that runs it writes a per-run random
nonce, which the parent passes in through a pipe the guard reads and closes before the program
starts, to a second pipe after the program returned normally. An exit status of 0 proves
nothing: `sys.exit(0)`, `os._exit(0)`, a module-level `exit()` or `atexit.register(os._exit, 0)`
before `check(candidate)` returns all fail, as in OpenAI's human-eval harness, where a sample
passes only when `exec` of the program returns.

Containment, for each program:
- a fresh temporary working directory, deleted afterwards whatever happens;
- `sys.executable -I` (isolated mode) with a minimal environment (no variable of the parent's),
  stdin closed, no inherited file descriptors but the two nonce pipes, its own session;
- stdout and stderr go to files capped by RLIMIT_FSIZE (16 MB); the parent reads only their last
  2,000 characters, so a program that prints forever cannot exhaust the parent's memory;
- resource limits: address space, CPU seconds, file size, number of processes (RLIMIT_NPROC,
  which the kernel does not apply to root), no core dumps; `socket` creation refused in Python;
- on Linux, when `unshare` can create namespaces (root, or unprivileged user namespaces): new
  PID, network and mount namespaces (`unshare --pid --net --fork --mount-proc --kill-child`):
  the program sees only its own processes in /proc (not the parent's /proc/PID/environ), has no
  network interface but a down loopback, and every process it starts (a `setsid` daemon too)
  dies with it. `ExecResult.isolation` says which containment was used;
- the whole process group is killed at the wall-clock limit and after the program ends.

This is NOT a security boundary against a determined attacker: without namespaces the program
can read files of the same user (including other processes' /proc/PID/environ) and reach the
network through ctypes; even with them it shares the file system and the user id; and code that
inspects the guard's stack frames could find the nonce. Run untrusted model output inside a
container or VM without network, as the HumanEval authors advise (docs/security.md).
"""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

# Runs in the child before the program. Kept free of f-string braces: limits arrive as argv.
_GUARD = """\
import sys

def _limits(memory_mb, cpu_s):
    try:
        import resource
    except ImportError:  # not on this platform
        return
    wanted = [
        ("RLIMIT_AS", memory_mb * 1024 * 1024),
        ("RLIMIT_CPU", cpu_s),
        ("RLIMIT_FSIZE", 16 * 1024 * 1024),
        ("RLIMIT_CORE", 0),
        ("RLIMIT_NPROC", 64),
    ]
    for name, value in wanted:
        which = getattr(resource, name, None)
        if which is None or value <= 0:
            continue
        soft, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        try:
            resource.setrlimit(which, (value, hard))
        except (ValueError, OSError):
            pass

def _no_network():
    import socket
    import _socket

    def refuse(*args, **kwargs):
        raise OSError("network access is disabled in the alignkit sandbox")

    class BlockedSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            refuse()

    socket.socket = BlockedSocket
    socket.SocketType = BlockedSocket
    _socket.socket = BlockedSocket
    _socket.SocketType = BlockedSocket
    for name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo",
                 "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
        if hasattr(socket, name):
            setattr(socket, name, refuse)
        if hasattr(_socket, name):
            setattr(_socket, name, refuse)

def _run(nonce_in, done_out):
    import os
    import runpy

    nonce = os.read(nonce_in, 256)
    os.close(nonce_in)
    runpy.run_path("program.py", run_name="__main__")
    os.write(done_out, nonce)  # reached only when the program returned normally
    os.close(done_out)

_limits(int(sys.argv[1]), int(sys.argv[2]))
_no_network()
_args = (int(sys.argv[3]), int(sys.argv[4]))
del _limits, _no_network
sys.argv = ["program.py"]
_run(*_args)
"""

_TAIL = 2000


@dataclass(frozen=True)
class ExecResult:
    """What happened to one program.

    status: "passed" (the program returned normally: the guard wrote the run's nonce),
    "failed" (anything else: an exception, any exit before the end, a resource limit), or
    "timeout" (killed at the wall-clock limit).
    """

    status: str
    returncode: int | None
    stdout: str
    """Last 2,000 characters of standard output."""
    stderr: str
    """Last 2,000 characters of standard error (the traceback, for a failure)."""
    seconds: float
    workdir: str
    """The temporary working directory; it no longer exists when the result is returned."""
    isolation: str = "process group"
    """What contained the program: "namespaces (pid, net, mount)" or "process group"."""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        if hasattr(os, "killpg"):
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except (ProcessLookupError, PermissionError):
        pass


@functools.lru_cache(maxsize=1)
def namespace_prefix() -> tuple[str, ...]:
    """`unshare` arguments for new PID, network and mount namespaces, or () where they cannot be
    made (not Linux, no util-linux, no permission)."""
    tool = shutil.which("unshare")
    if not sys.platform.startswith("linux") or tool is None:
        return ()
    prefix = (tool, "--pid", "--net", "--fork", "--mount-proc", "--kill-child")
    try:
        ok = subprocess.run([*prefix, "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return prefix if ok else ()


def _tail(path: str) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4 * _TAIL))
            return f.read().decode("utf-8", "replace")[-_TAIL:]
    except OSError:
        return ""


def run_program(program: str, timeout: float = 5.0, memory_mb: int = 2048) -> ExecResult:
    """Run `program` (Python source) as described in the module docstring.

    timeout: wall-clock seconds before the process group is killed (CPU time is capped at the
    next whole second above it). memory_mb: address-space limit (0: none).
    """
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    workdir = tempfile.mkdtemp(prefix="alignkit-sandbox-")
    start = time.monotonic()
    nonce = secrets.token_hex(16).encode()
    nonce_r, nonce_w = os.pipe()
    done_r, done_w = os.pipe()
    prefix = namespace_prefix()
    try:
        os.write(nonce_w, nonce)
        os.close(nonce_w)
        with open(os.path.join(workdir, "program.py"), "w", encoding="utf-8") as f:
            f.write(program)
        with open(os.path.join(workdir, "guard.py"), "w", encoding="utf-8") as f:
            f.write(_GUARD)
        env = {"PATH": os.defpath, "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
        if sys.platform == "win32" and "SYSTEMROOT" in os.environ:
            env["SYSTEMROOT"] = os.environ["SYSTEMROOT"]
        cmd = [*prefix, sys.executable, "-I", "guard.py", str(memory_mb), str(int(timeout) + 1),
               str(nonce_r), str(done_w)]
        out_path, err_path = os.path.join(workdir, ".stdout"), os.path.join(workdir, ".stderr")
        with open(out_path, "wb") as out_f, open(err_path, "wb") as err_f:
            proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out_f,
                                    stderr=err_f, start_new_session=True, pass_fds=(nonce_r, done_w))
        os.close(nonce_r)
        os.close(done_w)
        nonce_r = done_w = -1
        try:
            proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        _kill_group(proc)  # on time-out, and any grandchild the program left behind
        proc.wait()
        os.set_blocking(done_r, False)
        try:
            got = os.read(done_r, 256)
        except BlockingIOError:
            got = b""
        status = "timeout" if timed_out else ("passed" if got == nonce else "failed")
        return ExecResult(
            status=status,
            returncode=proc.returncode,
            stdout=_tail(out_path),
            stderr=_tail(err_path),
            seconds=time.monotonic() - start,
            workdir=workdir,
            isolation="namespaces (pid, net, mount)" if prefix else "process group",
        )
    finally:
        for fd in (nonce_r, done_w, done_r):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        shutil.rmtree(workdir, ignore_errors=True)
