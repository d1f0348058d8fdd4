"""Rollout generation behind one small protocol, so a vLLM backend can replace the HF one.

    gen = HFGenerator(model, tokenizer)
    out = gen.generate([[12, 40, 7], [5, 9]], SamplingParams(max_new_tokens=32, seed=0))
    out[0]             # response ids of prompt 0, up to and including EOS if one was produced
    out.finished[0]    # True when that response ended with EOS (False: cut at max_new_tokens)

Legend for shapes: B: rows in a batch, P: longest prompt in the batch, T: tokens so far, V: vocab.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from alignkit.models.logprobs import position_ids_from_mask


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token."""

    max_new_tokens: int = 64
    """Most tokens generated per prompt (EOS included)."""
    temperature: float = 1.0
    """Logits are divided by this; 0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1: off)."""
    top_k: int = 0
    """Keep only the k most likely tokens (0: off)."""
    greedy: bool = False
    """Always take the most likely token (ignores temperature, top_p, top_k, seed)."""
    seed: int | None = None
    """Seed of the sampling RNG; the same seed, prompts and batch size give the same tokens."""
    stop_at_eos: bool = True
    """End a response at its first EOS; False always generates max_new_tokens (benchmarks)."""
    row_seeds: tuple[int, ...] | None = None
    """One seed per prompt (overrides `seed`): each row samples from its own RNG, so its tokens do
    not depend on the other prompts in the batch (a batch split over ranks samples the same)."""


class Generations(list):
    """Response token ids per prompt (a plain `list[list[int]]`), plus `finished`: one bool per
    prompt, True when the response ends with EOS, False when max_new_tokens cut it."""

    def __init__(self, ids: list[list[int]], finished: list[bool]):
        super().__init__(ids)
        self.finished = finished


class Generator(Protocol):
    """Anything that turns prompt token ids into response token ids."""

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> Generations:
        """Responses in the order of `prompts`, without padding, each up to and including its
        EOS when one was produced (see Generations.finished)."""
        ...


def check_request(prompts: list[list[int]], params: SamplingParams) -> None:
    """ValueError for an empty prompt or a negative max_new_tokens (every Generator's contract)."""
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty; generation needs at least one prompt token")
    if params.max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {params.max_new_tokens}")


def _core_model(model: Any) -> Any:
    """The transformers model under a peft wrapper (peft forwards kwargs unchanged)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def cache_kwarg(model: Any) -> str:
    """Name of the forward's KV-cache argument: transformers 5 renamed `past_key_values` to `cache`."""
    params = inspect.signature(_core_model(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def distinct_prompts(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The distinct rows of (B, P) left-padded prompts (ids and mask both equal): (U, P) ids,
    (U, P) mask and the (B,) index of each row's distinct prompt; None when no row repeats."""
    P = ids.shape[1]
    unique, inverse = torch.unique(torch.cat([ids, mask.to(ids.dtype)], dim=1), dim=0, return_inverse=True)
    if unique.shape[0] == ids.shape[0]:
        return None
    return unique[:, :P], unique[:, P:], inverse


def new_kv_cache(model: Any) -> Any:
    """An empty transformers DynamicCache for `model` (sliding-window layers follow its config)."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=_core_model(model).config)
    except TypeError:  # older transformers
        return DynamicCache()


@functools.cache
def _preallocated_layer_class() -> type:
    """`_PreallocatedLayer`, built on first use so importing this module does not import transformers."""
    from transformers.cache_utils import DynamicLayer

    class _PreallocatedLayer(DynamicLayer):
        """One decoder layer's KV cache written into buffers sized for the whole generation, so a
        decode step copies its one new column instead of `torch.cat`-ing the whole cache (a fresh
        allocation and full copy per layer and step: O(T^2) copying over T tokens). Attention
        reads the first `n` columns as a view: the same values as the concatenated cache."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int):
            super().__init__()
            B, H, n, D = keys.shape  # (B, H, n, D)
            self._k = keys.new_empty((B, H, capacity, D))
            self._v = values.new_empty((B, H, capacity, values.shape[-1]))
            self._k[:, :, :n] = keys
            self._v[:, :, :n] = values
            self.n, self.device, self.is_initialized = n, keys.device, True
            self.keys, self.values = self._k[:, :, :n], self._v[:, :, :n]

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            q = key_states.shape[-2]
            if self.n + q > self._k.shape[2]:
                raise RuntimeError(f"preallocated KV cache full: {self.n} + {q} > {self._k.shape[2]} columns")
            self._k[:, :, self.n : self.n + q] = key_states
            self._v[:, :, self.n : self.n + q] = value_states
            self.n += q
            self.keys, self.values = self._k[:, :, : self.n], self._v[:, :, : self.n]
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.n

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            raise NotImplementedError("a preallocated KV cache is not reordered (reorder before preallocating)")

        crop = batch_repeat_interleave = batch_select_indices = reorder_cache

    return _PreallocatedLayer


def preallocate_kv_cache(cache: Any, extra: int) -> Any:
    """Give every plain (full-attention, unquantised) layer of a filled DynamicCache room for
    `extra` more columns (`_PreallocatedLayer`); other layers are left as they are. Returns `cache`."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if layers is None or extra <= 0:
        return cache
    cls = _preallocated_layer_class()
    for i, layer in enumerate(layers):
        if type(layer) is DynamicLayer and layer.is_initialized and layer.keys.dim() == 4:
            layers[i] = cls(layer.keys, layer.values, layer.keys.shape[2] + extra)
    return cache


def sample_rows(probs: torch.Tensor, rngs: list[torch.Generator] | RowNoise) -> torch.Tensor:
    """(B, V) probabilities, one generator per row -> (B,) token ids, each row's draw identical to
    `torch.multinomial(probs[r], 1, generator=rngs[r])`: that call (one sample) is the
    exponential race argmax(p / q), q ~ Exp(1) drawn from the row's generator; here the q rows
    come one generator at a time (or pre-drawn by a `RowNoise`), and the division and argmax run
    once for the batch."""
    if not bool(((probs >= 0) & torch.isfinite(probs)).all()):  # multinomial's own check
        raise RuntimeError("probability tensor contains either inf, nan or element < 0")
    if isinstance(rngs, RowNoise):
        q = rngs.next(probs)
    else:
        q = torch.empty_like(probs)
        for row, g in zip(q, rngs):
            row.exponential_(1.0, generator=g)
    return (probs / q).argmax(dim=-1)


class RowNoise:
    """The Exp(1) draws of `sample_rows` for several decode steps at once: each row's generator
    fills a (steps, V) block in one call, which on the CPU is bit for bit the same stream as
    `steps` calls of V (tests/test_models.py), without a Python call per row and step. Blocks
    hold at most `budget` floats for the batch (at least one step). CPU only: other devices'
    generators count offsets per call, so there the rows draw every step (`sample_rows` with the
    generators themselves)."""

    def __init__(self, rngs: list[torch.Generator], steps: int, budget: int = 1 << 22):
        self.rngs, self.steps, self.budget = rngs, steps, budget
        self.block: torch.Tensor | None = None  # (B, k, V)
        self.used = 0

    def next(self, probs: torch.Tensor) -> torch.Tensor:
        """(B, V) Exp(1) draws for this step, row r from rngs[r]."""
        B, V = probs.shape
        if self.block is None or self.used == self.block.shape[1]:
            k = max(1, min(self.steps, self.budget // max(1, B * V)))
            self.block = torch.empty((B, k, V), dtype=probs.dtype)
            for row, g in zip(self.block, self.rngs):
                row.exponential_(1.0, generator=g)
            self.steps -= k
            self.used = 0
        self.used += 1
        return self.block[:, self.used - 1]


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    if ids is None:
        ids = getattr(_core_model(model).config, "eos_token_id", None)
    if ids is None:
        return []
    return [ids] if isinstance(ids, int) else list(ids)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set the logits of tokens outside the top-k / nucleus (top-p) set to -inf.

    logits: (B, V). The most likely token is always kept.
    """
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens before it already reach top_p
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p  # (B, V)
        drop_sorted[:, 0] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


class HFGenerator:
    """Batched sampling from a transformers causal LM with our own decoding loop.

    Prompts are sorted by length and cut into batches of `batch_size` to limit padding; each batch
    is left-padded, positions count only real tokens (cumsum(mask) - 1), and with `use_cache` the
    KV cache of the previous step is reused so each step feeds one new token per row. Without the
    cache every step recomputes the whole sequence (slower; kept for the benchmark and tests).
    With the cache and `share_prefix`, a prompt that occurs several times in a batch (GRPO's G
    samples per prompt) is prefilled once and its cache copied to its rows: the same logits,
    one prompt forward instead of G.
    """

    def __init__(
        self, model: Any, tokenizer: Any = None, batch_size: int = 64, use_cache: bool = True, share_prefix: bool = True
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.use_cache = use_cache
        self.share_prefix = share_prefix
        self.eos_ids = _eos_ids(model, tokenizer)
        pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        if pad is None:
            pad = getattr(_core_model(model).config, "pad_token_id", None)
        self.pad_id = pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0)
        self._cache_kw = cache_kwarg(model)
        self._keep_last = "logits_to_keep" in inspect.signature(_core_model(model).forward).parameters

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> Generations:
        check_request(prompts, params)
        device = next(self.model.parameters()).device
        rng = None
        if params.seed is not None:
            rng = torch.Generator(device=device)
            rng.manual_seed(params.seed)
        row_rngs = None
        if params.row_seeds is not None:
            if len(params.row_seeds) != len(prompts):
                raise ValueError(f"row_seeds has {len(params.row_seeds)} seeds for {len(prompts)} prompts")
            row_rngs = [torch.Generator(device=device).manual_seed(s) for s in params.row_seeds]
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        ids: list[list[int]] = [[] for _ in prompts]
        finished = [False] * len(prompts)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                for start in range(0, len(order), self.batch_size):
                    rows = order[start : start + self.batch_size]
                    batch_rng = rng if row_rngs is None else [row_rngs[i] for i in rows]
                    out, done = self._generate_batch([prompts[i] for i in rows], params, device, batch_rng)
                    for j, i in enumerate(rows):
                        ids[i], finished[i] = out[j], done[j]
        finally:
            self.model.train(was_training)
        return Generations(ids, finished)

    def _next_token(
        self, logits: torch.Tensor, params: SamplingParams,
        rng: torch.Generator | list[torch.Generator] | RowNoise | None,
    ) -> torch.Tensor:
        """logits: (B, V) float -> (B,) token ids; `rng` is one generator, or one per row (a list,
        or their pre-drawn `RowNoise`)."""
        if params.greedy or params.temperature == 0:
            return logits.argmax(dim=-1)
        probs = filter_logits(logits.float() / params.temperature, params.top_k, params.top_p).softmax(dim=-1)
        if isinstance(rng, (list, RowNoise)):
            return sample_rows(probs, rng)
        return torch.multinomial(probs, 1, generator=rng).squeeze(-1)

    def _forward(self, input_ids, mask, positions, cache) -> torch.Tensor:
        kwargs: dict[str, Any] = dict(input_ids=input_ids, attention_mask=mask, position_ids=positions)
        if cache is not None:
            kwargs[self._cache_kw] = cache
            kwargs["use_cache"] = True
        else:
            kwargs["use_cache"] = False
        if self._keep_last:
            kwargs["logits_to_keep"] = 1
        return self.model(**kwargs).logits[:, -1, :]  # (B, V)

    def _prefill(self, seq: torch.Tensor, mask: torch.Tensor, cache: Any) -> torch.Tensor:
        """(B, V) next-token logits after the (B, P) left-padded prompts, filling `cache`; each
        distinct prompt row (ids and mask) goes through the model once when `share_prefix`."""
        distinct = distinct_prompts(seq, mask) if self.share_prefix else None
        if distinct is None:
            return self._forward(seq, mask, position_ids_from_mask(mask), cache)
        u_ids, u_mask, inverse = distinct  # (U, P), (U, P), (B,)
        logits = self._forward(u_ids, u_mask, position_ids_from_mask(u_mask), cache)  # (U, V)
        cache.reorder_cache(inverse)  # (U, ...) -> (B, ...) in every layer
        return logits.index_select(0, inverse)

    def _generate_batch(self, prompts, params, device, rng) -> tuple[list[list[int]], list[bool]]:
        B, P = len(prompts), max(len(p) for p in prompts)
        seq = torch.full((B, P), self.pad_id, dtype=torch.long, device=device)  # (B, P), left-padded
        mask = torch.zeros((B, P), dtype=torch.long, device=device)
        for r, p in enumerate(prompts):
            seq[r, P - len(p) :] = torch.tensor(p, dtype=torch.long, device=device)
            mask[r, P - len(p) :] = 1
        eos = torch.tensor(self.eos_ids, dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        lengths = torch.zeros(B, dtype=torch.long, device=device)  # response tokens kept per row
        new_tokens = []
        cache = new_kv_cache(self.model) if self.use_cache else None
        step_ids = seq
        if isinstance(rng, list) and device.type == "cpu":  # one generator per row: many steps' draws at once
            rng = RowNoise(rng, params.max_new_tokens)
        for step in range(params.max_new_tokens):
            if cache is not None and step == 0:
                logits = self._prefill(seq, mask, cache)
                preallocate_kv_cache(cache, params.max_new_tokens)
            else:
                positions = position_ids_from_mask(mask)  # (B, T)
                if cache is not None:
                    positions = positions[:, -1:]  # only the token fed this step
                logits = self._forward(step_ids, mask, positions, cache)
            token = self._next_token(logits, params, rng)  # (B,)
            token = torch.where(done, torch.full_like(token, self.pad_id), token)
            new_tokens.append(token)
            lengths += (~done).long()
            if params.stop_at_eos and len(eos):
                done = done | torch.isin(token, eos)
            # finished rows keep feeding pad with mask 1: their outputs are dropped, and other
            # rows never attend across rows, so this changes nothing and keeps shapes simple
            mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=device)], dim=1)
            if cache is not None:
                step_ids = token[:, None]
            else:
                seq = torch.cat([seq, token[:, None]], dim=1)
                step_ids = seq
            if bool(done.all()):
                break
        gen = torch.stack(new_tokens, dim=1).tolist() if new_tokens else [[] for _ in range(B)]
        lens = lengths.tolist()
        out = [row[:n] for row, n in zip(gen, lens)]
        finished = [params.stop_at_eos and n > 0 and row[-1] in self.eos_ids for row, n in zip(out, lens)]
        return out, finished


def generate_text(
    model: Any, tokenizer: Any, prompts: list[str], params: SamplingParams, batch_size: int = 64
) -> list[str]:
    """Generate from text prompts. Prompts are tokenised as they are (only what the tokenizer adds
    by itself, e.g. a BOS); responses are decoded without special tokens (EOS, pad)."""
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    out = HFGenerator(model, tokenizer, batch_size=batch_size).generate(ids, params)
    return [tokenizer.decode(r, skip_special_tokens=True) for r in out]
