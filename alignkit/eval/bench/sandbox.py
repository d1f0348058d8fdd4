"""Run a generated Python program in a separate process, with a time limit and no network.

    result = run_program("assert 1 + 1 == 2\\n", timeout=5.0)
    result.status        # "passed" | "failed" | "timeout"
    result.isolation     # which isolation was used, e.g. "linux-namespaces+nobody"

A program passes only if it runs to its end: the harness then writes a per-run random nonce to
a pipe only it holds; the nonce reached the child on stdin, read (and stdin closed) before the
program starts, and is in no file, argument or environment variable. An exit of any kind
(`sys.exit(0)`, `os._exit(0)`, an atexit hook, a signal, a resource limit) is a failure whatever
its status, and printing a guessed marker proves nothing. This is the semantics of OpenAI's
human-eval harness: a sample passes iff `check(candidate)`, the program's last statement,
returned normally.

Isolation, best first, chosen once per process by trying each (docs/security.md has the table):
- "linux-namespaces+nobody" (Linux, run as root, util-linux `unshare` and `setpriv`): new PID,
  network and mount namespaces with a private /proc; the program runs as uid/gid 65534 with no
  capabilities and no_new_privs. It sees no other process (no /proc/<ppid>/environ), has only a
  loopback device that is down (no network at all), cannot outlive the run (when the
  namespace's first process ends the kernel kills every process in it, setsid daemons
  included), and RLIMIT_NPROC bounds its processes.
- "linux-namespaces" (Linux, not root, unprivileged user namespaces allowed): the same
  namespaces inside a user namespace, capabilities dropped; RLIMIT_NPROC counts all of the
  user's processes, so it is set to their current number plus `max_procs`.
- "process" (elsewhere): only a new session, resource limits, a scrubbed environment and the
  `socket` module replaced. A guard against accidents, NOT a security boundary: the program can
  read other processes of the same user, reach the network through a subprocess, and a
  daemonised grandchild can outlive the run.

In every mode: a fresh working directory (deleted afterwards), a minimal environment (PATH,
HOME, TMPDIR, LANG: nothing of the parent's), no inherited file descriptors, resource limits
(address space, CPU seconds, written file size, open files, processes, no core dumps), output
written to files capped by RLIMIT_FSIZE of which only the tail is read back, and the whole
process group (and namespace) killed at the end. The program runs in the same interpreter as
the harness's last step, so code that hunts through the interpreter's memory (gc, frames,
ctypes) could find the nonce: the marker stops exit tricks and forged output, not an attack
aimed at this harness. Run untrusted model output in a VM or container without network.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

# Runs in the child before the program. Kept free of f-string braces: settings arrive as argv.
_GUARD = """\
import os
import sys


def _limits(memory_mb, cpu_s, fsize_mb, nproc):
    try:
        import resource
    except ImportError:  # not on this platform
        return
    wanted = [
        ("RLIMIT_AS", memory_mb * 1024 * 1024),
        ("RLIMIT_CPU", cpu_s),
        ("RLIMIT_FSIZE", fsize_mb * 1024 * 1024),
        ("RLIMIT_CORE", 0),
        ("RLIMIT_NOFILE", 256),
        ("RLIMIT_NPROC", nproc),
    ]
    for name, value in wanted:
        which = getattr(resource, name, None)
        if which is None or value < 0 or (value == 0 and name != "RLIMIT_CORE"):
            continue
        soft, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        try:  # the hard limit too, so the program cannot raise it again
            resource.setrlimit(which, (value, value))
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


def _main():
    marker_fd = int(sys.argv[5])
    nonce = os.read(0, 64)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    _limits(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    _no_network()
    with open("program.py", encoding="utf-8") as f:
        code = compile(f.read(), "program.py", "exec")
    try:
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
    except BaseException:  # SystemExit and KeyboardInterrupt fail too
        import traceback

        traceback.print_exc()
        os._exit(1)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        pass
    os.write(marker_fd, nonce)
    os._exit(0)  # no atexit hook of the program runs after the marker


_main()
"""

_TAIL = 2000
NOBODY = 65534


@dataclass(frozen=True)
class ExecResult:
    """What happened to one program.

    status: "passed" (ran to its end: the harness's marker arrived), "failed" (anything else:
    an exception, any exit, a resource limit), or "timeout" (killed at the wall-clock limit).
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
    isolation: str = "process"
    """Which isolation ran the program (module docstring)."""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


_mode_lock = threading.Lock()
_mode: str | None = None


def _tools() -> tuple[str, str] | None:
    if not sys.platform.startswith("linux"):
        return None
    unshare, setpriv = shutil.which("unshare"), shutil.which("setpriv")
    return (unshare, setpriv) if unshare and setpriv else None


def _python() -> tuple[str, str]:
    """The interpreter's install prefix and its executable's path inside it."""
    exe = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    prefix = os.path.realpath(sys.base_prefix)
    if not exe.startswith(prefix + os.sep):
        return "", exe
    return prefix, os.path.relpath(exe, prefix)


def _command(mode: str, base: str, guard_args: list[str]) -> list[str]:
    """argv that starts the guard in `base/work` under `mode`."""
    if mode == "process":
        return [sys.executable, "-I", "guard.py", *guard_args]
    unshare, setpriv = _tools()  # type: ignore[misc]
    ns = [unshare, "--mount", "--pid", "--net", "--fork", "--kill-child", "--mount-proc"]
    drop = [setpriv, "--no-new-privs", "--bounding-set=-all", "--inh-caps=-all"]
    if mode == "linux-namespaces":
        return [*ns[:1], "--user", "--map-root-user", *ns[1:], "--", *drop,
                sys.executable, "-I", "guard.py", *guard_args]  # fmt: skip
    # as nobody, the interpreter under /root may be out of reach: bind its prefix to base/py
    prefix, rel = _python()
    py = os.path.join(base, "py")
    script = 'mount --bind "$0" "$1" && shift && exec "$@"' if prefix else 'shift && exec "$@"'
    drop = [*drop[:1], f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *drop[1:]]
    exe = os.path.join(py, rel) if prefix else rel
    return [*ns, "--", "/bin/sh", "-c", script, prefix or "-", py, *drop, exe, "-I", "guard.py", *guard_args]


def _modes() -> list[str]:
    if _tools() is None:
        return ["process"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return ["linux-namespaces+nobody", "linux-namespaces", "process"]
    return ["linux-namespaces", "process"]


def isolation() -> str:
    """The isolation mode run_program uses here (tried once, then cached)."""
    global _mode
    with _mode_lock:
        if _mode is None:
            for mode in _modes():
                if mode == "process" or _run(mode, "pass\n", 20.0, 512, 16).passed:
                    _mode = mode
                    break
        return _mode  # type: ignore[return-value]


def _user_procs() -> int:
    uid = os.getuid()
    n = 0
    for pid in os.listdir("/proc") if os.path.isdir("/proc") else ():
        try:
            n += pid.isdigit() and os.stat(f"/proc/{pid}").st_uid == uid
        except OSError:
            pass
    return n


def _kill(proc: subprocess.Popen) -> None:
    try:
        if hasattr(os, "killpg"):
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except (ProcessLookupError, PermissionError):
        pass


def _tail(f) -> str:
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - 4 * _TAIL))
    return f.read().decode("utf-8", "replace")[-_TAIL:]


def _run(mode: str, program: str, timeout: float, memory_mb: int, max_procs: int) -> ExecResult:
    base = tempfile.mkdtemp(prefix="alignkit-sandbox-")
    workdir = os.path.join(base, secrets.token_hex(8))  # base is 0711: other samples cannot find it
    start = time.monotonic()
    nonce = secrets.token_hex(16).encode()
    try:
        os.mkdir(workdir)
        os.mkdir(os.path.join(base, "py"))
        with open(os.path.join(workdir, "program.py"), "w", encoding="utf-8") as f:
            f.write(program)
        with open(os.path.join(workdir, "guard.py"), "w", encoding="utf-8") as f:
            f.write(_GUARD)
        if mode == "linux-namespaces+nobody":
            os.chmod(base, 0o711)
            for name in ("program.py", "guard.py", ""):
                os.chown(os.path.join(workdir, name), NOBODY, NOBODY)
        nproc = max_procs if mode != "linux-namespaces" else _user_procs() + max_procs
        guard_args = [str(memory_mb), str(int(timeout) + 1), "16", str(nproc)]
        env = {"PATH": os.defpath, "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
        if sys.platform == "win32" and "SYSTEMROOT" in os.environ:
            env["SYSTEMROOT"] = os.environ["SYSTEMROOT"]
        nonce_r, nonce_w = os.pipe()
        marker_r, marker_w = os.pipe()
        os.write(nonce_w, nonce)
        os.close(nonce_w)
        timed_out = False
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            try:
                proc = subprocess.Popen(
                    _command(mode, base, [*guard_args, str(marker_w)]),
                    cwd=workdir, env=env, stdin=nonce_r, stdout=out, stderr=err,
                    pass_fds=(marker_w,), start_new_session=True,
                )  # fmt: skip
            finally:
                os.close(nonce_r)
                os.close(marker_w)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            _kill(proc)  # the group; in the namespaces, unshare's death kills them all
            proc.wait()
            os.set_blocking(marker_r, False)  # an escaped grandchild may hold the write end
            try:
                marker = os.read(marker_r, 4096)
            except BlockingIOError:
                marker = b""
            finally:
                os.close(marker_r)
            status = "timeout" if timed_out else "passed" if nonce in marker else "failed"
            return ExecResult(
                status=status, returncode=proc.returncode, stdout=_tail(out), stderr=_tail(err),
                seconds=time.monotonic() - start, workdir=workdir, isolation=mode,
            )  # fmt: skip
    finally:
        shutil.rmtree(base, ignore_errors=True)


def run_program(program: str, timeout: float = 5.0, memory_mb: int = 2048, max_procs: int = 64) -> ExecResult:
    """Run `program` (Python source) as described in the module docstring.

    timeout: wall-clock seconds before the process group is killed (CPU time is capped at the
    next whole second above it). memory_mb: address-space limit (0: none). max_procs:
    RLIMIT_NPROC (processes and threads; for "linux-namespaces", above the user's current count).
    """
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    return _run(isolation(), program, timeout, memory_mb, max_procs)
