"""The reference's likelihood as a second reward feature (`reward.ref_logprob_coef`).

On the SFT model's own samples the reward models order many pairs worse than the SFT model's
own mean per-token log-probability does (arithmetic, format; docs/reward.md). The RL stages can
add c x mean_t log pi_ref(y_t | x) to each response's score; c is fitted here on preference
pairs (people's labels, or the world's noisy gold labels in the demo) as the weight of that
feature beside the reward ensemble's normalised score, in one no-intercept logistic regression
of "chosen beats rejected" on the two chosen-minus-rejected differences (Bradley-Terry with two
features). PPO computes log pi_ref for its KL penalty already, so the feature costs nothing there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from alignkit.data.records import PreferencePair


def fit_margin_weights(x: torch.Tensor, ridge: float = 1e-4, iters: int = 50) -> torch.Tensor:
    """(K,) weights w of P(chosen) = sigmoid(x @ w) for (N, K) chosen-minus-rejected features x.

    Newton's method on mean softplus(-x @ w) + ridge / 2 * |w|^2 (convex; the ridge keeps w finite
    when the pairs are separable), in float64. Deterministic: no learning rate, no seed.
    """
    x = x.double()
    w = torch.zeros(x.shape[1], dtype=torch.float64)
    eye = torch.eye(x.shape[1], dtype=torch.float64)
    for _ in range(iters):
        p = torch.sigmoid(x @ w)  # P(the model's order is the label's)
        grad = -(x * (1 - p)[:, None]).mean(0) + ridge * w
        hess = (x * (p * (1 - p))[:, None]).T @ x / len(x) + ridge * eye
        step = torch.linalg.solve(hess, grad)
        w = w - step
        if float(step.abs().max()) < 1e-10:
            break
    return w


@torch.no_grad()
def response_logprobs(model: Any, tokenizer: Any, pairs: Sequence[tuple[str, str]], average: bool = True,
                      batch: int = 64) -> torch.Tensor:
    """(N,) log-prob of each (prompt, response)'s response tokens under `model`: the mean per
    token (`average`) or the sum."""
    from alignkit.data.tokenize import encode_pair
    from alignkit.models.logprobs import sequence_logprobs

    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    for s in range(0, len(pairs), batch):
        enc = [encode_pair(tokenizer, p, r) for p, r in pairs[s : s + batch]]
        width = max(len(e.input_ids) for e in enc)
        ids = torch.full((len(enc), width), pad)
        labels = torch.full((len(enc), width), -100)
        mask = torch.zeros((len(enc), width), dtype=torch.long)
        for i, e in enumerate(enc):
            n = len(e.input_ids)
            ids[i, :n], mask[i, :n] = torch.tensor(e.input_ids), 1
            labels[i, len(e.prompt_ids) : n] = torch.tensor(e.response_ids)
        out.append(sequence_logprobs(model, ids.to(device), mask.to(device), labels.to(device), average=average)
                   .float().cpu())
    return torch.cat(out)


def normalised_pair_scores(reward_dir: str, pairs: Sequence[PreferencePair], limits: Any = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) normalised scores of the chosen and of the rejected responses by one reward model
    directory (its reward_stats.json); `limits`: TruncationLimits (default: none)."""
    from alignkit.data.tokenize import TruncationLimits, tokenize_preference
    from alignkit.models.heads import load_reward_model
    from alignkit.models.load import load_tokenizer
    from alignkit.train.reward import score_pairs

    model, tok = load_reward_model(reward_dir), load_tokenizer(reward_dir)
    if model.stats is None:
        raise ValueError(f"{reward_dir}: no reward_stats.json to normalise its scores with")
    limits = limits or TruncationLimits(max_prompt_len=10**6 - 1, max_len=10**6)
    items, _ = tokenize_preference(tok, list(pairs), limits)
    if len(items) != len(pairs):
        raise ValueError(f"{reward_dir}: {len(pairs) - len(items)} of {len(pairs)} pairs could not be tokenised")
    r_c, r_r = score_pairs(model, items, tok.pad_token_id)
    return model.normalize(r_c).float(), model.normalize(r_r).float()


def ensemble_margins(reward_dirs: Sequence[str], pairs: Sequence[PreferencePair], mode: str = "mean",
                     coef: float = 1.0) -> torch.Tensor:
    """(N,) score(chosen) - score(rejected) of the reward ensemble as the RL stages combine it
    (each member's normalised score, `rollout.combine_ensemble`)."""
    from alignkit.train.rollout import combine_ensemble

    scores = [normalised_pair_scores(d, pairs) for d in reward_dirs]
    chosen, rejected = torch.stack([c for c, _ in scores]), torch.stack([r for _, r in scores])
    return combine_ensemble(chosen, mode, coef) - combine_ensemble(rejected, mode, coef)


def fit_ref_logprob_coef(reward_dirs: Sequence[str], reference: str, pairs: Sequence[PreferencePair],
                         mode: str = "mean", coef: float = 1.0) -> dict:
    """Fit `reward.ref_logprob_coef` on labelled pairs: {"coef", "weights", "pairs", "agreement"}.

    weights (a, b): the logistic regression's weights of the ensemble margin and of the mean
    log-prob margin under `reference` (the RL stage's reference: the SFT model); coef = b / a puts
    the feature on the ensemble's scale. agreement: the share of pairs each scorer orders as
    labelled (ensemble alone, log-prob alone, the fitted mix), on these same pairs.
    """
    from alignkit.models.load import load_model, load_tokenizer

    if not pairs:
        raise ValueError("fit_ref_logprob_coef: no pairs to fit on")
    d_rm = ensemble_margins(reward_dirs, pairs, mode, coef)
    model, tok = load_model(reference), load_tokenizer(reference)
    lp_c = response_logprobs(model, tok, [(p.prompt, p.chosen) for p in pairs])
    lp_r = response_logprobs(model, tok, [(p.prompt, p.rejected) for p in pairs])
    d_lp = lp_c - lp_r
    a, b = fit_margin_weights(torch.stack([d_rm, d_lp], 1)).tolist()
    if a <= 0:
        raise ValueError(f"fit_ref_logprob_coef: the reward ensemble's weight came out {a:.3g} <= 0 on "
                         f"{len(pairs)} pairs: its scores do not order them as labelled")
    mix = d_rm + (b / a) * d_lp
    agree = {name: float((m > 0).double().mean()) for name, m in
             (("reward", d_rm), ("ref_logprob", d_lp), ("combined", mix))}
    return {"coef": b / a, "weights": [a, b], "pairs": len(pairs), "agreement": agree}
