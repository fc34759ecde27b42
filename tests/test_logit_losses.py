"""The logit losses against hand-computed values and independent formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distill.logits.losses import dkd_loss, kd_loss, standardize


def test_kd_loss_by_hand():
    # two classes, T = 2: teacher probs softmax([2, 0]/2) = softmax([1, 0]); student logits [0, 0]
    s, t = torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 0.0]])
    p1 = math.exp(1) / (math.exp(1) + 1)
    p = [p1, 1 - p1]
    kl = sum(pi * math.log(pi / 0.5) for pi in p)
    assert kd_loss(s, t, temperature=2.0).item() == pytest.approx(4 * kl, rel=1e-6)  # T² = 4 applied


def test_kd_loss_matches_torch_kl_div_and_scales_with_t_squared():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    for T in (1.0, 3.0):
        ref = F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean") * T * T
        assert kd_loss(s, t, temperature=T).item() == pytest.approx(ref.item(), rel=1e-5)
    assert kd_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)


def test_standardize_formula_and_invariance():
    z = torch.tensor([[1.0, 2.0, 4.0]])
    mean, std = 7 / 3, math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)  # unbiased
    expected = torch.tensor([[(v - mean) / (std + 1e-7) for v in (1.0, 2.0, 4.0)]])
    assert torch.allclose(standardize(z), expected, atol=1e-6)
    x = torch.randn(6, 10, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(standardize(x + 5.0), standardize(x), atol=1e-5)
    assert torch.allclose(standardize(3.7 * x), standardize(x), atol=1e-5)
    # so KD with standardization ignores teacher logit scale/shift
    s = torch.randn(6, 10, generator=torch.Generator().manual_seed(2))
    a = kd_loss(s, x, standardize=True)
    b = kd_loss(s, 10 * x - 3, standardize=True)
    assert a.item() == pytest.approx(b.item(), rel=1e-4)


def _dkd_reference(s, t, y, alpha, beta, T):
    """mdistiller's formula (mask with -1000, probabilities cat'ed), in float64."""
    s, t = s.double(), t.double()
    gt = F.one_hot(y, s.shape[1]).double()
    ps, pt = F.softmax(s / T, 1), F.softmax(t / T, 1)
    bs = torch.stack([(ps * gt).sum(1), (ps * (1 - gt)).sum(1)], 1)
    bt = torch.stack([(pt * gt).sum(1), (pt * (1 - gt)).sum(1)], 1)
    tckd = (bt * (bt.log() - bs.log())).sum() * T**2 / len(y)
    pt2 = F.softmax(t / T - 1000.0 * gt, 1)
    ls2 = F.log_softmax(s / T - 1000.0 * gt, 1)
    nckd = F.kl_div(ls2, pt2, reduction="sum") * T**2 / len(y)
    return alpha * tckd + beta * nckd


def test_dkd_matches_mdistiller_formula():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(7, 6, generator=g) * 2, torch.randn(7, 6, generator=g) * 2
    y = torch.randint(0, 6, (7,), generator=g)
    for alpha, beta, T in ((1.0, 8.0, 4.0), (0.5, 2.0, 1.0)):
        ref = _dkd_reference(s, t, y, alpha, beta, T)
        assert dkd_loss(s, t, y, alpha, beta, T).item() == pytest.approx(ref.item(), rel=1e-5)


def test_dkd_decomposition_reduces_to_kd():
    # the paper's Eq. 5: KD = TCKD + (1 - p_t^T) NCKD, per sample; check on one sample
    g = torch.Generator().manual_seed(4)
    s, t, y = torch.randn(1, 5, generator=g), torch.randn(1, 5, generator=g), torch.tensor([2])
    tckd = dkd_loss(s, t, y, 1.0, 0.0, 1.0)
    nckd = dkd_loss(s, t, y, 0.0, 1.0, 1.0)
    p_t = F.softmax(t, -1)[0, 2]
    assert kd_loss(s, t, 1.0).item() == pytest.approx((tckd + (1 - p_t) * nckd).item(), rel=1e-5)


@pytest.mark.parametrize("fn", ["kd", "kd_std", "dkd"])
def test_finite_for_huge_and_bf16_logits(fn):
    g = torch.Generator().manual_seed(5)
    y = torch.randint(0, 10, (4,), generator=g)
    for s, t in (
        (torch.randn(4, 10, generator=g) * 1e4, torch.randn(4, 10, generator=g) * 1e4),
        (torch.randn(4, 10, generator=g).bfloat16(), torch.randn(4, 10, generator=g).bfloat16()),
    ):
        s = s.clone().requires_grad_(True)
        if fn == "dkd":
            loss = dkd_loss(s, t, y)
        else:
            loss = kd_loss(s, t, standardize=fn == "kd_std")
        loss.backward()
        assert loss.dtype == torch.float32
        assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
