"""Reward-model losses: the Bradley-Terry pairwise loss and a calibration metric.

Shape legend: B = batch of preference pairs, N = number of evaluated pairs.

A reward model scores each response with one scalar r(x, y). The Bradley-Terry model
(Bradley & Terry 1952) reads a pair of scores as a probability:

    P(chosen better than rejected) = sigmoid(r_chosen - r_rejected)

and the reward model is fitted by maximum likelihood on that probability (Ouyang et al. 2022,
Eq. 1; Touvron et al. 2023, Eq. 1). Everything here is a pure function of tensors.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class RewardLossOutput(NamedTuple):
    """What `bradley_terry_loss` returns.

    losses:   (B,) per-pair loss, with gradient; the caller reduces (mean, or masked mean).
    accuracy: (B,) detached, 1.0 where the model ranks the labelled winner higher, else 0.0
              (0.5 for a soft label of exactly 0.5, which names no winner).
    margin:   (B,) detached reward difference r_chosen - r_rejected (the given margin is
              not subtracted).
    """

    losses: torch.Tensor
    accuracy: torch.Tensor
    margin: torch.Tensor


def _check_same_shape(**tensors: torch.Tensor | None) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items() if t is not None}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shape mismatch, all must be equal (B,): {shapes}")


def bradley_terry_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    soft_label: torch.Tensor | None = None,
    center_coef: float = 0.0,
) -> RewardLossOutput:
    """Pairwise Bradley-Terry loss for a scalar reward model.

    With d = r_chosen - r_rejected and m the margin (0 when None):

        hard label:   loss = -log sigmoid(d - m)                      (Touvron et al. 2023, Eq. 2)
        soft label p: loss = -[p log sigmoid(d - m) + (1 - p) log sigmoid(-d - m)]
        centring:     loss += center_coef * (r_chosen + r_rejected)^2 (Eisenstein et al. 2023)

    With m = 0 this is the InstructGPT reward loss (Ouyang et al. 2022, Eq. 1). The margin is
    Llama 2's "how much better" term: the winner must beat the loser by at least m before the
    loss flattens out. A soft label p = P(chosen is better), e.g. the fraction of annotators
    who agreed, turns the loss into the cross-entropy against p; under the soft label the
    margin applies to whichever side wins, so swapping chosen/rejected together with
    p -> 1 - p leaves the loss unchanged, and p = 1 equals the hard label. The centring term
    (Eisenstein et al. 2023, "Helping or Herding? Reward Model Ensembles Mitigate but do not
    Eliminate Reward Hacking", arXiv:2312.09244, Sec. 2) pins the otherwise free offset of the
    rewards near zero, which makes scores of different reward models comparable.

    Args:
        r_chosen:    (B,) reward of the preferred response.
        r_rejected:  (B,) reward of the dispreferred response.
        margin:      (B,) non-negative required gap, or None for no margin.
        soft_label:  (B,) probability in [0, 1] that chosen is better, or None (= 1).
        center_coef: weight of the centring term; 0 disables it (Eisenstein et al. use 0.01).

    Returns:
        RewardLossOutput(losses (B,), accuracy (B,) detached, margin (B,) detached).
        B: number of pairs. log-sigmoid keeps the loss finite for any reward gap.
    """
    _check_same_shape(r_chosen=r_chosen, r_rejected=r_rejected, margin=margin, soft_label=soft_label)
    d = r_chosen - r_rejected  # (B,)
    m = 0.0 if margin is None else margin
    losses = -F.logsigmoid(d - m)  # (B,)
    if soft_label is not None:
        p = soft_label.to(d.dtype)
        losses = p * losses + (1.0 - p) * -F.logsigmoid(-d - m)
    if center_coef:
        losses = losses + center_coef * (r_chosen + r_rejected) ** 2

    d_det = d.detach()
    if soft_label is None:
        accuracy = (d_det > 0).to(d.dtype)
    else:
        p = soft_label.detach().to(d.dtype)
        right = torch.where(p > 0.5, d_det > 0, d_det < 0).to(d.dtype)
        accuracy = torch.where(p == 0.5, torch.full_like(right, 0.5), right)
    return RewardLossOutput(losses=losses, accuracy=accuracy, margin=d_det)


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 10) -> float:
    """Expected calibration error of predicted preference probabilities.

        ECE = sum_b (n_b / N) * | mean(labels in b) - mean(probs in b) |

    over n_bins equal-width bins of [0, 1] (Naeini et al. 2015; Guo et al. 2017, Eq. 3).
    Bin b holds probs in [b/n_bins, (b+1)/n_bins); the last bin also holds 1.0. Empty bins
    contribute nothing. For a reward model, probs = sigmoid(r_a - r_b) = P(a better than b)
    and labels = 1.0 where a really was better (gold judge or held-out human label), else 0.0.
    Evaluate on pairs in random order (or on both orders): with a always the labelled winner,
    every label is 1 and ECE only measures how confident the model is.

    Args:
        probs:  (N,) predicted probabilities in [0, 1].
        labels: (N,) outcomes in {0, 1} (soft outcomes in [0, 1] also work).
        n_bins: number of equal-width bins.

    Returns:
        ECE as a Python float in [0, 1]. N: number of evaluated pairs.
    """
    if probs.shape != labels.shape or probs.dim() != 1:
        raise ValueError(
            f"probs and labels must both be (N,), got {tuple(probs.shape)} and {tuple(labels.shape)}"
        )
    if probs.numel() == 0:
        raise ValueError("expected_calibration_error needs at least one pair")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    probs = probs.detach().double()
    labels = labels.detach().double()
    bins = (probs * n_bins).floor().clamp(0, n_bins - 1).long()  # (N,)
    sum_p = torch.zeros(n_bins, dtype=torch.float64, device=probs.device).index_add_(0, bins, probs)
    sum_y = torch.zeros_like(sum_p).index_add_(0, bins, labels)
    # Per bin, n_b * |mean_y - mean_p| = |sum_y - sum_p|, so empty bins give 0 with no division.
    return float((sum_y - sum_p).abs().sum() / probs.numel())
