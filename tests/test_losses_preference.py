"""DPO family and KTO: hand-worked numbers, a plain-math reference over random inputs,
invariances, gradient signs, metrics, registry and beta check."""

import math
import random

import pytest
import torch

from alignkit.losses.preference import (
    PREFERENCE_LOSSES,
    REFERENCE_FREE,
    KTOLossOutput,
    PreferenceLossOutput,
    check_beta,
    get_preference_loss,
    kto_kl_estimate,
    kto_loss,
    preference_metrics,
)


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


# The running example: policy chosen -1, rejected -3; reference -2, -2; beta 0.1.
# Log-ratios: chosen -1 - (-2) = +1, rejected -3 - (-2) = -1, so h = 2 and beta*h = 0.2.
# -log sigmoid(0.2) = log(1 + e^-0.2) = log(1.8187308) = 0.5981389
# -log sigmoid(-0.2) = 0.5981389 + 0.2 = 0.7981389
PC, PR, RC, RR = t(-1.0), t(-3.0), t(-2.0), t(-2.0)
DPO_02 = 0.5981389


def run(name, pc=PC, pr=PR, rc=RC, rr=RR, **kw):
    return get_preference_loss(name)(pc, pr, rc, rr, **kw)


# ---------------------------------------------------------------- hand-worked values


def test_sigmoid_hand():
    """h = 2, loss = -log sigmoid(0.2) = 0.5981389; rewards 0.1 * (+1) and 0.1 * (-1)."""
    out = run("sigmoid", beta=0.1)
    assert isinstance(out, PreferenceLossOutput)
    assert out.losses.item() == pytest.approx(DPO_02, abs=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(0.1)
    assert out.rejected_rewards.item() == pytest.approx(-0.1)


def test_sigmoid_soft_label_hand():
    """p = 0.75: 0.75 * 0.5981389 + 0.25 * 0.7981389 = 0.5981389 + 0.05 = 0.6481389."""
    out = run("sigmoid", beta=0.1, soft_label=t(0.75))
    assert out.losses.item() == pytest.approx(0.6481389, abs=1e-6)


def test_ipo_hand():
    """tau = beta = 0.1: target 1/(2 * 0.1) = 5, loss = (2 - 5)^2 = 9.
    Soft label p = 0.75: 0.75 * 9 + 0.25 * (-2 - 5)^2 = 6.75 + 12.25 = 19."""
    assert run("ipo", beta=0.1).losses.item() == pytest.approx(9.0)
    assert run("ipo", beta=0.1, soft_label=t(0.75)).losses.item() == pytest.approx(19.0)


def test_hinge_hand():
    """beta 0.1: max(0, 1 - 0.2) = 0.8. beta 1: max(0, 1 - 2) = 0, and no gradient."""
    assert run("hinge", beta=0.1).losses.item() == pytest.approx(0.8)
    pc = PC.clone().requires_grad_()
    out = run("hinge", pc=pc, beta=1.0)
    out.losses.sum().backward()
    assert out.losses.item() == 0.0 and pc.grad.item() == 0.0


def test_hinge_without_reference_is_slic():
    """No reference: h = -1 - (-3) = 2 again; SLiC-HF with delta = 1/beta = 10 gives
    max(0, 10 - 2) = 8, scaled by beta = 0.1 -> 0.8."""
    out = get_preference_loss("hinge")(PC, PR, None, None, beta=0.1)
    assert out.losses.item() == pytest.approx(0.1 * max(0.0, 10 - 2))


def test_cdpo_hand():
    """eps 0.1: 0.9 * 0.5981389 + 0.1 * 0.7981389 = 0.5981389 + 0.1 * 0.2 = 0.6181389."""
    assert run("cdpo", beta=0.1, label_smoothing=0.1).losses.item() == pytest.approx(0.6181389, abs=1e-6)


def test_robust_hand():
    """eps 0.1: (0.9 * 0.5981389 - 0.1 * 0.7981389) / 0.8 = 0.5981389 - 0.1 * 0.2 / 0.8
    = 0.5981389 - 0.025 = 0.5731389."""
    assert run("robust", beta=0.1, label_smoothing=0.1).losses.item() == pytest.approx(0.5731389, abs=1e-6)


def test_rpo_hand():
    """alpha 1, chosen NLL 0.5: 0.5981389 + 0.5 = 1.0981389; alpha 2: 1.5981389."""
    assert run("rpo", beta=0.1, chosen_nll=t(0.5)).losses.item() == pytest.approx(1.0981389, abs=1e-6)
    assert run("rpo", beta=0.1, chosen_nll=t(0.5), alpha=2.0).losses.item() == pytest.approx(
        1.5981389, abs=1e-6
    )


def test_simpo_hand():
    """Averaged logps -0.5, -1.5; beta 2, gamma 1: 2 * 1 - 1 = 1,
    loss = -log sigmoid(1) = log(1 + e^-1) = 0.3132617; rewards 2 * (-0.5) = -1, 2 * (-1.5) = -3.
    The reference arguments are ignored."""
    out = get_preference_loss("simpo")(t(-0.5), t(-1.5), t(-9.0), t(9.0), beta=2.0, gamma=1.0)
    assert out.losses.item() == pytest.approx(0.3132617, abs=1e-6)
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == pytest.approx((-1.0, -3.0))


def test_orpo_hand():
    """P(y_c) = 0.5 -> odds 1, log odds 0; P(y_r) = 0.2 -> odds 0.25, log odds -log 4.
    log odds ratio = log 4, sigmoid = 4/5, L_OR = -log 0.8 = 0.2231436.
    NLL = -log 0.5 = 0.6931472, lambda 0.1: loss = 0.6931472 + 0.0223144 = 0.7154615."""
    avg_c, avg_r = t(math.log(0.5)), t(math.log(0.2))
    out = get_preference_loss("orpo")(avg_c, avg_r, None, None, beta=0.1, chosen_nll=-avg_c)
    assert out.losses.item() == pytest.approx(0.7154615, abs=1e-6)


def test_kto_hand():
    """beta 0.1, z0 = 0.5.
    Desirable: policy -1, ref -2 -> r = 1, v = sigmoid(0.1 * (1 - 0.5)) = sigmoid(0.05) = 0.5124974,
    loss = 1 - 0.5124974 = 0.4875026.
    Undesirable: policy -3, ref -2 -> r = -1, v = sigmoid(0.1 * (0.5 + 1)) = sigmoid(0.15) = 0.5374298,
    loss = 1 - 0.5374298 = 0.4625702; with lambda_u = 2: 2 - 2 * 0.5374298 = 0.9251404."""
    pol, ref, des = t(-1.0, -3.0), t(-2.0, -2.0), torch.tensor([True, False])
    out = kto_loss(pol, ref, des, torch.tensor(0.5), beta=0.1)
    assert isinstance(out, KTOLossOutput)
    assert out.losses.tolist() == pytest.approx([0.4875026, 0.4625702], abs=1e-6)
    assert out.rewards.tolist() == pytest.approx([0.1, -0.1])
    weighted = kto_loss(pol, ref, des, 0.5, beta=0.1, lambda_u=2.0)
    assert weighted.losses.tolist() == pytest.approx([0.4875026, 0.9251404], abs=1e-6)


def test_kto_kl_estimate_hand():
    """mean(policy - ref) = mean(1, 0) = 0.5; a negative mean clamps to 0; always detached."""
    pol = t(-1.0, -2.0).requires_grad_()
    z0 = kto_kl_estimate(pol, t(-2.0, -2.0))
    assert z0.item() == pytest.approx(0.5) and not z0.requires_grad and z0.dim() == 0
    assert kto_kl_estimate(t(-3.0, -2.0), t(-2.0, -2.0)).item() == 0.0


def test_kto_gradient_signs_and_detached_reference_point():
    pol = t(-1.0, -3.0).requires_grad_()
    z0 = t(0.2).requires_grad_()
    out = kto_loss(pol, t(-2.0, -2.0), torch.tensor([True, False]), z0, beta=0.1)
    out.losses.sum().backward()
    assert pol.grad[0] < 0  # raising a desirable completion lowers the loss
    assert pol.grad[1] > 0  # raising an undesirable one raises it
    assert z0.grad is None


def test_kto_rejects_non_bool_mask():
    with pytest.raises(ValueError, match="bool"):
        kto_loss(t(-1.0), t(-2.0), torch.tensor([1]), 0.0, beta=0.1)


# ---------------------------------------------------------------- plain-math reference


def naive(name, pc, pr, rc, rr, p, beta, **kw):
    """One pair, plain Python; the soft label is the expectation over the label."""

    def expect(loss_of, h):
        return p * loss_of(h) + (1 - p) * loss_of(-h)

    h = (pc - rc) - (pr - rr)
    eps = kw.get("label_smoothing", 0.1)
    if name == "sigmoid":
        return expect(lambda z: -log_sigmoid(beta * z), h)
    if name == "ipo":
        return expect(lambda z: (z - 1 / (2 * beta)) ** 2, h)
    if name == "hinge":
        return expect(lambda z: max(0.0, 1 - beta * z), h)
    if name == "cdpo":
        return expect(lambda z: -(1 - eps) * log_sigmoid(beta * z) - eps * log_sigmoid(-beta * z), h)
    if name == "robust":
        return expect(
            lambda z: ((1 - eps) * -log_sigmoid(beta * z) - eps * -log_sigmoid(-beta * z)) / (1 - 2 * eps), h
        )
    if name == "rpo":
        return expect(lambda z: -log_sigmoid(beta * z), h) + kw.get("alpha", 1.0) * kw["chosen_nll"]
    if name == "simpo":
        return expect(lambda z: -log_sigmoid(beta * z - kw["gamma"]), pc - pr)
    if name == "orpo":

        def log_odds(x):
            return x - math.log(1 - math.exp(x))

        return kw["chosen_nll"] + beta * expect(lambda z: -log_sigmoid(z), log_odds(pc) - log_odds(pr))
    raise AssertionError(name)


CASES = [
    ("sigmoid", 0.1, {}),
    ("ipo", 0.5, {}),
    ("hinge", 0.1, {}),
    ("cdpo", 0.1, {"label_smoothing": 0.2}),
    ("robust", 0.1, {"label_smoothing": 0.2}),
    ("rpo", 0.1, {"alpha": 0.7}),
    ("simpo", 2.5, {"gamma": 1.2}),
    ("orpo", 0.2, {}),
]


def test_every_registered_loss_has_a_reference_case():
    assert {name for name, _, _ in CASES} == set(PREFERENCE_LOSSES)


@pytest.mark.parametrize("name,beta,params", CASES)
def test_matches_naive_reference_on_random_inputs(name, beta, params):
    rng = random.Random(sum(map(ord, name)))  # str hash() is salted per process
    n = 32
    # Averaged per-token log-probs for the reference-free losses, sequence sums otherwise.
    scale = 1.5 if name in REFERENCE_FREE else 40.0
    pc = [-rng.random() * scale - 1e-3 for _ in range(n)]
    pr = [-rng.random() * scale - 1e-3 for _ in range(n)]
    rc = [x + rng.gauss(0, 3) for x in pc]
    rr = [x + rng.gauss(0, 3) for x in pr]
    p = [rng.random() for _ in range(n)]
    nll = [rng.random() * 3 for _ in range(n)]
    kw = dict(params)
    if name in ("rpo", "orpo"):
        kw["chosen_nll"] = t(*nll)
    out = get_preference_loss(name)(t(*pc), t(*pr), t(*rc), t(*rr), beta=beta, soft_label=t(*p), **kw)
    want = []
    for i in range(n):
        kw_i = dict(params, chosen_nll=nll[i])
        want.append(naive(name, pc[i], pr[i], rc[i], rr[i], p[i], beta, **kw_i))
    assert out.losses.tolist() == pytest.approx(want, rel=1e-9, abs=1e-10)


# ---------------------------------------------------------------- invariances


def _random_pairs(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    pc, pr = (
        -torch.rand(n, generator=g, dtype=torch.float64) * 50,
        -torch.rand(n, generator=g, dtype=torch.float64) * 50,
    )
    rc, rr = (
        pc + torch.randn(n, generator=g, dtype=torch.float64),
        pr + torch.randn(n, generator=g, dtype=torch.float64),
    )
    p = torch.rand(n, generator=g, dtype=torch.float64)
    return pc, pr, rc, rr, p


REF_BASED = ["sigmoid", "ipo", "hinge", "cdpo", "robust"]


@pytest.mark.parametrize("name", REF_BASED)
def test_shift_of_both_policy_logps_changes_nothing(name):
    """Only the difference of log-ratios enters: adding c to both policy logps is a no-op."""
    pc, pr, rc, rr, _ = _random_pairs()
    a = get_preference_loss(name)(pc, pr, rc, rr, beta=0.1).losses
    b = get_preference_loss(name)(pc + 3.7, pr + 3.7, rc, rr, beta=0.1).losses
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", REF_BASED + ["simpo"])
def test_swap_with_flipped_soft_label(name):
    pc, pr, rc, rr, p = _random_pairs(seed=1)
    if name == "simpo":
        pc, pr = pc / 50, pr / 50
    fn = get_preference_loss(name)
    a = fn(pc, pr, rc, rr, beta=0.1, soft_label=p).losses
    b = fn(pr, pc, rr, rc, beta=0.1, soft_label=1 - p).losses
    torch.testing.assert_close(a, b)


def test_orpo_swap_with_flipped_soft_label_in_the_odds_term():
    pc, pr, _, _, p = _random_pairs(seed=2)
    pc, pr = pc / 50 - 1e-3, pr / 50 - 1e-3
    zero = torch.zeros_like(pc)
    fn = get_preference_loss("orpo")
    a = fn(pc, pr, None, None, beta=0.3, chosen_nll=zero, soft_label=p).losses
    b = fn(pr, pc, None, None, beta=0.3, chosen_nll=zero, soft_label=1 - p).losses
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", sorted(PREFERENCE_LOSSES))
def test_soft_label_one_equals_hard(name):
    pc, pr, rc, rr, _ = _random_pairs(seed=3)
    pc, pr = pc / 50 - 1e-3, pr / 50 - 1e-3
    kw = {"chosen_nll": -pc} if name in ("rpo", "orpo") else {}
    fn = get_preference_loss(name)
    hard = fn(pc, pr, rc, rr, beta=0.1, **kw).losses
    soft = fn(pc, pr, rc, rr, beta=0.1, soft_label=torch.ones_like(pc), **kw).losses
    torch.testing.assert_close(soft, hard)


@pytest.mark.parametrize("name", ["cdpo", "robust"])
def test_zero_smoothing_is_plain_dpo(name):
    pc, pr, rc, rr, p = _random_pairs(seed=4)
    want = get_preference_loss("sigmoid")(pc, pr, rc, rr, beta=0.1, soft_label=p).losses
    got = get_preference_loss(name)(pc, pr, rc, rr, beta=0.1, soft_label=p, label_smoothing=0.0).losses
    torch.testing.assert_close(got, want)


def test_cdpo_equals_dpo_with_smoothed_soft_label():
    pc, pr, rc, rr, p = _random_pairs(seed=5)
    eps = 0.15
    got = get_preference_loss("cdpo")(pc, pr, rc, rr, beta=0.1, soft_label=p, label_smoothing=eps).losses
    want = get_preference_loss("sigmoid")(
        pc, pr, rc, rr, beta=0.1, soft_label=(1 - eps) * p + eps * (1 - p)
    ).losses
    torch.testing.assert_close(got, want)


def test_robust_is_unbiased_under_label_flips():
    """E over a flip with prob eps of the rDPO loss equals the clean DPO loss (the paper's claim)."""
    pc, pr, rc, rr, _ = _random_pairs(seed=6)
    eps = 0.2
    rdpo = get_preference_loss("robust")
    clean = get_preference_loss("sigmoid")(pc, pr, rc, rr, beta=0.1).losses
    kept = rdpo(pc, pr, rc, rr, beta=0.1, label_smoothing=eps).losses
    flipped = rdpo(pr, pc, rr, rc, beta=0.1, label_smoothing=eps).losses
    torch.testing.assert_close((1 - eps) * kept + eps * flipped, clean)


def test_reference_free_is_zero_reference():
    pc, pr, _, _, _ = _random_pairs(seed=7)
    zero = torch.zeros_like(pc)
    for name in REF_BASED:
        fn = get_preference_loss(name)
        torch.testing.assert_close(
            fn(pc, pr, None, None, beta=0.1).losses, fn(pc, pr, zero, zero, beta=0.1).losses
        )


def test_half_given_reference_is_an_error():
    with pytest.raises(ValueError, match="both"):
        get_preference_loss("sigmoid")(PC, PR, RC, None, beta=0.1)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape mismatch"):
        get_preference_loss("sigmoid")(t(-1.0, -2.0), PR, RC, RR, beta=0.1)


def test_bf16_inputs_are_upcast():
    out = get_preference_loss("sigmoid")(*(x.to(torch.bfloat16) for x in (PC, PR, RC, RR)), beta=0.1)
    assert out.losses.dtype == torch.float32
    assert out.losses.item() == pytest.approx(DPO_02, abs=1e-6)


def test_orpo_stable_near_probability_one_and_far_below():
    """log odds needs log(1 - e^x): finite and correct at x = -1e-6 and x = -50."""
    avg_c, avg_r = t(-1e-6, -50.0, 0.0), t(-50.0, -1e-6, -1.0)
    out = get_preference_loss("orpo")(avg_c, avg_r, None, None, beta=1.0, chosen_nll=torch.zeros(3))
    assert torch.isfinite(out.losses).all()
    # x = -1e-6: log odds = -1e-6 - log(1e-6 - 5e-13) ~ 13.8155; x = -50: log odds ~ -50.
    assert out.losses[0].item() == pytest.approx(-log_sigmoid(13.815511 + 50.0), abs=1e-6)
    assert out.losses[1].item() == pytest.approx(-log_sigmoid(-50.0 - 13.815511), abs=1e-5)


# ---------------------------------------------------------------- gradient signs


@pytest.mark.parametrize("name", sorted(PREFERENCE_LOSSES))
def test_gradient_signs(name):
    """Raising the chosen log-prob lowers the loss; raising the rejected one raises it.
    Inputs sit where no loss is flat (hinge active, IPO below its target)."""
    pc, pr = t(-0.9, -0.4).requires_grad_(), t(-0.8, -1.2).requires_grad_()
    rc, rr = t(-1.0, -1.0), t(-1.0, -1.0)
    kw = {"chosen_nll": torch.zeros(2, dtype=torch.float64)} if name in ("rpo", "orpo") else {}
    out = get_preference_loss(name)(pc, pr, rc, rr, beta=0.5, **kw)
    out.losses.sum().backward()
    assert (pc.grad < 0).all(), pc.grad
    assert (pr.grad > 0).all(), pr.grad
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


def test_dpo_gradient_matches_closed_form():
    """d/d logpi(y_c) of -log sigmoid(beta h) = -beta * sigmoid(-beta h) (Rafailov et al. 2023, Sec. 4):
    at beta h = 0.2, -0.1 * sigmoid(-0.2) = -0.1 * 0.4501660 = -0.0450166."""
    pc, pr = PC.clone().requires_grad_(), PR.clone().requires_grad_()
    get_preference_loss("sigmoid")(pc, pr, RC, RR, beta=0.1).losses.sum().backward()
    assert pc.grad.item() == pytest.approx(-0.0450166, abs=1e-7)
    assert pr.grad.item() == pytest.approx(0.0450166, abs=1e-7)


def test_reference_gets_no_gradient():
    rc = RC.clone().requires_grad_()
    get_preference_loss("sigmoid")(PC.clone().requires_grad_(), PR, rc, RR, beta=0.1).losses.sum().backward()
    assert rc.grad is None


# ---------------------------------------------------------------- metrics, registry, beta


def test_preference_metrics_names_and_values():
    """Rewards 0.1 * log-ratios: chosen [0.1, -0.2], rejected [-0.1, 0.0]:
    means 0.05 / -0.05, accuracies [1, 0] -> 0.5, margins [0.2, -0.2] -> 0."""
    pc, pr, rc, rr = t(-1.0, -4.0), t(-3.0, -2.0), t(-2.0, -2.0), t(-2.0, -2.0)
    out = get_preference_loss("sigmoid")(pc, pr, rc, rr, beta=0.1)
    m = preference_metrics(out, pc, pr)
    assert list(m) == [
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
    ]
    assert all(isinstance(v, float) for v in m.values())
    assert m["rewards/chosen"] == pytest.approx(-0.05)
    assert m["rewards/rejected"] == pytest.approx(-0.05)
    assert m["rewards/accuracies"] == pytest.approx(0.5)
    assert m["rewards/margins"] == pytest.approx(0.0)
    assert m["logps/chosen"] == pytest.approx(-2.5)
    assert m["logps/rejected"] == pytest.approx(-2.5)


def test_registry_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        get_preference_loss("dpo")
    msg = str(err.value)
    assert "'dpo'" in msg
    for name in PREFERENCE_LOSSES:
        assert name in msg


def test_registry_rejects_unknown_params():
    with pytest.raises(TypeError):
        get_preference_loss("sigmoid")(PC, PR, RC, RR, beta=0.1, gamma=1.0)


def test_check_beta_ranges():
    assert check_beta(0.1, "sigmoid") is None
    assert check_beta(0.05, "kto") is None
    low = check_beta(0.001, "sigmoid")
    assert low is not None and "below" in low and "drift" in low and "0.01-0.1" in low
    high = check_beta(1.0, "sigmoid")
    assert high is not None and "above" in high and "barely" in high
    assert check_beta(2.0, "simpo") is None
    assert "SimPO" in check_beta(0.1, "simpo")
    assert check_beta(0.5, "ipo") is None
    assert check_beta(0.0, "orpo") is not None
    with pytest.raises(ValueError, match="valid names"):
        check_beta(0.1, "nope")


def test_check_beta_knows_every_registered_loss():
    for name in PREFERENCE_LOSSES:
        check_beta(0.1, name)


def test_invalid_smoothing_is_an_error():
    with pytest.raises(ValueError):
        get_preference_loss("robust")(PC, PR, RC, RR, beta=0.1, label_smoothing=0.5)
    with pytest.raises(ValueError):
        get_preference_loss("cdpo")(PC, PR, RC, RR, beta=0.1, label_smoothing=0.6)
