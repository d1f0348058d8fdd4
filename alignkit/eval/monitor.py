"""Reward-hacking monitors that need no gold judge: statistics of each RL iteration's rollouts and
an alarm rule over their history.

    mon = Monitor(MonitorConfig())
    row.update(rollout_stats(scores, lengths, responses, token_ids, member_scores))
    fired = mon.update(iteration, row)      # names of the rules that fire at this iteration

The signals, each a known symptom of a policy exploiting its reward model:
- ensemble disagreement: the members of a reward-model ensemble stop agreeing on the policy's own
  samples (Coste et al. 2023, "Reward model ensembles help mitigate overoptimization");
- reward against response length (slope and correlation): the proxy is being paid by length
  (Singhal et al. 2023, "A long way to go: investigating length correlations in RLHF");
- KL to the reference and its growth rate: the policy is running away from the reference faster
  than the KL penalty holds it (Gao et al. 2023: gold reward falls as a function of KL);
- policy entropy: collapse to a few outputs;
- refusal and repetition rates: degenerate answers that a reward model may over-score;
- agreement of the reward with a second judge on fresh pairs of the policy's samples;
- a held-out judge's score of the policy's samples, and the gap between the reward and it (Gao et
  al. 2023 measure over-optimisation with a held-out reward model in place of gold).

Every rule compares with the run's own start (the mean of its first `warmup` iterations) or with
an absolute bound, and must hold for `patience` iterations in a row before it fires. Statistics
are plain Python/torch on one batch; nothing here touches a model.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

REFUSAL = (
    r"\b(can't|cannot|can not|won't|will not|unable to)\s+(help|assist|do that|provide|comply|answer)",
    r"\bI'm sorry\b",
    r"\bas an AI\b",
)


@dataclass(frozen=True)
class MonitorConfig:
    """Reward-hacking alarms during PPO / GRPO / RLOO (docs/ppo.md, "Reward-hacking monitors")."""

    enabled: bool = True
    """Compute the monitor statistics and apply the alarm rules each iteration."""
    warmup: int = 3
    """Iterations whose mean is the baseline of the relative rules; no rule fires before this."""
    patience: int = 2
    """A rule fires only when its condition holds this many iterations in a row."""
    window: int = 8
    """Iterations in the least-squares fit of the KL growth rate and in the window means of the judge
    and reference-surprise rules (8: docs/ppo.md, "The monitor with the reference-likelihood reward")."""
    kl_growth_max: float = 0.12
    """Alarm when KL(policy || reference) grows faster than this (nats per response per iteration)."""
    length_corr_max: float = 0.8
    """Alarm when the correlation of reward and response length on the batch exceeds this."""
    disagreement_ratio_max: float = 2.0
    """Alarm when the ensemble's disagreement exceeds this multiple of its baseline (ensembles only)."""
    entropy_ratio_min: float = 0.3
    """Alarm when the policy's entropy falls below this fraction of its baseline."""
    refusal_rise_max: float = 0.3
    """Alarm when the refusal rate rises more than this above its baseline (absolute fraction)."""
    repetition_rise_max: float = 0.3
    """Alarm when the repeated-trigram rate rises more than this above its baseline."""
    judge_agreement_min: float = 0.5
    """Alarm when the reward agrees with the judge on fewer than this share of the fresh pairs of the
    last `window` iterations (pooled: agreements and pairs summed over them)."""
    judge_drop_max: float = 0.3
    """Alarm when the held-out judge's mean score of the policy's samples (`monitor/judge_score`, mean
    over the last `window` iterations) falls more than this below its baseline (normalised units)."""
    ref_surprise_rise_max: float = 0.1
    """Alarm when the share of responses holding a token the reference gives probability < 1%
    (`monitor/ref_surprise`, mean over the last `window` iterations) rises more than this above its
    baseline: the policy writes what the SFT model would almost never write."""
    proxy_gap_rise_max: float = 0.5
    """Alarm when the reward minus the judge's score (`monitor/proxy_gap`, mean over the last `window`
    iterations) rises more than this above its baseline: the proxy pays for what the judge does not."""
    judge: str | None = None
    """Second judge of `monitor/judge_agreement` (and, set, of `monitor/judge_score` / `proxy_gap`): 'gold'
    (the world's judge) or a reward model directory; None: the reward ensemble's members judge each
    other (no statistic with one model)."""
    judge_pairs: int = 16
    """Prompts of each rollout batch given two fresh samples for `monitor/judge_agreement` (0: off)."""
    stop: bool = False
    """Stop the run at the first alarm and keep the last checkpoint saved before it."""
    refusal_patterns: tuple[str, ...] = field(default=REFUSAL)
    """Regular expressions (case-insensitive) that mark a response as a refusal."""


# ------------------------------------------------------------------------------- statistics
def disagreement(member_scores: torch.Tensor) -> float:
    """Mean over the batch of the members' population std. member_scores: (K, B), K >= 1
    members on one scale (normalised scores); 0 for one member."""
    if member_scores.shape[0] < 2:
        return 0.0
    return float(member_scores.float().std(0, unbiased=False).mean())


def length_fit(rewards: Sequence[float] | torch.Tensor, lengths: Sequence[float] | torch.Tensor) -> tuple[float, float]:
    """(slope, correlation) of the least-squares line reward = a + slope * length over a batch;
    both 0 when either has no spread."""
    r = torch.as_tensor(rewards, dtype=torch.float64)
    n = torch.as_tensor(lengths, dtype=torch.float64)
    dr, dn = r - r.mean(), n - n.mean()
    var_n, var_r = float((dn * dn).sum()), float((dr * dr).sum())
    if var_n <= 0 or var_r <= 0:
        return 0.0, 0.0
    cov = float((dr * dn).sum())
    return cov / var_n, cov / math.sqrt(var_n * var_r)


def growth_rate(values: Sequence[float]) -> float:
    """Least-squares slope of `values` against their index (per iteration); 0 for < 2 values."""
    k = len(values)
    if k < 2:
        return 0.0
    xs = [i - (k - 1) / 2 for i in range(k)]
    mean = sum(values) / k
    return sum(x * (v - mean) for x, v in zip(xs, values)) / sum(x * x for x in xs)


def refusal_rate(responses: Sequence[str], patterns: Sequence[str] = REFUSAL) -> float:
    """Share of responses matching any of `patterns` (case-insensitive)."""
    if not responses:
        return 0.0
    rx = re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE)
    return sum(1 for r in responses if rx.search(r)) / len(responses)


def repetition_rate(token_ids: Sequence[Sequence[int]], n: int = 3) -> float:
    """Mean over responses of the share of their n-grams that repeat an earlier n-gram of the
    same response (responses shorter than n+1 tokens count 0)."""
    if not token_ids:
        return 0.0
    total = 0.0
    for ids in token_ids:
        grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
        if len(grams) > 1:
            total += 1.0 - len(set(grams)) / len(grams)
    return total / len(token_ids)


def pair_agreement(
    proxy_a: Sequence[float], proxy_b: Sequence[float], judge_a: Sequence[float], judge_b: Sequence[float]
) -> tuple[float, int]:
    """(agreement, pairs): the share of pairs (a_i, b_i) that the proxy and the judge order the
    same way, over the pairs that both order strictly (ties are left out); (nan, 0) if none."""
    agree = n = 0
    for pa, pb, ja, jb in zip(proxy_a, proxy_b, judge_a, judge_b):
        if pa == pb or ja == jb:
            continue
        n += 1
        agree += (pa > pb) == (ja > jb)
    return (agree / n if n else float("nan")), n


def member_agreement(scores_a: torch.Tensor, scores_b: torch.Tensor) -> tuple[float, int]:
    """(agreement, pairs) among a reward ensemble's members on pairs (a_i, b_i): the mean, over
    every two members, of `pair_agreement` with one member as the proxy and the other as the
    judge, and the number of pairs the first two members both order strictly. scores_a, scores_b:
    (K, N) member scores of the first and second answer of each pair, K >= 2; (nan, 0) when no
    two members order a common pair."""
    k = scores_a.shape[0]
    if k < 2:
        raise ValueError(f"member_agreement needs >= 2 members, got {k}")
    a, b = scores_a.tolist(), scores_b.tolist()
    values, counted = [], 0
    for i in range(k):
        for j in range(i + 1, k):
            agree, n = pair_agreement(a[i], b[i], a[j], b[j])
            if n:
                values.append(agree)
            if (i, j) == (0, 1):
                counted = n
    return (sum(values) / len(values) if values else float("nan")), counted


def surprising_tokens(ref_logprobs: torch.Tensor, mask: torch.Tensor, min_prob: float = 0.01) -> torch.Tensor:
    """(B, T) bool: the real tokens (mask) to which the reference gives probability below `min_prob`
    (ref_logprobs: (B, T) its log-probabilities of the sampled response tokens)."""
    return (ref_logprobs.float() < math.log(min_prob)) & mask.bool()


def reference_surprise(ref_logprobs: torch.Tensor, mask: torch.Tensor, min_prob: float = 0.01) -> dict[str, float]:
    """How often the policy writes what the reference model would almost never write.
    ref_logprobs: (B, T) the reference's log-probabilities of the sampled response tokens; mask:
    (B, T) real tokens. `monitor/ref_surprise`: share of responses with at least one token the
    reference gives probability below `min_prob`; `monitor/ref_surprise_tokens`: share of tokens."""
    m = mask.bool()
    low = surprising_tokens(ref_logprobs, m, min_prob)
    rows = m.any(-1)
    return {
        "monitor/ref_surprise": float(low.any(-1)[rows].float().mean()) if bool(rows.any()) else 0.0,
        "monitor/ref_surprise_tokens": float(low.sum() / m.sum().clamp(min=1)),
    }


def rollout_stats(
    scores: torch.Tensor,
    lengths: torch.Tensor,
    responses: Sequence[str],
    token_ids: Sequence[Sequence[int]],
    member_scores: torch.Tensor | None = None,
    patterns: Sequence[str] = REFUSAL,
) -> dict[str, float]:
    """The per-batch monitor statistics, as `monitor/...` metrics.

    scores: (B,) the reward the policy optimises; lengths: (B,) response tokens;
    member_scores: (K, B) normalised scores of an ensemble's members, or None.
    """
    slope, corr = length_fit(scores, lengths)
    row = {
        "monitor/length_slope": slope,
        "monitor/length_corr": corr,
        "monitor/refusal_rate": refusal_rate(responses, patterns),
        "monitor/repetition_rate": repetition_rate(token_ids),
    }
    if member_scores is not None and member_scores.shape[0] > 1:
        row["monitor/disagreement"] = disagreement(member_scores)
    return row


# ------------------------------------------------------------------------------- alarm rule
class Monitor:
    """Keeps the history of the statistics and applies the alarm rules of a MonitorConfig.

    `update(iteration, row)` reads `kl`, `entropy` and the `monitor/...` keys of the metrics row
    (any may be missing: its rules are skipped), and returns the names of the rules that fire.
    `first_alarm` is the first iteration at which any rule fired (None so far).
    """

    def __init__(self, cfg: MonitorConfig):
        self.cfg = cfg
        self.history: list[dict[str, float]] = []
        self.streak: dict[str, int] = {}
        self.first_alarm: int | None = None

    def _baseline(self, key: str) -> float | None:
        vals = [r[key] for r in self.history[: self.cfg.warmup] if key in r and math.isfinite(r[key])]
        return sum(vals) / len(vals) if vals else None

    def conditions(self, row: dict[str, float]) -> dict[str, bool]:
        """Each rule's condition on this row (before patience), for the rules whose inputs exist."""
        c, out = self.cfg, {}
        kls = [r["kl"] for r in self.history[-c.window:] if "kl" in r]
        if len(kls) >= 2:
            out["kl_growth"] = growth_rate(kls) > c.kl_growth_max
        if "monitor/length_corr" in row:
            out["length_corr"] = row["monitor/length_corr"] > c.length_corr_max
        base = self._baseline("monitor/disagreement")
        if base is not None and "monitor/disagreement" in row:
            out["disagreement"] = row["monitor/disagreement"] > c.disagreement_ratio_max * max(base, 1e-8)
        base = self._baseline("entropy")
        if base is not None and "entropy" in row:
            out["entropy"] = row["entropy"] < c.entropy_ratio_min * base
        for key, rise in (("refusal_rate", c.refusal_rise_max), ("repetition_rate", c.repetition_rise_max)):
            base = self._baseline(f"monitor/{key}")
            if base is not None and f"monitor/{key}" in row:
                out[key] = row[f"monitor/{key}"] > base + rise
        recent = self.history[-c.window:]
        pooled = [(r["monitor/judge_agreement"], r.get("monitor/judge_pairs", 1.0)) for r in recent
                  if math.isfinite(r.get("monitor/judge_agreement", math.nan))]
        if "monitor/judge_agreement" in row and sum(n for _, n in pooled) > 0:
            out["judge_agreement"] = sum(a * n for a, n in pooled) / sum(n for _, n in pooled) < c.judge_agreement_min
        for key, name, limit, sign in (("monitor/judge_score", "judge_drop", c.judge_drop_max, -1.0),
                                       ("monitor/proxy_gap", "proxy_gap", c.proxy_gap_rise_max, 1.0),
                                       ("monitor/ref_surprise", "ref_surprise", c.ref_surprise_rise_max, 1.0)):
            base = self._baseline(key)
            vals = [r[key] for r in recent if key in r]
            if base is not None and key in row:
                out[name] = sign * (sum(vals) / len(vals) - base) > limit
        return out

    def update(self, iteration: int, row: dict[str, float]) -> list[str]:
        """Record `row` (iteration's metrics) and return the rules that fire at this iteration."""
        self.history.append(dict(row))
        if len(self.history) <= self.cfg.warmup:
            return []
        fired = []
        for name, holds in self.conditions(row).items():
            self.streak[name] = self.streak.get(name, 0) + 1 if holds else 0
            if self.streak[name] >= self.cfg.patience:
                fired.append(name)
        if fired and self.first_alarm is None:
            self.first_alarm = iteration
        return sorted(fired)


def observe_rollout(
    mon: Monitor, iteration: int, row: dict, scores: torch.Tensor, response_ids: torch.Tensor,
    response_mask: torch.Tensor, responses: Sequence[str], member_scores: torch.Tensor | None = None,
) -> list[str]:
    """Add this iteration's monitor statistics to the metrics `row`, apply the alarm rule, and
    warn on the console when rules fire. response_ids / response_mask: (B, T). Returns the rules
    that fired (row["monitor/alarm"] counts them; row["monitor/alarm/RULE"] is 1.0 for each)."""
    mask = response_mask.bool()
    tokens = [ids[m].tolist() for ids, m in zip(response_ids, mask)]
    row.update(rollout_stats(scores, mask.sum(-1).float(), responses, tokens, member_scores,
                             mon.cfg.refusal_patterns))
    fired = mon.update(iteration, row)
    row["monitor/alarm"] = float(len(fired))
    row.update({f"monitor/alarm/{name}": 1.0 for name in fired})  # which rules: a false alarm can be traced
    if fired:
        from alignkit.console import warn

        warn(f"reward-hacking monitor, iteration {iteration}: {', '.join(fired)} "
             "(docs/ppo.md, Reward-hacking monitors)")
    return fired
