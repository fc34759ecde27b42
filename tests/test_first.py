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
from distill.logits.methods.first import CALIBRATION_GRID, FIRSTParams, fit_calibration_temperature, topk_ece
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


def _first_by_loop(s, t, k, tau, student_norm):
    """S03 written out sample by sample and class by class, in float64."""
    total = 0.0
    for i in range(s.shape[0]):
        e = [math.exp(v) for v in t[i].double().tolist()]
        p = [v / sum(e) for v in e]
        ids = sorted(range(len(p)), key=lambda c: -p[c])[:k]
        qt = [math.exp(p[c] / tau) for c in ids]
        qt = [v / sum(qt) for v in qt]
        es = [math.exp(v) for v in s[i].double().tolist()]
        ps = [es[c] / sum(es) for c in ids]  # the student's full softmax at the teacher's top-k
        if student_norm == "topk":  # official: softmax over those k probabilities (student_temp 1)
            ps = [math.exp(v) / sum(math.exp(u) for u in ps) for v in ps]
        total += sum(qt[j] * (math.log(qt[j]) - math.log(ps[j])) for j in range(k))
    return total / s.shape[0]


@pytest.mark.parametrize("student_norm", ["topk", "full"])
def test_first_loss_against_an_independent_formula(student_norm):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 7, generator=g), 3 * torch.randn(6, 7, generator=g)
    k, tau = 3, 0.2
    ref = _first_by_loop(s, t, k, tau, student_norm)
    assert first_loss(s, t, k, tau, student_norm).item() == pytest.approx(ref, rel=1e-5)


def test_official_student_norm_is_the_default_and_differs_from_full():
    g = torch.Generator().manual_seed(5)
    s, t = 3 * torch.randn(8, 10, generator=g), 3 * torch.randn(8, 10, generator=g)
    topk, full = _first_by_loop(s, t, 5, 1.0, "topk"), _first_by_loop(s, t, 5, 1.0, "full")
    assert full > 10 * topk  # the two normalisations differ by more than an order of magnitude
    assert first_loss(s, t, 5, 1.0).item() == pytest.approx(topk, rel=1e-5)
    assert FIRSTParams().student_norm == "topk"
    # not plain KD at T = 1 either
    kd = torch.nn.functional.kl_div(torch.log_softmax(s, -1), torch.softmax(t, -1), reduction="batchmean")
    assert abs(first_loss(s, t, 5, 1.0).item() - kd.item()) > 1e-2


def test_method_passes_student_norm_to_the_loss():
    from distill.core.distiller import TaskInfo
    from distill.logits.methods.first import FIRST

    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(4, 6), torch.nn.Linear(4, 6)
    x = torch.randn(40, 4)
    info = TaskInfo(num_classes=6, num_train=5, input_shape=(4,), val=_Sized(x, teacher(x).argmax(-1).detach()))
    batch = {"x": torch.randn(5, 4), "y": torch.full((5,), -1), "index": torch.arange(5)}
    for norm in ("topk", "full"):
        d = FIRST(student, teacher, FIRSTParams(top_k=3, student_norm=norm), info)
        got = d.training_step(batch).losses["student"].item()
        with torch.no_grad():
            ref = _first_by_loop(student(batch["x"]), teacher(batch["x"]), 3, float(d.calibration_temperature), norm)
        assert got == pytest.approx(ref, rel=1e-5)


class _Sized:
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)


def test_small_temperature_makes_first_cross_entropy_on_the_teacher_top1():
    # τ → 0 sharpens the top-k target to the teacher's top-1: with the full student the loss is CE(s, argmax t)
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, 10, generator=g), torch.randn(5, 10, generator=g)
    ce = F.cross_entropy(s, t.argmax(-1))
    assert first_loss(s, t, 5, 1e-4, "full").item() == pytest.approx(ce.item(), rel=1e-5)


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
