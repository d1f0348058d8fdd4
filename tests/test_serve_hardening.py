"""The server against hostile clients: slow clients (slowloris) are dropped at a whole-request
deadline while real clients are served, a deeply nested body is a 400, an oversized body's 413
reaches the client, and an endpoint that echoes the API key never shows it."""

import json
import socket
import threading
import time
import urllib.request

import pytest

from alignkit.feedback.judges import redact_secret
from alignkit.models.bpe import train_bpe_tokenizer
from alignkit.models.load import save_model, tiny_llama
from alignkit.serve import Config, start


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("srv")
    tok = train_bpe_tokenizer(["How do I cut bread? With a knife."] * 20, vocab_size=300)
    save_model(tiny_llama("nano", tokenizer=tok, seed=0), tok, d / "m")
    cfg = Config(model=str(d / "m"), port=0, max_body_bytes=20_000, read_deadline_s=2.0, max_concurrency=4)
    with start(cfg) as handle:
        yield handle


def _host_port(server):
    url = server.url.split("//", 1)[1].split("/", 1)[0]
    host, port = url.rsplit(":", 1)
    return host, int(port)


def _chat(server, timeout=30):
    body = json.dumps({"messages": [{"role": "user", "content": "How do I cut bread?"}], "max_tokens": 2,
                       "temperature": 0}).encode()
    req = urllib.request.Request(server.url + "/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status


def _slow_client(addr, stop: threading.Event, dropped: list):
    s = socket.create_connection(addr)
    request = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"{" * 100
    start = time.monotonic()
    try:
        for byte in request:
            if stop.is_set():
                break
            s.sendall(bytes([byte]))
            time.sleep(0.25)
    except OSError:  # the server shut the connection: dropped
        dropped.append(time.monotonic() - start)
    finally:
        s.close()


def test_fifty_slow_clients_do_not_lock_out_twenty_real_ones(server):
    addr = _host_port(server)
    stop, dropped = threading.Event(), []
    slow = [threading.Thread(target=_slow_client, args=(addr, stop, dropped)) for _ in range(50)]
    for t in slow:
        t.start()
    time.sleep(0.5)
    latencies, statuses = [], []

    def real():
        t0 = time.monotonic()
        statuses.append(_chat(server))
        latencies.append(time.monotonic() - t0)

    reals = [threading.Thread(target=real) for _ in range(20)]
    for t in reals:
        t.start()
    for t in reals:
        t.join(60)
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    print(f"20 real requests beside 50 slow clients: median {latencies[len(latencies) // 2]:.3f} s, p99 {p99:.3f} s")
    assert statuses == [200] * 20
    for t in slow:
        t.join(30)
    stop.set()
    # every slow client was cut off near the 2 s deadline, long before its 40 s trickle ended
    assert len(dropped) == 50 and max(dropped) < 6.0
    assert server.stats["slow_clients_dropped"] >= 50


def test_nested_json_is_a_400(server):
    body = b"[" * 100_00 + b"]" * 100_00
    req = urllib.request.Request(server.url + "/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 400 and b"nested too deeply" in e.value.read()


def test_an_oversized_body_gets_a_readable_413(server):
    """The client sends its whole 2 MB body, then reads the answer: a 413, not a broken pipe."""
    s = socket.create_connection(_host_port(server))
    body = b"x" * 2_000_000
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    answer = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        answer += chunk
    s.close()
    assert answer.startswith(b"HTTP/1.1 413") and b"exceeds the limit of 20000" in answer


@pytest.mark.parametrize("echo", [
    lambda k: f"bad key {k} " + "x" * 400,                     # the key before the 300-byte cut
    lambda k: "x" * 290 + k,                                   # the key across the cut
    lambda k: json.dumps({"error": f"key {k}"}),                # JSON-escaped ("/" as "\\/" here)
    lambda k: "".join(f"\\u{ord(c):04x}" for c in k),          # every character \u-escaped
])
def test_echoed_keys_are_redacted_in_every_form(echo):
    key = "sk-test/abc+def_0123456789"
    text = redact_secret(echo(key), key)
    assert key not in text and "abc+def" not in text and "0123456789" not in text
    assert "[redacted]" in text[:300 + len("[redacted]")]
