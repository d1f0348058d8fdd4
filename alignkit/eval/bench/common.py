"""What every benchmark shares: the language-model interface, file readers, and small helpers.

A benchmark asks a model two kinds of question, and nothing else:

    lm.loglikelihood([(prompt, continuation), ...])  -> [log p(continuation | prompt), ...]
    lm.generate_texts([prompt, ...], GenOptions(...)) -> [[sample, ...] per prompt]

`HFLM` answers them for any transformers causal LM. A test (or another backend) can pass any
object with these two methods in place of the model; `as_lm` lets it through unchanged, so the
metric code is the same whichever answers.

Scoring splits prompt and continuation as lm-evaluation-harness does (`_encode_pair`): prompt +
continuation is tokenised as one text, and the continuation's tokens are those after the prompt's
own tokens (`alignkit.data.tokenize.continuation_ids`). When the prompt's ids are not a prefix of
the joint ids and the prompt ends in whitespace, that whitespace moves to the continuation first
(lm-eval does this always; see `HFLM._split`); only when that fails too is the continuation
tokenised alone. BOS, when the tokenizer adds one, goes only before the prompt; no EOS. Only the continuation tokens are scored (labels -100 elsewhere). Tokenising
the continuation alone would be wrong for SentencePiece-layout tokenizers: " A" alone is
['▁', '▁A'], while "Answer: A" ends in '▁A'.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from alignkit.config import ConfigError
from alignkit.data.load import DataError


@dataclass(frozen=True)
class GenOptions:
    """How to sample continuations for a generation benchmark."""

    max_new_tokens: int = 256
    """Most tokens generated per sample."""
    temperature: float = 0.0
    """0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling mass when temperature > 0."""
    n: int = 1
    """Samples per prompt."""
    seed: int = 0
    """Sampling seed."""
    stop: tuple[str, ...] = ()
    """A sample is cut before the first occurrence of any of these strings (after decoding)."""


class BenchLM(Protocol):
    """What a benchmark needs from a model."""

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[float]:
        """Summed log-prob of each continuation given its prompt, in request order."""
        ...

    def generate_texts(self, prompts: Sequence[str], opts: GenOptions) -> list[list[str]]:
        """`opts.n` decoded samples per prompt, each already cut at the stop strings."""
        ...


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to (not including) the earliest occurrence of any stop string."""
    cut = len(text)
    for s in stop:
        if s:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


def _core_model(model: Any) -> Any:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


class HFLM:
    """`BenchLM` for a transformers causal LM and its tokenizer.

    Prompts longer than the model's context keep their LAST tokens (a leading BOS is kept); each
    such cut is counted in `truncated` so results can say how many items the model saw only in
    part. A continuation that does not fit by itself is an error.

    Requests whose continuation is a single token are grouped by prompt and scored from one
    forward pass of the prompt (the next-token distribution at its last position), which makes
    letter-choice benchmarks such as MMLU one forward per question instead of four; the result
    equals the general path (tested).

    With `logprob_chunk` > 0 (and a model whose head splits off) scores go through the chunked
    LM head (`alignkit.models.chunked`): the head runs on the scored positions only, that many
    tokens at a time, so no (B, T, V) logits are built; 0 uses the model's own forward.
    """

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 8, max_length: int | None = None,
                 logprob_chunk: int = 1024):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.logprob_chunk = logprob_chunk
        if max_length is None:
            config = getattr(_core_model(model), "config", None)
            max_length = getattr(config, "max_position_embeddings", None) or 2048
        self.max_length = int(max_length)
        self.truncated = 0

    # -- tokenisation -------------------------------------------------------------------------

    def _encode(self, prompt: str) -> list[int]:
        """Prompt ids, BOS first when the tokenizer adds one (as in training)."""
        from alignkit.data.tokenize import encode_prompt

        return encode_prompt(self.tokenizer, prompt)[0]

    def _left_cut(self, ids: list[int], room: int) -> list[int]:
        """The last `room` ids (a leading BOS is kept)."""
        if len(ids) <= room:
            return ids
        bos = self.tokenizer.bos_token_id
        if ids and ids[0] == bos and room > 1:
            return [bos] + ids[len(ids) - (room - 1) :]
        return ids[len(ids) - room :]

    # -- scoring ------------------------------------------------------------------------------

    def _split(self, prompt: str, cont: str, cache: dict) -> tuple[list[int], list[int]]:
        """(prompt ids with BOS, continuation ids) of one request, before any length cut.

        The continuation's ids follow the prompt's in the joint encoding. When the prompt's ids are
        not a prefix of it and the prompt ends in whitespace, that whitespace moves to the
        continuation (lm-eval's rule: "Answer: " + "A" is scored as "Answer:" + " A"); when that
        fails too, the continuation is tokenised alone."""
        from alignkit.data.tokenize import continuation_ids

        def context(text: str) -> tuple[list[int], list[int]]:
            if text not in cache:
                cache[text] = (self._encode(text), self.tokenizer(text, add_special_tokens=False)["input_ids"])
            return cache[text]

        ids, text_ids = context(prompt)
        cont_ids, joint = continuation_ids(self.tokenizer, prompt, cont, text_ids)
        stripped = prompt.rstrip()
        if not joint and stripped != prompt:
            ids2, text2 = context(stripped)
            cont2, joint2 = continuation_ids(self.tokenizer, stripped, prompt[len(stripped) :] + cont, text2)
            if joint2:
                return ids2, cont2
        return ids, cont_ids

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[float]:
        encoded = []
        cache: dict[str, tuple[list[int], list[int]]] = {}  # prompts repeat across options
        cut: set[str] = set()
        for prompt, cont in requests:
            whole, cont_ids = self._split(prompt, cont, cache)
            if not cont_ids:
                raise ValueError(f"empty continuation {cont!r}: nothing to score")
            if len(cont_ids) >= self.max_length:
                raise ValueError(
                    f"continuation of {len(cont_ids)} tokens does not fit the model's {self.max_length}"
                )
            prompt_ids = self._left_cut(whole, self.max_length - len(cont_ids))
            if len(prompt_ids) < len(whole) and prompt not in cut:
                cut.add(prompt)
                self.truncated += 1
            if not prompt_ids:
                raise ValueError("empty prompt and no BOS: the first continuation token has no context")
            encoded.append((prompt_ids, cont_ids))
        out = [0.0] * len(encoded)
        single: dict[tuple[int, ...], list[int]] = {}
        multi: list[int] = []
        for i, (p, c) in enumerate(encoded):
            if len(c) == 1:
                single.setdefault(tuple(p), []).append(i)
            else:
                multi.append(i)
        self._score_single(encoded, single, out)
        self._score_multi(encoded, multi, out)
        return out

    def _batches(self, rows: list[list[int]]) -> Iterator[list[int]]:
        """Row indices in batches of similar length (longest first, to fail fast on memory)."""
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        for start in range(0, len(order), self.batch_size):
            yield order[start : start + self.batch_size]

    def _pad(self, rows: list[list[int]], device, left: bool = False):
        """(B, T) ids and attention mask, padded on the right (or the left)."""
        import torch

        T = max(len(r) for r in rows)
        ids = torch.zeros((len(rows), T), dtype=torch.long, device=device)
        mask = torch.zeros((len(rows), T), dtype=torch.long, device=device)
        for b, r in enumerate(rows):
            span = slice(T - len(r), T) if left else slice(0, len(r))
            ids[b, span] = torch.tensor(r, dtype=torch.long, device=device)
            mask[b, span] = 1
        return ids, mask

    def _last_logits(self, ids, mask):
        """(B, V) next-token logits after the last column of left-padded rows. Only that position
        goes through the output head when the model supports `logits_to_keep` (with a 100k+
        vocabulary the full (B, T, V) logits would dominate memory)."""
        import inspect

        from alignkit.models.logprobs import forward_logits, position_ids_from_mask

        forward = getattr(_core_model(self.model), "forward", None)
        if forward is not None and "logits_to_keep" in inspect.signature(forward).parameters:
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=position_ids_from_mask(mask),
                use_cache=False,
                logits_to_keep=1,
            )
            return out.logits[:, -1]
        return forward_logits(self.model, ids, mask)[:, -1]

    def _score_single(self, encoded, groups: dict[tuple[int, ...], list[int]], out: list[float]) -> None:
        import torch

        from alignkit.models.chunked import last_token_logprobs

        if not groups:
            return
        prompts = [list(p) for p in groups]
        members = list(groups.values())
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            for rows in self._batches(prompts):
                ids, mask = self._pad([prompts[r] for r in rows], device, left=True)
                lp = last_token_logprobs(self.model, ids, mask, self.logprob_chunk)  # (B, V)
                if lp is None:
                    lp = self._last_logits(ids, mask).float().log_softmax(-1)
                for b, r in enumerate(rows):
                    for i in members[r]:
                        out[i] = float(lp[b, encoded[i][1][0]])

    def _score_multi(self, encoded, idx: list[int], out: list[float]) -> None:
        import torch

        from alignkit.models.chunked import sequence_sums
        from alignkit.models.logprobs import sequence_logprobs

        if not idx:
            return
        rows_all = [encoded[i][0] + encoded[i][1] for i in idx]
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            for rows in self._batches(rows_all):
                ids, mask = self._pad([rows_all[r] for r in rows], device)
                labels = torch.full_like(ids, -100)  # (B, T)
                for b, r in enumerate(rows):
                    p, c = encoded[idx[r]]
                    labels[b, len(p) : len(p) + len(c)] = torch.tensor(c, device=device)
                got = sequence_sums(self.model, ids, mask, labels, self.logprob_chunk)
                total = got[0] if got is not None else sequence_logprobs(self.model, ids, mask, labels)  # (B,)
                for b, r in enumerate(rows):
                    out[idx[r]] = float(total[b])

    # -- generation ---------------------------------------------------------------------------

    def generate_texts(self, prompts: Sequence[str], opts: GenOptions) -> list[list[str]]:
        from alignkit.models.generate import HFGenerator, SamplingParams

        if opts.n < 1:
            raise ConfigError(f"n (samples per prompt) must be >= 1, got {opts.n}")
        room = self.max_length - opts.max_new_tokens
        if room < 1:
            raise ConfigError(
                f"max_new_tokens={opts.max_new_tokens} leaves no room for a prompt in the model's "
                f"{self.max_length} positions"
            )
        ids = []
        for p in prompts:
            full = self._encode(p)
            ids.append(self._left_cut(full, room))
            self.truncated += len(ids[-1]) < len(full)
        ids = [i for i in ids for _ in range(opts.n)]  # each prompt n times, adjacent
        greedy = opts.temperature <= 0
        params = SamplingParams(
            max_new_tokens=opts.max_new_tokens,
            temperature=opts.temperature if not greedy else 1.0,
            top_p=opts.top_p,
            greedy=greedy,
            seed=opts.seed,
        )
        gen = HFGenerator(self.model, self.tokenizer, batch_size=self.batch_size).generate(ids, params)
        texts = [cut_at_stop(self.tokenizer.decode(r, skip_special_tokens=True), opts.stop) for r in gen]
        return [texts[i * opts.n : (i + 1) * opts.n] for i in range(len(prompts))]


def as_lm(model: Any, tokenizer: Any = None, batch_size: int = 8, logprob_chunk: int = 1024) -> BenchLM:
    """`model` itself when it already speaks `BenchLM` (a test stub, another backend), otherwise
    an `HFLM` around the transformers model and tokenizer (scoring through the chunked head
    `logprob_chunk` tokens at a time; 0: the model's own forward)."""
    if hasattr(model, "loglikelihood") and hasattr(model, "generate_texts"):
        return model
    if tokenizer is None:
        raise ValueError("a transformers model needs its tokenizer")
    return HFLM(model, tokenizer, batch_size=batch_size, logprob_chunk=logprob_chunk)


def truncated_count(lm: BenchLM) -> int:
    """Prompts the model saw only in part (0 for backends that do not count)."""
    return int(getattr(lm, "truncated", 0))


# -- files ------------------------------------------------------------------------------------


def find_file(data_path: str | os.PathLike, names: Sequence[str], what: str) -> Path:
    """`data_path` itself when it is a file, else the first of `names` inside that directory."""
    p = Path(data_path)
    if p.is_file():
        return p
    if p.is_dir():
        for name in names:
            if (p / name).is_file():
                return p / name
        raise FileNotFoundError(f"{p}: no {what} file here (looked for {', '.join(names)})")
    raise FileNotFoundError(f"{what} data not found: {p}")


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSON Lines file (`.gz` read as gzip).

    A line that is not a JSON object is a `DataError` naming file:line.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(path, f"invalid JSON ({e.msg} at column {e.colno})", n) from None
            if not isinstance(obj, dict):
                raise DataError(path, f"expected a JSON object, got {type(obj).__name__}", n)
            yield n, obj


def field(rec: dict, key: str, path: Path | str, line: int, kind: type | tuple = str, unit: str = "line"):
    """rec[key], checked to exist and have type `kind` (a non-empty string when `kind` is str)."""
    if key not in rec or rec[key] is None:
        raise DataError(path, f"missing field '{key}' (has: {', '.join(sorted(rec))})", line, unit)
    value = rec[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise DataError(path, f"field '{key}' should be {names}, got {type(value).__name__}", line, unit)
    if isinstance(value, str) and not value.strip():
        raise DataError(path, f"field '{key}' is empty", line, unit)
    return value


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write `obj` as JSON to a temporary file beside `path`, then rename it over `path`."""
    from alignkit.atomic import write_json_atomic as write

    return write(path, obj, indent=2, ensure_ascii=False)


def mean(values: Sequence[float]) -> float | None:
    """Arithmetic mean; None for no values (JSON has no NaN)."""
    return sum(values) / len(values) if values else None


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first one on ties."""
    return max(range(len(values)), key=lambda i: (values[i], -i))
