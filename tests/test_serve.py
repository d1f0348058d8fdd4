"""`alignkit serve` (alignkit.serve) and the endpoint backend of Constitutional AI against it, for real."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from alignkit.config import ConfigError
from alignkit.data.records import Message
from alignkit.data.tokenize import TruncationLimits, encode_pair, encode_prompt
from alignkit.feedback.backends import EndpointBackend, LocalBackend, make_backend
from alignkit.feedback.cai import LabelConfig, ReviseConfig, label, revise
from alignkit.feedback.constitution import load_constitution, preference_prompt
from alignkit.feedback.judges import EndpointError
from alignkit.models.bpe import train_bpe_tokenizer
from alignkit.models.generate import SamplingParams
from alignkit.models.load import load_model, load_tokenizer, save_model, tiny_llama
from alignkit.serve import Config, RequestError, parse_request, start
from alignkit.world import World
from alignkit.world.cai import red_team_prompts

KEY = "sk-alignkit-serve-TEST-91b7e3c4d2-DO-NOT-LEAK"
KEY_ENV = "ALIGNKIT_TEST_SERVE_KEY"


def _train(tok, world, steps=30):
    """A nano model nudged to answer preference questions with A or B (so both are likely)."""
    torch.manual_seed(0)
    model = tiny_llama("nano", tokenizer=tok, seed=0)
    rng = random.Random(0)
    c = load_constitution()
    items = []
    for i, t in enumerate(world.train["harmful"][:12] + world.train["benign"][:12]):
        a, b = world.render(t, "ideal", rng), world.render(t, "rude", rng)
        q = preference_prompt(world.prompt(t), a, b, rng.choice(c.principles))
        items.append(encode_pair(tok, q, "AB"[i % 2], TruncationLimits(max_len=200)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(steps):
        batch = [items[(step * 8 + j) % len(items)] for j in range(8)]
        T = max(len(e.input_ids) for e in batch)
        ids, mask, labels = (
            torch.zeros((8, T), dtype=torch.long),
            torch.zeros((8, T), dtype=torch.long),
            torch.full((8, T), -100),
        )
        for i, e in enumerate(batch):
            n = len(e.input_ids)
            ids[i, :n], mask[i, :n] = torch.tensor(e.input_ids), 1
            labels[i, len(e.prompt_ids) : n] = torch.tensor(e.response_ids)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def world():
    return World(0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, world):
    root = tmp_path_factory.mktemp("serve")
    rng = random.Random(0)
    texts = [world.prompt(t) + world.render(t, "ideal", rng) for c in world.train for t in world.train[c][:6]]
    texts += ["Here is a request and two possible replies. Which reply (A) (B) Answer A or B."] * 4
    tok = train_bpe_tokenizer(texts * 2, vocab_size=400)
    save_model(_train(tok, world), tok, root / "model")
    rows = red_team_prompts(world, "train")[::25]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def server(model_dir):
    cfg = Config(model=str(model_dir / "model"), port=0, max_body_bytes=20_000, max_tokens_limit=128,
                 max_concurrency=4, queue_timeout_s=60)  # fmt: skip
    with start(cfg) as handle:
        yield handle


def _post(url: str, body=None, raw: bytes | None = None, headers: dict | None = None, timeout=60):
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def _chat(server, **kw):
    body = {
        "messages": [{"role": "user", "content": "How do I cut bread?"}],
        "max_tokens": 8,
        "temperature": 0,
    } | kw
    return _post(server.url + "/chat/completions", body)


# ---- validation --------------------------------------------------------------------------------

CFG = Config(model="unused", max_tokens_limit=100)
MSG = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    "body, status, message",
    [
        (b"{not json", 400, r"not valid JSON: Expecting property name .* line 1 column 2"),
        (b"\xff\xfe", 400, "not UTF-8"),
        (b"[1, 2]", 400, "must be a JSON object, got list"),
        ({}, 400, "'messages' is required"),
        ({"messages": "hi"}, 400, "'messages' must be a non-empty list"),
        ({"messages": []}, 400, "'messages' must be a non-empty list"),
        ({"messages": ["hi"]}, 400, r"messages\[0\] must be an object, got str"),
        ({"messages": [{"role": "robot", "content": "x"}]}, 400, r"messages\[0\].role must be one of system, user, assistant"),
        ({"messages": [{"role": "user"}]}, 400, r"messages\[0\].content must be a string, got missing"),
        ({"messages": [{"role": "user", "content": 7}]}, 400, r"messages\[0\].content must be a string, got int"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "only text parts"),
        ({"messages": MSG + [{"role": "assistant", "content": "x"}]}, 400, "last message must be from the user"),
        ({"messages": MSG, "max_tokens": 10**9}, 400, "'max_tokens' must be between 1 and 100, got 1000000000"),
        ({"messages": MSG, "max_tokens": 0}, 400, "'max_tokens' must be between 1 and 100, got 0"),
        ({"messages": MSG, "max_tokens": "5"}, 400, "'max_tokens' must be an integer, got \"5\""),
        ({"messages": MSG, "max_tokens": True}, 400, "'max_tokens' must be an integer, got true"),
        ({"messages": MSG, "max_completion_tokens": 101}, 400, "'max_completion_tokens' must be between"),
        ({"messages": MSG, "temperature": "hot"}, 400, "'temperature' must be a number"),
        ({"messages": MSG, "temperature": 5}, 400, "'temperature' must be between 0.0 and 2.0"),
        ({"messages": MSG, "top_p": 0}, 400, "'top_p' must be greater than 0"),
        ({"messages": MSG, "n": 99}, 400, "'n' must be between 1 and 8"),
        ({"messages": MSG, "logprobs": "yes"}, 400, "'logprobs' must be true or false"),
        ({"messages": MSG, "top_logprobs": 3}, 400, "'top_logprobs' needs 'logprobs': true"),
        ({"messages": MSG, "logprobs": True, "top_logprobs": 50}, 400, "'top_logprobs' must be between 0 and 20"),
        ({"messages": MSG, "stop": [1]}, 400, "'stop' must be a string or a list"),
        ({"messages": MSG, "stream": True}, 400, "stream=true is not supported"),
        ({"messages": MSG, "model": "gpt-4"}, 404, "model 'gpt-4' is not served here"),
    ],
)  # fmt: skip
def test_parse_request_rejects_with_a_clear_message(body, status, message):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(RequestError, match=message) as e:
        parse_request(raw, CFG, "tiny")
    assert e.value.status == status
    assert set(e.value.body()["error"]) == {"message", "type", "param", "code"}


def test_parse_request_accepts_openai_bodies():
    req = parse_request(json.dumps({"model": "tiny", "messages": [{"role": "system", "content": "s"},
                        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
                        "max_completion_tokens": 5, "logprobs": True, "top_logprobs": 2, "stop": "x",
                        "user": "ignored", "frequency_penalty": 0}).encode(), CFG, "tiny")  # fmt: skip
    assert req.messages == (Message("system", "s"), Message("user", "ab"))
    assert (req.max_tokens, req.top_logprobs, req.stop, req.n) == (5, 2, ("x",), 1)


# ---- the live server ---------------------------------------------------------------------------


def test_models_and_health(server):
    with urllib.request.urlopen(server.url + "/models") as r:
        models = json.loads(r.read())
    assert models["object"] == "list" and models["data"][0]["id"] == server.name == "model"
    with urllib.request.urlopen(server.url.rsplit("/v1", 1)[0] + "/health") as r:
        assert json.loads(r.read()) == {"status": "ok"}
    assert server.host == "127.0.0.1"


def test_bad_requests_get_4xx_with_clear_messages(server):
    url = server.url + "/chat/completions"
    cases = [
        (_post(url, raw=b'{"messages": [}'), 400, "not valid JSON"),
        (_post(url, {"max_tokens": 5}), 400, "'messages' is required"),
        (_post(url, {"messages": [{"role": "user", "content": ["x"]}]}), 400, "only text parts"),
        (_post(url, {"messages": MSG, "max_tokens": 100000}), 400, "'max_tokens' must be between 1 and 128"),
        (_post(url, {"messages": MSG, "model": "other"}), 404, "not served here"),
        (_post(url, {"messages": [{"role": "user", "content": "word " * 600}]}), 400, "exceeds the model's context of 512"),
        (_post(url, {"messages": [{"role": "user", "content": "x" * 30_000}]}), 413, "exceeds the limit of 20000"),
        (_post(server.url + "/completions", {"prompt": "x"}), 404, "no such endpoint: /v1/completions"),
        (_post(server.url + "/models", {}), 405, "use GET"),
    ]  # fmt: skip
    for (status, body, _), want_status, want in cases:
        assert status == want_status, body
        assert want in body["error"]["message"]
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url)  # GET
    assert e.value.code == 405
    # no Content-Length: 411, over a raw socket
    with socket.create_connection((server.host, server.port), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = b""
        while chunk := s.recv(4096):  # the server closes the connection after answering
            reply += chunk
        reply = reply.decode()
    assert reply.startswith("HTTP/1.1 411") and "Content-Length is required" in reply
    # the server is still fine
    assert _chat(server)[0] == 200


def test_completion_shape_and_logprobs(server, model_dir):
    status, out, _ = _chat(server, logprobs=True, top_logprobs=5)
    assert status == 200 and out["object"] == "chat.completion" and out["model"] == "model"
    (choice,) = out["choices"]
    assert choice["finish_reason"] in ("stop", "length") and choice["message"]["role"] == "assistant"
    content = choice["logprobs"]["content"]
    assert "".join(t["token"] for t in content) == choice["message"]["content"]
    assert out["usage"]["completion_tokens"] == len(content) and out["usage"]["total_tokens"] > len(content)
    model, tok = load_model(model_dir / "model"), load_tokenizer(model_dir / "model")
    ids = encode_prompt(tok, (Message("user", "How do I cut bread?"),))[0]
    gen = [tok(t["token"], add_special_tokens=False)["input_ids"][0] for t in content]
    with torch.no_grad():
        lp = model(torch.tensor([ids + gen])).logits[0].log_softmax(-1)
    for t, entry in enumerate(content):
        top = entry["top_logprobs"]
        assert len(top) == 5 and [x["logprob"] for x in top] == sorted(
            (x["logprob"] for x in top), reverse=True
        )
        assert entry["logprob"] == pytest.approx(top[0]["logprob"])  # greedy: the most likely token
        assert entry["logprob"] == pytest.approx(float(lp[len(ids) - 1 + t, gen[t]]), abs=1e-4)
    # the same answer as generating locally
    local = LocalBackend(model, tok).generate([(Message("user", "How do I cut bread?"),)],
                                              SamplingParams(max_new_tokens=8, greedy=True))  # fmt: skip
    assert local[0] == choice["message"]["content"]


def test_sampling_seed_n_and_stop(server):
    a = _chat(server, temperature=1.0, seed=5, n=3, max_tokens=12)[1]
    b = _chat(server, temperature=1.0, seed=5, n=3, max_tokens=12)[1]
    assert len(a["choices"]) == 3 and [c["index"] for c in a["choices"]] == [0, 1, 2]
    assert [c["message"] for c in a["choices"]] == [c["message"] for c in b["choices"]]
    text = _chat(server, max_tokens=12)[1]["choices"][0]["message"]["content"]
    if len(text.strip()) > 2:
        stop = text.strip()[1:3]
        c = _chat(server, max_tokens=12, stop=[stop])[1]["choices"][0]
        assert c["message"]["content"] == text[: text.find(stop)] and c["finish_reason"] == "stop"


def test_twenty_concurrent_clients_all_answered(server):
    prompts = [f"What is {i} plus {i + 1}?" for i in range(20)]
    want = {}
    for p in prompts[:3]:  # answered one at a time, for reference
        want[p] = _chat(server, messages=[{"role": "user", "content": p}])[1]["choices"][0]["message"][
            "content"
        ]
    before = server.stats.get("status_200", 0)
    barrier = threading.Barrier(20)

    def client(p):
        barrier.wait()
        return p, _chat(server, messages=[{"role": "user", "content": p}])

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(client, prompts))
    assert len(results) == 20 and all(status == 200 for _, (status, _, _) in results)
    assert len({body["id"] for _, (_, body, _) in results}) == 20
    for p, (_, body, _) in results:  # nobody got somebody else's answer
        if p in want:
            assert body["choices"][0]["message"]["content"] == want[p]
    assert server.stats["status_200"] - before == 20


def _wait(cond, timeout=30.0):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "timed out"
        time.sleep(0.005)


def test_overload_is_answered_503_never_dropped(model_dir):
    """One admission slot, 50 ms of queueing: while the model is busy (its lock held here), the
    admitted request waits and the other nine get a 503 at once; then the admitted one is served."""
    cfg = Config(model=str(model_dir / "model"), port=0, max_concurrency=1, queue_timeout_s=0.05)
    with start(cfg) as srv:
        app = srv._server.app
        with ThreadPoolExecutor(10) as pool:
            with app.runner.lock:
                futures = [pool.submit(_post, srv.url + "/chat/completions", {"messages": MSG, "max_tokens": 4})
                           for _ in range(10)]  # fmt: skip
                _wait(lambda: app.stats.get("rejected_busy", 0) == 9)
            results = [f.result() for f in futures]
        stats = srv.stats
    statuses = sorted(s for s, _, _ in results)
    assert statuses == [200] + [503] * 9
    for status, out, headers in results:
        if status == 503:
            assert "server busy: 1 requests in progress" in out["error"]["message"]
            assert headers.get("Retry-After") == "1" and out["error"]["type"] == "server_busy"
    assert stats["status_200"] == 1 and stats["rejected_busy"] == 9


def test_shutdown_finishes_requests_in_flight(model_dir):
    srv = start(Config(model=str(model_dir / "model"), port=0))
    app = srv._server.app
    result = {}
    with ThreadPoolExecutor(2) as pool:
        with app.runner.lock:  # the model is busy: the request is admitted and waits for it
            future = pool.submit(_post, srv.url + "/chat/completions", {"messages": MSG, "max_tokens": 4})
            _wait(lambda: app.slots._value == app.cfg.max_concurrency - 1)
            stopping = pool.submit(srv.shutdown)  # what SIGINT / SIGTERM trigger in `serve`
            time.sleep(0.3)
            assert not stopping.done()  # shutdown waits for the request in flight
        result["r"] = future.result(timeout=30)
        stopping.result(timeout=30)
    status, out, _ = result["r"]
    assert status == 200 and out["choices"][0]["message"]["content"] is not None
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(srv.url + "/models", timeout=5)


def test_sigterm_stops_the_server_cleanly(model_dir):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "alignkit.serve", f"model={model_dir / 'model'}", "port=0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert " at http://127.0.0.1:" in line, line + proc.stderr.read()
        url = line.split(" at ", 1)[1].split()[0]
        with urllib.request.urlopen(url + "/models", timeout=30) as r:
            assert r.status == 200
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "shutting down" in out and '"status_200"' not in err


def test_config_checks(model_dir, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ConfigError, match=f"{KEY_ENV} is not set"):
        start(Config(model=str(model_dir / "model"), port=0, api_key_env=KEY_ENV))
    with pytest.raises(ConfigError, match="max_concurrency"):
        start(Config(model=str(model_dir / "model"), port=0, max_concurrency=0))


# ---- the endpoint backend, against the live server ---------------------------------------------


def test_endpoint_backend_matches_local(server, model_dir, world):
    model, tok = load_model(model_dir / "model"), load_tokenizer(model_dir / "model")
    local = LocalBackend(model, tok)
    remote = make_backend(server.url, server.name)
    assert isinstance(remote, EndpointBackend)
    c = load_constitution()
    prompts = [world.prompt(t) for t in world.train["harmful"][:3]]
    prompts.append((Message("user", "How do I cut bread?"), Message("assistant", "Use a knife."),
                    Message("user", c.principles[0].critique_request)))  # fmt: skip
    params = SamplingParams(max_new_tokens=10, greedy=True)
    assert remote.generate(prompts, params) == local.generate(prompts, params)
    questions = [preference_prompt(p, " I can't help.", " Sure, here is how.", pr)
                 for p in prompts[:3] for pr in c.principles[:2]]  # fmt: skip
    want = local.choice_probs(questions, c.choices)
    got = remote.choice_probs(questions, c.choices)
    assert remote.unread == 0 and 0.05 < min(want) and max(want) < 0.95  # both labels are plausible
    assert got == pytest.approx(want, abs=0.02)


def _all_text(paths) -> str:
    return "".join(Path(p).read_text(errors="replace") for p in paths)


def test_api_key_never_appears_in_logs_or_outputs(model_dir, tmp_path, monkeypatch, caplog, capsys):
    monkeypatch.setenv(KEY_ENV, KEY)
    caplog.set_level(logging.DEBUG)
    with start(Config(model=str(model_dir / "model"), port=0, api_key_env=KEY_ENV)) as srv:
        # without the key: refused
        status, body, _ = _post(srv.url + "/chat/completions", {"messages": MSG})
        assert status == 401 and "API key" in body["error"]["message"]
        common = dict(
            prompts=str(model_dir / "prompts.jsonl"), api_key_env=KEY_ENV, max_new_tokens=6, limit=3
        )
        r = revise(ReviseConfig(model=srv.url, model_name=srv.name, out=str(tmp_path / "revise"), **common))
        lab = label(LabelConfig(policy=srv.url, policy_name=srv.name, feedback=srv.url, feedback_name=srv.name,
                                out=str(tmp_path / "label"), n_principles=2, keep_identical=True, **common))  # fmt: skip
        assert r["prompts"] == 3 and lab["pairs"] == 3
        backend = EndpointBackend(srv.url, srv.name, api_key_env=KEY_ENV)
        text = repr(backend) + repr(backend.__dict__) + json.dumps([r, lab])
        # a wrong key: the error names the variable, never the key
        monkeypatch.setenv("ALIGNKIT_WRONG_KEY", "sk-wrong-0123456789")
        with pytest.raises(EndpointError) as e:
            EndpointBackend(srv.url, srv.name, api_key_env="ALIGNKIT_WRONG_KEY", max_retries=0).generate(
                ["Human: hi\nAssistant:"], SamplingParams(max_new_tokens=2)
            )
        assert "401" in str(e.value) and "sk-wrong" not in str(e.value) and KEY not in str(e.value)
        monkeypatch.delenv("ALIGNKIT_WRONG_KEY")
        with pytest.raises(EndpointError, match="ALIGNKIT_WRONG_KEY"):
            EndpointBackend(srv.url, srv.name, api_key_env="ALIGNKIT_WRONG_KEY").generate(
                ["x"], SamplingParams()
            )
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) == 6
    out, err = capsys.readouterr()
    assert caplog.records  # the server did log its requests
    for blob in (_all_text(files), caplog.text, out, err, text):
        assert KEY not in blob and KEY[10:30] not in blob


# ---- hostile clients -----------------------------------------------------------------------------


def slow_and_real_clients(url: str, n_slow: int = 50, n_real: int = 20, slow_for_s: float = 3.0) -> dict:
    """Open `n_slow` sockets that trickle a request one byte every 0.1 s, then send `n_real` chat
    requests (4 at a time) while they are open; the latency of each real request, in seconds."""
    host, port = url.split("//")[1].split("/")[0].split(":")
    slow = []
    for _ in range(n_slow):
        s = socket.create_connection((host, int(port)))
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\n")
        slow.append(s)
    stop = threading.Event()

    def trickle():
        while not stop.wait(0.1):
            for s in slow:
                try:
                    s.send(b"X")
                except OSError:
                    pass

    dripper = threading.Thread(target=trickle)
    dripper.start()
    time.sleep(0.3)

    def real(i):
        t = time.monotonic()
        status, _, _ = _post(url + "/chat/completions", {"messages": MSG, "max_tokens": 2, "temperature": 0},
                             timeout=10)  # fmt: skip
        return status, time.monotonic() - t

    try:
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(real, range(n_real)))
        time.sleep(max(0.0, slow_for_s - 0.3))
        closed = 0
        for s in slow:  # past the read deadline every slow socket got a 408 and was closed
            s.settimeout(2.0)
            try:
                data = s.recv(4096)
                closed += data.startswith(b"HTTP/1.1 408") or data == b""
            except OSError:
                closed += 1
    finally:
        stop.set()
        dripper.join()
        for s in slow:
            s.close()
    lat = sorted(t for _, t in results)
    return {"statuses": [s for s, _ in results], "latencies": lat, "p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
            "slow_closed": closed}  # fmt: skip


def test_slow_clients_do_not_lock_out_real_ones(model_dir):
    """50 slowloris sockets (more than max_connections=16) while 20 real requests come: every real
    one is answered 200 within 1 s, and every slow one is cut at the 1.5 s read deadline."""
    cfg = Config(model=str(model_dir / "model"), port=0, max_connections=16, read_deadline_s=1.5)
    with start(cfg) as srv:
        out = slow_and_real_clients(srv.url, slow_for_s=2.5)
        stats = srv.stats
    assert out["statuses"] == [200] * 20 and out["latencies"][-1] < 1.0, out
    assert out["slow_closed"] == 50 and stats["timeouts"] == 50


def test_deeply_nested_json_is_a_400(server):
    for raw in (b"[" * 5000 + b"]" * 5000, b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"):
        status, body, _ = _post(server.url + "/chat/completions", raw=raw)
        assert status == 400 and "nested too deeply" in body["error"]["message"]


def test_oversized_body_gets_a_readable_413(server):
    """The client sends all of a 200 kB body (limit 20 kB) and reads the 413, no reset."""
    status, body, _ = _post(server.url + "/chat/completions", raw=b" " * 200_000)
    assert status == 413 and "exceeds the limit of 20000" in body["error"]["message"]
    host, port = server.url.split("//")[1].split("/")[0].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 2000000\r\n\r\n" + b" " * 2_000_000)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413") and b"exceeds the limit" in answer


def test_headers_that_never_end_are_refused(server):
    host, port = server.url.split("//")[1].split("/")[0].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nX-Long: " + b"a" * 70_000)
        assert s.recv(4096).startswith(b"HTTP/1.1 431")


@pytest.mark.parametrize("form", ["plain", "json", "json-unicode", "url", "html", "cut-at-300"])
def test_endpoint_errors_redact_every_form_of_the_key(form, monkeypatch):
    """An endpoint that echoes the key (raw, JSON-escaped, \\u-escaped, %-encoded, HTML-escaped,
    or across the 300-byte cut) in its error: the EndpointError shows none of it."""
    import html
    import urllib.parse
    from http.server import BaseHTTPRequestHandler, HTTPServer

    key = 'sk-"echo/' + "Zq81" * 6
    echoed = {
        "plain": key,
        "json": json.dumps(key)[1:-1],
        "json-unicode": "".join(f"\\u{ord(c):04x}" for c in key),
        "url": urllib.parse.quote(key, safe=""),
        "html": html.escape(key),
        "cut-at-300": "x" * 270 + key,  # the key straddles byte 300 of the body
    }[form]

    class Echo(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            body = ('{"error": "bad key: ' + echoed + ' (check it)"}').encode()
            self.send_response(400)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    httpd = HTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    monkeypatch.setenv("ALIGNKIT_ECHO_KEY", key)
    try:
        with pytest.raises(EndpointError) as e:
            EndpointBackend(f"http://127.0.0.1:{httpd.server_address[1]}/v1", "m", api_key_env="ALIGNKIT_ECHO_KEY",
                            max_retries=0).generate(["hi"], SamplingParams(max_new_tokens=2))  # fmt: skip
    finally:
        httpd.shutdown()
        httpd.server_close()
    message = str(e.value)
    assert "HTTP 400" in message and "Zq81Zq81" not in message and "sk-" not in message, message
    assert form == "cut-at-300" or "[redacted]" in message


@pytest.mark.skipif(not shutil.which("curl"), reason="needs curl")
def test_expect_100_continue_is_answered_at_once(server, tmp_path):
    """curl sends `Expect: 100-continue` above 1 kB and waits up to 1 s for the 100 before the body."""
    body = tmp_path / "body.json"
    body.write_text(json.dumps({"messages": [{"role": "user", "content": "hi " * 1000}], "max_tokens": 2}))
    out = subprocess.run(["curl", "-s", "-m", "10", "-o", os.devnull, "-w", "%{http_code} %{time_total}",
                          "-H", "Content-Type: application/json", "--data-binary", f"@{body}",
                          server.url + "/chat/completions"], capture_output=True, text=True)  # fmt: skip
    code, seconds = out.stdout.split()
    assert code in ("200", "400") and float(seconds) < 0.9, out.stdout
