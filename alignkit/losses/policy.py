"""Policy-gradient losses for PPO and GRPO, the clipped value loss, and token entropy.

Pure functions of tensors; only torch is imported. Each loss returns a scalar to minimise
and a NamedTuple of detached scalar statistics for logging.

Shape legend: B: batch (sequences), T: response tokens, V: vocabulary.

Positions where ``mask`` is 0 may hold anything: inputs are masked before any nonlinearity,
so padding never changes a loss, a statistic or a gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from alignkit.losses.advantages import fill_masked, masked_mean
from alignkit.losses.kl import kl_k3

__all__ = [
    "LOSS_AGGREGATIONS",
    "GRPOLossStats",
    "PolicyLossStats",
    "aggregate_loss",
    "entropy_from_logits",
    "grpo_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
]


def _token_mean(loss_tok: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return masked_mean(loss_tok, mask)


def _seq_mean_token_mean(loss_tok: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    per_seq = masked_mean(loss_tok, mask, dim=-1)  # (B,)
    has_tokens = mask.bool().any(dim=-1)  # (B,)
    return masked_mean(per_seq, has_tokens)


LOSS_AGGREGATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    # Every token weighs the same: 1/sum_i |o_i| * sum_i sum_t (DAPO, Yu et al. 2025,
    # "Token-Level Policy Gradient Loss"). Long responses are not down-weighted per token.
    "token-mean": _token_mean,
    # Every sequence weighs the same: 1/G * sum_i 1/|o_i| * sum_t (GRPO as written in
    # Shao et al. 2024, Eq. 3). A token of a short response weighs more than one of a long one.
    "seq-mean-token-mean": _seq_mean_token_mean,
}


def aggregate_loss(loss_tok: torch.Tensor, mask: torch.Tensor, loss_agg: str = "token-mean") -> torch.Tensor:
    """Reduce a per-token loss (B, T) to a scalar with the named rule in ``LOSS_AGGREGATIONS``.

    Sequences without any valid token are ignored by ``"seq-mean-token-mean"``.
    """
    try:
        agg = LOSS_AGGREGATIONS[loss_agg]
    except KeyError:
        raise ValueError(
            f"unknown loss_agg {loss_agg!r}; choose one of {sorted(LOSS_AGGREGATIONS)}"
        ) from None
    return agg(loss_tok, mask)


class PolicyLossStats(NamedTuple):
    """Detached scalars; means over valid tokens."""

    clipfrac: torch.Tensor
    """Fraction of tokens where the clipped term is the active one (their gradient is 0)."""
    approx_kl: torch.Tensor
    """k3 estimate of KL(pi_old || pi_theta): mean of (ratio - 1) - log(ratio)."""
    ratio_mean: torch.Tensor
    """Mean of pi_theta / pi_old; 1 on the first minibatch of an update."""


class GRPOLossStats(NamedTuple):
    """Detached scalars; means over valid tokens."""

    clipfrac: torch.Tensor
    approx_kl: torch.Tensor
    ratio_mean: torch.Tensor
    kl: torch.Tensor
    """k3 estimate of KL(pi_theta || pi_ref) per token (0 when no reference is given)."""


def _clipped_surrogate(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    clip_eps_high: float | None,
) -> tuple[torch.Tensor, PolicyLossStats]:
    """Per-token negated clipped surrogate (B, T) and its statistics."""
    if advantages.dim() == logp.dim() - 1:
        advantages = advantages.unsqueeze(-1)  # (B,) -> (B, 1), one advantage per sequence
    high = clip_eps if clip_eps_high is None else clip_eps_high
    log_ratio = fill_masked(logp, mask) - fill_masked(old_logp, mask)  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    adv = fill_masked(advantages.expand_as(ratio), mask)  # (B, T)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + high)
    loss_tok = torch.maximum(unclipped, clipped)  # (B, T)
    with torch.no_grad():
        stats = PolicyLossStats(
            clipfrac=masked_mean((clipped > unclipped).to(ratio.dtype), mask),
            approx_kl=masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            ratio_mean=masked_mean(ratio, mask),
        )
    return loss_tok, stats


def ppo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    loss_agg: str = "token-mean",
) -> tuple[torch.Tensor, PolicyLossStats]:
    """PPO clipped surrogate loss (Schulman et al. 2017, "Proximal Policy Optimization
    Algorithms", Eq. 7), negated for minimisation, one term per token:

        ratio_t = exp(logp_t - old_logp_t)
        loss_t  = max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - clip_eps, 1 + clip_eps_high))

    The max of the negated terms is the min of the objective: a token whose ratio has already
    moved past the clip range in the direction its advantage favours gets no gradient.

    Args:
        logp: (B, T) log-probs of the sampled tokens under the policy being trained.
        old_logp: (B, T) the same under the policy that generated the rollout (detached).
        advantages: (B, T), or (B,) for one advantage per sequence (broadcast over tokens).
        mask: (B, T) 1 on response tokens.
        clip_eps: lower clip range, and the upper one unless ``clip_eps_high`` is set.
        clip_eps_high: upper clip range ("clip-higher", DAPO, Yu et al. 2025); None = clip_eps.
        loss_agg: a name in ``LOSS_AGGREGATIONS``.

    Returns:
        scalar loss and ``PolicyLossStats``. ``clipfrac`` counts tokens where the clipped term
        is active (not merely tokens whose ratio lies outside the range); ``approx_kl`` is the
        k3 estimator of KL(pi_old || pi_theta) (Schulman 2020, "Approximating KL Divergence").
    """
    loss_tok, stats = _clipped_surrogate(logp, old_logp, advantages, mask, clip_eps, clip_eps_high)
    return aggregate_loss(loss_tok, mask, loss_agg), stats


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps_value: float | None = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value-function loss, the PPO implementation detail from OpenAI baselines
    (discussed in Engstrom et al. 2020, "Implementation Matters in Deep Policy Gradients", and
    Huang et al. 2022, "The 37 Implementation Details of Proximal Policy Optimization"):

        V_clip = old_V + clip(V - old_V, -clip_eps_value, clip_eps_value)
        loss   = 0.5 * mean_t max((V_t - R_t)^2, (V_clip_t - R_t)^2)

    The 0.5 makes the gradient of the unclipped term plain (V - R), so ``vf_coef`` keeps its
    conventional meaning. The max is pessimistic: a value that moved more than
    ``clip_eps_value`` away from ``old_V`` gets no gradient if moving back would not help.
    Note the clip is in the units of the returns; with unscaled rewards it may bite often.
    ``clip_eps_value=None`` disables clipping.

    Args:
        values: (B, T) current value predictions.
        old_values: (B, T) value predictions made during the rollout (detached).
        returns: (B, T) value targets, e.g. from ``advantages.gae``.
        mask: (B, T) 1 on response tokens.

    Returns:
        scalar loss (token mean) and ``vf_clipfrac``: the detached fraction of tokens where
        the clipped error was the larger.
    """
    v = fill_masked(values, mask)
    ret = fill_masked(returns, mask)
    err = (v - ret) ** 2  # (B, T)
    if clip_eps_value is None:
        return 0.5 * masked_mean(err, mask), torch.zeros((), dtype=v.dtype, device=v.device)
    old_v = fill_masked(old_values, mask)
    v_clipped = old_v + torch.clamp(v - old_v, -clip_eps_value, clip_eps_value)
    err_clipped = (v_clipped - ret) ** 2  # (B, T)
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        vf_clipfrac = masked_mean((err_clipped > err).to(v.dtype), mask)
    return loss, vf_clipfrac


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax distribution at each position, in nats.

        H = -sum_v p_v * log p_v,   log p = log_softmax(logits)

    Computed from ``log_softmax`` so large logits do not overflow; logits of -inf (masked
    vocabulary entries) contribute 0 and give finite gradients. Half-precision inputs are
    upcast to float32, which costs one float32 copy of the (B, T, V) logits.

    Args:
        logits: (B, T, V).

    Returns:
        (B, T) entropies, between 0 and log V.
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)  # (B, T, V)
    # p = 0 where logp = -inf; clamping keeps 0 * logp at 0 in the forward and the backward.
    return -(logp.exp() * logp.clamp(min=torch.finfo(logp.dtype).min)).sum(dim=-1)


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    beta: float = 0.04,
    loss_agg: str = "token-mean",
    clip_eps_high: float | None = None,
) -> tuple[torch.Tensor, GRPOLossStats]:
    """GRPO loss (Shao et al. 2024, "DeepSeekMath", Eq. 3), negated for minimisation:

        loss_t = max(-A * ratio_t, -A * clip(ratio_t, 1 - eps, 1 + eps_high)) + beta * k3_t
        k3_t   = exp(ref_logp_t - logp_t) - (ref_logp_t - logp_t) - 1      (Eq. 4)

    The KL to the reference sits in the loss, not in the reward as in PPO-RLHF. It is
    evaluated on tokens sampled from pi_old, which is exact when each rollout is used for a
    single update (then ``old_logp = logp.detach()`` and ratio = 1).

    Aggregation (``loss_agg``, see ``LOSS_AGGREGATIONS``):
      * ``"seq-mean-token-mean"``: Eq. 3 as written, mean over tokens of each response, then
        over responses. Each response weighs the same, so tokens of long responses weigh less
        and long wrong answers are penalised less per token.
      * ``"token-mean"`` (default): mean over all valid tokens of the batch (DAPO, Yu et al.
        2025, "Token-Level Policy Gradient Loss"), which removes that length bias.

    Args:
        logp: (B, T) log-probs of the sampled tokens under the policy being trained.
        old_logp: (B, T) the same under the rollout policy (detached).
        ref_logp: (B, T) the same under the reference model, or None when ``beta == 0``.
        advantages: (B,) one per response (e.g. ``advantages.group_advantages``), or (B, T).
        mask: (B, T) 1 on response tokens.
        clip_eps: clip range (the lower one if ``clip_eps_high`` is set).
        beta: KL coefficient; 0.04 in DeepSeekMath.
        loss_agg: a name in ``LOSS_AGGREGATIONS``.
        clip_eps_high: upper clip range (DAPO "clip-higher"); None = clip_eps.

    Returns:
        scalar loss and ``GRPOLossStats``.
    """
    loss_tok, pstats = _clipped_surrogate(logp, old_logp, advantages, mask, clip_eps, clip_eps_high)
    if ref_logp is not None:
        kl_tok = kl_k3(fill_masked(logp, mask), fill_masked(ref_logp, mask))  # (B, T)
        if beta != 0.0:
            loss_tok = loss_tok + beta * kl_tok
        kl_mean = masked_mean(kl_tok.detach(), mask)
    elif beta != 0.0:
        raise ValueError("grpo_loss needs ref_logp when beta != 0")
    else:
        kl_mean = torch.zeros((), dtype=logp.dtype, device=logp.device)
    stats = GRPOLossStats(pstats.clipfrac, pstats.approx_kl, pstats.ratio_mean, kl_mean)
    return aggregate_loss(loss_tok, mask, loss_agg), stats
