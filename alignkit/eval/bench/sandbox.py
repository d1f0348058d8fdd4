"""Run a generated Python program in a separate process, with a time limit and no network.

    result = run_program("assert 1 + 1 == 2\\n", timeout=5.0)
    result.status        # "passed" | "failed" | "timeout"

What it does, for each program:
- writes it to a fresh temporary directory, which is the child's working directory and is
  deleted afterwards whatever happens;
- starts `sys.executable -I` (isolated mode: no user site-packages, no PYTHON* variables, not
  even the script's directory on sys.path) in its own session, with stdin closed and a minimal
  environment;
- in the child, before the program runs: resource limits where the platform has them
  (address space, CPU seconds, size of written files, no core dumps), and every way to create a
  socket through the `socket` module replaced by one that raises OSError;
- kills the child's whole process group when the wall-clock limit passes.

This is a guard against accidents (an infinite loop, a runaway allocation, a stray download),
NOT a security boundary: a determined program can still reach the file system, start
processes, or rebuild a socket through ctypes. Run untrusted model output inside a container or
VM without network, as the HumanEval authors advise.
"""

from __future__ import annotations

import os
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
        ("RLIMIT_FSIZE", 64 * 1024 * 1024),
        ("RLIMIT_CORE", 0),
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

_limits(int(sys.argv[1]), int(sys.argv[2]))
_no_network()
del _limits, _no_network

import runpy
runpy.run_path("program.py", run_name="__main__")
"""

_TAIL = 2000


@dataclass(frozen=True)
class ExecResult:
    """What happened to one program.

    status: "passed" (exit code 0), "failed" (any other exit, including an uncaught exception or
    a resource limit), or "timeout" (killed at the wall-clock limit).
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


def run_program(program: str, timeout: float = 5.0, memory_mb: int = 2048) -> ExecResult:
    """Run `program` (Python source) as described in the module docstring.

    timeout: wall-clock seconds before the process group is killed (CPU time is capped at the
    next whole second above it). memory_mb: address-space limit (0: none).
    """
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    workdir = tempfile.mkdtemp(prefix="alignkit-sandbox-")
    start = time.monotonic()
    try:
        with open(os.path.join(workdir, "program.py"), "w", encoding="utf-8") as f:
            f.write(program)
        with open(os.path.join(workdir, "guard.py"), "w", encoding="utf-8") as f:
            f.write(_GUARD)
        env = {"PATH": os.defpath, "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
        if sys.platform == "win32" and "SYSTEMROOT" in os.environ:
            env["SYSTEMROOT"] = os.environ["SYSTEMROOT"]
        cmd = [sys.executable, "-I", "guard.py", str(memory_mb), str(int(timeout) + 1)]
        proc = subprocess.Popen(
            cmd,
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=timeout)
            status = "passed" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            try:
                out, err = proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:  # a descendant escaped the group and holds the pipes
                proc.kill()
                proc.wait()
                proc.stdout.close()
                proc.stderr.close()
                out, err = b"", b""
            status = "timeout"
        _kill_group(proc)  # any grandchild the program left behind
        return ExecResult(
            status=status,
            returncode=proc.returncode,
            stdout=out.decode("utf-8", "replace")[-_TAIL:],
            stderr=err.decode("utf-8", "replace")[-_TAIL:],
            seconds=time.monotonic() - start,
            workdir=workdir,
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
