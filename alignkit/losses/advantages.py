"""Masked statistics and advantage estimators shared by PPO, GRPO and RLOO.

Pure functions of tensors; only torch is imported.

Shape legend: B: batch (sequences), T: response tokens, G: group size (responses per prompt).

A ``mask`` is bool or 0/1 with the shape of the tensor it masks; 1 marks a real response token.
Positions where the mask is 0 may hold anything (even inf or NaN): every function here
replaces them before use, so they never reach a result or a gradient.
"""

from __future__ import annotations

import torch

__all__ = [
    "explained_variance",
    "fill_masked",
    "gae",
    "group_advantages",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "rloo_advantages",
    "whiten",
]


def fill_masked(x: torch.Tensor, mask: torch.Tensor, value: float = 0.0) -> torch.Tensor:
    """``x`` with positions where ``mask`` is 0 replaced by ``value`` (gradient there is 0).

    Used before any nonlinearity so that garbage in padding (inf, NaN) cannot leak into a
    result or, through ``0 * inf``, into a gradient.
    """
    return torch.where(mask.bool(), x, torch.as_tensor(value, dtype=x.dtype, device=x.device))


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1.

    Args:
        x: any shape, e.g. (B, T).
        mask: same shape as ``x``.
        dim: reduce over this dimension only (e.g. ``-1`` gives one mean per sequence, (B,));
            ``None`` reduces over every entry to a scalar.

    An empty selection gives 0 rather than NaN (the count is clamped to at least 1).
    """
    m = mask.to(x.dtype)
    total = fill_masked(x, mask).sum() if dim is None else fill_masked(x, mask).sum(dim)
    count = m.sum() if dim is None else m.sum(dim)
    return total / count.clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over the positions where ``mask`` is 1, as a scalar.

    With ``unbiased`` the sum of squares is divided by ``n - 1`` (Bessel's correction) instead of
    ``n``; with a single valid entry the biased value (0) is returned.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((fill_masked(x, mask) - mean) ** 2, mask)
    if unbiased:
        n = mask.to(x.dtype).sum()
        var = torch.where(n > 1, var * n / (n - 1).clamp(min=1.0), var)
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Normalise ``x`` to mean 0 and (unbiased) variance 1 over the masked entries.

    ``(x - mean) / sqrt(var + eps)``; with ``shift_mean=False`` the mean is added back, so only
    the scale changes (the usual choice for rewards, where the sign carries meaning).
    Statistics use only entries where ``mask`` is 1; masked-out positions of the result are 0.

    Args:
        x: any shape, e.g. advantages (B, T).
        mask: same shape as ``x``.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    out = (fill_masked(x, mask) - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return fill_masked(out, mask)


def whiten(x: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """``masked_whiten`` over every entry of ``x`` (no padding)."""
    return masked_whiten(x, torch.ones_like(x, dtype=torch.bool), shift_mean=shift_mean, eps=eps)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016, "High-Dimensional Continuous
    Control Using Generalized Advantage Estimation", Eq. 16).

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = sum_{l >= 0} (gamma * lam)^l * delta_{t+l}
                = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t          (the value target, a TD(lambda) return)

    Each response is one episode that ends at its last valid token, so ``V`` after it is 0
    (no bootstrap) and rewards/values at padded positions are treated as 0. Works for right-
    or left-padded masks (each row's valid tokens contiguous); not for holes inside a row.
    Inputs are normally detached; nothing here detaches for you.

    Args:
        rewards: (B, T) per-token rewards (see ``kl.kl_penalized_rewards``).
        values: (B, T) value estimates V(s_t) from the rollout.
        mask: (B, T) 1 on response tokens.
        gamma: discount; 1.0 is the usual choice for language models.
        lam: GAE lambda; 0 gives one-step TD, 1 gives Monte-Carlo returns minus V.

    Returns:
        advantages (B, T) and returns (B, T), both 0 at padded positions.
    """
    m = mask.to(values.dtype)
    r = fill_masked(rewards, mask)  # (B, T)
    v = fill_masked(values, mask)  # (B, T)
    T = r.shape[-1]
    next_value = torch.zeros_like(v[..., 0])  # (B,)
    running = torch.zeros_like(v[..., 0])  # (B,)
    reversed_advantages = []
    for t in reversed(range(T)):
        delta = r[..., t] + gamma * next_value - v[..., t]
        running = delta + gamma * lam * running
        # On padding the recursion restarts, so a left-padded row starts clean at its last token.
        running = running * m[..., t]
        reversed_advantages.append(running)
        next_value = v[..., t]
    advantages = torch.stack(reversed_advantages[::-1], dim=-1)  # (B, T)
    returns = (advantages + v) * m
    return advantages, returns


def _as_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B*G,) or (B, G) -> (B, G); the G responses of one prompt are contiguous in (B*G,)."""
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 for a group baseline, got {group_size}")
    if rewards.dim() == 2:
        if rewards.shape[1] != group_size:
            raise ValueError(f"rewards has shape {tuple(rewards.shape)}, expected (B, {group_size})")
        return rewards
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards has shape {tuple(rewards.shape)}, expected (B*G,) with G={group_size} "
            "dividing its length, or (B, G)"
        )
    return rewards.view(-1, group_size)


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    normalize_std: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """GRPO outcome-supervision advantage (Shao et al. 2024, "DeepSeekMath", Sec. 4.1.2).

        A_i = (r_i - mean(r_group)) / (std(r_group) + eps)

    Every token of response i then gets A_i. ``std`` is the unbiased (n - 1) sample standard
    deviation. ``normalize_std=False`` drops the division, as Dr. GRPO (Liu et al. 2025,
    "Understanding R1-Zero-Like Training") recommends, since dividing by the group std
    up-weights prompts that are nearly always or never solved. A group whose rewards are all
    equal gets advantage 0 either way.

    Args:
        rewards: (B*G,) with the G responses of each prompt contiguous, or (B, G).
        group_size: G, at least 2.

    Returns:
        (B*G,) advantages, in the same order as the flattened rewards.
    """
    r = _as_groups(rewards, group_size)  # (B, G)
    adv = r - r.mean(dim=1, keepdim=True)
    if normalize_std:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    return adv.reshape(-1)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out advantage (Kool et al. 2019, "Buy 4 REINFORCE Samples, Get a
    Baseline for Free!"; Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style
    Optimization for Learning from Human Feedback in LLMs", the RLOO estimator).

        A_i = r_i - 1/(G-1) * sum_{j != i} r_j  =  G/(G-1) * (r_i - mean(r_group))

    The baseline for sample i does not depend on sample i, so the gradient estimate stays
    unbiased.

    Args:
        rewards: (B*G,) with the G responses of each prompt contiguous, or (B, G).
        group_size: G, at least 2.

    Returns:
        (B*G,) advantages.
    """
    r = _as_groups(rewards, group_size)  # (B, G)
    baseline = (r.sum(dim=1, keepdim=True) - r) / (group_size - 1)  # (B, G)
    return (r - baseline).reshape(-1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Fraction of the variance of the returns that the value head explains, over masked tokens.

        EV = 1 - Var[returns - values] / Var[returns]

    1 is a perfect critic, 0 is no better than predicting the mean, negative is worse than
    that. NaN when the returns have zero variance. Scalar, detached.

    Args:
        values: (B, T) value predictions.
        returns: (B, T) value targets.
        mask: (B, T).
    """
    values, returns = values.detach(), returns.detach()
    var_returns = masked_var(returns, mask)
    var_residual = masked_var(fill_masked(returns, mask) - fill_masked(values, mask), mask)
    nan = torch.full_like(var_returns, float("nan"))
    return torch.where(var_returns > 0, 1.0 - var_residual / var_returns, nan)
