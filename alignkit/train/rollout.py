"""Rollout machinery shared by PPO, GRPO and RLOO: sample, score, and record what the update needs.

    source = build_reward_source(cfg.reward, tokenizer, world)        # reward model, gold, or module:function
    ro = collect_rollout(policy, tokenizer, prompt_ids, prompt_texts, source, cfg.rollout,
                         logprob_fn=..., ref_logprob_fn=..., group_size=G)
    ro.response_ids, ro.response_mask, ro.logprobs, ro.ref_logprobs, ro.values, ro.scores

Legend: B responses in the rollout (prompts x group size), P longest prompt, T longest response,
V vocabulary, L = P + T.

Layout: prompts are LEFT-padded to P and responses RIGHT-padded to T, so `input_ids = [prompt;
response]` (B, L) has every prompt ending at column P-1 and every response starting at column P.
Per-token tensors (logprobs, values, rewards, masks) are (B, T) and aligned with
`response_ids`: entry t belongs to the response token at column P+t, and is computed from the
model's output at column P-1+t (the position that predicts that token). A response token's
mask is 1 up to and including its EOS; a response cut at `max_new_tokens` has no EOS and its
`finished` flag is False.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import math
import random
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from alignkit.config import ConfigError, TrainConfig, to_dict
from alignkit.console import Progress, header, warn
from alignkit.data.tokenize import decode_response
from alignkit.eval.monitor import surprising_tokens
from alignkit.losses.policy import entropy_from_logits
from alignkit.models.chunked import DEFAULT_CHUNK, response_stats
from alignkit.models.generate import (
    Generator,
    HFGenerator,
    SamplingParams,
    cache_kwarg,
    distinct_prompts,
    new_kv_cache,
)
from alignkit.models.logprobs import position_ids_from_mask
from alignkit.train import checkpoint as ckpt
from alignkit.train.loop import reshape_schedule, truncate_metrics
from alignkit.train.ray_launch import RayConfig
from alignkit.train.strategy import SHARDS
from alignkit.train.trackers import MetricsLog

ENSEMBLE_MODES = ("mean", "min", "uwo")
REF_LOGPROB_BASELINES = ("none", "empty_prompt")


@dataclass(frozen=True)
class RewardConfig:
    """Where the sequence score of a response comes from."""

    source: Literal["model", "gold", "function"] = "model"
    """'model': a reward model directory; 'gold': the world's gold judge; 'function': module:function."""
    model: str | None = None
    """Reward model directory (alignkit reward's OUT/final) when source is 'model'."""
    ensemble: tuple[str, ...] = ()
    """More reward model directories scored alongside `model` (an ensemble: e.g. the same recipe, other seeds)."""
    ensemble_mode: Literal["mean", "min", "uwo"] = "mean"
    """How the members' normalised scores combine: mean, min (worst case), or uwo: mean - ensemble_coef * std."""
    ensemble_coef: float = 1.0
    """uwo only: weight of the members' disagreement (std) subtracted from their mean (Coste et al. 2023)."""
    function: str | None = None
    """'module:function' taking (prompts: list[str], responses: list[str]) -> list[float]."""
    normalize: bool = True
    """Reward model only: (r - mean) / std with the reward_stats.json stored with the model."""
    clip: float = 0.0
    """Clip scores to [-clip, clip] after normalisation (0: no clipping)."""
    missing_eos_penalty: float = 1.0
    """Subtracted from the score of a response that never reached EOS (0: no penalty)."""
    ref_logprob_coef: float = 0.0
    """Adds coef x the frozen reference's mean per-token log-prob of the response to the reward
    the update optimises (`ref_logprob_bonus`): a second reward feature beside the reward models'
    score (docs/reward.md, "The reference's likelihood as a reward feature"); 0: off."""
    ref_logprob_baseline: Literal["none", "empty_prompt"] = "none"
    """'empty_prompt': the feature becomes mean_t [log pi_ref(y_t | x) - log pi_ref(y_t | x0)], x0 the
    prompt with its last question emptied (`content_free_prompt`), so answers likely under any prompt
    (a memorised refusal) earn nothing; 'none': the plain mean log-prob."""
    ref_surprise_coef: float = 0.0
    """Subtracts coef x the number of response tokens the frozen reference gives probability below
    `ref_surprise_prob` from the reward the update optimises (`ref_surprise_penalty`): a word the
    SFT model would almost never write there (docs/reward.md); 0: off."""
    ref_surprise_prob: float = 0.01
    """The probability under which `ref_surprise_coef` counts a token as surprising."""

    def __post_init__(self):
        if self.ensemble_mode not in ENSEMBLE_MODES:
            raise ConfigError(f"config key 'reward.ensemble_mode': expected one of {list(ENSEMBLE_MODES)}, got {self.ensemble_mode!r}")
        if self.ensemble_coef < 0:
            raise ConfigError(f"config key 'reward.ensemble_coef' must be >= 0, got {self.ensemble_coef}")
        if self.ensemble and self.source != "model":
            raise ConfigError(f"config key 'reward.ensemble' needs reward.source=model, got source {self.source!r}")
        if self.ensemble and not self.normalize:
            raise ConfigError("config key 'reward.ensemble' needs reward.normalize=true (members' raw scores have their own scales)")
        paths = [self.model, *self.ensemble]
        if self.ensemble and len(set(paths)) < len(paths):
            raise ConfigError(f"config key 'reward.ensemble' names a reward model twice (with reward.model): {paths}")
        if self.ref_logprob_baseline not in REF_LOGPROB_BASELINES:
            raise ConfigError(f"config key 'reward.ref_logprob_baseline': expected one of {list(REF_LOGPROB_BASELINES)}, "
                              f"got {self.ref_logprob_baseline!r}")
        if self.ref_surprise_coef < 0:
            raise ConfigError(f"config key 'reward.ref_surprise_coef' must be >= 0, got {self.ref_surprise_coef}")
        if not 0 < self.ref_surprise_prob < 1:
            raise ConfigError(f"config key 'reward.ref_surprise_prob' must be in (0, 1), got {self.ref_surprise_prob}")
        if self.ref_logprob_baseline != "none" and not self.ref_logprob_coef:
            raise ConfigError(f"config key 'reward.ref_logprob_baseline={self.ref_logprob_baseline}' needs "
                              "reward.ref_logprob_coef > 0 (the feature it changes is off)")


@dataclass(frozen=True)
class RolloutConfig:
    """How responses are sampled and how the log-prob passes are chunked."""

    max_new_tokens: int = 32
    """Longest response sampled (EOS included)."""
    temperature: float = 1.0
    """Sampling temperature; log-probs are taken from logits / temperature, as sampled."""
    generation_batch_size: int = 64
    """Prompts decoded together (KV cache)."""
    forward_batch_size: int = 64
    """Rows per forward pass when recomputing log-probs and values without gradients."""
    engine: str = "hf"
    """Sampler: `hf` (our KV-cached loop, the reference) or `vllm` (needs vllm; docs/grpo.md)."""

    def __post_init__(self):
        if self.engine not in ("hf", "vllm"):
            raise ConfigError(f"config key 'rollout.engine': expected 'hf' or 'vllm', got {self.engine!r}")


@dataclass
class Rollout:
    """One batch of sampled responses with everything an RL update needs (see the module legend).

    Per-token tensors are 0 on padding. Rows of one prompt's group are contiguous.
    """

    prompt_ids: torch.Tensor
    """(B, P) long, left-padded."""
    prompt_mask: torch.Tensor
    """(B, P) long, 1 on prompt tokens."""
    response_ids: torch.Tensor
    """(B, T) long, right-padded; includes the EOS when one was sampled."""
    response_mask: torch.Tensor
    """(B, T) float, 1 on response tokens (EOS included)."""
    logprobs: torch.Tensor
    """(B, T) log-probs of the sampled tokens under the policy that sampled them (old_logp)."""
    ref_logprobs: torch.Tensor | None
    """(B, T) the same under the frozen reference, or None when no reference is used."""
    values: torch.Tensor | None
    """(B, T) value estimates V(s_t) at the position predicting token t, or None (critic-free)."""
    scores: torch.Tensor
    """(B,) the score RL optimises: source score, normalised, clipped, minus the EOS penalty."""
    raw_scores: torch.Tensor
    """(B,) the reward source's own numbers, before normalisation, clipping and penalty."""
    finished: torch.Tensor
    """(B,) bool, True when the response ended with EOS."""
    prompts: list[str]
    """(B,) prompt texts as the policy saw them."""
    responses: list[str]
    """(B,) decoded responses, special tokens removed."""
    group_size: int = 1
    """Responses per prompt (G); B is a multiple of it."""
    ref_baseline_logprobs: torch.Tensor | None = None
    """(B, T) the reference's log-probs of the same tokens behind the content-free prompt
    (`reward.ref_logprob_baseline`), or None."""

    @property
    def input_ids(self) -> torch.Tensor:
        """(B, L) prompt followed by response."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """(B, L) 1 on real tokens."""
        return torch.cat([self.prompt_mask, self.response_mask.long()], dim=1)

    @property
    def response_length(self) -> torch.Tensor:
        """(B,) response tokens per row."""
        return self.response_mask.sum(-1)

    def __len__(self) -> int:
        return self.response_ids.shape[0]


def content_free_prompt(prompt: str) -> str:
    """`prompt` with its last human turn emptied: the baseline of `reward.ref_logprob_baseline`.

    The text between the last "Human:" and the "Assistant:" after it loses everything but its
    leading and trailing whitespace ("Human: What is 2 plus 2?\\nAssistant:" becomes
    "Human: \\nAssistant:"); earlier turns stay. Raises ValueError for a prompt without these
    markers (a chat template's rendering: give such prompts in the HH form)."""
    h = prompt.rfind("Human:")
    a = prompt.find("Assistant:", h + 6) if h >= 0 else -1
    if a < 0:
        raise ValueError("reward.ref_logprob_baseline=empty_prompt needs prompts with 'Human: ...' followed by "
                         f"'Assistant:' (the HH form); got {prompt[:80]!r}")
    body = prompt[h + 6 : a]
    lead, trail = body[: len(body) - len(body.lstrip())], body[len(body.rstrip()) :]
    if not body.strip():
        lead, trail = body, ""
    return prompt[: h + 6] + lead + trail + prompt[a:]


def ref_logprob_bonus(ro: Rollout, coef: float) -> torch.Tensor:
    """(B,) coef x the reference's mean per-token log-prob of each response
    (`reward.ref_logprob_coef`; 0 for an empty response), minus the same mean behind the
    content-free prompt when the rollout has `ref_baseline_logprobs` (`reward.ref_logprob_baseline`).
    `ro.scores` stays the reward source's score (what the monitor and the metrics' `reward`
    read); the stages add this to it where they build the rewards they optimise."""
    if not coef:
        return torch.zeros_like(ro.scores)
    if ro.ref_logprobs is None:
        raise ValueError("reward.ref_logprob_coef needs the reference model's log-probs; this rollout has none")
    lp = ro.ref_logprobs if ro.ref_baseline_logprobs is None else ro.ref_logprobs - ro.ref_baseline_logprobs
    return coef * (lp * ro.response_mask).sum(-1) / ro.response_mask.sum(-1).clamp(min=1.0)


def ref_surprise_penalty(ro: Rollout, coef: float, prob: float) -> torch.Tensor:
    """(B,) -coef x the number of response tokens with pi_ref(y_t | x, y_<t) < prob
    (`reward.ref_surprise_coef`); zeros when coef is 0."""
    if not coef:
        return torch.zeros_like(ro.scores)
    if ro.ref_logprobs is None:
        raise ValueError("reward.ref_surprise_coef needs the reference model's log-probs; this rollout has none")
    return -coef * surprising_tokens(ro.ref_logprobs, ro.response_mask, prob).sum(-1).to(ro.scores.dtype)


def reference_features(ro: Rollout, reward: RewardConfig) -> torch.Tensor:
    """(B,) what the reference model adds to the reward sources' score in the reward the update
    optimises: `ref_logprob_bonus` plus `ref_surprise_penalty` (zeros when both are off)."""
    return (ref_logprob_bonus(ro, reward.ref_logprob_coef)
            + ref_surprise_penalty(ro, reward.ref_surprise_coef, reward.ref_surprise_prob))


def reference_feature_metrics(ro: Rollout, reward: RewardConfig) -> dict[str, float]:
    """The batch means of the reference's features that are on (`ref_logprob_bonus`,
    `ref_surprise_penalty`): their share of the score the update optimised, for the metrics row."""
    row = {}
    if reward.ref_logprob_coef:
        row["ref_logprob_bonus"] = float(ref_logprob_bonus(ro, reward.ref_logprob_coef).mean())
    if reward.ref_surprise_coef:
        row["ref_surprise_penalty"] = float(ref_surprise_penalty(ro, reward.ref_surprise_coef,
                                                                 reward.ref_surprise_prob).mean())
    return row


def baseline_prompt_ids(tokenizer: Any, prompt_texts: Sequence[str], baseline: str) -> list[list[int]] | None:
    """The ids of each prompt's content-free prompt (`content_free_prompt`, BOS first when the
    tokenizer adds one) for `reward.ref_logprob_baseline`, or None when it is 'none'."""
    if baseline == "none":
        return None
    from alignkit.data.tokenize import encode_prompt

    cache: dict[str, list[int]] = {}
    out = []
    for t in prompt_texts:
        b = content_free_prompt(t)
        if b not in cache:
            cache[b] = encode_prompt(tokenizer, b)[0]
        out.append(cache[b])
    return out


# ---------------------------------------------------------------------------------- padding
def pad_left(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P) ids and mask with every sequence flush right."""
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        if s:
            ids[r, width - len(s) :] = torch.tensor(list(s), dtype=torch.long)
            mask[r, width - len(s) :] = 1
    return ids, mask


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and mask with every sequence flush left (T is at least 1)."""
    width = max(1, max((len(s) for s in seqs), default=0))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        if s:
            ids[r, : len(s)] = torch.tensor(list(s), dtype=torch.long)
            mask[r, : len(s)] = 1
    return ids, mask


# ---------------------------------------------------------------------------------- log-probs
def _core(model: Any) -> Any:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def response_logits(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_response: int, temperature: float = 1.0
) -> torch.Tensor:
    """(B, T, V) logits / temperature at the T positions that predict the response tokens.

    Positions come from the mask, so padding on either side does not change the result. Only the
    last T + 1 positions go through the LM head (`logits_to_keep`): the prompt's logits are
    never built.
    """
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
        logits_to_keep=n_response + 1,
    )
    logits = out.logits[:, -(n_response + 1) : -1]  # (B, T, V): column P-1+t predicts token t
    return logits / temperature if temperature != 1.0 else logits


def grouped_response_logits(
    model: Any, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor,
    response_mask: torch.Tensor, temperature: float = 1.0,
) -> torch.Tensor:
    """(B, T, V) the same logits as `response_logits` on [prompt; response], with each distinct
    prompt run through the model once.

    GRPO and RLOO sample G responses per prompt, so a rollout holds every prompt G times. Here
    the U distinct prompt rows (ids and mask both equal) are prefilled once with a KV cache, the
    cache is gathered back to the B rows (`index_select`, whose backward sums the rows' gradients
    into their prompt, so the parameters get the same gradient as from B full sequences), and
    only the first T - 1 response tokens are fed on top of it. Tokens through the model: U*P +
    B*(T-1) instead of B*(P+T). The first response token is predicted by the prompt's last
    position, taken from the prefill. Rows in any order; with no repeated prompt it is exactly
    `response_logits`.

    prompt_ids, prompt_mask: (B, P) left-padded; response_ids, response_mask: (B, T) right-padded.
    """
    P = prompt_ids.shape[1]
    T = response_ids.shape[1]
    full_mask = torch.cat([prompt_mask.long(), response_mask.long()], dim=1)  # (B, L)
    distinct = distinct_prompts(prompt_ids, prompt_mask) if P else None
    if distinct is None:
        return response_logits(model, torch.cat([prompt_ids, response_ids], dim=1), full_mask, T, temperature)
    u_ids, u_mask, inverse = distinct  # (U, P), (U, P), (B,)
    cache_kw, cache = cache_kwarg(model), new_kv_cache(model)  # filled in place by the prefill
    pre = model(input_ids=u_ids, attention_mask=u_mask, position_ids=position_ids_from_mask(u_mask),
                use_cache=True, logits_to_keep=1, **{cache_kw: cache})
    first = pre.logits[:, -1:].index_select(0, inverse)  # (B, 1, V): column P-1 predicts token 0
    if T > 1:
        cache.reorder_cache(inverse)  # (U, ...) -> (B, ...) per layer, differentiable
        mask = full_mask[:, : P + T - 1]  # (B, P+T-1): the last response token predicts nothing
        out = model(input_ids=response_ids[:, :-1], attention_mask=mask,
                    position_ids=position_ids_from_mask(mask)[:, P:], use_cache=True, **{cache_kw: cache})
        logits = torch.cat([first, out.logits], dim=1)  # (B, T, V)
    else:
        logits = first
    return logits / temperature if temperature != 1.0 else logits


def gather_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] per position: (B, T, V), (B, T) -> (B, T) float32.

    Gathered logit minus logsumexp, so the (B, T, V) log-softmax is never materialised.
    """
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).float()  # (B, T)
    return picked - torch.logsumexp(logits.float(), dim=-1)


def response_token_stats(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_ids: torch.Tensor,
    temperature: float = 1.0, chunk: int = DEFAULT_CHUNK, *, share_prompt_prefix: bool = False,
    entropy: bool = False, entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, T) log-probs of `response_ids` (the last T columns of `input_ids`) and, with `entropy`,
    (B, T) entropies of the next-token distribution (with a gradient only with `entropy_grad`).

    With `chunk` > 0 and a model whose head splits off, the head runs `chunk` response tokens at
    a time and the (B, T, V) logits are never built (`alignkit.models.chunked.response_stats`;
    padding gets 0); otherwise from `response_logits`, or `grouped_response_logits` when
    `share_prompt_prefix`. Both paths agree within float32 rounding on every response token.
    """
    got = response_stats(model, input_ids, attention_mask, response_ids, temperature=temperature, chunk=chunk,
                         entropy=entropy, entropy_grad=entropy_grad, share_prompt_prefix=share_prompt_prefix)
    if got is not None:
        return got.logprobs, got.entropy
    T = response_ids.shape[1]
    if share_prompt_prefix:
        P = input_ids.shape[1] - T
        logits = grouped_response_logits(model, input_ids[:, :P], attention_mask[:, :P], response_ids,
                                         attention_mask[:, P:], temperature)
    else:
        logits = response_logits(model, input_ids, attention_mask, T, temperature)
    ent = entropy_from_logits(logits if entropy_grad else logits.detach()) if entropy else None
    return gather_logprobs(logits, response_ids), ent


def response_logprobs(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_ids: torch.Tensor,
    temperature: float = 1.0, chunk: int = 0,
) -> torch.Tensor:
    """(B, T) log-probs of `response_ids` (the last T columns of `input_ids`) under `model`
    (`chunk` > 0: through the chunked head, see `response_token_stats`)."""
    return response_token_stats(model, input_ids, attention_mask, response_ids, temperature, chunk)[0]


def in_chunks(fn: Callable[..., Any], rows: int, *tensors: torch.Tensor) -> Any:
    """Apply `fn` to row chunks of `tensors` and concatenate the results along dim 0.

    `fn` returns a tensor or a tuple of tensors (None entries stay None).
    """
    outs = [fn(*(t[i : i + rows] for t in tensors)) for i in range(0, tensors[0].shape[0], max(1, rows))]
    if isinstance(outs[0], tuple):
        return tuple(None if o[0] is None else torch.cat(o, dim=0) for o in zip(*outs))
    return torch.cat(outs, dim=0)


# ---------------------------------------------------------------------------------- reward sources
class RewardSource(Protocol):
    """Scores whole responses: one float per (prompt, response)."""

    def __call__(
        self, prompts: list[str], responses: list[str], input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, raw_scores), both (B,) float32. `input_ids`/`attention_mask` (B, L) are
        the policy's tokens of prompt + response, for sources that read ids directly."""
        ...


def combine_ensemble(scores: torch.Tensor, mode: str = "mean", coef: float = 1.0) -> torch.Tensor:
    """(K, B) scores of K reward models -> (B,).

    mean: the average; min: the most pessimistic member; uwo (uncertainty-weighted optimisation,
    Coste et al. 2023): mean - coef * std over the members (population std, 0 for one member), so
    answers the members disagree on earn less. Members must be on one scale (normalised scores).
    """
    if mode == "mean":
        return scores.mean(0)
    if mode == "min":
        return scores.min(0).values
    if mode == "uwo":
        return scores.mean(0) - coef * scores.std(0, unbiased=False)
    raise ValueError(f"unknown ensemble mode {mode!r} (valid: {', '.join(ENSEMBLE_MODES)})")


class RewardModelSource:
    """A learned reward model's score of the full sequence (the proxy, in RLHF).

    With `normalize`, scores become (r - mean) / std using the statistics stored with the reward
    model (reward_stats.json), so a fixed KL coefficient means the same across reward models;
    `clip` then bounds them. The reward model must share the policy's vocabulary (it reads the
    policy's token ids, EOS included, exactly as it was trained on them).

    With `ensemble` (more reward models), each member's score is normalised with its own
    statistics and `combine_ensemble(mode, coef)` makes one score; raw_scores are the members'
    mean raw score. One model and any mode give exactly the single model's scores.
    """

    def __init__(
        self, model: Any, normalize: bool = True, clip: float = 0.0, batch_size: int = 64,
        ensemble: Sequence[Any] = (), mode: str = "mean", coef: float = 1.0, names: Sequence[str] = (),
    ):
        """names: how errors call the models, in order (default "the reward model", "ensemble member i")."""
        self.models = [model, *ensemble]
        names = list(names) or ["the reward model", *(f"ensemble member {i}" for i in range(1, len(self.models)))]
        for name, m in zip(names, self.models):
            if normalize and getattr(m, "stats", None) is None:
                raise ValueError(f"{name} has no reward_stats.json to normalise with; set reward.normalize=false")
        self.model = model
        self.normalize = normalize
        self.clip = clip
        self.batch_size = batch_size
        self.mode = mode
        self.coef = coef

    @torch.no_grad()
    def __call__(self, prompts, responses, input_ids, attention_mask):
        raws, scores = [], []
        for m in self.models:
            m.eval()
            raw = in_chunks(lambda i, a, m=m: m(i, a).float(), self.batch_size, input_ids, attention_mask)  # (B,)
            raws.append(raw)
            scores.append(m.normalize(raw) if self.normalize else raw)
        self.last_member_scores = torch.stack(scores)  # (K, B), for the reward-hacking monitor
        score = combine_ensemble(self.last_member_scores, self.mode, self.coef)
        if self.clip > 0:
            score = score.clamp(-self.clip, self.clip)
        return score, torch.stack(raws).mean(0)


class FunctionSource:
    """Any Python function `fn(prompts, responses) -> list[float]` (the gold judge is one)."""

    def __init__(self, fn: Callable[[list[str], list[str]], Sequence[float]], name: str = "function", clip: float = 0.0):
        self.fn = fn
        self.name = name
        self.clip = clip

    def __call__(self, prompts, responses, input_ids, attention_mask):
        values = list(self.fn(list(prompts), list(responses)))
        if len(values) != len(responses):
            raise ValueError(f"reward function {self.name} returned {len(values)} scores for {len(responses)} responses")
        for i, v in enumerate(values):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise ValueError(f"reward function {self.name} returned {v!r} for response {i}; expected a finite number")
        raw = torch.tensor([float(v) for v in values], dtype=torch.float32)
        scores = raw.clamp(-self.clip, self.clip) if self.clip > 0 else raw.clone()
        return scores, raw


def gold_fn(world: Any) -> Callable[[list[str], list[str]], list[float]]:
    """The world's gold judge as a reward function (scores in [0, 1])."""
    return lambda prompts, responses: [world.judge(p, r).total for p, r in zip(prompts, responses)]


def import_function(spec: str) -> Callable:
    """'package.module:function' -> the function (ValueError naming the spec when it fails)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward.function {spec!r} must look like 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"reward.function {spec!r}: cannot import {module_name!r}: {e}") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ValueError(f"reward.function {spec!r}: {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise ValueError(f"reward.function {spec!r} is not callable")
    return fn


def _model_source(cfg: RewardConfig, world: Any, device: Any) -> RewardSource:
    from alignkit.models.heads import load_reward_model

    if not cfg.model:
        raise ValueError("reward.source=model needs reward.model (a reward model directory)")
    members = [load_reward_model(path).to(device).requires_grad_(False) for path in (cfg.model, *cfg.ensemble)]
    names = [f"reward.model ({cfg.model})", *(f"reward.ensemble[{i}] ({p})" for i, p in enumerate(cfg.ensemble))]
    return RewardModelSource(
        members[0], normalize=cfg.normalize, clip=cfg.clip, ensemble=members[1:],
        mode=cfg.ensemble_mode, coef=cfg.ensemble_coef, names=names,
    )


def _gold_source(cfg: RewardConfig, world: Any, device: Any) -> RewardSource:
    if world is None:
        raise ValueError("reward.source=gold needs world (a directory written by alignkit world)")
    return FunctionSource(gold_fn(world), name="gold", clip=cfg.clip)


def _function_source(cfg: RewardConfig, world: Any, device: Any) -> RewardSource:
    if not cfg.function:
        raise ValueError("reward.source=function needs reward.function ('module:function')")
    return FunctionSource(import_function(cfg.function), name=cfg.function, clip=cfg.clip)


REWARD_SOURCES: dict[str, Callable[[RewardConfig, Any, Any], RewardSource]] = {
    "model": _model_source,
    "gold": _gold_source,
    "function": _function_source,
}


def build_reward_source(cfg: RewardConfig, world: Any = None, device: Any = "cpu") -> RewardSource:
    """The reward source named by `cfg.source` (see REWARD_SOURCES)."""
    try:
        make = REWARD_SOURCES[cfg.source]
    except KeyError:
        raise ValueError(f"unknown reward.source {cfg.source!r} (valid: {', '.join(REWARD_SOURCES)})") from None
    return make(cfg, world, device)


# ---------------------------------------------------------------------------------- collection
LogprobFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]
"""(input_ids (B, L), attention_mask (B, L), response_ids (B, T)) -> (logprobs (B, T), values (B, T) or None)."""
RefLogprobFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""The same signature, returning the reference's (B, T) log-probs."""


_VLLM_ELSEWHERE: list[Any] = []  # the Ray vLLM actors' sampler while `vllm_elsewhere` is active


@contextlib.contextmanager
def vllm_elsewhere(sampler: Any) -> Iterator[None]:
    """For the block, rollout.engine=vllm samples through `sampler` (`sampler.bind(policy,
    tokenizer)` -> Generator; the Ray launcher's vLLM actors, alignkit/train/ray_vllm.py) instead
    of an engine colocated in this process."""
    _VLLM_ELSEWHERE.append(sampler)
    try:
        yield
    finally:
        _VLLM_ELSEWHERE.remove(sampler)


def make_generator(policy: Any, tokenizer: Any, engine: str = "hf", batch_size: int = 64) -> Generator:
    """The rollout sampler of `engine`; a vLLM engine is started once per policy and receives the
    policy's current weights in memory before each generate (in this process, or in the Ray vLLM
    actors inside `vllm_elsewhere`)."""
    if engine == "vllm" and _VLLM_ELSEWHERE:
        return _VLLM_ELSEWHERE[-1].bind(policy, tokenizer)
    if engine == "vllm":
        from alignkit.models.vllm_engine import vllm_generator

        return vllm_generator(policy, tokenizer)
    return HFGenerator(policy, tokenizer, batch_size=batch_size)


@torch.no_grad()
def collect_rollout(
    policy: Any,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    prompt_texts: Sequence[str],
    reward: RewardSource,
    cfg: RolloutConfig,
    *,
    logprob_fn: LogprobFn | None,
    ref_logprob_fn: RefLogprobFn | None = None,
    baseline_ids: Sequence[Sequence[int]] | None = None,
    group_size: int = 1,
    missing_eos_penalty: float = 0.0,
    seed: int | None = None,
    row_seeds: Sequence[int] | None = None,
    autocast: contextlib.AbstractContextManager | None = None,
) -> Rollout:
    """Sample `group_size` responses per prompt with the KV-cached generator, then score them.

    logprob_fn: the policy's (B, T) log-probs of the sampled tokens, plus values when there is a
        critic; recomputed with a plain forward (not taken from the sampler) so they match the
        update's forward exactly. None skips it (logprobs are then zeros: the caller fills them
        from its first update, as GRPO does with one update per rollout).
    ref_logprob_fn: the frozen reference's log-probs, or None.
    baseline_ids: one content-free prompt per prompt (`baseline_prompt_ids`): the reference's
        log-probs of the same response tokens behind it fill `ref_baseline_logprobs`; None: none.
    missing_eos_penalty: subtracted from `scores` where a response has no EOS.
    row_seeds: one sampling seed per response row (prompts x group_size, overrides `seed`), so a
        row's tokens do not depend on the rank or batch that samples it (distributed.row_seeds).
    autocast: the update's autocast context (`autocast_for`), so that the log-prob passes round
        as the update does (under bf16 the ratio is then 1 and the KL 0 before the first step).
    """
    device = next(policy.parameters()).device
    rows = [list(p) for p in prompt_ids for _ in range(group_size)]  # group members contiguous
    texts = [t for t in prompt_texts for _ in range(group_size)]
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=seed,
                            row_seeds=None if row_seeds is None else tuple(row_seeds))
    gen = make_generator(policy, tokenizer, cfg.engine, cfg.generation_batch_size).generate(rows, params)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = 0 if pad_id is None else pad_id
    p_ids, p_mask = pad_left(rows, pad_id)  # (B, P)
    r_ids, r_mask = pad_right(list(gen), pad_id)  # (B, T)
    p_ids, p_mask, r_ids, r_mask = (t.to(device) for t in (p_ids, p_mask, r_ids, r_mask))
    input_ids = torch.cat([p_ids, r_ids], dim=1)  # (B, L)
    attention_mask = torch.cat([p_mask, r_mask], dim=1)  # (B, L)
    finished = torch.tensor(gen.finished, dtype=torch.bool, device=device)
    responses = [decode_response(tokenizer, p, r) for p, r in zip(rows, gen)]
    mask = r_mask.float()

    was_training = policy.training
    policy.eval()  # no dropout in the log-prob pass: old_logp must be the sampling distribution
    try:
        with autocast if autocast is not None else contextlib.nullcontext():
            if logprob_fn is not None:
                logp, values = in_chunks(logprob_fn, cfg.forward_batch_size, input_ids, attention_mask, r_ids)
            else:
                logp, values = torch.zeros_like(mask), None
            ref = None
            if ref_logprob_fn is not None:
                ref = in_chunks(ref_logprob_fn, cfg.forward_batch_size, input_ids, attention_mask, r_ids) * mask
            base = None
            if baseline_ids is not None:
                if ref_logprob_fn is None:
                    raise ValueError("reward.ref_logprob_baseline needs the reference model's log-probs (ref_logprob_fn)")
                b_ids, b_mask = pad_left([list(b) for b in baseline_ids for _ in range(group_size)], pad_id)
                b_ids, b_mask = b_ids.to(device), b_mask.to(device)
                base = in_chunks(ref_logprob_fn, cfg.forward_batch_size, torch.cat([b_ids, r_ids], dim=1),
                                 torch.cat([b_mask, r_mask], dim=1), r_ids) * mask
        values = None if values is None else values.float()
    finally:
        policy.train(was_training)
    scores, raw = reward(texts, responses, input_ids, attention_mask)
    scores = scores.to(device).float() - missing_eos_penalty * (~finished).float()
    return Rollout(
        prompt_ids=p_ids,
        prompt_mask=p_mask,
        response_ids=r_ids,
        response_mask=mask,
        logprobs=logp * mask,
        ref_logprobs=ref,
        ref_baseline_logprobs=base,
        values=None if values is None else values * mask,
        scores=scores,
        raw_scores=raw.to(device).float(),
        finished=finished,
        prompts=texts,
        responses=responses,
        group_size=group_size,
    )


def build_monitor_judge(judge: str | None, world: Any, device: Any) -> RewardSource | None:
    """The second judge of the reward-hacking monitor's `judge_agreement` (`monitor.judge`):
    'gold' (the world's judge), a reward model directory, or None."""
    if judge is None:
        return None
    if judge == "gold":
        if world is None:
            raise ConfigError("config key 'monitor.judge' is 'gold' but no world is set (world=DIR)")
        return FunctionSource(gold_fn(world), name="gold")
    from alignkit.models.heads import load_reward_model

    if not Path(judge).is_dir():
        raise ConfigError(f"config key 'monitor.judge': {judge!r} is neither 'gold' nor a reward model directory")
    model = load_reward_model(judge).to(device).requires_grad_(False)
    return RewardModelSource(model, normalize=model.stats is not None, names=[f"monitor.judge ({judge})"])


def fresh_pair_agreement(
    policy: Any, tokenizer: Any, prompt_ids: Sequence[Sequence[int]], prompt_texts: Sequence[str],
    reward: RewardSource, judge: RewardSource | None, cfg: RolloutConfig, row_seeds: Sequence[int],
    missing_eos_penalty: float = 0.0,
) -> tuple[float, int] | None:
    """(agreement, pairs) of the reward with a second judge on two fresh samples per prompt:
    `pair_agreement` of the reward the policy optimises (missing-EOS penalty included) against
    `judge`; without a judge, `member_agreement` of the reward ensemble's members. None when
    neither exists (one reward model, no judge). row_seeds: 2 per prompt."""
    from alignkit.eval.monitor import member_agreement, pair_agreement

    ro = collect_rollout(policy, tokenizer, prompt_ids, prompt_texts, reward, cfg, logprob_fn=None,
                         group_size=2, missing_eos_penalty=missing_eos_penalty, row_seeds=row_seeds)
    if judge is not None:
        j, _ = judge(ro.prompts, ro.responses, ro.input_ids, ro.attention_mask)
        return pair_agreement(ro.scores[0::2].tolist(), ro.scores[1::2].tolist(), j[0::2].tolist(), j[1::2].tolist())
    members = getattr(reward, "last_member_scores", None)  # (K, 2n): the call above just set it
    if members is None or members.shape[0] < 2:
        return None
    return member_agreement(members[:, 0::2], members[:, 1::2])


def judge_scores(judge: RewardSource, ro: Rollout, missing_eos_penalty: float = 0.0) -> dict[str, float]:
    """The monitor's held-out judge on a rollout: `monitor/judge_score`, the mean of its scores of
    the policy's responses (missing-EOS penalty subtracted as from the reward), and
    `monitor/proxy_gap`, the mean reward the policy optimises minus that."""
    j, _ = judge(ro.prompts, ro.responses, ro.input_ids, ro.attention_mask)
    j = j.float() - missing_eos_penalty * (~ro.finished).float().to(j.device)
    return {"monitor/judge_score": float(j.mean()), "monitor/proxy_gap": float(ro.scores.float().mean() - j.mean())}


# ---------------------------------------------------------------------------------- prompts
def prompt_batches(n: int, batch: int, seed: int) -> Iterator[list[int]]:
    """Endless batches of `batch` prompt indices: a fresh seeded shuffle of range(n) per epoch,
    batches never straddling two epochs' duplicates (a batch may wrap into the next epoch)."""
    if n <= 0:
        raise ValueError("no prompts to sample from")
    epoch, queue = 0, []
    while True:
        while len(queue) < batch:
            order = list(range(n))
            random.Random(f"alignkit-rollout:{seed}:{epoch}").shuffle(order)
            queue += order
            epoch += 1
        yield queue[:batch]
        queue = queue[batch:]


def load_prompts(path: str, tokenizer: Any, max_prompt_len: int, limit: int = 0, on_error: str = "raise"):
    """Prompt records from `path`, their ids (left-truncated to max_prompt_len) and rendered texts."""
    from alignkit.data.load import load_records
    from alignkit.data.tokenize import TruncationLimits, render_prompt, tokenize_prompts

    records = load_records(path, kind="prompt", on_error=on_error, limit=limit).records
    if not records:
        raise ValueError(f"{path}: no prompts")
    limits = TruncationLimits(max_prompt_len=max_prompt_len, max_len=None)
    items, trunc = tokenize_prompts(tokenizer, records, limits)
    warn(trunc.warnings(limits, path))
    texts = [render_prompt(tokenizer, r.prompt) for r in records]
    return [it.prompt_ids for it in items], texts


# ---------------------------------------------------------------------------------- evaluation
def greedy_responses(
    model: Any, tokenizer: Any, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, engine: str = "hf"
) -> list[str]:
    """Greedy decoded responses (special tokens removed)."""
    gen = make_generator(model, tokenizer, engine).generate([list(p) for p in prompt_ids],
                                                          SamplingParams(max_new_tokens=max_new_tokens, greedy=True))
    return [tokenizer.decode(r, skip_special_tokens=True) for r in gen]


def gold_comparison(
    world: Any, prompts: Sequence[str], policy_responses: Sequence[str], ref_responses: Sequence[str]
) -> dict:
    """Gold score of both sides and the policy's win rate against the reference.

    Per prompt the gold judge scores both responses: a higher score is a win (1), equal a tie
    (0.5), lower a loss (0). `win_rate_ci` is a 95% Wilson interval.
    """
    from alignkit.eval.winrate import pairwise_outcomes, win_rate

    a = [world.judge(p, r).total for p, r in zip(prompts, policy_responses)]
    b = [world.judge(p, r).total for p, r in zip(prompts, ref_responses)]
    outcomes = pairwise_outcomes(a, b)
    rate, lo, hi = win_rate(outcomes)
    return {
        "gold": sum(a) / len(a),
        "gold_ref": sum(b) / len(b),
        "win_rate": rate,
        "win_rate_ci": [lo, hi],
        "wins": outcomes.count(1.0),
        "ties": outcomes.count(0.5),
        "losses": outcomes.count(0.0),
        "n": len(a),
    }


# ---------------------------------------------------------------------------------- reference
class Reference:
    """The frozen reference policy pi_ref: its own frozen copy, or, for a LoRA policy, the same
    model with the adapter disabled (no second copy of the weights in memory)."""

    def __init__(self, policy: Any, model: Any = None):
        if model is None and not hasattr(policy, "disable_adapter"):
            raise ValueError("a reference without its own model needs a LoRA (peft) policy")
        self.policy = policy
        self.model = model
        if model is not None:
            model.requires_grad_(False)
            model.eval()

    @contextlib.contextmanager
    def active(self) -> Iterator[Any]:
        """The reference as a callable model, for the duration of the block."""
        if self.model is not None:
            yield self.model
        else:
            with self.policy.disable_adapter():
                yield self.policy

    @torch.no_grad()
    def logprobs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_ids: torch.Tensor, temperature: float = 1.0,
        chunk: int = 0, share_prompt_prefix: bool = False,
    ) -> torch.Tensor:
        """(B, T) reference log-probs of the response tokens (`response_token_stats`)."""
        with self.active() as model:
            return response_token_stats(model, input_ids, attention_mask, response_ids, temperature, chunk,
                                        share_prompt_prefix=share_prompt_prefix)[0]

    def greedy_responses(self, tokenizer: Any, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int) -> list[str]:
        """The reference's greedy answers (`greedy_responses`)."""
        with self.active() as model:
            return greedy_responses(model, tokenizer, prompt_ids, max_new_tokens)


def build_reference(policy: Any, model_path: str, lora: bool, device: Any) -> Reference:
    """Adapter-disabled policy when `lora`, else a frozen copy loaded from `model_path`."""
    if lora:
        return Reference(policy)
    from alignkit.models.load import load_model

    return Reference(policy, load_model(model_path).to(device))


def autocast_for(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for 'bf16', or for 'auto' on a GPU that supports it; otherwise a no-op."""
    use_bf16 = precision == "bf16" or (
        precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def open_reports(name: str, cfg: Any, out: Path, n_prompts: int, per_iteration: str, done: int, dist: Any,
                 device: torch.device) -> tuple[MetricsLog, Progress]:
    """An RL stage's console header, progress display (one unit per iteration) and metrics log
    (OUT/metrics.jsonl, TensorBoard, train.report_to): the supervised loop's design."""
    world = dist.world
    header(name, [f"{n_prompts} prompts", f"{cfg.iterations} iterations", per_iteration, f"lr {cfg.train.lr:g}",
                  f"{world} process{'es' if world > 1 else ''} on {device.type}",
                  *([f"resuming at iteration {done}"] if done else [])], out=out)
    log = MetricsLog(out, cfg.train, name=name, resume_step=done, main=dist.main, config=to_dict(cfg))
    return log, Progress(cfg.iterations, initial=done, enabled=cfg.train.progress and dist.main, unit="iteration")


# ---------------------------------------------------------------------------------- checkpoints
RESUME_MAY_CHANGE = frozenset({
    "iterations", "out", "eval_every", "eval_limit", "eval_max_new_tokens", "train.resume", "train.overwrite",
    "train.save_every", "train.keep_checkpoints", "train.progress", "train.tensorboard", "train.report_to",
    "train.log_every",
    # where the ranks run is not what they compute
    "launcher", *(f"ray.{f.name}" for f in dataclasses.fields(RayConfig)),
})
"""Config keys a resumed RL run may change; any other change would make it a different run."""


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_resume(checkpoint: Path, config: dict, iterations: int) -> None:
    """Refuse to resume from `checkpoint` with another run's settings: every key of `config`
    (`to_dict` of the stage's config) outside RESUME_MAY_CHANGE must equal the saved one, and
    `iterations` must not be below the iterations already done."""
    saved = json.loads((checkpoint / "trainer_state.json").read_text())
    then, now = _flat(saved["config"]), _flat(json.loads(json.dumps(config)))
    changed = sorted(k for k in then.keys() | now.keys() if k not in RESUME_MAY_CHANGE and then.get(k) != now.get(k))
    if changed:
        shown = ", ".join(f"{k} ({then.get(k)!r} -> {now.get(k)!r})" for k in changed[:5])
        raise ConfigError(
            f"train.resume=true: config keys differ from the run in {checkpoint}: {shown}"
            f"{' ...' if len(changed) > 5 else ''}; resume with the run's settings or start afresh with train.overwrite=true"
        )
    if saved["step"] > iterations:
        raise ConfigError(
            f"config key 'iterations' is {iterations}, but {checkpoint} is already at iteration {saved['step']}"
        )


def save_iteration(
    out: Path, iteration: int, model: torch.nn.Module, trainable: set[int], optimizers: list[Any],
    schedulers: list[Any], shuffle: torch.Generator, state: dict, keep: int, *, dist: Any = None,
    engine: Any = None,
) -> Path:
    """Write OUT/checkpoints/step-`iteration` atomically and keep the `keep` newest (0: all).
    Call it on every rank: rank 0 writes; under a sharded `engine` (`rl_shard.Sharded`) every
    rank first writes its shard of the model and optimizers, which become step-N/shards.

    It holds `model`'s parameters whose ids are in `trainable` plus its buffers, the optimizers
    and schedulers, the python / numpy / torch RNG states with the update's minibatch `shuffle`
    generator, and `state` (JSON: what else the next iteration reads) with "step": iteration.
    """
    root = out / ckpt.CHECKPOINTS
    path = root / f"step-{iteration}"
    main = dist is None or dist.main
    sharded = engine is not None and engine.sharded
    tmp = ckpt.shard_tmp(path)
    if sharded:
        if main:
            ckpt.remove_tmp(tmp)
        engine.barrier()
        engine.save_shards(tmp, optimizers)
        engine.barrier()
    if main:
        rng = {**ckpt.rng_state(), "shuffle": shuffle.get_state()}
        ckpt.write_checkpoint(
            path, model=None if sharded else model, optimizer=None if sharded else ckpt.StateDicts(optimizers),
            scheduler=ckpt.StateDicts(schedulers), rng_states=[rng], trainer_state={**state, "step": iteration},
            trainable=trainable, shards=tmp if sharded else None,
        )
        ckpt.prune(root, keep)
    if sharded:
        engine.barrier()  # no rank runs ahead of a checkpoint it may have to resume from
    return path


def restore_weights(path: Path, model: torch.nn.Module, optimizers: list[Any], engine: Any = None) -> None:
    """Load checkpoint `path`'s weights into `model` (a sharded `engine` loads its shards,
    optimizer states included; collective)."""
    if engine is not None and engine.sharded:
        engine.load_shards(path, optimizers)
    else:
        ckpt.read_checkpoint(path, model)


def save_due(iteration: int, iterations: int, train: TrainConfig) -> bool:
    """An RL stage checkpoints every `train.save_every` iterations (0: never) and after the last."""
    return iteration == iterations or (train.save_every > 0 and iteration % train.save_every == 0)


def load_iteration(
    path: Path, model: torch.nn.Module, optimizers: list[Any], schedulers: list[Any], shuffle: torch.Generator,
    train: TrainConfig, total_steps: int, metrics_path: Path, batches: Iterator[Any], main: bool = True,
    engine: Any = None,
) -> dict:
    """Restore what `save_iteration` wrote into the freshly built objects and return its `state`.

    The schedulers follow `train`'s schedule over `total_steps` from the saved step (the loop's
    rule), metrics rows after the saved iteration (a killed run's) are dropped, the prompt
    `batches` iterator skips the batches already used, and the global RNGs are restored: call it
    just before the first iteration. Only `main` (rank 0) truncates the metrics. A sharded
    `engine` loads the model and optimizer shards (collective).
    """
    sharded = engine is not None and engine.sharded
    if sharded and not (path / SHARDS).is_dir():
        raise ConfigError(f"{path} was written by a replicated run (no {SHARDS}/): resume it with train.strategy=ddp")
    if not sharded and (path / SHARDS).is_dir():
        raise ConfigError(f"{path} holds sharded weights ({SHARDS}/): resume it with train.strategy=fsdp2")
    saved = ckpt.read_checkpoint(path, None if sharded else model)
    if sharded:
        engine.load_shards(path, optimizers)
    for name, items in (("optimizer", optimizers), ("scheduler", schedulers))[1 if sharded else 0:]:
        try:
            ckpt.StateDicts(items).load_state_dict(saved[name])
        except ValueError as err:
            raise ValueError(f"{path / (name + '.pt')}: {err}") from None
    for s in schedulers:
        reshape_schedule(s, train, total_steps)
    state = saved["trainer_state"]
    if main:
        truncate_metrics(metrics_path, state["step"])
    rng = saved["rng"][0]
    ckpt.set_rng_state(rng)
    shuffle.set_state(rng["shuffle"])
    for _ in range(state["prompt_batches"]):  # the prompt order continues where the run stopped
        next(batches)
    print(f"alignkit: resumed from {path} (iteration {state['step']})", file=sys.stderr)
    return state


def final_gold_eval(
    policy: Any, reference: Reference, tokenizer: Any, world: Any, world_dir: str, limit: int, max_new_tokens: int,
    cache: dict | None = None,
) -> dict:
    """Greedy responses of the policy and the reference on the world's held-out prompts (`limit`
    of them spread over every category; 0: all), judged. cache: a dict kept by the caller across
    calls of one run; the frozen reference's greedy responses are computed once and kept there."""
    from alignkit.eval.gold import spread

    ids, texts = load_prompts(f"{world_dir}/eval_prompts.jsonl", tokenizer, max_prompt_len=512)
    keep = spread(list(range(len(ids))), limit)
    ids, texts = [ids[i] for i in keep], [texts[i] for i in keep]
    mine = greedy_responses(policy, tokenizer, ids, max_new_tokens)
    key = ("reference", limit, max_new_tokens)
    if cache is not None and key in cache:
        theirs = cache[key]
    else:
        theirs = reference.greedy_responses(tokenizer, ids, max_new_tokens)  # a local Reference, or Ray's actor
        if cache is not None:
            cache[key] = theirs
    out = gold_comparison(world, texts, mine, theirs)
    out["examples"] = [{"prompt": p, "policy": a, "reference": b} for p, a, b in list(zip(texts, mine, theirs))[:: max(1, len(texts) // 12)]]
    return out
