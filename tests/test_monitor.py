"""Reward-hacking monitor statistics against numbers worked by hand, and the alarm rule on
synthetic curves (fires on a runaway run, stays quiet on a steady one)."""

import math

import pytest
import torch

from alignkit.eval.monitor import (
    Monitor,
    MonitorConfig,
    disagreement,
    growth_rate,
    length_fit,
    member_agreement,
    pair_agreement,
    reference_surprise,
    refusal_rate,
    repetition_rate,
    rollout_stats,
)


def test_disagreement_is_the_mean_population_std_over_members():
    """Members [0, 2] on row 0 (std 1) and [1, 1] on row 1 (std 0): mean 0.5."""
    scores = torch.tensor([[0.0, 1.0], [2.0, 1.0]])  # (K=2, B=2)
    assert disagreement(scores) == pytest.approx(0.5)
    assert disagreement(scores[:1]) == 0.0


def test_length_fit_by_hand():
    """lengths 1, 2, 3 and rewards 1, 3, 5: slope 2, correlation 1. Rewards 2, 1, 3: cov
    (-1)(0) + 0(-1) + 1(1) = 1, var_n = 2, var_r = 2: slope 0.5, correlation 0.5."""
    assert length_fit([1, 3, 5], [1, 2, 3]) == pytest.approx((2.0, 1.0))
    assert length_fit([2, 1, 3], [1, 2, 3]) == pytest.approx((0.5, 0.5))
    assert length_fit([5, 5, 5], [1, 2, 3]) == (0.0, 0.0)
    slope, corr = length_fit([3, 1], [1, 2])
    assert slope == pytest.approx(-2.0) and corr == pytest.approx(-1.0)


def test_growth_rate_is_the_least_squares_slope():
    """0, 1, 4: x = -1, 0, 1 around the middle; slope = (-1*(0-5/3) + 1*(4-5/3)) / 2 = 2."""
    assert growth_rate([0.0, 1.0, 4.0]) == pytest.approx(2.0)
    assert growth_rate([3.0]) == 0.0
    assert growth_rate([1.0, 1.5, 2.0, 2.5]) == pytest.approx(0.5)


def test_refusal_and_repetition_rates():
    responses = ["Sorry, I can't help with that.", "The answer is 5.", "I'm sorry, I won't do that", "ok"]
    assert refusal_rate(responses) == pytest.approx(0.5)
    # [1,2,3,1,2,3]: trigrams 123 231 312 123 -> 3 unique of 4, rate 0.25; [7,8,9,10]: 0; [1]: 0
    assert repetition_rate([[1, 2, 3, 1, 2, 3], [7, 8, 9, 10], [1]]) == pytest.approx(0.25 / 3)


def test_pair_agreement_leaves_out_ties():
    """Pairs: (proxy a>b, judge a>b) agree; (a<b, a>b) disagree; judge tie left out; proxy tie
    left out; (a<b, a<b) agree: 2 of 3."""
    agree, n = pair_agreement([2, 0, 1, 1, 0], [1, 1, 0, 1, 3], [5, 5, 1, 0, 1], [4, 4, 1, 1, 2])
    assert n == 3 and agree == pytest.approx(2 / 3)
    assert math.isnan(pair_agreement([1], [1], [0], [1])[0])


def test_reference_surprise_by_hand():
    """Row 1: probabilities 0.5, 0.005 (below 1%) and padding; row 2: 0.9, 0.2 and a masked 0.001
    (padding never counts); row 3: empty. Responses with a surprise: 1 of the 2 non-empty ones;
    tokens: 1 of 4."""
    logp = torch.log(torch.tensor([[0.5, 0.005, 1.0], [0.9, 0.2, 0.001], [1.0, 1.0, 1.0]]))
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 0]])
    out = reference_surprise(logp, mask)
    assert out["monitor/ref_surprise"] == pytest.approx(0.5)
    assert out["monitor/ref_surprise_tokens"] == pytest.approx(0.25)
    assert reference_surprise(logp, mask, min_prob=0.001)["monitor/ref_surprise"] == 0.0


def test_rollout_stats_keys():
    row = rollout_stats(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, 3.0]), ["a", "b", "c"],
                        [[1], [2], [3]], member_scores=torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]))
    assert row["monitor/length_corr"] == pytest.approx(1.0) and row["monitor/disagreement"] == pytest.approx(0.5)
    assert "monitor/disagreement" not in rollout_stats(torch.ones(3), torch.ones(3), ["a"] * 3, [[1]] * 3)


def _run(rows, cfg=None):
    mon = Monitor(cfg or MonitorConfig())
    fired = [mon.update(i + 1, r) for i, r in enumerate(rows)]
    return mon, fired


def test_alarm_fires_on_a_runaway_curve_after_patience():
    """KL flat at 0.2 for 5 iterations, then growing by 1 nat per iteration: the least-squares
    slope over the last 5 KLs passes 0.5 at iteration 7 (0.2,0.2,0.2,1.2,2.2 -> 0.5 is not >0.5;
    at iteration 8 the window 0.2,0.2,1.2,2.2,3.2 has slope 0.8) and patience 2 makes it fire at 9."""
    kls = [0.2] * 5 + [1.2, 2.2, 3.2, 4.2, 5.2]
    mon, fired = _run([{"kl": k, "entropy": 1.0} for k in kls], MonitorConfig(kl_growth_max=0.5, window=5))
    assert mon.first_alarm == 9 and fired[8] == ["kl_growth"]
    assert all(f == [] for f in fired[:8])
    # the defaults (limit 0.12, window 8): at iteration 6 the six KLs so far, 0.2 x 5 then 1.2, have
    # slope sum((x - 2.5) y) / sum((x - 2.5)^2) = 2.5 / 17.5 = 0.143; at 7 (0.2 x 5, 1.2, 2.2) 8 / 28
    # = 0.286: two in a row
    mon, fired = _run([{"kl": k, "entropy": 1.0} for k in kls])
    assert mon.first_alarm == 7 and fired[6] == ["kl_growth"]


def test_alarm_stays_quiet_on_a_steady_run():
    rows = [{"kl": 0.03 * i, "entropy": 1.0 - 0.01 * i, "monitor/length_corr": 0.2,
             "monitor/disagreement": 0.3, "monitor/refusal_rate": 0.1, "monitor/repetition_rate": 0.05}
            for i in range(40)]
    mon, fired = _run(rows)
    assert mon.first_alarm is None and not any(fired)


@pytest.mark.parametrize("key, bad, rule", [
    ("monitor/disagreement", 0.7, "disagreement"),       # > 2 x baseline 0.3
    ("entropy", 0.2, "entropy"),                          # < 0.3 x baseline 1.0
    ("monitor/refusal_rate", 0.45, "refusal_rate"),       # > baseline 0.1 + 0.3
    ("monitor/length_corr", 0.9, "length_corr"),          # > 0.8
])
def test_each_rule_fires_alone_after_warmup_and_patience(key, bad, rule):
    base = {"kl": 0.1, "entropy": 1.0, "monitor/length_corr": 0.2, "monitor/disagreement": 0.3,
            "monitor/refusal_rate": 0.1, "monitor/judge_agreement": 0.8}
    rows = [dict(base) for _ in range(4)] + [dict(base, **{key: bad}) for _ in range(3)]
    mon, fired = _run(rows)
    assert fired[4] == [] and fired[5] == [rule] and mon.first_alarm == 6
    # a single bad iteration between good ones never fires (patience 2)
    rows = [dict(base) for _ in range(4)] + [dict(base, **{key: bad}), dict(base), dict(base, **{key: bad})]
    assert _run(rows)[0].first_alarm is None


def test_judge_agreement_is_pooled_over_the_window_by_pairs():
    """window 5, min 0.55: four iterations at 0.8 (10 pairs each), then 0.2. Pooled over the last 5:
    it. 5: (4*8 + 2) / 50 = 0.68; it. 6: (3*8 + 2*2) / 50 = 0.56; it. 7: (2*8 + 3*2) / 50 = 0.44;
    it. 8: (8 + 4*2) / 50 = 0.32. Holding at 7 and 8: fires at 8 (patience 2)."""
    cfg = MonitorConfig(window=5, judge_agreement_min=0.55)
    rows = [{"monitor/judge_agreement": 0.8, "monitor/judge_pairs": 10.0}] * 4 + \
        [{"monitor/judge_agreement": 0.2, "monitor/judge_pairs": 10.0}] * 4
    mon, fired = _run(rows, cfg)
    assert mon.first_alarm == 8 and fired[7] == ["judge_agreement"] and not any(fired[:7])
    # weighted by pairs: 0.9 on 2 pairs and 0.5 on 18 pool to (1.8 + 9) / 20 = 0.54 < 0.55; unweighted 0.7
    rows = [{"monitor/judge_agreement": 0.9, "monitor/judge_pairs": 2.0},
            {"monitor/judge_agreement": 0.5, "monitor/judge_pairs": 18.0}] * 4
    mon = Monitor(MonitorConfig(window=2, warmup=0, judge_agreement_min=0.55))
    for i, r in enumerate(rows[:2], 1):
        mon.update(i, r)
    assert mon.conditions(rows[1])["judge_agreement"] is True
    mon = Monitor(MonitorConfig(window=2, warmup=0, judge_agreement_min=0.53))
    for i, r in enumerate(rows[:2], 1):
        mon.update(i, r)
    assert mon.conditions(rows[1])["judge_agreement"] is False


def test_judge_drop_and_proxy_gap_rules_by_hand():
    """warmup 3 (baselines: judge score 0.1, gap 0.0), window 3. The judge's score then falls by
    0.2 an iteration (-0.1, -0.3, -0.5, ...) while the proxy gains as much (gap 0.2, 0.4, ...).
    Window means at it. 4: judge (0.1 + 0.1 - 0.1) / 3 = 0.033 (drop 0.067), gap 0.067;
    it. 5: judge -0.1 (drop 0.2), gap 0.2; it. 6: judge -0.3 (drop 0.4), gap 0.4;
    it. 7: judge -0.5 (drop 0.6), gap 0.6. Limits 0.3 and 0.5: judge_drop holds from it. 6
    and fires at 7; proxy_gap holds from it. 7 and fires at 8."""
    cfg = MonitorConfig(warmup=3, window=3, patience=2, judge_drop_max=0.3, proxy_gap_rise_max=0.5)
    judge = [0.1, 0.1, 0.1, -0.1, -0.3, -0.5, -0.7, -0.9]
    gap = [0.0, 0.0, 0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    rows = [{"monitor/judge_score": j, "monitor/proxy_gap": g} for j, g in zip(judge, gap)]
    mon, fired = _run(rows, cfg)
    assert not any(fired[:6]) and fired[6] == ["judge_drop"] and fired[7] == ["judge_drop", "proxy_gap"]
    assert mon.first_alarm == 7
    # a judge that likes the policy more than at the start never fires judge_drop
    rows = [{"monitor/judge_score": 0.1 * i, "monitor/proxy_gap": 0.0} for i in range(12)]
    assert _run(rows, cfg)[0].first_alarm is None


def test_nothing_fires_during_warmup():
    rows = [{"kl": 10.0 * i, "monitor/length_corr": 0.99} for i in range(3)]
    assert _run(rows)[0].first_alarm is None


def test_member_agreement_by_hand():
    """Three members on three pairs. Members 0 and 1 order every pair alike (1.0); member 2
    reverses pair 0 and ties pair 2: 0 vs 2 and 1 vs 2 agree on 1 of the 2 pairs both order
    (0.5 each). Mean over the three member pairs: (1 + 0.5 + 0.5) / 3."""
    a = torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, 1.0], [0.0, 0.0, 1.0]])  # (K=3, N=3) first answers
    b = torch.tensor([[0.0, 1.0, 1.0], [1.0, 2.0, 0.0], [1.0, 1.0, 1.0]])  # second answers
    agree, n = member_agreement(a, b)
    assert agree == pytest.approx(2 / 3) and n == 3
    with pytest.raises(ValueError, match="2 members"):
        member_agreement(a[:1], b[:1])
    assert math.isnan(member_agreement(torch.ones(2, 2), torch.ones(2, 2))[0])


@pytest.fixture(scope="module")
def tiny_policy():
    from alignkit.models.bpe import train_bpe_tokenizer
    from alignkit.models.load import tiny_llama

    tok = train_bpe_tokenizer(["Human: What is 2 plus 3?\nAssistant: five . four six seven"] * 20, vocab_size=300)
    return tiny_llama("nano", tokenizer=tok, seed=0).eval(), tok


class _TextReward:
    """A reward source over texts: `fn(response)` per row (the ids are ignored); members optional."""

    def __init__(self, fn, members=None):
        self.fn, self.members = fn, members

    def __call__(self, prompts, responses, input_ids, attention_mask):
        s = torch.tensor([float(self.fn(r)) for r in responses])
        if self.members is not None:
            self.last_member_scores = torch.stack([f(s) for f in self.members])
        return s, s


def test_fresh_pair_agreement_against_a_judge_and_among_members(tiny_policy):
    """Two fresh samples per prompt from a tiny random policy; the proxy scores a response by its
    length. A judge that also scores length agrees on every strictly ordered pair (1.0), one that
    scores minus the length on none (0.0); members (length, length) agree fully, members (length,
    -length) never; a single model without a judge gives None."""
    from alignkit.train.rollout import RolloutConfig, fresh_pair_agreement

    model, tok = tiny_policy
    ids = [tok("Human: What is 2 plus 3?\nAssistant:")["input_ids"], tok("Human: Hi there\nAssistant:")["input_ids"]]
    cfg = RolloutConfig(max_new_tokens=8, temperature=1.0)
    seeds = list(range(2 * len(ids)))
    args = (model, tok, ids, ["p0", "p1"])
    up, down = _TextReward(len), _TextReward(lambda r: -len(r))
    agree, n = fresh_pair_agreement(*args, up, up, cfg, seeds)
    assert n > 0 and agree == 1.0
    assert fresh_pair_agreement(*args, up, down, cfg, seeds) == (0.0, n)
    same = _TextReward(len, members=[lambda s: s, lambda s: 2 * s])
    assert fresh_pair_agreement(*args, same, None, cfg, seeds) == (1.0, n)
    opposite = _TextReward(len, members=[lambda s: s, lambda s: -s])
    assert fresh_pair_agreement(*args, opposite, None, cfg, seeds) == (0.0, n)
    assert fresh_pair_agreement(*args, up, None, cfg, seeds) is None
