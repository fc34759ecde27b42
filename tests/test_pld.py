"""PLD (S11): the Plackett–Luce loss by hand, its special cases, and a short run."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_recipe, tiny_teacher

from distill.core.distiller import TaskInfo
from distill.core.recipe import load_recipe, recipe_from_dict
from distill.core.runner import run_recipe
from distill.logits.losses import pld_loss, teacher_optimal_permutation
from distill.logits.methods.pld import PlackettLuceKD, PLDParams


def _lse(*v: float) -> float:
    return math.log(sum(math.exp(x) for x in v))


def test_pld_three_classes_by_hand():
    # student s = [1, 2, 0], teacher t = [0, 3, 1], label y = 2.
    # π* = (2, then the rest by teacher logit: 1 (3), 0 (0)) = (2, 1, 0)
    s, t, y = torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([[0.0, 3.0, 1.0]]), torch.tensor([2])
    assert teacher_optimal_permutation(t, y).tolist() == [[2, 1, 0]]
    z = math.exp(0) + math.exp(3) + math.exp(1)
    q = [math.exp(0) / z, math.exp(3) / z, math.exp(1) / z]  # teacher softmax, class order
    expected = (
        q[2] * (_lse(0.0, 2.0, 1.0) - 0.0)  # pick class 2 from {2, 1, 0}
        + q[1] * (_lse(2.0, 1.0) - 2.0)  # pick class 1 from {1, 0}
        + q[0] * (_lse(1.0) - 1.0)  # pick class 0 from {0}: log 1 = 0
    )
    assert pld_loss(s, t, y).item() == pytest.approx(expected, rel=1e-6)
    # teacher temperature softens the weights only (the student is never tempered)
    zt = sum(math.exp(v / 2) for v in (0.0, 3.0, 1.0))
    q2 = [math.exp(v / 2) / zt for v in (0.0, 3.0, 1.0)]
    expected_t2 = q2[2] * (_lse(0.0, 2.0, 1.0)) + q2[1] * (_lse(2.0, 1.0) - 2.0)
    assert pld_loss(s, t, y, teacher_temperature=2.0).item() == pytest.approx(expected_t2, rel=1e-6)


def test_pld_batch_mean_and_label_moved_to_front():
    s = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 2.0]])
    t = torch.tensor([[0.0, 3.0, 1.0], [2.0, 1.0, 0.0]])
    y = torch.tensor([2, 1])
    assert teacher_optimal_permutation(t, y).tolist() == [[2, 1, 0], [1, 0, 2]]
    per = pld_loss(s, t, y, reduction="none")
    assert per.shape == (2,)
    assert pld_loss(s, t, y).item() == pytest.approx(per.mean().item())
    assert pld_loss(s, t, y, reduction="sum").item() == pytest.approx(per.sum().item())


def test_pld_special_cases():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    y = t.argmax(-1)
    # a one-hot teacher weight on the label (α = (1, 0, ..., 0)) is plain cross-entropy
    ce = F.cross_entropy(s, y)
    assert pld_loss(s, t, y, teacher_temperature=1e-4).item() == pytest.approx(ce.item(), rel=1e-5)
    # uniform teacher weights: ListMLE over (label, then classes in index order) divided by C
    flat = torch.zeros(6, 5)
    y2 = torch.tensor([0, 1, 2, 3, 4, 0])
    listmle = []
    for i in range(6):
        order = [int(y2[i])] + [c for c in range(5) if c != int(y2[i])]
        sv = s[i, order]
        listmle.append(sum(float(torch.logsumexp(sv[k:], 0) - sv[k]) for k in range(5)) / 5)
    assert pld_loss(s, flat, y2).item() == pytest.approx(sum(listmle) / 6, rel=1e-5)
    # translation invariance in the student and in the teacher logits
    base = pld_loss(s, t, y)
    assert pld_loss(s + 7.0, t - 3.0, y).item() == pytest.approx(base.item(), rel=1e-5)
    # finite for huge logits, and float32 output for half inputs
    big = pld_loss(s * 1e4, t * 1e4, y)
    assert torch.isfinite(big)
    assert pld_loss(s.half(), t.half(), y).dtype == torch.float32


def test_pld_unlabeled_samples_use_teacher_top1():
    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    d = PlackettLuceKD(student, teacher, PLDParams(), TaskInfo(3, 8, (4,)))
    x = torch.randn(5, 4)
    batch = {"x": x, "y": torch.tensor([0, -1, 2, -1, 1]), "index": torch.arange(5)}
    out = d.training_step(batch)
    with torch.no_grad():
        t = teacher(x)
    y = torch.where(batch["y"] >= 0, batch["y"], t.argmax(-1))
    assert out.losses["student"].item() == pytest.approx(pld_loss(student(x), t, y).item(), rel=1e-6)


def test_pld_recipe_loads_and_tiny_run(tmp_runs):
    assert load_recipe("mnist1d-pld").method.name == "pld"
    res = run_recipe(recipe_from_dict(tiny_recipe("pld", {"name": "pld"}, {"recipe": tiny_teacher()})), out=tmp_runs)
    assert 0.0 <= res.metrics["test/accuracy"] <= 1.0 and "test/ece" in res.metrics
    assert any("train/pld" in r for r in res.history)
