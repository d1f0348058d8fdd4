"""Hand-checked tests for the shared RL pieces: advantages, KL, PPO/GRPO losses."""

import math

import pytest
import torch

from alignkit.losses.advantages import (
    explained_variance,
    gae,
    group_advantages,
    masked_mean,
    masked_var,
    masked_whiten,
    rloo_advantages,
    whiten,
)
from alignkit.losses.kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    get_kl_estimator,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_penalized_rewards,
)
from alignkit.losses.policy import (
    aggregate_loss,
    entropy_from_logits,
    grpo_loss,
    ppo_policy_loss,
    ppo_value_loss,
)

LOG_HALF = math.log(0.5)
LOG_QUARTER = math.log(0.25)
K3_HALF_QUARTER = 0.5 - 1.0 + math.log(2.0)  # k3 with logp = log .5, ref_logp = log .25


def right_padded_mask(lengths, T):
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]


def fill_padding(x, mask, values=(float("nan"), float("inf"), -1e4, 1e4)):
    """Copy of ``x`` with the padded positions replaced by garbage."""
    garbage = torch.tensor(values, dtype=x.dtype).repeat(x.numel() // len(values) + 1)[: x.numel()]
    return torch.where(mask, x, garbage.view_as(x))


# ----------------------------------------------------------------------------- masked stats


def test_masked_mean_and_var_ignore_padding():
    x = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, 99.0, 99.0, 99.0]])
    mask = right_padded_mask([3, 1], 4)
    x = fill_padding(x, mask)
    assert masked_mean(x, mask).item() == pytest.approx(2.5)
    torch.testing.assert_close(masked_mean(x, mask, dim=-1), torch.tensor([2.0, 4.0]))
    # values 1,2,3,4: mean 2.5, squared deviations sum to 5
    assert masked_var(x, mask, unbiased=True).item() == pytest.approx(5 / 3)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(5 / 4)
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0


def test_masked_whiten_mean0_var1_over_valid_entries_only():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 9, generator=g) * 3 + 5
    mask = right_padded_mask([9, 7, 5, 3, 1, 8], 9)
    w = masked_whiten(fill_padding(x, mask), mask)
    assert torch.isfinite(w).all()
    assert masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-5)
    assert masked_var(w, mask).item() == pytest.approx(1.0, abs=1e-5)
    assert (w[~mask] == 0).all()
    # the same as whitening the flat vector of valid entries
    torch.testing.assert_close(w[mask], whiten(x[mask]))
    # shift_mean=False keeps the mean, rescales only
    w2 = masked_whiten(x, mask, shift_mean=False)
    assert masked_mean(w2, mask).item() == pytest.approx(masked_mean(x, mask).item(), rel=1e-5)
    assert masked_var(w2, mask).item() == pytest.approx(1.0, abs=1e-5)


# ----------------------------------------------------------------------------- GAE


def test_gae_hand_worked_three_tokens():
    """gamma = 0.9, lam = 0.8, rewards (0, 0, 1), values (0.5, 0.6, 0.7); V after the end = 0.

    delta_2 = 1 + 0.9 * 0   - 0.7 = 0.3
    delta_1 = 0 + 0.9 * 0.7 - 0.6 = 0.03
    delta_0 = 0 + 0.9 * 0.6 - 0.5 = 0.04
    gamma * lam = 0.72
    A_2 = 0.3
    A_1 = 0.03 + 0.72 * 0.3   = 0.246
    A_0 = 0.04 + 0.72 * 0.246 = 0.21712
    returns = A + V = (0.71712, 0.846, 1.0)

    The same row right-padded to 5 tokens with garbage gives the same numbers and zeros after.
    """
    rewards = torch.tensor([[0.0, 0.0, 1.0, 7.0, 7.0]])
    values = torch.tensor([[0.5, 0.6, 0.7, 3.0, 3.0]])
    mask = right_padded_mask([3], 5)
    adv, ret = gae(fill_padding(rewards, mask), fill_padding(values, mask), mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, torch.tensor([[0.21712, 0.246, 0.3, 0.0, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.71712, 0.846, 1.0, 0.0, 0.0]]))


def naive_gae(rewards, values, lengths, gamma, lam):
    """Direct sum A_t = sum_l (gamma lam)^l delta_{t+l}, one row at a time, plain floats."""
    B, T = len(rewards), len(rewards[0])
    adv = [[0.0] * T for _ in range(B)]
    for b in range(B):
        n = lengths[b]
        v = [values[b][t] for t in range(n)] + [0.0]
        deltas = [rewards[b][t] + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            adv[b][t] = sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t))
    ret = [[adv[b][t] + (values[b][t] if t < lengths[b] else 0.0) for t in range(T)] for b in range(B)]
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0), (1.0, 0.0)])
def test_gae_matches_naive_loop_on_random_right_padded_batches(gamma, lam):
    g = torch.Generator().manual_seed(1)
    B, T = 5, 11
    lengths = [11, 6, 1, 9, 3]
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = right_padded_mask(lengths, T)
    adv, ret = gae(fill_padding(rewards, mask), fill_padding(values, mask), mask, gamma, lam)
    ref_adv, ref_ret = naive_gae(rewards.tolist(), values.tolist(), lengths, gamma, lam)
    torch.testing.assert_close(adv, torch.tensor(ref_adv, dtype=torch.float64))
    torch.testing.assert_close(ret, torch.tensor(ref_ret, dtype=torch.float64))


def test_gae_left_padding_equals_right_padding():
    g = torch.Generator().manual_seed(2)
    r, v = torch.randn(1, 4, generator=g), torch.randn(1, 4, generator=g)
    right_mask = right_padded_mask([4], 6)
    left_mask = right_mask.flip(-1)
    pad = torch.zeros(1, 2)
    adv_r, _ = gae(torch.cat([r, pad], 1), torch.cat([v, pad], 1), right_mask, 0.9, 0.8)
    adv_l, _ = gae(torch.cat([pad + 5, r], 1), torch.cat([pad + 5, v], 1), left_mask, 0.9, 0.8)
    torch.testing.assert_close(adv_r[:, :4], adv_l[:, 2:])
    assert (adv_l[:, :2] == 0).all()


# ----------------------------------------------------------------------------- group baselines


def test_group_advantages_by_hand():
    """Group 1: rewards (1, 0, 0, 1), mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = sqrt(1/3),
    so A = +-0.5 * sqrt(3) = +-0.8660. Group 2: all equal, A = 0 (0 / eps)."""
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    a = group_advantages(rewards, group_size=4)
    s = 0.5 * math.sqrt(3)
    torch.testing.assert_close(a, torch.tensor([s, -s, -s, s, 0, 0, 0, 0]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(group_advantages(rewards.view(2, 4), group_size=4), a)
    a_nostd = group_advantages(rewards, group_size=4, normalize_std=False)
    torch.testing.assert_close(a_nostd, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    with pytest.raises(ValueError):
        group_advantages(torch.ones(7), group_size=4)
    with pytest.raises(ValueError):
        group_advantages(torch.ones(4), group_size=1)


def test_rloo_advantages_by_hand():
    """Rewards (1, 2, 3, 6): leave-one-out means 11/3, 10/3, 3, 2
    -> A = (1 - 11/3, 2 - 10/3, 3 - 3, 6 - 2) = (-8/3, -4/3, 0, 4)."""
    a = rloo_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0]), group_size=4)
    torch.testing.assert_close(a, torch.tensor([-8 / 3, -4 / 3, 0.0, 4.0, 0, 0, 0, 0]))
    # equals G/(G-1) * (r - group mean)
    r = torch.randn(3, 5, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(
        rloo_advantages(r, 5), (5 / 4 * (r - r.mean(1, keepdim=True))).reshape(-1), atol=1e-6, rtol=1e-6
    )


def test_explained_variance_by_hand():
    """returns (1, 2, 3, 4): unbiased var 5/3. values = returns + (1, -1, 1, -1): residual var 4/3
    -> EV = 1 - (4/3) / (5/3) = 0.2. Perfect values -> 1; constant values -> 0."""
    mask = right_padded_mask([4], 6)
    returns = fill_padding(torch.tensor([[1.0, 2.0, 3.0, 4.0, 0.0, 0.0]]), mask)
    values = torch.tensor([[2.0, 1.0, 4.0, 3.0, 0.0, 0.0]])
    assert explained_variance(fill_padding(values, mask), returns, mask).item() == pytest.approx(0.2)
    assert explained_variance(returns.clone(), returns, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.full_like(values, 2.5), returns, mask).item() == pytest.approx(0.0)
    assert math.isnan(explained_variance(values, torch.ones_like(values), mask).item())


# ----------------------------------------------------------------------------- KL


def test_kl_estimators_by_hand():
    """logp = log 0.5, ref_logp = log 0.25, so log r = ref - logp = -log 2, r = 0.5:
    k1 = log 2 = 0.6931, k2 = 0.5 (log 2)^2 = 0.2402, k3 = (0.5 - 1) + log 2 = 0.1931."""
    logp, ref = torch.tensor([LOG_HALF]), torch.tensor([LOG_QUARTER])
    assert kl_k1(logp, ref).item() == pytest.approx(math.log(2))
    assert kl_k2(logp, ref).item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert kl_k3(logp, ref).item() == pytest.approx(K3_HALF_QUARTER)
    assert get_kl_estimator("k3") is kl_k3
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3"}
    with pytest.raises(ValueError, match="k1"):
        get_kl_estimator("k4")


def test_k3_nonnegative_and_zero_at_equality():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(1000, generator=g) * 5, torch.randn(1000, generator=g) * 5
    assert (kl_k3(a, b) >= 0).all()
    assert (kl_k2(a, b) >= 0).all()
    assert (kl_k3(a, a) == 0).all()


def test_k1_and_k3_unbiased_on_gaussians():
    """x ~ pi = N(0, 1), pi_ref = N(0.5, 1): KL(pi || pi_ref) = 0.5^2 / 2 = 0.125."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(400_000, generator=g, dtype=torch.float64)
    pi, ref = torch.distributions.Normal(0.0, 1.0), torch.distributions.Normal(0.5, 1.0)
    logp, ref_logp = pi.log_prob(x), ref.log_prob(x)
    assert kl_k1(logp, ref_logp).mean().item() == pytest.approx(0.125, abs=3e-3)
    assert kl_k3(logp, ref_logp).mean().item() == pytest.approx(0.125, abs=3e-3)
    assert kl_k3(logp, ref_logp).std() < kl_k1(logp, ref_logp).std()


def test_kl_penalized_rewards_places_score_on_last_valid_token():
    """Row 0 has 3 tokens, row 1 has 1 token, row 2 none. With k1 and logp - ref = log 2 on
    every token, each valid token gets -beta log 2 and the last one also gets the score."""
    mask = right_padded_mask([3, 1, 0], 4)
    logp = fill_padding(torch.full((3, 4), LOG_HALF), mask)
    ref = fill_padding(torch.full((3, 4), LOG_QUARTER), mask)
    score = torch.tensor([2.0, -1.0, 5.0])
    beta = 0.1
    rewards, kl = kl_penalized_rewards(score, logp, ref, mask, beta=beta, estimator="k1")
    p = -beta * math.log(2)
    torch.testing.assert_close(
        rewards, torch.tensor([[p, p, p + 2.0, 0.0], [p - 1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    )
    torch.testing.assert_close(kl, mask.float() * math.log(2))
    # left padding: the score still goes to the last valid token
    rewards_l, _ = kl_penalized_rewards(score, logp.flip(-1), ref.flip(-1), mask.flip(-1), beta=beta)
    assert rewards_l[0, 3].item() == pytest.approx(p + 2.0)
    # k3 estimator by name
    _, kl3 = kl_penalized_rewards(score, logp, ref, mask, beta=beta, estimator="k3")
    torch.testing.assert_close(kl3, mask.float() * K3_HALF_QUARTER)


def test_adaptive_kl_controller_hand_updates_and_resume():
    """init 0.1, target 6, horizon 10000, batches of 256 rollouts:
    KL 9   -> e = clip(0.5, +-0.2) = 0.2 -> beta = 0.1 * (1 + 0.2 * 256/10000) = 0.100512
    KL 6.6 -> e = 0.1                    -> beta = 0.100512 * 1.00256 = 0.10076931...
    KL 0 with n = 10000 -> e = -0.2      -> beta *= 0.8."""
    c = AdaptiveKLController(init_beta=0.1, target=6.0, horizon=10000)
    assert c.update(9.0, 256) == pytest.approx(0.100512)
    assert c.update(6.6, 256) == pytest.approx(0.100512 * 1.00256)
    before = c.beta
    assert c.update(0.0, 10000) == pytest.approx(before * 0.8)
    assert c.update(6.0, 256) == pytest.approx(before * 0.8)  # on target: unchanged
    resumed = AdaptiveKLController(init_beta=1.0, target=1.0, horizon=1)
    resumed.load_state_dict(c.state_dict())
    assert resumed.update(7.0, 512) == c.update(7.0, 512)
    fixed = FixedKLController(0.05)
    assert fixed.update(100.0, 256) == 0.05
    f2 = FixedKLController(1.0)
    f2.load_state_dict(fixed.state_dict())
    assert f2.beta == 0.05


# ----------------------------------------------------------------------------- PPO


def test_ppo_policy_loss_by_hand():
    """clip_eps = 0.2; per token (ratio, A) -> loss = max(-A r, -A clip(r)):
      (1.5, +1): max(-1.5, -1.2) = -1.2  clipped (no gradient)
      (1.5, -1): max( 1.5,  1.2) =  1.5  unclipped
      (0.5, +1): max(-0.5, -0.8) = -0.5  unclipped
      (0.5, -1): max( 0.5,  0.8) =  0.8  clipped (no gradient)
      (1.1, +2): max(-2.2, -2.2) = -2.2  inside the range
    loss = (-1.2 + 1.5 - 0.5 + 0.8 - 2.2) / 5 = -0.32, clipfrac = 2/5.
    d loss / d logp_t = -A_t r_t / 5 where unclipped: (0, 0.3, -0.1, 0, -0.44).
    A sixth, padded token holds garbage and must not matter."""
    ratios = torch.tensor([[1.5, 1.5, 0.5, 0.5, 1.1, 1.0]])
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0, 2.0, 0.0]])
    mask = right_padded_mask([5], 6)
    old = torch.full((1, 6), -1.0)
    logp = (old + ratios.log()).requires_grad_()
    loss, stats = ppo_policy_loss(
        fill_padding(logp, mask, (float("nan"),)), old, fill_padding(adv, mask, (1e9,)), mask, clip_eps=0.2
    )
    assert loss.item() == pytest.approx(-0.32)
    assert stats.clipfrac.item() == pytest.approx(0.4)
    assert stats.ratio_mean.item() == pytest.approx((1.5 + 1.5 + 0.5 + 0.5 + 1.1) / 5)
    r = [1.5, 1.5, 0.5, 0.5, 1.1]
    assert stats.approx_kl.item() == pytest.approx(sum(x - 1 - math.log(x) for x in r) / 5, rel=1e-5)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.3, -0.1, 0.0, -0.44, 0.0]]))


def test_ppo_policy_loss_ratio_one_is_policy_gradient():
    """At ratio 1 nothing is clipped and the gradient is -A / n_tokens (REINFORCE)."""
    mask = right_padded_mask([3, 2], 3)
    adv = torch.tensor([1.0, -2.0])  # one per sequence, (B,)
    logp = torch.zeros(2, 3, requires_grad=True)
    loss, stats = ppo_policy_loss(logp, logp.detach(), adv, mask)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.0, -1.0, -1.0], [2.0, 2.0, 0.0]]) / 5)
    assert stats.clipfrac.item() == 0 and stats.approx_kl.item() == 0 and stats.ratio_mean.item() == 1


def test_ppo_clip_higher_is_asymmetric():
    """ratio 1.25, A = +1: clipped at 1.2 with clip_eps 0.2, not with clip_eps_high 0.28."""
    mask = torch.ones(1, 1, dtype=torch.bool)
    logp, old, adv = torch.tensor([[math.log(1.25)]]), torch.zeros(1, 1), torch.ones(1, 1)
    loss, stats = ppo_policy_loss(logp, old, adv, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(-1.2) and stats.clipfrac.item() == 1
    loss, stats = ppo_policy_loss(logp, old, adv, mask, clip_eps=0.2, clip_eps_high=0.28)
    assert loss.item() == pytest.approx(-1.25) and stats.clipfrac.item() == 0


def test_ppo_value_loss_by_hand():
    """old V = 0, return = 1, clip 0.2:
      V =  0.1: inside,  errors 0.81 / 0.81           -> 0.81, not clipped
      V =  0.5: V_clip = 0.2, errors 0.25 / 0.64      -> 0.64, clipped (no gradient)
      V = -0.5: V_clip = -0.2, errors 2.25 / 1.44     -> 2.25, unclipped
    loss = 0.5 * (0.81 + 0.64 + 2.25) / 3 = 0.616667, vf_clipfrac = 1/3.
    Gradient 0.5 * 2 (V - R) / 3 where unclipped: (-0.3, 0, -0.5)."""
    mask = right_padded_mask([3], 4)
    values = torch.tensor([[0.1, 0.5, -0.5, 0.0]], requires_grad=True)
    old = fill_padding(torch.zeros(1, 4), mask)
    ret = fill_padding(torch.ones(1, 4), mask)
    loss, clipfrac = ppo_value_loss(fill_padding(values, mask), old, ret, mask, clip_eps_value=0.2)
    assert loss.item() == pytest.approx(0.5 * 3.7 / 3)
    assert clipfrac.item() == pytest.approx(1 / 3)
    loss.backward()
    torch.testing.assert_close(values.grad, torch.tensor([[-0.3, 0.0, -0.5, 0.0]]))
    loss_nc, cf = ppo_value_loss(values, old, ret, mask, clip_eps_value=None)
    assert loss_nc.item() == pytest.approx(0.5 * (0.81 + 0.25 + 2.25) / 3) and cf.item() == 0


def test_entropy_from_logits():
    V = 7
    torch.testing.assert_close(entropy_from_logits(torch.zeros(2, 3, V)), torch.full((2, 3), math.log(V)))
    # invariant to a constant shift, stable for huge logits
    logits = torch.randn(2, 3, V, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(
        entropy_from_logits(logits + 1e4), entropy_from_logits(logits), atol=1e-3, rtol=0
    )
    h = entropy_from_logits(logits.double())
    p = logits.double().softmax(-1)
    torch.testing.assert_close(h, -(p * p.log()).sum(-1))
    # near one-hot -> ~0; -inf entries contribute 0 and keep gradients finite
    assert entropy_from_logits(torch.tensor([[[100.0, 0.0, 0.0]]])).item() == pytest.approx(0.0, abs=1e-6)
    masked = torch.tensor([[[0.0, 0.0, float("-inf")]]], requires_grad=True)
    h = entropy_from_logits(masked)
    assert h.item() == pytest.approx(math.log(2))
    h.sum().backward()
    assert torch.isfinite(masked.grad).all()
    assert entropy_from_logits(torch.zeros(1, 1, 4, dtype=torch.bfloat16)).dtype == torch.float32


# ----------------------------------------------------------------------------- GRPO


def test_grpo_loss_by_hand():
    """B = 2, mask ((1, 1), (1, 0)), A = (+1, -1) per sequence, ratio 1 (old = logp), beta 0.1.
    Only token (0, 0) differs from the reference: logp = log .5, ref = log .25, k3 = 0.19315.
    Per-token loss: row 0: (-1 + 0.1 * 0.19315, -1), row 1: (+1).
      token-mean:          (-2 + 0.019315 + 1) / 3      = -0.326895
      seq-mean-token-mean: ((-2 + 0.019315) / 2 + 1) / 2 = 0.0048288
    Gradient of the KL term at (0, 0): beta * (1 - exp(ref - logp)) = 0.1 * 0.5."""
    mask = torch.tensor([[True, True], [True, False]])
    logp = torch.tensor([[LOG_HALF, LOG_HALF], [LOG_HALF, 0.0]], requires_grad=True)
    ref = torch.tensor([[LOG_QUARTER, LOG_HALF], [LOG_HALF, 0.0]])
    adv = torch.tensor([1.0, -1.0])
    k3 = K3_HALF_QUARTER
    loss, stats = grpo_loss(
        fill_padding(logp, mask), logp.detach(), fill_padding(ref, mask), adv, mask, beta=0.1
    )
    assert loss.item() == pytest.approx((-2 + 0.1 * k3 + 1) / 3)
    assert stats.kl.item() == pytest.approx(k3 / 3)
    assert stats.clipfrac.item() == 0 and stats.ratio_mean.item() == pytest.approx(1.0)
    loss.backward()
    expected = torch.tensor([[-1.0 + 0.1 * 0.5, -1.0], [1.0, 0.0]]) / 3
    torch.testing.assert_close(logp.grad, expected)
    loss_seq, _ = grpo_loss(logp, logp.detach(), ref, adv, mask, beta=0.1, loss_agg="seq-mean-token-mean")
    assert loss_seq.item() == pytest.approx(((-2 + 0.1 * k3) / 2 + 1) / 2, abs=1e-6)
    # (B,) advantages equal their (B, T) broadcast
    loss_bt, _ = grpo_loss(logp, logp.detach(), ref, adv[:, None].expand(2, 2), mask, beta=0.1)
    assert loss_bt.item() == pytest.approx(loss.item())
    # no reference needed without a KL term
    loss_nokl, stats = grpo_loss(logp, logp.detach(), None, adv, mask, beta=0.0)
    assert loss_nokl.item() == pytest.approx(-1 / 3) and stats.kl.item() == 0
    with pytest.raises(ValueError):
        grpo_loss(logp, logp.detach(), None, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="token-mean"):
        aggregate_loss(torch.zeros(2, 2), mask, "sum")


def test_seq_mean_ignores_empty_sequences():
    mask = torch.tensor([[True, True], [False, False]])
    loss_tok = torch.tensor([[1.0, 3.0], [5.0, 5.0]])
    assert aggregate_loss(loss_tok, mask, "seq-mean-token-mean").item() == pytest.approx(2.0)
    assert aggregate_loss(loss_tok, mask, "token-mean").item() == pytest.approx(2.0)


# ----------------------------------------------------------------------------- padding invariance


def test_padded_positions_never_affect_results_or_gradients():
    """Every function gets the same answer when padded positions hold NaN / inf / huge values,
    and the gradient at padded positions is exactly 0."""
    g = torch.Generator().manual_seed(7)
    B, T = 4, 6
    mask = right_padded_mask([6, 4, 1, 3], T)

    def rnd(scale=1.0):
        return torch.randn(B, T, generator=g) * scale

    logp, old, ref = rnd(0.3) - 1, rnd(0.3) - 1, rnd(0.3) - 1
    adv, values, old_values, returns = rnd(), rnd(), rnd(), rnd()
    score = torch.randn(B, generator=g)

    def run(dirty):
        f = (lambda x: fill_padding(x, mask)) if dirty else (lambda x: x.clone())
        lp = f(logp).requires_grad_()
        v = f(values).requires_grad_()
        out = {}
        out["ppo"], ppo_stats = ppo_policy_loss(lp, f(old), f(adv), mask, clip_eps=0.1)
        for name in ("token-mean", "seq-mean-token-mean"):
            out[name], grpo_stats = grpo_loss(
                lp, f(old), f(ref), f(adv), mask, clip_eps=0.1, beta=0.2, loss_agg=name
            )
        out["vf"], vf_clipfrac = ppo_value_loss(v, f(old_values), f(returns), mask, clip_eps_value=0.1)
        total = sum(out.values())
        total.backward()
        out.update(ppo_stats._asdict())
        out.update({f"grpo_{k}": s for k, s in grpo_stats._asdict().items()})
        out["vf_clipfrac"] = vf_clipfrac
        out["rewards"], out["kl"] = kl_penalized_rewards(
            score, f(logp), f(ref), mask, beta=0.1, estimator="k3"
        )
        out["adv"], out["ret"] = gae(out["rewards"], f(values), mask, 1.0, 0.95)
        out["whiten"] = masked_whiten(f(adv), mask)
        out["ev"] = explained_variance(f(values), f(returns), mask)
        out["grad_logp"], out["grad_values"] = lp.grad, v.grad
        return out

    clean, dirty = run(False), run(True)
    for key in clean:
        torch.testing.assert_close(dirty[key], clean[key], msg=key)
    assert (dirty["grad_logp"][~mask] == 0).all() and (dirty["grad_values"][~mask] == 0).all()
    assert clean["clipfrac"] > 0 and clean["vf_clipfrac"] > 0  # the clipped paths were exercised
