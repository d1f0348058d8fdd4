"""Direct preference losses: DPO and its relatives, plus KTO, metrics and a beta check.

Shape legend: B = batch of preference pairs, N = batch of unpaired (KTO) examples,
M = mismatched (prompt, completion) pairs used for KTO's reference point.

Every paired loss shares one signature and lives in `PREFERENCE_LOSSES`; a stage resolves
its loss once with `get_preference_loss(name)` and never branches on the name again:

    fn(policy_chosen_logps (B,), policy_rejected_logps (B,),
       ref_chosen_logps (B,) | None, ref_rejected_logps (B,) | None,
       *, beta, soft_label=None, **params) -> PreferenceLossOutput

Log-probs are the summed (or, where a loss says so, per-token averaged) log-probs of the
response tokens only. Each loss uses whatever log-probs the caller gives; the docstring says
which normalisation the paper used. Inputs in float16/bfloat16 are upcast to float32.

Soft labels: soft_label = p (B,) is the probability that "chosen" really is better. For every
paired loss l(h), where h is signed towards "chosen", the soft-label loss is the expectation
over the label, p * l(h) + (1 - p) * l(-h). So p = 1 equals the hard label, and swapping
chosen/rejected together with p -> 1 - p gives the same loss. (For DPO this is the
cross-entropy -(p log sigmoid(beta h) + (1 - p) log sigmoid(-beta h)).) Values of p are not
checked here; the data contract checks them at load time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F


class PreferenceLossOutput(NamedTuple):
    """What every paired preference loss returns.

    losses:           (B,) per-pair loss, with gradient; the caller reduces.
    chosen_rewards:   (B,) detached implicit reward of the chosen response,
                      beta * (policy_chosen_logps - ref_chosen_logps) unless the loss says otherwise.
    rejected_rewards: (B,) detached implicit reward of the rejected response.
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


class KTOLossOutput(NamedTuple):
    """What `kto_loss` returns.

    losses:  (N,) per-example loss, with gradient; the caller reduces.
    rewards: (N,) detached implicit rewards beta * (policy_logps - ref_logps).
    """

    losses: torch.Tensor
    rewards: torch.Tensor


def _f32(x: torch.Tensor) -> torch.Tensor:
    # A difference of two long-sequence log-probs in bf16 can lose whole nats; (B,) is cheap.
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _check_shapes(**tensors: torch.Tensor | None) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items() if t is not None}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shape mismatch, all must be equal (B,): {shapes}")


def _log_ratios(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    soft_label: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) log-ratios log pi/pi_ref, each (B,). No reference means pi_ref = 1
    (the "reference-free" ablation), i.e. plain log-probs."""
    _check_shapes(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
        soft_label=soft_label,
    )
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("give both ref_chosen_logps and ref_rejected_logps, or neither")
    chosen = _f32(policy_chosen_logps)
    rejected = _f32(policy_rejected_logps)
    if ref_chosen_logps is not None:
        chosen = chosen - _f32(ref_chosen_logps).detach()
        rejected = rejected - _f32(ref_rejected_logps).detach()
    return chosen, rejected


def _expect_over_label(
    loss_of: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, soft_label: torch.Tensor | None
) -> torch.Tensor:
    """p * l(h) + (1 - p) * l(-h): the loss expected under a label that says "chosen" w.p. p."""
    if soft_label is None:
        return loss_of(h)
    p = soft_label.to(h.dtype)
    return p * loss_of(h) + (1.0 - p) * loss_of(-h)


def _output(
    losses: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor, beta: float
) -> PreferenceLossOutput:
    return PreferenceLossOutput(losses, (beta * chosen).detach(), (beta * rejected).detach())


def dpo_sigmoid_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    beta: float,
    soft_label: torch.Tensor | None = None,
) -> PreferenceLossOutput:
    """DPO (Rafailov et al. 2023, "Direct Preference Optimization", Eq. 7).

        h    = [log pi(y_c) - log pi_ref(y_c)] - [log pi(y_r) - log pi_ref(y_r)]
        loss = -log sigmoid(beta * h)

    Log-probs are summed over response tokens, as in the paper.

    Args:
        policy_chosen_logps:   (B,) log pi_theta(y_chosen | x), with gradient.
        policy_rejected_logps: (B,) log pi_theta(y_rejected | x), with gradient.
        ref_chosen_logps:      (B,) log pi_ref(y_chosen | x), or None for reference-free.
        ref_rejected_logps:    (B,) log pi_ref(y_rejected | x), or None.
        beta:                  strength of the implicit KL penalty (usual 0.01-0.1).
        soft_label:            (B,) P(chosen better) or None; see the module docstring.

    Returns:
        PreferenceLossOutput; rewards beta * log-ratio. B: batch of pairs.
    """
    chosen, rejected = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, soft_label
    )
    h = chosen - rejected  # (B,)
    losses = _expect_over_label(lambda z: -F.logsigmoid(beta * z), h, soft_label)
    return _output(losses, chosen, rejected, beta)


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    beta: float,
    soft_label: torch.Tensor | None = None,
) -> PreferenceLossOutput:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from
    Human Preferences", Eq. 17), with beta playing the paper's tau:

        loss = (h - 1 / (2 * beta))^2,   h = log-ratio(chosen) - log-ratio(rejected)

    The regression target 1/(2 tau) bounds how far h is pushed, which is IPO's fix for DPO
    driving h to infinity on deterministic preferences. Normalisation: the paper writes
    sequence log-probs; common practice (and this library's DPO stage for IPO) passes
    per-token AVERAGED log-probs, which makes the target length-independent. This function
    uses whatever it is given; with summed log-probs pick a smaller tau (larger target).

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) policy log-probs, with gradient.
        ref_chosen_logps, ref_rejected_logps:       (B,) reference log-probs, or None.
        beta:       tau, the regularisation strength (target gap 1/(2 tau)).
        soft_label: (B,) P(chosen better) or None; the expectation over the label moves the
                    minimiser to h* = (2p - 1) / (2 tau).

    Returns:
        PreferenceLossOutput; rewards tau * log-ratio. B: batch of pairs.
    """
    chosen, rejected = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, soft_label
    )
    h = chosen - rejected  # (B,)
    target = 1.0 / (2.0 * beta)
    losses = _expect_over_label(lambda z: (z - target) ** 2, h, soft_label)
    return _output(losses, chosen, rejected, beta)


def hinge_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    beta: float,
    soft_label: torch.Tensor | None = None,
) -> PreferenceLossOutput:
    """Hinge loss on the normalised likelihood (SLiC-HF, Zhao et al. 2023, Eq. 1; in the
    reference-normalised form of RSO, Liu et al. 2024, "Statistical Rejection Sampling
    Improves Preference Optimization", Sec. 3, "hinge-norm"):

        loss = max(0, 1 - beta * h),   h = log-ratio(chosen) - log-ratio(rejected)

    SLiC-HF's calibration term is max(0, delta - log P(y+) + log P(y-)) with no reference;
    passing ref logps = None here gives beta * max(0, 1/beta - log P(y+) + log P(y-)), i.e.
    SLiC-HF with delta = 1/beta, scaled by beta. (SLiC-HF's extra regulariser
    -lambda log P(y_ref) is an SFT term the caller adds, as with "rpo".) The loss is exactly
    zero once the pair is separated by 1/beta nats, so pairs that are learned stop pulling.

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) policy log-probs (summed), with gradient.
        ref_chosen_logps, ref_rejected_logps:       (B,) reference log-probs, or None.
        beta:       inverse margin: the hinge closes at h = 1/beta.
        soft_label: (B,) P(chosen better) or None.

    Returns:
        PreferenceLossOutput; rewards beta * log-ratio. B: batch of pairs.
    """
    chosen, rejected = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, soft_label
    )
    h = chosen - rejected  # (B,)
    losses = _expect_over_label(lambda z: F.relu(1.0 - beta * z), h, soft_label)
    return _output(losses, chosen, rejected, beta)


def cdpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    beta: float,
    soft_label: torch.Tensor | None = None,
    label_smoothing: float = 0.1,
) -> PreferenceLossOutput:
    """Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences & relationship
    to IPO"): DPO against labels that are wrong with probability eps = label_smoothing.

        loss = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)

    Unlike plain DPO its minimiser is finite: beta h* = log((1 - eps) / eps).
    eps = 0 is exactly DPO ("sigmoid"). With a soft label p the two combine into
    p_eff = (1 - eps) p + eps (1 - p).

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) policy log-probs (summed), with gradient.
        ref_chosen_logps, ref_rejected_logps:       (B,) reference log-probs, or None.
        beta:            as in DPO.
        soft_label:      (B,) P(chosen better) or None.
        label_smoothing: eps in [0, 0.5], the assumed label-flip rate.

    Returns:
        PreferenceLossOutput; rewards beta * log-ratio. B: batch of pairs.
    """
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing}")
    chosen, rejected = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, soft_label
    )
    h = chosen - rejected  # (B,)
    eps = label_smoothing

    def loss_of(z: torch.Tensor) -> torch.Tensor:
        return -(1.0 - eps) * F.logsigmoid(beta * z) - eps * F.logsigmoid(-beta * z)

    losses = _expect_over_label(loss_of, h, soft_label)
    return _output(losses, chosen, rejected, beta)


def robust_dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    beta: float,
    soft_label: torch.Tensor | None = None,
    label_smoothing: float = 0.1,
) -> PreferenceLossOutput:
    """Robust DPO, rDPO (Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models
    with Noisy Feedback", arXiv:2403.00409, Sec. 3, the de-biased loss): with l(h) the DPO
    loss and eps = label_smoothing the known flip rate,

        loss = [(1 - eps) l(h) - eps l(-h)] / (1 - 2 eps)
             = -log sigmoid(beta h) - eps beta h / (1 - 2 eps)

    Its expectation over noisy labels equals the DPO loss on clean labels (unbiased), unlike
    cDPO. The price: it is not bounded below in h, so a single example can be driven far;
    use it when the flip rate is known. eps = 0 is exactly DPO ("sigmoid").

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) policy log-probs (summed), with gradient.
        ref_chosen_logps, ref_rejected_logps:       (B,) reference log-probs, or None.
        beta:            as in DPO.
        soft_label:      (B,) P(chosen better) or None.
        label_smoothing: eps in [0, 0.5), the flip rate.

    Returns:
        PreferenceLossOutput; rewards beta * log-ratio. B: batch of pairs.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5) for robust DPO, got {label_smoothing}")
    chosen, rejected = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, soft_label
    )
    h = chosen - rejected  # (B,)
    eps = label_smoothing

    def loss_of(z: torch.Tensor) -> torch.Tensor:
        flipped = -F.logsigmoid(-beta * z)
        return ((1.0 - eps) * -F.logsigmoid(beta * z) - eps * flipped) / (1.0 - 2.0 * eps)

    losses = _expect_over_label(loss_of, h, soft_label)
    return _output(losses, chosen, rejected, beta)


def rpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    beta: float,
    chosen_nll: torch.Tensor,
    soft_label: torch.Tensor | None = None,
    alpha: float = 1.0,
) -> PreferenceLossOutput:
    """DPO + NLL on the chosen response (Pang et al. 2024, "Iterative Reasoning Preference
    Optimization", arXiv:2404.19733, Sec. 2, the L_DPO+NLL objective):

        loss = -log sigmoid(beta h) + alpha * NLL(y_chosen)

    The NLL term counters DPO's tendency to lower the chosen likelihood too. Pang et al.
    length-normalise the NLL (mean over the chosen tokens) and use alpha = 1.

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) policy log-probs (summed), with gradient.
        ref_chosen_logps, ref_rejected_logps:       (B,) reference log-probs, or None.
        beta:       as in DPO.
        chosen_nll: (B,) per-token mean negative log-likelihood of the chosen response, with
                    gradient (e.g. -policy_chosen_logps / chosen_lengths).
        soft_label: (B,) P(chosen better) or None; applies to the DPO term only.
        alpha:      weight of the NLL term.

    Returns:
        PreferenceLossOutput; rewards beta * log-ratio. B: batch of pairs.
    """
    _check_shapes(policy_chosen_logps=policy_chosen_logps, chosen_nll=chosen_nll)
    out = dpo_sigmoid_loss(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        beta=beta,
        soft_label=soft_label,
    )
    return out._replace(losses=out.losses + alpha * _f32(chosen_nll))


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    *,
    beta: float,
    soft_label: torch.Tensor | None = None,
    gamma: float = 0.5,
) -> PreferenceLossOutput:
    """SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free
    Reward", Eq. 6). Reference-free; the caller passes per-token AVERAGED log-probs:

        loss = -log sigmoid(beta * (avg_logp(y_c) - avg_logp(y_r)) - gamma)

    The reward beta * avg_logp matches what generation ranks by, and the average removes the
    length bias of summed log-probs. gamma is a target reward margin. The paper tunes
    beta in 2-10 and gamma in about 0.3-1.6 (gamma/beta around 0.5).

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) AVERAGED policy log-probs, with gradient.
        ref_chosen_logps, ref_rejected_logps:       ignored (reference-free); pass None.
        beta:       reward scale (much larger than DPO's: 2-10).
        soft_label: (B,) P(chosen better) or None; gamma applies to the winning side.
        gamma:      target reward margin.

    Returns:
        PreferenceLossOutput; rewards beta * averaged log-prob. B: batch of pairs.
    """
    chosen, rejected = _log_ratios(policy_chosen_logps, policy_rejected_logps, None, None, soft_label)
    h = chosen - rejected  # (B,)
    losses = _expect_over_label(lambda z: -F.logsigmoid(beta * z - gamma), h, soft_label)
    return _output(losses, chosen, rejected, beta)


def _log_odds(avg_logps: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) for p = exp(avg_logps), stable for every avg_logps < 0."""
    # At p = 1 the odds are infinite; cap just below 0 so the loss stays finite.
    x = avg_logps.clamp(max=-torch.finfo(avg_logps.dtype).eps)
    # log(1 - e^x): log(-expm1(x)) is accurate near 0, log1p(-exp(x)) for very negative x.
    log1m_exp = torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
    return x - log1m_exp


def orpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    *,
    beta: float,
    chosen_nll: torch.Tensor,
    soft_label: torch.Tensor | None = None,
) -> PreferenceLossOutput:
    """ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference
    Model", Eq. 6-7), with beta playing the paper's lambda. Reference-free; the caller passes
    per-token AVERAGED log-probs, so P(y|x) = exp(avg_logp) as in the paper:

        log odds(y) = avg_logp - log(1 - exp(avg_logp))
        L_OR        = -log sigmoid(log odds(y_c) - log odds(y_r))           (Eq. 7)
        loss        = NLL(y_c) + lambda * L_OR                              (Eq. 6)

    One stage replaces SFT + DPO: the NLL term is the SFT loss on the chosen response.
    Averaged log-probs must be < 0; values closer to 0 than eps(dtype) are capped.

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) AVERAGED policy log-probs, with gradient.
        ref_chosen_logps, ref_rejected_logps:       ignored (reference-free); pass None.
        beta:       lambda, the weight of the odds-ratio term (paper: 0.1-1).
        chosen_nll: (B,) per-token mean NLL of the chosen response, with gradient (usually
                    -policy_chosen_logps).
        soft_label: (B,) P(chosen better) or None; applies to the odds-ratio term only.

    Returns:
        PreferenceLossOutput; rewards lambda * averaged log-prob (for logging only).
        B: batch of pairs.
    """
    chosen, rejected = _log_ratios(policy_chosen_logps, policy_rejected_logps, None, None, soft_label)
    _check_shapes(policy_chosen_logps=policy_chosen_logps, chosen_nll=chosen_nll)
    h = _log_odds(chosen) - _log_odds(rejected)  # (B,)
    odds_ratio_loss = _expect_over_label(lambda z: -F.logsigmoid(z), h, soft_label)
    losses = _f32(chosen_nll) + beta * odds_ratio_loss
    return _output(losses, chosen, rejected, beta)


PREFERENCE_LOSSES: dict[str, Callable[..., PreferenceLossOutput]] = {
    "sigmoid": dpo_sigmoid_loss,
    "ipo": ipo_loss,
    "hinge": hinge_loss,
    "cdpo": cdpo_loss,
    "robust": robust_dpo_loss,
    "rpo": rpo_loss,
    "simpo": simpo_loss,
    "orpo": orpo_loss,
}

REFERENCE_FREE: frozenset[str] = frozenset({"simpo", "orpo"})
"""Losses that ignore the reference log-probs: a stage can skip the reference model."""


def get_preference_loss(name: str) -> Callable[..., PreferenceLossOutput]:
    """The paired preference loss registered under `name`; resolve once at config time."""
    try:
        return PREFERENCE_LOSSES[name]
    except KeyError:
        valid = ", ".join(sorted(PREFERENCE_LOSSES))
        raise ValueError(f"unknown preference loss {name!r}; valid names: {valid}") from None


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl_ref_point: torch.Tensor | float,
    *,
    beta: float,
    lambda_d: float = 1.0,
    lambda_u: float = 1.0,
) -> KTOLossOutput:
    """KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization",
    Eq. 8), for unpaired examples each marked desirable or undesirable:

        r    = log pi(y|x) - log pi_ref(y|x)
        z0   = kl_ref_point (detached; see `kto_kl_estimate`)
        v    = lambda_d * sigmoid(beta (r - z0))   if desirable
               lambda_u * sigmoid(beta (z0 - r))   if undesirable
        loss = lambda_y - v

    Set lambda_d * n_d / (lambda_u * n_u) in [1, 4/3] for imbalanced data (paper, Sec. 4.2).

    Args:
        policy_logps:  (N,) log pi_theta(y|x), summed over response tokens, with gradient.
        ref_logps:     (N,) log pi_ref(y|x).
        desirable:     (N,) bool, True for desirable examples.
        kl_ref_point:  scalar tensor or float z0; detached here.
        beta:          as in DPO (paper default 0.1).
        lambda_d:      weight of desirable examples.
        lambda_u:      weight of undesirable examples.

    Returns:
        KTOLossOutput(losses (N,), rewards (N,) detached = beta * r). N: batch of examples.
    """
    _check_shapes(policy_logps=policy_logps, ref_logps=ref_logps, desirable=desirable)
    if desirable.dtype != torch.bool:
        raise ValueError(f"desirable must be a bool tensor, got {desirable.dtype}")
    r = _f32(policy_logps) - _f32(ref_logps).detach()  # (N,)
    z0 = torch.as_tensor(kl_ref_point, dtype=r.dtype, device=r.device).detach()
    value = torch.where(
        desirable, lambda_d * torch.sigmoid(beta * (r - z0)), lambda_u * torch.sigmoid(beta * (z0 - r))
    )  # (N,)
    lambda_y = torch.where(desirable, torch.full_like(r, lambda_d), torch.full_like(r, lambda_u))
    return KTOLossOutput(losses=lambda_y - value, rewards=(beta * r).detach())


def kto_kl_estimate(
    policy_logps_mismatched: torch.Tensor, ref_logps_mismatched: torch.Tensor
) -> torch.Tensor:
    """KTO's reference point z0 (Ethayarajh et al. 2024, Sec. 4.1):

        z0 = max(0, mean_j [log pi(y_j | x_i) - log pi_ref(y_j | x_i)])

    over M mismatched pairs (x_i, y_j), j != i, made by pairing each prompt in the batch with
    another example's completion (e.g. shift completions by one). It estimates
    KL(pi || pi_ref) without favouring any real completion; it is detached, so no gradient
    flows through it. Under data parallelism, average the mean across ranks before clamping.

    Args:
        policy_logps_mismatched: (M,) policy log-probs of mismatched completions.
        ref_logps_mismatched:    (M,) reference log-probs of the same.

    Returns:
        0-dim detached tensor, >= 0. M: number of mismatched pairs.
    """
    _check_shapes(policy=policy_logps_mismatched, ref=ref_logps_mismatched)
    diff = _f32(policy_logps_mismatched).detach() - _f32(ref_logps_mismatched).detach()  # (M,)
    return diff.mean().clamp(min=0.0)


def preference_metrics(
    out: PreferenceLossOutput, policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor
) -> dict[str, float]:
    """The standard preference metrics, means over the batch.

    rewards/chosen, rewards/rejected: mean implicit rewards.
    rewards/accuracies: fraction of pairs with chosen reward > rejected reward (ties count 0).
    rewards/margins:    mean of chosen - rejected reward.
    logps/chosen, logps/rejected: mean policy log-probs (as given: summed or averaged).

    Args:
        out: the loss output for a batch of B pairs.
        policy_chosen_logps, policy_rejected_logps: (B,) the policy log-probs fed to the loss.
    """
    c, r = out.chosen_rewards.detach().float(), out.rejected_rewards.detach().float()
    return {
        "rewards/chosen": c.mean().item(),
        "rewards/rejected": r.mean().item(),
        "rewards/accuracies": (c > r).float().mean().item(),
        "rewards/margins": (c - r).mean().item(),
        "logps/chosen": policy_chosen_logps.detach().float().mean().item(),
        "logps/rejected": policy_rejected_logps.detach().float().mean().item(),
    }


# name -> (low, high, what goes wrong below, what goes wrong above)
_DPO_RANGE = (
    0.01,
    0.5,
    "the implicit KL penalty is so weak that the policy can drift far from the reference and "
    "produce degenerate text",
    "the policy is held so close to the reference that it barely changes",
)
_BETA_RANGES: dict[str, tuple[float, float, str, str]] = {
    "sigmoid": _DPO_RANGE,
    "cdpo": _DPO_RANGE,
    "robust": _DPO_RANGE,
    "rpo": _DPO_RANGE,
    "hinge": (
        0.01,
        0.5,
        "the hinge only closes at a log-ratio gap of 1/beta, so large that the policy drifts far "
        "from the reference",
        "the hinge closes at a tiny gap of 1/beta and most pairs stop contributing at once",
    ),
    "kto": _DPO_RANGE,
    "ipo": (
        0.01,
        1.0,
        "beta is IPO's tau and the target log-ratio gap 1/(2 tau) becomes huge, pushing the "
        "policy far from the reference",
        "beta is IPO's tau and the target log-ratio gap 1/(2 tau) is tiny, so the policy barely moves",
    ),
    "simpo": (
        1.0,
        10.0,
        "SimPO's reward is beta * averaged log-prob and needs a large scale (paper: 2-10); with a "
        "small beta the margin gamma dominates and the preference signal is weak",
        "the sigmoid saturates on most pairs and training becomes unstable",
    ),
    "orpo": (
        0.01,
        1.0,
        "beta is ORPO's lambda; the odds-ratio term is negligible and ORPO reduces to SFT on chosen",
        "beta is ORPO's lambda; the odds-ratio term swamps the SFT term and can degrade fluency",
    ),
}


def check_beta(beta: float, loss_name: str) -> str | None:
    """A warning text if beta is outside the sane range for `loss_name`, else None.

    Ranges: DPO-family ("sigmoid", "cdpo", "robust", "rpo", "hinge", "kto") 0.01-0.5 (0.01-0.1
    usual); "ipo" (tau) 0.01-1; "simpo" 1-10; "orpo" (lambda) 0.01-1. A non-positive beta is
    always reported.
    """
    if loss_name not in _BETA_RANGES:
        valid = ", ".join(sorted(_BETA_RANGES))
        raise ValueError(f"unknown preference loss {loss_name!r}; valid names: {valid}")
    if beta <= 0:
        return f"beta={beta} for loss {loss_name!r} must be > 0"
    low, high, too_small, too_large = _BETA_RANGES[loss_name]
    usual = " (0.01-0.1 is usual)" if _BETA_RANGES[loss_name] is _DPO_RANGE else ""
    if beta < low:
        return (
            f"beta={beta} is below the sane range [{low}, {high}]{usual} for loss {loss_name!r}: {too_small}"
        )
    if beta > high:
        return (
            f"beta={beta} is above the sane range [{low}, {high}]{usual} for loss {loss_name!r}: {too_large}"
        )
    return None
