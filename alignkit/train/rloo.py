"""RLOO (`alignkit rloo`): the GRPO stage with the leave-one-out baseline and the KL in the reward.

REINFORCE with a leave-one-out baseline over G samples per prompt (Kool et al. 2019; Ahmadian
et al. 2024, "Back to Basics"): each response's reward is score - beta * sum_t kl_t, and its
advantage is that reward minus the mean of the other G - 1 rewards of its prompt. With one
update per rollout the clipped ratio is 1, so the update is plain REINFORCE. Same code and
settings as alignkit.train.grpo; only the defaults below differ.

    alignkit rloo --config configs/grpo.yaml model.path=runs/sft/final world=runs/world out=runs/rloo
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from alignkit.train import grpo


@dataclass(frozen=True)
class Config(grpo.Config):
    """RLOO settings: grpo.Config with the leave-one-out baseline and the KL in the reward."""

    out: str = "runs/rloo"
    """Output directory: metrics.jsonl, eval.json, checkpoints/ (resume), final/ (the policy)."""
    advantage: Literal["grpo", "dr_grpo", "rloo"] = "rloo"
    """Advantage estimator, a key of grpo.ADVANTAGES."""
    kl_in: Literal["loss", "reward"] = "reward"
    """'reward': score - beta * sum_t kl_t before the baseline (Ahmadian et al. 2024)."""
    kl_coef: float = 0.05
    """KL coefficient beta."""


run = grpo.run
