"""Bradley-Terry reward loss and calibration: hand-worked numbers, a plain-math reference,
invariances and gradient signs."""

import math
import random

import pytest
import torch

from alignkit.losses.reward import RewardLossOutput, bradley_terry_loss, expected_calibration_error


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def naive_bt(rc, rr, m, p, c):
    """The formula written out in plain Python, one pair at a time."""
    d = rc - rr
    return -(p * log_sigmoid(d - m) + (1 - p) * log_sigmoid(-d - m)) + c * (rc + rr) ** 2


def test_hand_value_plain():
    """r_c = 2, r_r = 0.5: d = 1.5, loss = -log sigmoid(1.5) = log(1 + e^-1.5)
    = log(1.2231302) = 0.2014133. Accuracy 1 (d > 0), margin output = d = 1.5."""
    out = bradley_terry_loss(t(2.0), t(0.5))
    assert isinstance(out, RewardLossOutput)
    assert out.losses.item() == pytest.approx(0.2014133, abs=1e-6)
    assert out.accuracy.tolist() == [1.0]
    assert out.margin.tolist() == [1.5]


def test_hand_value_margin():
    """Llama 2 margin m = 1: loss = -log sigmoid(1.5 - 1) = log(1 + e^-0.5) = 0.4740770.
    The reported margin stays the raw reward gap 1.5."""
    out = bradley_terry_loss(t(2.0), t(0.5), margin=t(1.0))
    assert out.losses.item() == pytest.approx(0.4740770, abs=1e-6)
    assert out.margin.item() == 1.5


def test_hand_value_soft_label():
    """p = 0.75, d = 1.5: -log sigmoid(-d) = -log sigmoid(d) + d, so
    loss = 0.75 * 0.2014133 + 0.25 * (0.2014133 + 1.5) = 0.2014133 + 0.375 = 0.5764133."""
    out = bradley_terry_loss(t(2.0), t(0.5), soft_label=t(0.75))
    assert out.losses.item() == pytest.approx(0.5764133, abs=1e-6)


def test_hand_value_centring():
    """center_coef 0.01: 0.2014133 + 0.01 * (2 + 0.5)^2 = 0.2014133 + 0.0625 = 0.2639133."""
    out = bradley_terry_loss(t(2.0), t(0.5), center_coef=0.01)
    assert out.losses.item() == pytest.approx(0.2639133, abs=1e-6)


def test_matches_naive_reference_on_random_inputs():
    rng = random.Random(0)
    n = 64
    rc = [rng.gauss(0, 3) for _ in range(n)]
    rr = [rng.gauss(0, 3) for _ in range(n)]
    m = [rng.uniform(0, 2) for _ in range(n)]
    p = [rng.random() for _ in range(n)]
    out = bradley_terry_loss(t(*rc), t(*rr), margin=t(*m), soft_label=t(*p), center_coef=0.05)
    want = [naive_bt(*args, 0.05) for args in zip(rc, rr, m, p)]
    assert out.losses.tolist() == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_soft_label_one_equals_hard_and_swap_invariance():
    rng = torch.Generator().manual_seed(1)
    rc, rr = (
        torch.randn(16, generator=rng, dtype=torch.float64),
        torch.randn(16, generator=rng, dtype=torch.float64),
    )
    m = torch.rand(16, generator=rng, dtype=torch.float64)
    p = torch.rand(16, generator=rng, dtype=torch.float64)
    hard = bradley_terry_loss(rc, rr, margin=m).losses
    soft1 = bradley_terry_loss(rc, rr, margin=m, soft_label=torch.ones(16, dtype=torch.float64)).losses
    torch.testing.assert_close(soft1, hard)
    a = bradley_terry_loss(rc, rr, margin=m, soft_label=p, center_coef=0.1).losses
    b = bradley_terry_loss(rr, rc, margin=m, soft_label=1 - p, center_coef=0.1).losses
    torch.testing.assert_close(a, b)


def test_shift_invariance_without_centring():
    """Bradley-Terry only sees differences: adding c to both rewards changes nothing."""
    rc, rr = t(1.0, -2.0, 0.3), t(0.0, 1.0, 0.3)
    torch.testing.assert_close(bradley_terry_loss(rc + 7, rr + 7).losses, bradley_terry_loss(rc, rr).losses)


def test_stable_for_huge_gaps():
    out = bradley_terry_loss(t(-1000.0, 1000.0), t(1000.0, -1000.0))
    assert torch.isfinite(out.losses).all()
    assert out.losses.tolist() == pytest.approx([2000.0, 0.0])


def test_gradient_signs_and_detached_metrics():
    """dL/dr_c = -sigmoid(-d) < 0 and dL/dr_r = +sigmoid(-d) > 0: descent raises the winner."""
    rc = t(0.5).requires_grad_()
    rr = t(0.2).requires_grad_()
    out = bradley_terry_loss(rc, rr)
    out.losses.sum().backward()
    assert rc.grad.item() == pytest.approx(-1 / (1 + math.exp(0.3)))
    assert rr.grad.item() == pytest.approx(1 / (1 + math.exp(0.3)))
    assert not out.accuracy.requires_grad and not out.margin.requires_grad


def test_accuracy_hard_and_soft():
    """Ties count as wrong; with soft labels the winner is the side with p > 0.5, p = 0.5 scores 0.5."""
    out = bradley_terry_loss(t(1.0, 0.0, 0.0), t(0.0, 1.0, 0.0))
    assert out.accuracy.tolist() == [1.0, 0.0, 0.0]
    soft = bradley_terry_loss(t(1.0, 1.0, 1.0, 0.0), t(0.0, 0.0, 0.0, 1.0), soft_label=t(0.9, 0.2, 0.5, 0.1))
    assert soft.accuracy.tolist() == [1.0, 0.0, 0.5, 1.0]


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape mismatch"):
        bradley_terry_loss(t(1.0, 2.0), t(1.0))


def test_ece_hand_case():
    """probs [0.1, 0.2, 0.8, 0.9], labels [0, 1, 1, 1], 2 bins:
    bin [0, 0.5): mean p 0.15, mean y 0.5, weight 2/4 -> 0.5 * 0.35 = 0.175
    bin [0.5, 1]: mean p 0.85, mean y 1.0, weight 2/4 -> 0.5 * 0.15 = 0.075
    ECE = 0.25."""
    assert expected_calibration_error(t(0.1, 0.2, 0.8, 0.9), t(0, 1, 1, 1), n_bins=2) == pytest.approx(0.25)


def test_ece_perfect_and_edges():
    """Perfectly calibrated bins give 0; p = 1.0 falls in the last bin, p = 0 in the first."""
    probs = t(0.25, 0.25, 0.25, 0.25, 1.0, 0.0)
    labels = t(1, 0, 0, 0, 1, 0)
    assert expected_calibration_error(probs, labels, n_bins=4) == pytest.approx(0.0)
    # Always-confident wrong model: ECE = 1.
    assert expected_calibration_error(t(1.0, 0.0), t(0, 1)) == pytest.approx(1.0)


def test_ece_matches_naive_reference():
    rng = random.Random(3)
    probs = [rng.random() for _ in range(200)]
    labels = [float(rng.random() < q) for q in probs]
    n_bins = 10
    bins = [[] for _ in range(n_bins)]
    for q, y in zip(probs, labels):
        bins[min(int(q * n_bins), n_bins - 1)].append((q, y))
    want = sum(
        len(b) / len(probs) * abs(sum(y for _, y in b) / len(b) - sum(q for q, _ in b) / len(b))
        for b in bins
        if b
    )
    assert expected_calibration_error(t(*probs), t(*labels), n_bins) == pytest.approx(want)


def test_ece_errors():
    with pytest.raises(ValueError):
        expected_calibration_error(t(), t())
    with pytest.raises(ValueError):
        expected_calibration_error(t(0.5), t(1, 0))
