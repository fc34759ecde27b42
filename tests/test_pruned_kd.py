"""S27: KD on a pruned training set."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_recipe, tiny_teacher

from distill.core.checkpoint import trainable_state
from distill.core.distiller import TaskInfo
from distill.core.recipe import recipe_from_dict
from distill.core.runner import run_recipe
from distill.logits.methods.pruned_kd import PrunedKD, PrunedKDParams, el2n_scores, kd_weight_for_fraction, select_subset
from distill.tasks.base import ArrayDataset
from distill.tasks.models import MLPParams, mlp


def test_subset_fraction_and_determinism():
    y = torch.cat([torch.randint(0, 3, (100,)), torch.full((50,), -1)])  # 100 labeled, 50 transfer
    torch.manual_seed(0)
    a = select_subset(150, y, 0.3)
    torch.manual_seed(0)
    b = select_subset(150, y, 0.3)
    torch.manual_seed(1)
    c = select_subset(150, y, 0.3)
    assert a.dtype == torch.bool and a.sum() == 30 and not a[100:].any()  # labeled samples only
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert select_subset(150, y, 1e-6).sum() == 1 and select_subset(150, y, 1.0).sum() == 100
    scores = torch.arange(150.0)
    top = select_subset(150, y, 0.1, scores)
    assert torch.equal(torch.nonzero(top).squeeze(-1), torch.arange(90, 100))  # the 10 largest labeled scores


def test_kd_weight_tied_to_fraction():
    assert kd_weight_for_fraction(1.0) == pytest.approx(0.5)
    assert kd_weight_for_fraction(0.3) == pytest.approx(0.85)
    assert kd_weight_for_fraction(0.1, 0.6) == pytest.approx(1 - 0.4 * 0.1)
    ws = [kd_weight_for_fraction(f) for f in (0.05, 0.1, 0.5, 1.0)]
    assert ws == sorted(ws, reverse=True) and ws[0] < 1.0


def test_el2n_by_hand():
    z, y = torch.tensor([[0.0, 0.0], [2.0, 0.0]]), torch.tensor([0, 1])
    p = 1 / (1 + torch.e**-2)  # softmax([2, 0])[0]
    expected = torch.tensor([(0.5**2 * 2) ** 0.5, (p**2 + p**2) ** 0.5])  # [p, 1-p] - [0, 1] = [p, -p]
    assert torch.allclose(el2n_scores(z, y), expected, atol=1e-6)


def _tiny(fraction: float, **kw) -> PrunedKD:
    torch.manual_seed(0)
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    teacher, student = mlp(MLPParams(width=16, depth=1), (5,), 3), mlp(MLPParams(width=8, depth=1), (5,), 3)
    info = TaskInfo(3, 40, (5,), 40, ArrayDataset(x, y))
    return PrunedKD(student, teacher, PrunedKDParams(fraction=fraction, **kw), info)


def test_objective_only_on_kept_samples():
    m = _tiny(0.5)
    assert m.kd_weight == pytest.approx(0.75) and m.keep.sum() == 20
    ds = m.info.train
    batch = ds.__getitems__(list(range(12)))
    keep = m.keep[:12]
    assert 0 < keep.sum() < 12
    step = m.training_step(batch)
    s, t = m.student(batch["x"][keep]), m.teacher(batch["x"][keep])
    kd = F.kl_div(F.log_softmax(s / 4, -1), F.softmax(t / 4, -1), reduction="batchmean") * 16
    ce = F.cross_entropy(s, batch["y"][keep])
    assert step.losses["student"].item() == pytest.approx((0.25 * ce + 0.75 * kd).item(), rel=1e-5)
    # a batch without kept samples: zero loss, zero gradient, and the backward pass still works
    dropped = torch.nonzero(~m.keep).squeeze(-1)[:5].tolist()
    out = m.training_step(ds.__getitems__(dropped))
    out.losses["student"].backward()
    assert out.losses["student"].item() == 0.0
    assert all(p.grad is not None and not p.grad.any() for p in m.student.parameters())
    assert "keep" in trainable_state(m)  # the subset travels with the checkpoint
    explicit = _tiny(0.5, kd_weight=0.2)
    assert explicit.kd_weight == 0.2


def test_el2n_keeps_the_teachers_hardest_samples():
    m = _tiny(0.25, selection="el2n")
    scores = el2n_scores(m.teacher(m.info.train.x), m.info.train.y)
    assert torch.equal(m.keep, scores >= scores.sort(descending=True).values[9])


@pytest.mark.parametrize("selection", ["random", "el2n"])
def test_pruned_kd_runs_end_to_end(tmp_runs, selection):
    r = tiny_recipe(f"pruned-{selection}", {"name": "pruned_kd", "fraction": 0.25, "selection": selection},
                    {"recipe": tiny_teacher()}, batch_size=128)
    res = run_recipe(recipe_from_dict(r), out=tmp_runs)
    assert 0.0 <= res.metrics["test/accuracy"] <= 1.0
    kept = [row["train/kept"] for row in res.history if "train/kept" in row]
    assert kept and all(0 < k < 128 for k in kept)  # about a quarter of each 128-sample batch
