"""Completions that try to pass without passing, run through the sandbox and through the
reference semantics of OpenAI's human-eval harness (a sample passes only when executing the
program RETURNS, i.e. `check(candidate)` returned normally; any exit, exception or time-out
fails): both must agree on every case."""

import os
import subprocess
import sys
import textwrap
import time

import pytest

from alignkit.eval.bench.sandbox import namespace_prefix, run_program

CHECK = "\ndef check(f):\n    assert f(2) == 4\n\ncheck(double)\n"
CASES = {
    "correct": ("def double(x):\n    return 2 * x\n", True),
    "wrong": ("def double(x):\n    return x\n", False),
    "sys_exit_0": ("import sys\ndef double(x):\n    sys.exit(0)\n", False),
    "os_exit_0": ("import os\ndef double(x):\n    os._exit(0)\n", False),
    "module_level_exit": ("exit(0)\ndef double(x):\n    return x\n", False),
    "atexit_os_exit": ("import atexit, os\natexit.register(os._exit, 0)\ndef double(x):\n    return x\n", False),
    "raise_systemexit_in_check": ("def double(x):\n    raise SystemExit(0)\n", False),
    "print_a_guessed_marker": ("import os\nprint('passed')\nos.write(4, b'0' * 32)\nos.write(5, b'0' * 32)\n"
                               "def double(x):\n    os._exit(0)\n", False),
    "exit_in_atexit_after_pass": ("import atexit, os\natexit.register(os._exit, 1)\n"
                                  "def double(x):\n    return 2 * x\n", True),
}


def reference_semantics(program: str) -> bool:
    """human-eval's rule, written plainly: run the program in a fresh interpreter and record
    'passed' only after exec returned (os._exit or sys.exit before that leaves no record)."""
    runner = textwrap.dedent("""
        import sys
        src = sys.stdin.read()
        try:
            exec(compile(src, "program", "exec"), {"__name__": "__main__"})
        except BaseException:
            raise SystemExit(3)
        sys.stderr.write("REFERENCE-PASSED")
        sys.stderr.flush()
    """)
    done = subprocess.run([sys.executable, "-c", runner], input=program, capture_output=True, text=True, timeout=10)
    return "REFERENCE-PASSED" in done.stderr


@pytest.mark.parametrize("name", list(CASES))
def test_adversarial_completions_agree_with_the_reference(name):
    completion, expected = CASES[name]
    program = completion + CHECK
    assert reference_semantics(program) is expected
    assert run_program(program, timeout=5).passed is expected


def test_endless_output_is_bounded():
    r = run_program("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", timeout=3)
    assert r.status in ("failed", "timeout") and len(r.stdout) <= 2000


@pytest.mark.skipif(not namespace_prefix(), reason="unshare cannot create namespaces here")
def test_namespaces_hide_the_parent_and_the_network_and_reap_daemons(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNKIT_TEST_SECRET", "s3cr3t-value")
    marker = tmp_path / "daemon-was-here"
    program = textwrap.dedent(f"""
        import os, socket, subprocess, sys
        seen = []
        for pid in os.listdir('/proc'):
            if pid.isdigit():
                try:
                    seen.append(open(f'/proc/{{pid}}/environ', 'rb').read())
                except OSError:
                    pass
        assert not any(b's3cr3t-value' in e for e in seen), 'a secret leaked'
        assert os.getppid() == 0 or os.getpid() < 10
        import _socket
        try:
            s = _socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        except OSError:
            pass
        else:
            assert s.connect_ex(('127.0.0.1', 22)) != 0
        daemon = 'import os, sys, time; time.sleep(2); open(sys.argv[1], "w").write("x")'
        subprocess.Popen([sys.executable, '-c', daemon, {str(marker)!r}], start_new_session=True)
    """)
    r = run_program(program, timeout=5)
    assert r.passed, r.stderr
    assert r.isolation == "namespaces (pid, net, mount)"
    time.sleep(2.5)
    assert not marker.exists()  # the daemon died with the namespace
    assert "ALIGNKIT_TEST_SECRET" in os.environ
