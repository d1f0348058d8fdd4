"""The HumanEval sandbox against adversarial completions.

Each completion runs through alignkit's harness and through a plain reference of OpenAI
human-eval's rule (a sample passes iff `check(candidate)` returned normally: the program is
exec'd, and "passed" is recorded only after exec returns; an exit of any kind records nothing).
The two must agree on every completion. Containment (secrets, network, daemons, forks) is
checked on top, where the reference has none.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from alignkit.eval.bench import humaneval
from alignkit.eval.bench.sandbox import isolation, run_program

TASK = {
    "task_id": "Toy/0",
    "prompt": 'def add(a, b):\n    """Return a + b."""\n',
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
    "entry_point": "add",
}

_REFERENCE = """\
import os, sys
src = open(sys.argv[1]).read()
try:
    exec(compile(src, "program.py", "exec"), {"__name__": "__main__"})
    result = b"passed"
except BaseException:
    result = b"failed"
os.write(int(sys.argv[2]), result)
"""


def reference_passed(program: str, tmp_path, timeout: float = 5.0) -> bool:
    """human-eval's semantics, no isolation: 'passed' is written only after exec returned."""
    (tmp_path / "program.py").write_text(program)
    (tmp_path / "ref.py").write_text(_REFERENCE)
    r, w = os.pipe()
    proc = subprocess.Popen([sys.executable, "ref.py", "program.py", str(w)], cwd=tmp_path, pass_fds=(w,),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True)  # fmt: skip
    os.close(w)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
    os.set_blocking(r, False)
    try:
        out = os.read(r, 64)
    except BlockingIOError:
        out = b""
    os.close(r)
    return out == b"passed"


def body(code: str) -> str:
    return textwrap.indent(textwrap.dedent(code), "    ")


RIGHT = body("return a + b\n")
ADVERSARIAL = {
    "right": RIGHT,
    "wrong": body("return a - b\n"),
    "sys.exit(0) in the body": body("import sys\nsys.exit(0)\n"),
    "os._exit(0) in the body": body("import os\nos._exit(0)\n"),
    "raise SystemExit in the body": body("raise SystemExit\n"),
    "module-level exit after a right body": RIGHT + "import sys\nsys.exit(0)\n",
    "module-level os._exit after a right body": RIGHT + "import os\nos._exit(0)\n",
    "atexit os._exit(0) with a wrong body": body("return 0\n") + "import atexit, os\natexit.register(os._exit, 0)\n",
    "atexit os._exit(1) with a right body": RIGHT + "import atexit, os\natexit.register(os._exit, 1)\n",
    "forged markers with a wrong body": body("return 0\n") + (
        "import os, sys\n"
        "for fd in range(1, 20):\n"
        "    for text in (b'passed\\n', b'PASSED', b'0' * 32, b'alignkit-ok'):\n"
        "        try:\n"
        "            os.write(fd, text)\n"
        "        except OSError:\n"
        "            pass\n"
        "os._exit(0)\n"
    ),
    "KeyboardInterrupt swallowed by nothing": body("raise KeyboardInterrupt\n"),
}


def test_harness_agrees_with_the_reference_on_adversarial_completions(tmp_path):
    """Every completion's verdict equals human-eval's; only `right` and the atexit(1) one pass."""
    got = {}
    for name, completion in ADVERSARIAL.items():
        program = humaneval.build_program(TASK, completion)
        ours = run_program(program, timeout=5).passed
        ref_dir = tmp_path / name.replace(" ", "_").replace("(", "").replace(")", "")
        ref_dir.mkdir()
        ref = reference_passed(program, ref_dir)
        got[name] = (ours, ref)
    assert all(ours == ref for ours, ref in got.values()), got
    assert {n for n, (ours, _) in got.items() if ours} == {"right", "atexit os._exit(1) with a right body"}


def test_endless_output_is_bounded():
    """Printing without end: the child hits RLIMIT_FSIZE (or the clock), the parent keeps a tail."""
    start = time.monotonic()
    res = run_program("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", timeout=5)
    assert res.status in ("failed", "timeout") and len(res.stdout) <= 2000
    assert time.monotonic() - start < 10


@pytest.mark.skipif(not isolation().startswith("linux-namespaces"), reason="needs Linux namespaces")
def test_parent_environment_is_unreadable(monkeypatch):
    monkeypatch.setenv("ALIGNKIT_TEST_SECRET", "s3cr3t-value-91731")
    program = (
        "import os\n"
        "print('own', 'ALIGNKIT_TEST_SECRET' in os.environ)\n"
        "found = []\n"
        "for pid in [str(os.getppid())] + os.listdir('/proc'):\n"
        "    try:\n"
        "        found.append(open('/proc/%s/environ' % pid, 'rb').read())\n"
        "    except OSError:\n"
        "        pass\n"
        "print('leak', any(b's3cr3t-value-91731' in f for f in found))\n"
    )
    res = run_program(program, timeout=5)
    assert res.passed and "own False" in res.stdout and "leak False" in res.stdout, res


@pytest.mark.skipif(not isolation().startswith("linux-namespaces"), reason="needs a network namespace")
def test_no_network_even_from_a_fresh_interpreter():
    """A subprocess has no guard patching `socket`; the network namespace still blocks it."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    program = (
        "import subprocess, sys\n"
        "code = 'import socket; socket.create_connection((\"127.0.0.1\", PORT), timeout=1); print(\"connected\")'\n"
        "r = subprocess.run([sys.executable, '-I', '-c', code], capture_output=True, text=True)\n"
        "print(r.stdout, r.stderr[-200:])\n"
    ).replace("PORT", str(port))
    res = run_program(program, timeout=5)
    with pytest.raises(TimeoutError):
        server.accept()
    server.close()
    assert res.passed and "connected" not in res.stdout and "Error" in res.stdout, res


@pytest.mark.skipif(not isolation().startswith("linux-namespaces"), reason="needs a PID namespace")
def test_setsid_daemon_dies_with_the_run(tmp_path):
    out = tmp_path / "drop"
    out.mkdir()
    os.chmod(out, 0o777)
    target = out / "late.txt"
    program = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(1.0)\n"
        "        open(TARGET, 'w').write('escaped')\n"
        "    os._exit(0)\n"
        "time.sleep(0.2)\n"
    ).replace("TARGET", repr(str(target)))
    res = run_program(program, timeout=5)
    assert res.passed
    time.sleep(1.8)
    assert not target.exists()


@pytest.mark.skipif(not isolation().startswith("linux-namespaces"), reason="RLIMIT_NPROC binds only without root's exemption")
def test_fork_bomb_is_bounded():
    program = (
        "import os, time\n"
        "ok = 0\n"
        "for _ in range(200):\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except OSError:\n"
        "        continue\n"
        "    if pid == 0:\n"
        "        time.sleep(2)\n"
        "        os._exit(0)\n"
        "    ok += 1\n"
        "print('forks', ok)\n"
    )
    res = run_program(program, timeout=5, max_procs=32)
    assert res.passed, res
    assert int(res.stdout.split()[-1]) < 32, res.stdout


def test_nothing_inherited():
    """Only stdin/stdout/stderr and the marker pipe (closed to reading) are open; env is scrubbed."""
    res = run_program("import os\nprint(sorted(os.environ))\nprint(sorted(int(f) for f in os.listdir('/proc/self/fd')))\n",
                      timeout=5)  # fmt: skip
    env_line, fds_line = res.stdout.strip().splitlines()
    assert set(eval(env_line)) <= {"PATH", "HOME", "TMPDIR", "LANG", "LC_CTYPE", "PWD"}  # PWD: set by sh
    assert len(eval(fds_line)) <= 5  # 0, 1, 2, the marker pipe, and listdir's own fd
