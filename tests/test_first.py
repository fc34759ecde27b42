"""FIRST (S03): calibrated top-k targets, the ECE-fitted temperature, a tiny run and resume."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_recipe, tiny_teacher, resume_round_trip
from safetensors.torch import load_file

from distill.core.metrics import ece
from distill.core.recipe import recipe_from_dict
from distill.core.runner import run_recipe
from distill.logits.methods.first import CALIBRATION_GRID, fit_calibration_temperature, topk_ece
from distill.logits.losses import first_loss, first_targets


def test_first_targets_by_hand():
    # teacher logits [2, 1, 0, -1]: probs p = e^z / Σ; top-2 = (p0, p1), then softmax(p / 0.5)
    z = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    total = sum(math.exp(v) for v in (2, 1, 0, -1))
    p0, p1 = math.exp(2) / total, math.exp(1) / total
    a, b = math.exp(p0 / 0.5), math.exp(p1 / 0.5)
    target, idx = first_targets(z, top_k=2, calibration_temperature=0.5)
    assert idx.tolist() == [[0, 1]]
    assert target[0].tolist() == pytest.approx([a / (a + b), b / (a + b)], rel=1e-6)


def test_first_loss_against_an_independent_formula():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 7, generator=g), 3 * torch.randn(6, 7, generator=g)
    k, tau = 3, 0.2
    total = 0.0
    for i in range(6):  # row by row, in float64
        p = torch.softmax(t[i].double(), 0)
        top, ids = p.sort(descending=True)
        q = torch.softmax(top[:k] / tau, 0)
        log_s = torch.log_softmax(s[i].double(), 0)[ids[:k]]
        total += float((q * (q.log() - log_s)).sum())
    assert first_loss(s, t, k, tau).item() == pytest.approx(total / 6, rel=1e-5)


def test_small_temperature_makes_first_cross_entropy_on_the_teacher_top1():
    # τ → 0 sharpens the top-k target to the teacher's top-1: the loss becomes CE(s, argmax t)
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, 10, generator=g), torch.randn(5, 10, generator=g)
    ce = F.cross_entropy(s, t.argmax(-1))
    assert first_loss(s, t, 5, 1e-4).item() == pytest.approx(ce.item(), rel=1e-5)


def _overconfident(n: int = 3000, classes: int = 10, acc: float = 0.6):
    """Logits with ~0.99 confidence on a prediction that is right 60% of the time."""
    g = torch.Generator().manual_seed(2)
    y = torch.randint(0, classes, (n,), generator=g)
    wrong = (y + torch.randint(1, classes, (n,), generator=g)) % classes
    pred = torch.where(torch.rand(n, generator=g) < acc, y, wrong)
    logits = 0.3 * torch.randn(n, classes, generator=g) + 7.0 * F.one_hot(pred, classes)
    return logits, y


def test_fitted_temperature_lowers_the_ece_of_an_overconfident_teacher():
    logits, y = _overconfident()
    raw = ece(logits, y)
    assert raw > 0.3  # over-confident: ~0.99 confidence, 60% accuracy
    tau = fit_calibration_temperature(logits, y, top_k=5)
    fitted = topk_ece(logits, y, 5, tau)
    assert fitted < 0.05 < raw
    assert fitted <= topk_ece(logits, y, 5, 1.0)  # better than the uncalibrated top-k softmax
    assert fitted == pytest.approx(min(topk_ece(logits, y, 5, float(t)) for t in CALIBRATION_GRID))
    # the calibrated confidence sits near the accuracy
    target, _ = first_targets(logits, 5, tau)
    assert target[:, 0].mean().item() == pytest.approx(0.6, abs=0.05)


def _first_recipe(name: str, **train) -> dict:
    return tiny_recipe(name, {"name": "first", "top_k": 3}, {"recipe": tiny_teacher()}, **train)


def test_first_tiny_run_stores_the_temperature(tmp_runs):
    res = run_recipe(recipe_from_dict(_first_recipe("first")), out=tmp_runs)
    assert math.isfinite(res.metrics["test/accuracy"])
    taus = [r["train/calibration_temperature"] for r in res.history if "train/calibration_temperature" in r]
    assert taus and len(set(taus)) == 1  # fitted once, then constant
    state = load_file(str(res.run_dir / "checkpoints" / "latest" / "model.safetensors"))
    assert state["calibration_temperature"].item() == pytest.approx(taus[0], rel=1e-6)


def test_first_resume_is_bitwise_exact(tmp_runs):
    resume_round_trip(_first_recipe("first", epochs=2), tmp_runs, 3)


def test_first_needs_a_validation_split(tmp_runs):
    from distill.errors import RecipeError

    data = _first_recipe("first-noval")
    data["task"]["num_val"] = 0
    with pytest.raises(RecipeError, match="num_val"):
        run_recipe(recipe_from_dict(data), out=tmp_runs)
