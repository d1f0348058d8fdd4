"""Policy and feedback models for Constitutional AI: a local causal LM or an OpenAI-compatible endpoint.

    b = make_backend("runs/sft/final")                              # local directory
    b = make_backend("http://127.0.0.1:8000/v1", name="tiny")       # vLLM, `alignkit serve`, ...
    b.generate(prompts, SamplingParams(max_new_tokens=48, seed=0))  # one text per prompt
    b.choice_probs(questions, ("A", "B"))                            # P(first label), per question

Prompts are strings (used as they are) or conversations (tuples of Messages: a local model
renders them with its chat template, an endpoint receives them as chat messages).

`choice_probs` reads, never generates, the answer to a multiple-choice question: the next-token
probabilities of the two labels, normalised over the two. Locally that is `LLMJudge.first_probs`
(labels "A" and " A" both count; a multi-token label is scored by teacher forcing). An endpoint
is asked for one token with `logprobs` / `top_logprobs` through `EndpointJudge`, which also owns
the HTTP client: the API key is read from an environment variable at each request and sent only
in the Authorization header; it is never stored, logged or written (see docs/winrate.md).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from alignkit.data.records import Message, Prompt
from alignkit.feedback.constitution import as_conversation
from alignkit.models.generate import SamplingParams

logger = logging.getLogger(__name__)


class Backend(Protocol):
    """A model Constitutional AI can ask things."""

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[str]:
        """One response text per prompt, in order (special tokens removed)."""
        ...

    def choice_probs(self, prompts: Sequence[Prompt], choices: tuple[str, str]) -> list[float]:
        """P(choices[0]) / (P(choices[0]) + P(choices[1])) as the next answer, per prompt."""
        ...


class LocalBackend:
    """A transformers causal LM in this process; generation and scoring are batched."""

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 32, name: str = "local"):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.name = name
        self._judges: dict[tuple[str, str], Any] = {}

    @classmethod
    def from_dir(cls, path: str, batch_size: int = 32, dtype: str | None = None) -> LocalBackend:
        from alignkit.models.load import load_model, load_tokenizer

        return cls(load_model(path, dtype=dtype), load_tokenizer(path), batch_size, name=str(path))

    def __repr__(self) -> str:
        return f"LocalBackend({self.name!r}, batch_size={self.batch_size})"

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[str]:
        from alignkit.data.tokenize import decode_response, encode_prompt
        from alignkit.models.generate import HFGenerator

        if not prompts:
            return []
        ids = [encode_prompt(self.tokenizer, p)[0] for p in prompts]
        out = HFGenerator(self.model, self.tokenizer, batch_size=self.batch_size).generate(ids, params)
        return [decode_response(self.tokenizer, p, r) for p, r in zip(ids, out)]

    def choice_probs(self, prompts: Sequence[Prompt], choices: tuple[str, str]) -> list[float]:
        from alignkit.data.tokenize import render_prompt
        from alignkit.feedback.judges import LLMJudge

        if not prompts:
            return []
        key = tuple(choices)
        if key not in self._judges:
            self._judges[key] = LLMJudge(
                self.model, self.tokenizer, labels=key, chat=False, batch_size=self.batch_size
            )
        # rendered here, so a conversation goes through the chat template exactly as in generate()
        return self._judges[key].first_probs([render_prompt(self.tokenizer, p) for p in prompts])


def _messages(prompt: Prompt) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in as_conversation(prompt)]


class EndpointBackend:
    """An OpenAI-compatible chat-completions endpoint (vLLM, llama.cpp, `alignkit serve`, OpenAI).

    base_url ends before /chat/completions (e.g. http://127.0.0.1:8000/v1). api_key_env names the
    environment variable holding the key (None: send no key, for a local server). Requests run
    `max_workers` at a time; the seed of prompt i is params.row_seeds[i] (mod 2^31) or else
    params.seed + i, so a server that honours `seed` gives reproducible samples. Failures raise `EndpointError` (never containing the key).
    """

    def __init__(
        self,
        base_url: str,
        model: str = "default",
        api_key_env: str | None = None,
        top_logprobs: int = 20,
        timeout: float = 120.0,
        max_retries: int = 3,
        max_workers: int = 4,
        allow_insecure_http: bool = False,
    ):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        self.top_logprobs = top_logprobs
        self.max_workers = max_workers
        self.unread = 0  # choice questions whose answer named neither label (counted as 0.5)
        self._kwargs = dict(
            api_key_env=api_key_env, top_logprobs=top_logprobs, max_tokens=1, timeout=timeout,
            max_retries=max_retries, max_workers=max_workers, allow_insecure_http=allow_insecure_http,
        )  # fmt: skip
        self._clients: dict[tuple[str, str], Any] = {}
        self._client(("A", "B"))  # checks the URL and the http/https rule now, not at the first request

    def __repr__(self) -> str:
        return f"EndpointBackend(base_url={self.base_url!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"

    def _client(self, choices: tuple[str, str]):
        from alignkit.feedback.judges import EndpointJudge

        key = tuple(choices)
        if key not in self._clients:
            self._clients[key] = EndpointJudge(self.base_url, self.model, labels=key, **self._kwargs)
        return self._clients[key]

    def _map(self, fn, items: list) -> list:
        with ThreadPoolExecutor(max_workers=max(1, self.max_workers)) as pool:
            return list(pool.map(fn, items))

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[str]:
        from alignkit.feedback.judges import EndpointError

        client = self._client(("A", "B"))
        client._api_key()  # a missing key fails before any request
        greedy = params.greedy or params.temperature == 0

        def one(item: tuple[int, Prompt]) -> str:
            i, prompt = item
            body: dict[str, Any] = {
                "model": self.model,
                "messages": _messages(prompt),
                "max_tokens": params.max_new_tokens,
                "temperature": 0.0 if greedy else params.temperature,
            }
            if not greedy and params.top_p < 1.0:
                body["top_p"] = params.top_p
            if params.row_seeds is not None:  # one seed per prompt, from the caller
                body["seed"] = params.row_seeds[i] % 2**31
            elif params.seed is not None:
                body["seed"] = params.seed + i
            answer = client._post(body)
            try:
                content = answer["choices"][0]["message"]["content"]
            except (KeyError, IndexError, TypeError):
                raise EndpointError(f"{client.url}: the answer has no choices[0].message.content") from None
            return content if isinstance(content, str) else ""

        return self._map(one, list(enumerate(prompts)))

    def choice_probs(self, prompts: Sequence[Prompt], choices: tuple[str, str]) -> list[float]:
        client = self._client(choices)
        client._api_key()
        questions = []
        for p in prompts:
            turns = as_conversation(p)
            if len(turns) != 1 or turns[0].role != "user":
                raise ValueError("an endpoint's choice question must be one user message")
            questions.append(turns[0].content)
        answers = self._map(client._first_prob, questions)
        unread = sum(src == "none" for _, src in answers)
        if unread:
            self.unread += unread
            logger.warning("endpoint %s: %d of %d answers named neither %s nor %s (counted as 0.5)",
                           self.base_url, unread, len(answers), *choices)  # fmt: skip
        return [p for p, _ in answers]


def is_endpoint(spec: str) -> bool:
    """True for an http(s) URL, False for a local model directory."""
    return str(spec).startswith(("http://", "https://"))


def make_backend(
    spec: str, name: str | None = None, api_key_env: str | None = None, batch_size: int = 32, **endpoint: Any
) -> LocalBackend | EndpointBackend:
    """A backend for `spec`: an http(s) base URL (model `name`) or a local model directory."""
    if is_endpoint(spec):
        return EndpointBackend(spec, name or "default", api_key_env=api_key_env, **endpoint)
    return LocalBackend.from_dir(spec, batch_size=batch_size)


__all__ = ["Backend", "EndpointBackend", "LocalBackend", "Message", "is_endpoint", "make_backend"]
