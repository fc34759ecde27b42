"""Feature losses against independent computations (explicit loops over samples, positions, pairs)
and the properties that tell each apart from plain MSE (scale, rotation, width invariances)."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
import torch.nn.functional as F

from distill.features.losses import (
    at_loss,
    attention_map,
    cka_loss,
    cosine_loss,
    hint_loss,
    linear_cka,
    rbf_cka,
    similarity_matrix,
    sp_loss,
)


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_hint_loss_is_the_elementwise_squared_error_with_masked_tokens_exactly_zero():
    s, t = torch.randn(3, 4, 5, generator=_g(0)), torch.randn(3, 4, 5, generator=_g(1))
    assert hint_loss(s, t).item() == pytest.approx(F.mse_loss(s, t).item(), rel=1e-6)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    s_nan = s.clone()
    s_nan[~mask] = float("nan")  # masked positions contribute exactly zero, even NaN
    per_tok = [sum((s[b, i, d] - t[b, i, d]).item() ** 2 for d in range(5)) / 5
               for b in range(3) for i in range(4) if mask[b, i]]
    assert hint_loss(s_nan, t, mask=mask).item() == pytest.approx(sum(per_tok) / len(per_tok), rel=1e-6)
    none = hint_loss(s, t, mask=mask, reduction="none")
    assert none.shape == (3,)
    assert none[1].item() == pytest.approx(((s[1, 0] - t[1, 0]) ** 2).mean().item(), rel=1e-6)
    with pytest.raises(ValueError, match="projector"):
        hint_loss(s, t[..., :4])


def test_cosine_loss_by_hand_and_scale_invariant():
    s, t = torch.randn(4, 6, generator=_g(2)), torch.randn(4, 6, generator=_g(3))
    by_hand = []
    for b in range(4):
        dot = sum(s[b, i].item() * t[b, i].item() for i in range(6))
        ns, nt = math.sqrt(sum(v * v for v in s[b].tolist())), math.sqrt(sum(v * v for v in t[b].tolist()))
        by_hand.append(1 - dot / (ns * nt))
    assert cosine_loss(s, t).item() == pytest.approx(sum(by_hand) / 4, rel=1e-5)
    assert cosine_loss(s, t, reduction="none").tolist() == pytest.approx(by_hand, rel=1e-5)
    assert cosine_loss(3.0 * t, t).item() == pytest.approx(0.0, abs=1e-6)  # MSE would be 4·E[t²]
    tok_s, tok_t = torch.randn(2, 3, 6, generator=_g(4)), torch.randn(2, 3, 6, generator=_g(5))
    mask = torch.tensor([[1, 0, 1], [0, 0, 1]], dtype=torch.bool)
    per = [1 - F.cosine_similarity(tok_s[b, i], tok_t[b, i], dim=0).item() for b in range(2) for i in range(3) if mask[b, i]]
    assert cosine_loss(tok_s, tok_t, mask=mask).item() == pytest.approx(sum(per) / 3, rel=1e-5)


def _attention_by_hand(f: torch.Tensor) -> list[list[float]]:
    """Σ_c A_c² at each position, divided by the L2 norm over positions (Zagoruyko & Komodakis, Eq. 2)."""
    b, c, h, w = f.shape
    maps = []
    for n in range(b):
        q = [sum(f[n, k, i, j].item() ** 2 for k in range(c)) for i in range(h) for j in range(w)]
        norm = math.sqrt(sum(v * v for v in q))
        maps.append([v / norm for v in q])
    return maps


def test_attention_transfer_by_hand_across_channel_counts():
    s, t = torch.randn(2, 3, 4, 4, generator=_g(6)), torch.randn(2, 5, 4, 4, generator=_g(7))
    qs, qt = _attention_by_hand(s), _attention_by_hand(t)
    assert attention_map(s).tolist()[1] == pytest.approx(qs[1], rel=1e-5)
    per = [sum((a - b) ** 2 for a, b in zip(qs[n], qt[n])) / 16 for n in range(2)]
    assert at_loss(s, t).item() == pytest.approx(sum(per) / 2, rel=1e-5)
    assert at_loss(s, t, reduction="none").tolist() == pytest.approx(per, rel=1e-5)
    # the map ignores the features' scale and sign: MSE would not be zero here
    assert at_loss(-4.0 * s, s).item() == pytest.approx(0.0, abs=1e-8)
    # p = 1 by hand at one sample: Σ_c |A_c|
    q1 = [sum(abs(s[0, k, i, j].item()) for k in range(3)) for i in range(4) for j in range(4)]
    n1 = math.sqrt(sum(v * v for v in q1))
    assert attention_map(s, p=1).tolist()[0] == pytest.approx([v / n1 for v in q1], rel=1e-5)
    with pytest.raises(ValueError, match="spatial"):
        at_loss(s, torch.randn(2, 3, 2, 2))


def test_similarity_preserving_loss_by_pairs_across_widths():
    s, t = torch.randn(5, 3, generator=_g(8)), torch.randn(5, 2, 2, 2, generator=_g(9))  # widths 3 vs 8

    def g_tilde(f):
        q = f.reshape(5, -1).tolist()
        g = [[sum(a * b for a, b in zip(q[i], q[j])) for j in range(5)] for i in range(5)]
        return [[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in g]

    gs, gt = g_tilde(s), g_tilde(t)
    assert similarity_matrix(s).tolist()[2] == pytest.approx(gs[2], rel=1e-5)
    expected = sum((gt[i][j] - gs[i][j]) ** 2 for i in range(5) for j in range(5)) / 25
    assert sp_loss(s, t).item() == pytest.approx(expected, rel=1e-5)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=_g(10)))
    assert sp_loss(2.0 * s @ q, s).item() == pytest.approx(0.0, abs=1e-7)  # rotation/scale-free, unlike MSE


def _hsic_cka(k: torch.Tensor, l: torch.Tensor) -> float:
    """tr(KHLH) / sqrt(tr(KHKH) tr(LHLH)), H = I − 11ᵀ/n, in float64 (Kornblith et al. 2019, Eq. 3-4)."""
    n = k.shape[0]
    h = torch.eye(n, dtype=torch.float64) - torch.full((n, n), 1.0 / n, dtype=torch.float64)

    def hsic(a: torch.Tensor, b: torch.Tensor) -> float:
        return torch.trace(a @ h @ b @ h).item()

    return hsic(k, l) / math.sqrt(hsic(k, k) * hsic(l, l))


@pytest.mark.parametrize("n, dx, dy", [(12, 3, 5), (4, 10, 7)])  # feature-space and Gram-space branches
def test_linear_cka_against_the_hsic_formula_and_its_invariances(n, dx, dy):
    x = torch.randn(n, dx, generator=_g(11), dtype=torch.float64)
    y = x[:, :1].repeat(1, dy) + 0.5 * torch.randn(n, dy, generator=_g(12), dtype=torch.float64)
    expected = _hsic_cka(x @ x.T, y @ y.T)
    got = linear_cka(x, y)
    assert got.item() == pytest.approx(expected, rel=1e-9)
    assert 0.0 < got.item() < 1.0
    assert linear_cka(x, x).item() == pytest.approx(1.0, rel=1e-9)
    q, _ = torch.linalg.qr(torch.randn(dx, dx, generator=_g(13), dtype=torch.float64))
    assert linear_cka(3.7 * x @ q + 2.0, y).item() == pytest.approx(expected, rel=1e-9)  # rotation, scale, shift
    assert linear_cka(x.float(), y.float()).item() == pytest.approx(expected, rel=1e-4)
    # not invariant to an arbitrary invertible linear map (CKA is not CCA)
    a = torch.diag(torch.tensor([10.0] + [0.1] * (dx - 1), dtype=torch.float64))
    assert abs(linear_cka(x @ a, y).item() - expected) > 1e-3


def test_rbf_cka_against_loops_with_the_median_bandwidth():
    x = torch.randn(7, 3, generator=_g(14), dtype=torch.float64)
    y = torch.tanh(x @ torch.randn(3, 4, generator=_g(15), dtype=torch.float64))

    def gram(f, frac):
        n = f.shape[0]
        d2 = [[sum((f[i, k] - f[j, k]).item() ** 2 for k in range(f.shape[1])) for j in range(n)] for i in range(n)]
        sigma2 = frac**2 * statistics.median(v for row in d2 for v in row)  # numpy-style median, diagonal included
        return torch.tensor([[math.exp(-v / (2 * sigma2)) for v in row] for row in d2], dtype=torch.float64)

    for frac in (0.8, 0.4):
        assert rbf_cka(x, y, sigma_frac=frac).item() == pytest.approx(_hsic_cka(gram(x, frac), gram(y, frac)), rel=1e-9)
    assert rbf_cka(x, x).item() == pytest.approx(1.0, rel=1e-9)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=_g(16), dtype=torch.float64))
    assert rbf_cka(5.0 * x @ q, y).item() == pytest.approx(rbf_cka(x, y).item(), rel=1e-9)  # bandwidth scales along


def test_cka_loss_trains_towards_the_teacher():
    torch.manual_seed(0)
    t = torch.randn(16, 6)
    s = torch.randn(16, 4, requires_grad=True)
    for kernel in ("linear", "rbf"):
        loss = cka_loss(s, t, kernel=kernel)
        (g,) = torch.autograd.grad(loss, s)
        assert torch.isfinite(g).all() and g.abs().sum() > 0
        assert cka_loss(t, t, kernel=kernel).item() == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="same examples"):
        linear_cka(torch.randn(3, 2), torch.randn(4, 2))
