"""`alignkit serve`: an OpenAI-compatible chat-completions server for a local model directory.

    alignkit serve model=runs/sft/final port=8000          # http://127.0.0.1:8000/v1

    with start(Config(model="runs/sft/final", port=0)) as server:   # tests, notebooks
        EndpointBackend(server.url, server.name).generate(...)

Endpoints: POST /v1/chat/completions, GET /v1/models, GET /health. Built on the standard
library's ThreadingHTTPServer (no web framework is a dependency of alignkit); docs/cai.md has
the full contract. What it guarantees:

- Bound to 127.0.0.1 unless `host` says otherwise. Optional bearer key (`api_key_env`).
- Validation: bad JSON, missing or mistyped fields, a last turn that is not the user's, absurd
  `max_tokens`, a prompt that does not fit the context: 4xx with an OpenAI-style JSON error
  {"error": {"message", "type", "param", "code"}} whose message names the field.
- Slow clients cannot lock it: one reader thread collects each request's headers and body
  with a selector, without a thread per connection, and drops a connection that has not sent
  its whole request within `read_deadline_s` (or sends nothing for `request_timeout_s`); only
  complete requests reach a handler thread. At most `max_pending` connections may be sending
  (more get 503 at once).
- Bounded: request bodies over `max_body_bytes` get 413 (the body is drained, up to a limit, so
  the client reads the answer); at most `max_concurrency` requests are admitted at once (the
  rest wait up to `queue_timeout_s` for a slot, then get 503 with Retry-After); more than
  `max_connections` requests being handled get 503 at once. JSON nested too deeply to decode
  is a 400.
- The model runs one request at a time under a lock (the n choices of a request are one batch).
- Graceful shutdown on SIGINT / SIGTERM: stop accepting, finish the requests in flight, exit.

`logprobs` / `top_logprobs` are the model's own next-token distribution (temperature 1, no
top-p), recomputed by one teacher-forced forward over prompt + answer, whatever the sampling
settings were: the convention of OpenAI and vLLM's default, and what a judge that reads P(A)
needs. The end-of-sequence token is neither in the text nor in the log-probs.
"""

from __future__ import annotations

import hmac
import io
import json
import logging
import os
import re
import secrets
import selectors
import signal
import socket
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from alignkit.config import required

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
MAX_TOP_LOGPROBS = 20
MAX_STOP = 4
MAX_HEAD_BYTES = 64 * 1024
DRAIN_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Config:
    """Settings of the chat-completions server."""

    model: str = required()
    """Local model directory (an alignkit model or any Hugging Face causal LM)."""
    name: str | None = None
    """Model id listed by /v1/models and accepted in requests (default: the directory's name)."""
    host: str = "127.0.0.1"
    """Address to bind; anything but loopback exposes the model to the network."""
    port: int = 8000
    """TCP port (0: a free port, printed at start)."""
    api_key_env: str | None = None
    """Environment variable holding a key requests must send as 'Authorization: Bearer KEY' (None: no key)."""
    max_tokens_limit: int = 512
    """Largest max_tokens a request may ask for (400 above)."""
    default_max_tokens: int = 64
    """max_tokens of a request that gives none."""
    max_n: int = 8
    """Largest n (choices per request)."""
    max_body_bytes: int = 1_000_000
    """Larger request bodies get 413 without being read."""
    max_concurrency: int = 8
    """Requests admitted at once (queued for or using the model)."""
    queue_timeout_s: float = 30.0
    """How long a request waits for an admission slot before 503."""
    max_connections: int = 64
    """Complete requests being handled at once beyond this are answered 503 at once."""
    max_pending: int = 1024
    """Connections still sending their request beyond this are answered 503 at once."""
    read_deadline_s: float = 10.0
    """Overall limit on receiving one request's headers and body (slow clients are dropped)."""
    request_timeout_s: float = 30.0
    """Longest silence while receiving a request, and the socket timeout while answering."""
    dtype: str | None = None
    """Load the weights in this dtype (fp32, bf16, fp16); None keeps the saved one."""


class RequestError(Exception):
    """A request the server refuses: HTTP `status`, a message naming the problem, the field."""

    def __init__(
        self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


@dataclass(frozen=True)
class ChatRequest:
    """A validated /v1/chat/completions request."""

    messages: tuple
    max_tokens: int
    temperature: float
    top_p: float
    n: int
    seed: int | None
    logprobs: bool
    top_logprobs: int
    stop: tuple[str, ...]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _content(m: dict, i: int) -> str:
    content = m.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for j, part in enumerate(content):
            if not (
                isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            ):
                raise RequestError(400, f"messages[{i}].content[{j}]: only text parts are supported",
                                   f"messages[{i}].content")  # fmt: skip
            parts.append(part["text"])
        return "".join(parts)
    got = "missing" if content is None else type(content).__name__
    raise RequestError(400, f"messages[{i}].content must be a string, got {got}", f"messages[{i}].content")


def parse_request(raw: bytes, cfg: Config, served_name: str) -> ChatRequest:
    """Decode and validate a chat-completions body; RequestError (4xx) on anything wrong."""
    from alignkit.data.records import Message

    try:
        body = json.loads(raw.decode("utf-8"))
    except RecursionError:  # the decoder's own guard, raised by a body like [[[[...]]]]
        raise RequestError(400, "request body is nested too deeply to decode") from None
    except UnicodeDecodeError:
        raise RequestError(400, "request body is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise RequestError(
            400, f"request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from None
    if not isinstance(body, dict):
        raise RequestError(400, f"request body must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if model is not None and model != served_name:
        raise RequestError(404, f"model {model!r} is not served here (this server serves {served_name!r})",
                           "model", "not_found_error")  # fmt: skip
    if body.get("stream"):
        raise RequestError(400, "stream=true is not supported; send stream=false", "stream")
    messages = body.get("messages")
    if messages is None:
        raise RequestError(400, "'messages' is required: a list of {role, content} objects", "messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RequestError(
                400, f"messages[{i}] must be an object, got {type(m).__name__}", f"messages[{i}]"
            )
        role = m.get("role")
        if role not in ROLES:
            raise RequestError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}",
                               f"messages[{i}].role")  # fmt: skip
        turns.append(Message(role, _content(m, i)))
    if turns[-1].role != "user":
        raise RequestError(400, f"the last message must be from the user, got {turns[-1].role!r}", "messages")

    def integer(key: str, default: int | None, low: int, high: int) -> int | None:
        v = body.get(key)
        if v is None:
            return default
        if not _is_int(v):
            raise RequestError(400, f"'{key}' must be an integer, got {json.dumps(v)}", key)
        if not low <= v <= high:
            raise RequestError(400, f"'{key}' must be between {low} and {high}, got {v}", key)
        return v

    def number(key: str, default: float, low: float, high: float) -> float:
        v = body.get(key)
        if v is None:
            return default
        if not _is_number(v):
            raise RequestError(400, f"'{key}' must be a number, got {json.dumps(v)}", key)
        if not low <= v <= high:
            raise RequestError(400, f"'{key}' must be between {low} and {high}, got {v}", key)
        return float(v)

    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = integer(key, cfg.default_max_tokens, 1, cfg.max_tokens_limit)
    temperature = number("temperature", 1.0, 0.0, 2.0)
    top_p = number("top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise RequestError(400, "'top_p' must be greater than 0", "top_p")
    n = integer("n", 1, 1, cfg.max_n)
    seed = integer("seed", None, -(2**63), 2**63 - 1)
    logprobs = body.get("logprobs", False)
    if logprobs is None:
        logprobs = False
    if not isinstance(logprobs, bool):
        raise RequestError(400, f"'logprobs' must be true or false, got {json.dumps(logprobs)}", "logprobs")
    top_logprobs = integer("top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
    if top_logprobs and not logprobs:
        raise RequestError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(
            400, f"'stop' must be a string or a list of at most {MAX_STOP} non-empty strings", "stop"
        )
    return ChatRequest(
        tuple(turns), max_tokens, temperature, top_p, n, seed, logprobs, top_logprobs, tuple(stop)
    )


class ModelRunner:
    """The model, its tokenizer and the lock that serialises their use."""

    def __init__(self, model: Any, tokenizer: Any):
        self.model = model
        self.tokenizer = tokenizer
        self.lock = threading.Lock()
        config = getattr(model, "config", None)
        self.context = getattr(config, "max_position_embeddings", None) or 2048
        self.eos_ids = set()
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is not None:
            self.eos_ids = {eos} if isinstance(eos, int) else set(eos)

    def encode(self, req: ChatRequest) -> list[int]:
        from alignkit.data.tokenize import encode_prompt

        try:
            ids, _ = encode_prompt(self.tokenizer, req.messages)
        except Exception as e:  # a chat template that rejects this conversation shape
            raise RequestError(400, f"the conversation cannot be rendered: {e}", "messages") from None
        if len(ids) + req.max_tokens > self.context:
            raise RequestError(400, f"the prompt is {len(ids)} tokens; with max_tokens {req.max_tokens} it exceeds "
                               f"the model's context of {self.context}", "messages")  # fmt: skip
        return ids

    def complete(self, req: ChatRequest) -> tuple[list[dict], int, int]:
        """The choices of a request, its prompt and completion token counts (under the lock:
        the model, and the tokenizer, serve one request at a time)."""
        from alignkit.models.generate import HFGenerator, SamplingParams

        seed = req.seed if req.seed is not None else secrets.randbits(62)
        params = SamplingParams(
            max_new_tokens=req.max_tokens, temperature=req.temperature or 1.0, top_p=req.top_p,
            greedy=req.temperature == 0, seed=seed,
        )  # fmt: skip
        with self.lock:
            prompt_ids = self.encode(req)
            out = HFGenerator(self.model, self.tokenizer, batch_size=req.n).generate(
                [prompt_ids] * req.n, params
            )
            rows = [list(r) for r in out]
            texts, finish = [], []
            for r, done in zip(rows, out.finished):
                if done and r and r[-1] in self.eos_ids:
                    r.pop()
                text, reason = (
                    self.tokenizer.decode(r, skip_special_tokens=True),
                    "stop" if done else "length",
                )
                cut = min((text.find(s) for s in req.stop if s in text), default=-1)
                if cut >= 0:
                    text, reason = text[:cut], "stop"
                    while r and len(self.tokenizer.decode(r, skip_special_tokens=True)) > cut:
                        r.pop()
                texts.append(text)
                finish.append(reason)
            lps = self._logprobs(prompt_ids, rows, req.top_logprobs) if req.logprobs else [None] * len(rows)
        choices = [
            {"index": i, "message": {"role": "assistant", "content": t}, "logprobs": lp, "finish_reason": f}
            for i, (t, lp, f) in enumerate(zip(texts, lps, finish))
        ]
        return choices, len(prompt_ids), sum(len(r) for r in rows)

    def _token(self, tid: int) -> dict:
        text = self.tokenizer.decode([tid])
        return {"token": text, "bytes": list(text.encode("utf-8"))}

    def _logprobs(self, prompt_ids: list[int], rows: list[list[int]], k: int) -> list[dict]:
        """OpenAI `logprobs.content` per row: each answer token, its log-prob and the top k."""
        import torch

        from alignkit.models.logprobs import forward_logits

        out = []
        with torch.inference_mode():
            for r in rows:
                if not r:
                    out.append({"content": []})
                    continue
                ids = torch.tensor([prompt_ids + r])  # (1, T)
                logits = forward_logits(self.model, ids, torch.ones_like(ids))[0, len(prompt_ids) - 1 : -1]
                lp = logits.float().log_softmax(-1)  # (len(r), V): position t predicts token r[t]
                top = torch.topk(lp, k, dim=-1) if k else None
                content = []
                for t, tid in enumerate(r):
                    entry = self._token(tid) | {"logprob": float(lp[t, tid])}
                    entry["top_logprobs"] = (
                        [self._token(int(j)) | {"logprob": float(v)} for v, j in zip(top.values[t], top.indices[t])]
                        if top is not None else []
                    )  # fmt: skip
                    content.append(entry)
                out.append({"content": content})
        return out


_HEAD_END = b"\r\n\r\n"
_LENGTH = re.compile(rb"^content-length:[ \t]*(\S*)", re.IGNORECASE | re.MULTILINE)
_EXPECT = re.compile(rb"^expect:[ \t]*100-continue", re.IGNORECASE | re.MULTILINE)


class _Pending:
    """A connection still sending its request: what came so far and when it must be complete."""

    __slots__ = ("sock", "address", "data", "need", "deadline", "idle_deadline")

    def __init__(self, sock, address, cfg: Config):
        now = time.monotonic()
        self.sock, self.address, self.data = sock, address, bytearray()
        self.need: int | None = None  # total bytes of head + body, once the head is in
        self.deadline = now + cfg.read_deadline_s
        self.idle_deadline = now + cfg.request_timeout_s

    def complete(self, max_body: int) -> bool:
        """True once the head and the body it announces are in (or the body will not be read)."""
        if self.need is None:
            end = self.data.find(_HEAD_END)
            if end < 0:
                return False
            head = bytes(self.data[:end])
            match = _LENGTH.search(head)
            try:
                length = int(match.group(1)) if match else 0
            except ValueError:  # the handler answers 400
                length = 0
            # no body to wait for: a bad length, chunked (411) or a body over the limit (413)
            self.need = end + 4 + (length if 0 <= length <= max_body else 0)
            if len(self.data) < self.need and _EXPECT.search(head):
                try:  # the client waits for this before it sends the body (curl does, above 1 kB)
                    self.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
                except OSError:
                    pass
        return len(self.data) >= self.need


def _answer_and_close(sock, status: str, error: RequestError) -> None:
    body = json.dumps(error.body())
    try:
        sock.setblocking(True)
        sock.settimeout(1.0)
        sock.sendall((f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                      f"Retry-After: 1\r\nConnection: close\r\n\r\n{body}").encode())  # fmt: skip
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class _Reader(threading.Thread):
    """Receives every request whole with one selector (no thread per connection), then hands it
    to the server; drops connections past their deadline."""

    def __init__(self, server: _Server):
        super().__init__(name="alignkit-serve-reader", daemon=True)
        self.server = server
        self.selector = selectors.DefaultSelector()
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.selector.register(self.wake_r, selectors.EVENT_READ)
        self.incoming: list[_Pending] = []
        self.lock = threading.Lock()
        self.stopping = False

    def add(self, sock, address) -> None:
        with self.lock:
            self.incoming.append(_Pending(sock, address, self.server.app.cfg))
        self.wake_w.send(b"x")

    def stop(self) -> None:
        self.stopping = True
        self.wake_w.send(b"x")
        self.join()
        for key in list(self.selector.get_map().values()):
            if key.fileobj is not self.wake_r:
                key.fileobj.close()
        self.selector.close()
        self.wake_r.close()
        self.wake_w.close()

    def run(self) -> None:
        cfg = self.server.app.cfg
        pending: dict = {}
        while not self.stopping:
            with self.lock:
                new, self.incoming = self.incoming, []
            for p in new:
                if len(pending) >= cfg.max_pending:
                    self.server.app.count("rejected_connections")
                    _answer_and_close(p.sock, "503 Service Unavailable", RequestError(
                        503, "too many connections sending requests; retry later", kind="server_busy"))
                    continue
                p.sock.setblocking(False)
                pending[p.sock] = p
                self.selector.register(p.sock, selectors.EVENT_READ, p)
            now = time.monotonic()
            wait = min((min(p.deadline, p.idle_deadline) for p in pending.values()), default=now + 1.0) - now
            for key, _ in self.selector.select(max(0.0, min(wait, 1.0))):
                if key.fileobj is self.wake_r:
                    try:
                        self.wake_r.recv(4096)
                    except BlockingIOError:
                        pass
                    continue
                self._receive(key.data, pending)
            now = time.monotonic()
            for p in [p for p in pending.values() if now >= min(p.deadline, p.idle_deadline)]:
                self.server.app.count("timeouts")
                self._forget(p, pending)
                _answer_and_close(p.sock, "408 Request Timeout", RequestError(
                    408, f"the request was not received within {cfg.read_deadline_s:g} s", kind="timeout"))

    def _forget(self, p: _Pending, pending: dict) -> None:
        self.selector.unregister(p.sock)
        del pending[p.sock]

    def _receive(self, p: _Pending, pending: dict) -> None:
        cfg = self.server.app.cfg
        try:
            chunk = p.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:  # the client went away
            self._forget(p, pending)
            p.sock.close()
            return
        p.data += chunk
        p.idle_deadline = time.monotonic() + cfg.request_timeout_s
        if p.complete(cfg.max_body_bytes):
            self._forget(p, pending)
            p.sock.setblocking(True)
            self.server.dispatch(p.sock, p.address, bytes(p.data))
        elif p.need is None and len(p.data) > MAX_HEAD_BYTES:
            self._forget(p, pending)
            _answer_and_close(p.sock, "431 Request Header Fields Too Large",
                              RequestError(431, f"request headers exceed {MAX_HEAD_BYTES} bytes"))  # fmt: skip


class _Server(ThreadingHTTPServer):
    """ThreadingHTTPServer whose requests arrive whole through a _Reader before they get a
    thread; it joins its request threads on close and caps the requests being handled."""

    daemon_threads = False  # server_close() waits for the requests in flight
    block_on_close = True

    def __init__(self, address, handler, app: _App):
        self.app = app
        # the listen backlog: the standard library's 5 resets a burst of simultaneous clients
        self.request_queue_size = max(128, app.cfg.max_connections)
        self._open = 0
        self._open_lock = threading.Lock()
        self.received: dict = {}  # socket -> the bytes of its request, for the handler
        super().__init__(address, handler)
        self.reader = _Reader(self)
        self.reader.start()

    def process_request(self, request, client_address):
        self.reader.add(request, client_address)

    def dispatch(self, request, client_address, data: bytes) -> None:
        with self._open_lock:
            full = self._open >= self.app.cfg.max_connections
            if not full:
                self._open += 1
        if full:
            self.app.count("rejected_connections")
            _answer_and_close(request, "503 Service Unavailable",
                              RequestError(503, "too many open connections; retry later", kind="server_busy"))
            return
        self.received[request] = data
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.received.pop(request, None)
            with self._open_lock:
                self._open -= 1

    def server_close(self) -> None:
        self.reader.stop()
        super().server_close()


class _App:
    """What the request handlers share."""

    def __init__(self, cfg: Config, runner: ModelRunner, name: str):
        self.cfg = cfg
        self.runner = runner
        self.name = name
        self.slots = threading.BoundedSemaphore(cfg.max_concurrency)
        self.created = int(time.time())
        self.stats: Counter = Counter()
        self._stats_lock = threading.Lock()

    def count(self, key: str) -> None:
        with self._stats_lock:
            self.stats[key] += 1


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "alignkit-serve"
    server: _Server

    def setup(self) -> None:
        self.timeout = self.server.app.cfg.request_timeout_s
        super().setup()
        self.rfile = io.BytesIO(self.server.received.pop(self.connection, b""))

    def handle_expect_100(self) -> bool:
        return True  # the reader answered 100 Continue already, before it received the body

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        # method, path and status only: never headers (Authorization) or bodies
        logger.info("%s %s", self.address_string(), format % args)

    def _send(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)
        self.close_connection = True

    def _error(self, e: RequestError, headers: dict[str, str] | None = None) -> None:
        self.server.app.count(f"status_{e.status}")
        self._send(e.status, e.body(), headers)

    def _authorised(self) -> bool:
        env = self.server.app.cfg.api_key_env
        if not env:
            return True
        key = os.environ.get(env, "")
        sent = self.headers.get("Authorization", "")
        if key and hmac.compare_digest(sent.encode(), f"Bearer {key}".encode()):
            return True
        self._error(RequestError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                                 kind="authentication_error"))  # fmt: skip
        return False

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        app = self.server.app
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/health":
            self._send(200, {"status": "ok"})
        elif path == "/v1/models":
            if self._authorised():
                model = {"id": app.name, "object": "model", "created": app.created, "owned_by": "alignkit"}
                self._send(200, {"object": "list", "data": [model]})
        elif path == "/v1/chat/completions":
            self._error(RequestError(405, "use POST for /v1/chat/completions"), {"Allow": "POST"})
        else:
            self._error(RequestError(404, f"no such endpoint: {path or '/'}", kind="not_found_error"))

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0].rstrip("/")
        if path != "/v1/chat/completions":
            if path in ("/v1/models", "/health"):
                self._error(RequestError(405, f"use GET for {path}"), {"Allow": "GET"})
            else:
                self._error(RequestError(404, f"no such endpoint: {path}", kind="not_found_error"))
            return
        try:
            self._chat()
        except RequestError as e:
            self._error(e, {"Retry-After": "1"} if e.status == 503 else None)
            if e.status == 413:
                self._drain()
        except TimeoutError:
            self.server.app.count("timeouts")
            self.close_connection = True
        except Exception:  # a bug must not kill the server; the client gets a 500
            logger.exception("chat completion failed")
            self._error(RequestError(500, "internal error while generating", kind="server_error"))

    def _drain(self) -> None:
        """Read (and drop) the rest of a refused body, up to DRAIN_BYTES and `read_deadline_s`:
        closing with unread data would reset the connection and lose the 413 at the client."""
        self.wfile.flush()
        left = min(getattr(self, "_unread", 0), DRAIN_BYTES)
        deadline = time.monotonic() + self.server.app.cfg.read_deadline_s
        try:
            while left > 0 and (remaining := deadline - time.monotonic()) > 0:
                self.connection.settimeout(min(remaining, 1.0))
                chunk = self.connection.recv(min(left, 65536))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass

    def _read_body(self) -> bytes:
        cfg = self.server.app.cfg
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise RequestError(411, "chunked bodies are not supported; send Content-Length")
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError(411, "Content-Length is required")
        try:
            n = int(length)
        except ValueError:
            raise RequestError(400, f"Content-Length is not an integer: {length[:20]!r}") from None
        if n < 0:
            raise RequestError(400, "Content-Length is negative")
        if n > cfg.max_body_bytes:
            self._unread = n - len(self.rfile.read())
            raise RequestError(413, f"request body of {n} bytes exceeds the limit of {cfg.max_body_bytes}")
        data = self.rfile.read(n)
        if len(data) != n:
            raise RequestError(400, f"request body ended after {len(data)} of {n} bytes")
        return data

    def _chat(self) -> None:
        app = self.server.app
        if not self._authorised():
            return
        raw = self._read_body()
        req = parse_request(raw, app.cfg, app.name)
        if not app.slots.acquire(timeout=app.cfg.queue_timeout_s):
            app.count("rejected_busy")
            raise RequestError(503, f"server busy: {app.cfg.max_concurrency} requests in progress; retry later",
                               kind="server_busy")  # fmt: skip
        try:
            choices, n_prompt, n_completion = app.runner.complete(req)
        finally:
            app.slots.release()
        app.count("status_200")
        self._send(200, {
            "id": "chatcmpl-" + uuid.uuid4().hex,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": app.name,
            "choices": choices,
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_completion,
                      "total_tokens": n_prompt + n_completion},
        })  # fmt: skip


class ServerHandle:
    """A running server: `.url` (base URL ending in /v1), `.name`, `.stats`, `.shutdown()`.

    Use as a context manager; shutdown stops accepting, waits for requests in flight and closes.
    """

    def __init__(self, server: _Server, thread: threading.Thread):
        self._server = server
        self._thread = thread
        host, port = server.server_address[:2]
        self.host, self.port = host, port
        self.url = f"http://{host}:{port}/v1"
        self.name = server.app.name

    @property
    def stats(self) -> dict[str, int]:
        """Requests answered, by outcome (status_200, status_400, ..., rejected_busy)."""
        return dict(self._server.app.stats)

    def shutdown(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()  # the accept loop ends
            self._thread.join()
        self._server.server_close()  # joins the request threads still running

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


def start(cfg: Config, model: Any = None, tokenizer: Any = None) -> ServerHandle:
    """Load `cfg.model` (or use the given model and tokenizer) and serve it from a background thread."""
    from alignkit.config import ConfigError, check_required

    if model is None or tokenizer is None:
        check_required(cfg)
        from alignkit.models.load import load_model, load_tokenizer

        model = load_model(cfg.model, dtype=cfg.dtype)
        tokenizer = load_tokenizer(cfg.model)
    for key in ("max_tokens_limit", "default_max_tokens", "max_n", "max_body_bytes", "max_concurrency",
                "max_connections"):  # fmt: skip
        if getattr(cfg, key) < 1:
            raise ConfigError(f"config key '{key}' must be >= 1, got {getattr(cfg, key)}")
    if cfg.default_max_tokens > cfg.max_tokens_limit:
        raise ConfigError("config key 'default_max_tokens' must not exceed 'max_tokens_limit'")
    if cfg.api_key_env and not os.environ.get(cfg.api_key_env):
        raise ConfigError(f"config key 'api_key_env': the environment variable {cfg.api_key_env} is not set")
    model.eval()
    name = cfg.name or (Path(cfg.model).name if cfg.model else "model")
    app = _App(cfg, ModelRunner(model, tokenizer), name)
    server = _Server((cfg.host, cfg.port), _Handler, app)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="alignkit-serve",
                              daemon=True)  # fmt: skip
    thread.start()
    return ServerHandle(server, thread)


def serve(cfg: Config) -> dict:
    """Serve until SIGINT or SIGTERM, then finish the requests in flight; returns the request counts."""
    handle = start(cfg)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    print(f"alignkit serve: {handle.name} at {handle.url} (Ctrl-C to stop)", flush=True)
    try:
        while not stop.wait(0.2):
            pass
        print("alignkit serve: shutting down, finishing requests in flight", flush=True)
    finally:
        handle.shutdown()
        for s, h in previous.items():
            signal.signal(s, h)
    return {"url": handle.url, "model": handle.name, "requests": handle.stats}


run = serve
"""`run(cfg)`: the stage-module convention of alignkit.cli."""


def main(argv: list[str] | None = None) -> int:
    """`python -m alignkit.serve [--config FILE] key=value ...`."""
    import argparse

    from alignkit.config import ConfigError, load_config

    parser = argparse.ArgumentParser(prog="alignkit serve", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        result = serve(load_config(Config, args.config, args.overrides))
    except (ConfigError, FileNotFoundError, OSError) as e:
        print(f"alignkit: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
