"""S09: self-distillation with weighted ground truth, kernel ridge theory and the network method."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_recipe

from distill.core.recipe import recipe_from_dict
from distill.core.runner import build_task, load_student, run_recipe
from distill.logits import theory as th
from distill.logits.losses import self_distill_loss
from distill.logits.methods.self_distill import estimate_label_weight

# the official toy example (Kennethborup/self_distillation, toy_example.ipynb): 11 noisy sinusoid points
X = torch.linspace(0, 1, 11, dtype=torch.float64)[:, None]
Y = torch.tensor([0.38476636465198066, 1.2333967683416893, 1.33232242218057, 0.69201594888895180,
                  -0.29756145531871736, -0.24189291901377769, -0.7964485769175675, -0.9616480167034174,
                  -0.49672509509916934, -0.3469066003991437, 0.5589512650600734], dtype=torch.float64)
XE = torch.arange(0, 1.01, 0.01, dtype=torch.float64)[:, None]
TRUTH = torch.sin(2 * torch.pi * XE[:, 0])
K, KE = th.rbf_kernel(X, X, 80.0), th.rbf_kernel(XE, X, 80.0)


def _mse(f: torch.Tensor) -> float:
    return ((f - TRUTH) ** 2).mean().item()


@pytest.mark.parametrize("xi", [0.0, 0.35, 1.0])
def test_closed_form_equals_iterative_refits(xi):
    g = torch.Generator().manual_seed(0)
    x, xe = torch.rand(15, 2, generator=g, dtype=torch.float64), torch.rand(7, 2, generator=g, dtype=torch.float64)
    k, ke = th.rbf_kernel(x, x, 3.0), th.rbf_kernel(xe, x, 3.0)
    for y in (torch.randn(15, generator=g, dtype=torch.float64), torch.randn(15, 2, generator=g, dtype=torch.float64)):
        for kev in (None, ke):
            fits = th.iterative_self_distillation(k, y, 0.1, xi, 6, kev)
            for step, f in enumerate(fits, start=1):
                cf = th.closed_form_self_distillation(k, y, 0.1, xi, step, kev)
                assert cf.dtype == torch.float64
                assert torch.allclose(cf, f, atol=1e-8, rtol=0), (step, xi)


def test_reproduces_the_official_toy_example():
    # the losses against the noise-free sinusoid reported in the official README (gamma 80, lambda 0.2)
    expected = {0.0: [0.16477, 0.15076, 0.14915, 0.15561, 0.16735, 0.18251],
                0.35: [0.16477, 0.15424, 0.15089, 0.14983, 0.14954, 0.14948]}
    for xi, ref in expected.items():
        fits = th.iterative_self_distillation(K, Y, 0.2, xi, 6, KE)
        assert [round(_mse(f), 5) for f in fits] == ref
    assert round(_mse(th.limit_self_distillation(K, Y, 0.2, 0.35, KE)), 5) == 0.14959


def test_infinite_steps_amplify_the_ridge_and_label_weight_one_never_moves():
    fits = th.iterative_self_distillation(K, Y, 0.2, 0.35, 300, KE)
    assert torch.allclose(fits[-1], th.limit_self_distillation(K, Y, 0.2, 0.35, KE), atol=1e-8, rtol=0)
    # the closed form's geometric sum reaches the same limit
    assert torch.allclose(th.closed_form_self_distillation(K, Y, 0.2, 0.35, 300, KE), fits[-1], atol=1e-8, rtol=0)
    same = th.iterative_self_distillation(K, Y, 0.2, 1.0, 4, KE)
    assert all(torch.allclose(f, same[0], atol=1e-12) for f in same)  # xi = 1: refitting the labels
    zero = th.iterative_self_distillation(K, Y, 0.2, 0.0, 200)
    assert zero[-1].abs().max() < 1e-3 < zero[0].abs().max()  # xi = 0 collapses to the zero function
    with pytest.raises(ValueError):
        th.limit_self_distillation(K, Y, 0.2, 0.0)


def test_optimal_label_weight_beats_both_ends_and_matches_grid_search():
    # a constructed example: after three xi = 0 steps the fit is over-regularised, so the optimum of
    # the fourth step lies strictly inside (0, 1)
    prev = th.iterative_self_distillation(K, Y, 0.2, 0.0, 3)[-1]
    xi = th.optimal_label_weight(K, Y, 0.2, prev, TRUTH, KE).item()
    assert 0.05 < xi < 0.95

    def err(w: float) -> float:  # the fourth step actually run with weight w (independent of the formula)
        return _mse(th.iterative_self_distillation(K, Y, 0.2, [0.0, 0.0, w], 4, KE)[-1])

    assert err(xi) < err(0.0) and err(xi) < err(1.0)
    grid = torch.linspace(0, 1, 2001).tolist()
    errs = [err(w) for w in grid]
    best = grid[min(range(len(grid)), key=errs.__getitem__)]
    assert abs(best - xi) <= 0.5e-3
    assert err(xi) <= min(errs) + 1e-12
    # the unclipped optimum of the second step of the official example is below 0 (more smoothing
    # wanted); the paper's range clips it to 0
    first = th.iterative_self_distillation(K, Y, 0.2, 1.0, 1)[0]
    assert th.optimal_label_weight(K, Y, 0.2, first, TRUTH, KE, clip=False) < 0
    assert th.optimal_label_weight(K, Y, 0.2, first, TRUTH, KE).item() == 0.0


def test_network_estimate_by_hand():
    # p(xi) = xi*p1 + (1-xi)*p0 against one-hot labels; xi* = <onehot - p0, p1 - p0> / ||p1 - p0||^2
    p0 = torch.tensor([[0.5, 0.5], [0.2, 0.8]])
    p1 = torch.tensor([[0.9, 0.1], [0.6, 0.4]])  # better on sample 0 (label 0), worse on sample 1 (label 1)
    y = torch.tensor([0, 1])
    # sample 0: <[0.5, -0.5], [0.4, -0.4]> = 0.4; sample 1: <[-0.2, 0.2], [0.4, -0.4]> = -0.16; ||.||^2 = 0.32 + 0.32
    assert th.estimate_label_weight(p1, p0, y).item() == pytest.approx(0.24 / 0.64)
    assert th.estimate_label_weight(p1[:1], p0[:1], y[:1]).item() == 1.0  # 0.4 / 0.32 = 1.25, clipped
    assert th.estimate_label_weight(p1[1:], p0[1:], y[1:]).item() == 0.0  # -0.5, clipped
    grid = torch.linspace(0, 1, 1001)
    errs = torch.stack([((w * p1 + (1 - w) * p0 - F.one_hot(y, 2)) ** 2).sum() for w in grid])
    assert th.estimate_label_weight(p1, p0, y).item() == pytest.approx(grid[errs.argmin()].item(), abs=1e-3)


def test_self_distill_loss_by_hand():
    s, t, y = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 2.0]]), torch.tensor([0])
    pt1 = 1 / (1 + torch.e**2)  # teacher's probability of class 0
    q0 = 0.6 * 1 + 0.4 * pt1  # target for class 0 with xi = 0.6
    assert self_distill_loss(s, t, y, 0.6, "mse").item() == pytest.approx(2 * (0.5 - q0) ** 2, rel=1e-6)
    ce = -(q0 * torch.log(torch.tensor(0.5)) + (1 - q0) * torch.log(torch.tensor(0.5))).item()
    assert self_distill_loss(s, t, y, 0.6, "ce").item() == pytest.approx(ce, rel=1e-6)
    # xi = 1 is MSE to the one-hot label; xi = 0 MSE to the teacher
    assert self_distill_loss(s, t, y, 1.0).item() == pytest.approx(0.5, rel=1e-6)
    assert self_distill_loss(s, t, y, 0.0).item() == pytest.approx(2 * (0.5 - pt1) ** 2, rel=1e-5)


def test_mixed_target_has_the_official_weighted_loss_gradient():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(5, 4, generator=g, requires_grad=True)
    t, y = torch.randn(5, 4, generator=g), torch.randint(0, 4, (5,), generator=g)
    self_distill_loss(s, t, y, 0.3).backward()
    ours = s.grad.clone()
    s.grad = None
    p = F.softmax(s, -1)  # self_distiller.py: alpha*MSE(p, y) + (1-alpha)*MSE(p, softmax(t)), here summed over classes
    official = 0.3 * ((p - F.one_hot(y, 4)) ** 2).sum(-1).mean() + 0.7 * ((p - F.softmax(t, -1)) ** 2).sum(-1).mean()
    official.backward()
    assert torch.allclose(ours, s.grad, atol=1e-6)


def test_estimate_then_distill_end_to_end(tmp_runs):
    gen1 = tiny_recipe("gen1", {"name": "ce"})  # generation 1: the student's architecture on labels
    pilot_recipe = tiny_recipe("xi0", {"name": "self_distill", "label_weight": 0.0}, {"recipe": gen1})
    pilot = run_recipe(recipe_from_dict(pilot_recipe), out=tmp_runs)
    teacher = load_student(next((tmp_runs / "_teachers").iterdir()))
    val = build_task(recipe_from_dict(gen1)).val
    xi = estimate_label_weight(teacher, pilot.student, val)
    assert 0.0 <= xi <= 1.0
    final_recipe = tiny_recipe("xi", {"name": "self_distill", "label_weight": xi}, {"recipe": gen1})
    res = run_recipe(recipe_from_dict(final_recipe), out=tmp_runs)
    assert len(list((tmp_runs / "_teachers").iterdir())) == 1  # the same generation-1 teacher
    assert 0.0 <= res.metrics["test/accuracy"] <= 1.0
    assert any(r.get("train/label_weight") == pytest.approx(xi) for r in res.history)
