"""CALICO RAD (S55): region pooling and the region InfoNCE against explicit loops (same region of the
other modality positive, every other region negative), a training step by hand (teacher on modality A,
student on modality B), the paired task and arch, and the recipe end to end."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from distill.core.distiller import TaskInfo
from distill.core.recipe import load_recipe, recipe_from_dict, shipped_recipe
from distill.core.runner import run_recipe
from distill.errors import RecipeError
from distill.features.data.paired import PairedParams, build_paired
from distill.features.methods.calico import CALICO, CALICOParams, region_features, region_infonce
from distill.logits.losses import kd_loss
from distill.tasks.models import build_model


def ref_infonce(s: torch.Tensor, t: torch.Tensor, tau: float, same_scene: bool = False) -> float:
    """-mean log softmax of the matching region, by loops over (scene, region) pairs."""
    b, r, _ = s.shape
    total = 0.0
    for i in range(b):
        for j in range(r):
            q = s[i, j] / s[i, j].norm()
            sims = {}
            for i2 in range(b):
                if same_scene and i2 != i:
                    continue
                for j2 in range(r):
                    sims[(i2, j2)] = math.exp(float(q @ (t[i2, j2] / t[i2, j2].norm())) / tau)
            total += -math.log(sims[(i, j)] / sum(sims.values()))
    return total / (b * r)


def test_region_features_by_hand():
    m = torch.arange(2 * 3 * 4 * 4, dtype=torch.float).view(2, 3, 4, 4)
    f = region_features(m, 2)
    assert f.shape == (2, 4, 3)
    # region 1 = top-right 2x2 block, channel 2 of sample 1
    assert f[1, 1, 2].item() == pytest.approx(m[1, 2, :2, 2:].mean().item())
    assert f[0, 2, 0].item() == pytest.approx(m[0, 0, 2:, :2].mean().item())


@pytest.mark.parametrize("tau,negatives", [(0.1, "all"), (0.5, "all"), (0.2, "scene")])
def test_infonce_by_explicit_loops(tau, negatives):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    got = region_infonce(s, t, tau, negatives).item()
    assert got == pytest.approx(ref_infonce(s, t, tau, negatives == "scene"), rel=1e-5)
    sym = region_infonce(s, t, tau, negatives, symmetric=True).item()
    assert sym == pytest.approx((ref_infonce(s, t, tau, negatives == "scene") + ref_infonce(t, s, tau, negatives == "scene")) / 2, rel=1e-5)


def test_infonce_rewards_matching_regions_only():
    g = torch.Generator().manual_seed(1)
    t = torch.randn(2, 4, 8, generator=g)
    aligned = region_infonce(t.clone(), t, 0.1).item()
    shuffled = region_infonce(t[:, [1, 0, 3, 2]], t, 0.1).item()  # right scene, wrong regions
    assert aligned < 0.5 < shuffled


def _pair(**kw) -> CALICO:
    torch.manual_seed(0)
    s = build_model("bevnet", {"modality": "b", "width": 4, "depth": 2}, (5, 8, 8), 4)
    t = build_model("bevnet", {"modality": "a", "width": 6, "depth": 2}, (5, 8, 8), 4)
    return CALICO(s, t, CALICOParams(**({"regions": 2, "dim": 8} | kw)), TaskInfo(4, 8, (5, 8, 8)))


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return {"x": torch.randn(3, 5, 8, 8, generator=g), "y": torch.tensor([0, -1, 3]), "index": torch.arange(3)}


def test_training_step_by_a_manual_forward():
    d, b = _pair(rad_weight=2.0, temperature=0.3), _batch()
    step = d.training_step(b)
    x = b["x"]
    with torch.no_grad():
        t_map = d.teacher.net.stages[1](d.teacher.net.stages[0](x[:, 0:2]))  # teacher: modality A only
        s_map = d.student.net.stages[1](d.student.net.stages[0](x[:, 2:5]))  # student: modality B only
        logits = d.student(x)

        def pooled(m: torch.Tensor) -> torch.Tensor:  # 2x2 regions of the 4x4 maps, row-major
            return torch.stack([m[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean((2, 3)) for i in range(2) for j in range(2)], 1)

        z_s, z_t = d.projectors["student"](pooled(s_map)), d.projectors["teacher"](pooled(t_map))
        ce = torch.nn.functional.cross_entropy(logits[[0, 2]], b["y"][[0, 2]]).item()  # the unlabeled scene: no CE
        want = ce + 2.0 * ref_infonce(z_s, z_t, 0.3)
    assert step.losses["student"].item() == pytest.approx(want, rel=1e-4)
    assert abs(step.losses["student"].item() - (ce + 2.0 * kd_loss(logits, d.teacher(x), 4.0).item())) > 1e-2
    step.losses["student"].backward()
    assert all(p.grad is None for p in d.teacher.parameters())
    assert d.projectors["teacher"][0].weight.grad.abs().sum() > 0 and d.student.net.stages[0][0].weight.grad.abs().sum() > 0


def test_modalities_are_separate_and_task_is_consistent():
    d = build_paired(PairedParams(num_train=8, num_val=0, num_test=8, num_transfer=4))
    assert d.train.x.shape == (8, 5, 8, 8) and d.transfer is not None and (d.transfer.y == -1).all()
    types = d.meta["test_types"]
    for i in range(8):  # the label is the strict majority type; LiDAR returns only where objects or clutter are
        counts = torch.bincount(types[i][types[i] >= 0], minlength=4)
        assert int(counts.argmax()) == int(d.test.y[i]) and (counts < counts.max()).sum() == 3
    s = build_model("bevnet", {"modality": "b", "width": 4, "depth": 2}, (5, 8, 8), 4)
    x = d.test.x.clone()
    y0 = s(x)
    x[:, 0:2] = torch.randn_like(x[:, 0:2])  # the camera student never sees the LiDAR channels
    torch.testing.assert_close(s(x), y0)
    with pytest.raises(RecipeError, match="BEV maps"):
        CALICO(build_model("mlpnet", {}, (5, 8, 8), 4), build_model("mlpnet", {}, (5, 8, 8), 4), CALICOParams(), TaskInfo(4, 8, (5, 8, 8)))


@pytest.mark.slow
def test_recipe_runs_end_to_end(tmp_runs):
    r = load_recipe("paired-calico")
    assert r.method.name == "calico"
    data = yaml.safe_load(shipped_recipe("paired-calico").read_text())
    data["task"] = {"name": "paired", "num_train": 40, "num_val": 16, "num_test": 40, "num_transfer": 40}
    small = {"epochs": 1, "batch_size": 32, "progress": False, "trackers": "none"}
    data["teacher"] = {"recipe": {"name": "t", "seed": 0, "task": data["task"], "student": {"arch": "bevnet", "modality": "a", "width": 8, "depth": 2},
                                  "method": {"name": "ce"}, "train": small}}
    data["train"] |= small
    res = run_recipe(recipe_from_dict(data), out=tmp_runs)
    assert 0 <= res.metrics["test/accuracy"] <= 1 and "teacher/accuracy" in res.metrics
