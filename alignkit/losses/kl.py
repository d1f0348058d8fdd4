"""Per-token KL estimators, the KL-penalised reward, and KL coefficient controllers.

Pure functions of tensors plus two tiny stateful controllers; only torch is imported.

Shape legend: B: batch (sequences), T: response tokens.

The estimators follow Schulman (2020), "Approximating KL Divergence",
http://joschu.net/blog/kl-approx.html. Tokens are sampled from the policy pi, and we estimate
KL(pi || pi_ref) = E_{x~pi}[log pi(x) - log pi_ref(x)] from the two log-probs of the sampled
token. With log r = ref_logp - logp:

    k1 = -log r                 unbiased, high variance, can be negative per token
    k2 = 0.5 * (log r)^2        biased (low bias when pi is close to pi_ref), always >= 0
    k3 = (r - 1) - log r        unbiased and always >= 0 (the DeepSeekMath GRPO choice)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from alignkit.losses.advantages import fill_masked

__all__ = [
    "KL_ESTIMATORS",
    "AdaptiveKLController",
    "FixedKLController",
    "get_kl_estimator",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_penalized_rewards",
]

KLEstimator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = logp - ref_logp. Shapes: (B, T), (B, T) -> (B, T)."""
    return logp - ref_logp


def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k2 = 0.5 * (logp - ref_logp)^2. Shapes: (B, T), (B, T) -> (B, T)."""
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = exp(ref_logp - logp) - (ref_logp - logp) - 1, >= 0. Shapes: (B, T), (B, T) -> (B, T).

    The same per-token term as Shao et al. 2024 ("DeepSeekMath"), Eq. 4.
    """
    log_r = ref_logp - logp
    return torch.expm1(log_r) - log_r


KL_ESTIMATORS: dict[str, KLEstimator] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def get_kl_estimator(name: str) -> KLEstimator:
    """Resolve an estimator by name (``"k1"``, ``"k2"``, ``"k3"``); call once at config time."""
    try:
        return KL_ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"unknown KL estimator {name!r}; choose one of {sorted(KL_ESTIMATORS)}") from None


def kl_penalized_rewards(
    score: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    estimator: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token RLHF reward: a KL penalty on every token plus the sequence score at the end.

        rewards_t = -beta * kl_t + [t == last valid token] * score

    Summed over a response this is R(x, y) = r(x, y) - beta * log(pi(y|x) / pi_ref(y|x))
    (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", Sec. 2.2;
    Ouyang et al. 2022, "Training language models to follow instructions", Eq. 2) when
    ``estimator="k1"``; spreading the penalty over tokens gives the critic a dense signal.

    Args:
        score: (B,) sequence-level reward (reward model or judge).
        logp: (B, T) log-probs of the sampled tokens under the rollout policy.
        ref_logp: (B, T) log-probs of the same tokens under the reference model.
        mask: (B, T) 1 on response tokens; any padding side.
        beta: KL coefficient (e.g. ``controller.beta``).
        estimator: name in ``KL_ESTIMATORS``.

    Returns:
        rewards (B, T) and per-token kl (B, T), both 0 at padded positions. A row with no
        valid token receives no score.
    """
    kl = fill_masked(get_kl_estimator(estimator)(fill_masked(logp, mask), fill_masked(ref_logp, mask)), mask)
    m = mask.bool()
    T = m.shape[-1]
    # Index of the last 1 in each row: flip, find the first 1, map back.
    last = (T - 1) - m.flip(-1).to(torch.int64).argmax(dim=-1)  # (B,)
    has_tokens = m.any(dim=-1)  # (B,)
    end_score = torch.where(has_tokens, score.to(kl.dtype), torch.zeros_like(kl[:, 0]))  # (B,)
    rewards = -beta * kl
    rewards = rewards.scatter_add(-1, last.unsqueeze(-1), end_score.unsqueeze(-1))
    return rewards, kl


class AdaptiveKLController:
    """Proportional controller that steers the KL coefficient towards a target KL.

    Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", Sec. 2.2:

        e_t        = clip((KL_t - KL_target) / KL_target, -0.2, 0.2)
        beta_{t+1} = beta_t * (1 + K_beta * e_t)

    with K_beta = n_steps / horizon, as in the authors' release
    (github.com/openai/lm-human-preferences, ``lm_human_preferences/train_policy.py``), where
    ``n_steps`` is the number of rollouts in the batch that produced ``current_kl``. ``target``
    is a KL per response (sum over its tokens, averaged over responses), in nats.
    """

    def __init__(self, init_beta: float, target: float, horizon: float) -> None:
        if init_beta < 0:
            raise ValueError(f"init_beta must be >= 0, got {init_beta}")
        if target <= 0:
            raise ValueError(f"target must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.beta = float(init_beta)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Move ``beta`` after a batch of ``n_steps`` rollouts whose mean KL was ``current_kl``.

        Returns the new ``beta``.
        """
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + error * n_steps / self.horizon
        return self.beta

    def state_dict(self) -> dict[str, float]:
        return {"beta": self.beta, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.beta = float(state["beta"])
        self.target = float(state["target"])
        self.horizon = float(state["horizon"])


class FixedKLController:
    """A constant KL coefficient with the same interface as ``AdaptiveKLController``."""

    def __init__(self, beta: float) -> None:
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.beta = float(beta)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.beta

    def state_dict(self) -> dict[str, float]:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.beta = float(state["beta"])
