"""ACAM-KD (S53): the cross-attention fusion, the mask-normalised spatial and channel losses and the
Dice diversity against explicit loops; a training step against a hand-written one; the masks' units
ascend (``max``) or descend (``min``) the masked error while the student always descends it; errors;
the recipe end to end."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from safetensors.torch import load_file

from distill.core.distiller import TaskInfo
from distill.core.recipe import load_recipe, recipe_from_dict, shipped_recipe
from distill.core.runner import run_recipe
from distill.errors import RecipeError
from distill.features.methods.acam import (
    ACAM,
    ACAMParams,
    cross_attention_fusion,
    dice_diversity,
    masked_feature_losses,
)
from distill.tasks.models import build_model


def test_cross_attention_fusion_by_explicit_loops():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 3, 2, 2, generator=g), torch.randn(2, 3, 2, 2, generator=g), torch.randn(2, 5, 2, 2, generator=g)
    got = cross_attention_fusion(q, k, v)
    assert got.shape == (2, 5, 2, 2)
    pos = [(i, j) for i in range(2) for j in range(2)]
    for n in range(2):
        for a, (i, j) in enumerate(pos):  # query position (teacher)
            scores = [sum(q[n, c, i, j].item() * k[n, c, y, x].item() for c in range(3)) / math.sqrt(3) for y, x in pos]
            z = sum(math.exp(s) for s in scores)
            w = [math.exp(s) / z for s in scores]
            for c in range(5):
                want = sum(w[b] * v[n, c, y, x].item() for b, (y, x) in enumerate(pos))
                assert got[n, c, i, j].item() == pytest.approx(want, rel=1e-5, abs=1e-6)


def _losses_by_hand(s, t, sp, ch) -> tuple[float, float]:
    n, c, h, w = s.shape
    m = sp.shape[1]
    ls = lc = 0.0
    for b in range(n):
        for k in range(m):
            num = sum(sp[b, k, i, j].item() * (t[b, cc, i, j].item() - s[b, cc, i, j].item()) ** 2
                      for cc in range(c) for i in range(h) for j in range(w))
            ls += num / (c * sum(sp[b, k, i, j].item() for i in range(h) for j in range(w))) / m
            num = sum(ch[b, k, cc].item() * (t[b, cc, i, j].item() - s[b, cc, i, j].item()) ** 2
                      for cc in range(c) for i in range(h) for j in range(w))
            lc += num / (h * w * sum(ch[b, k, cc].item() for cc in range(c))) / m
    return ls / n, lc / n


def test_masked_feature_losses_by_explicit_loops():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 3, 2, 3, generator=g), torch.randn(2, 3, 2, 3, generator=g)
    sp, ch = torch.rand(2, 2, 2, 3, generator=g), torch.rand(2, 2, 3, generator=g)
    ls, lc = masked_feature_losses(s, t, sp, ch)
    want_s, want_c = _losses_by_hand(s, t, sp, ch)
    assert ls.item() == pytest.approx(want_s, rel=1e-5) and lc.item() == pytest.approx(want_c, rel=1e-5)
    # uniform masks give plain MSE; the masks' scale cancels
    ones_s, ones_c = torch.ones_like(sp), torch.ones_like(ch)
    mse = ((s - t) ** 2).mean().item()
    assert [v.item() for v in masked_feature_losses(s, t, 0.3 * ones_s, 0.7 * ones_c)] == pytest.approx([mse, mse], rel=1e-5)
    # a mask on one position only measures that position
    one = torch.zeros_like(sp)
    one[:, :, 1, 2] = 1.0
    at = ((s - t)[:, :, 1, 2] ** 2).mean().item()
    assert masked_feature_losses(s, t, one, ones_c)[0].item() == pytest.approx(at, rel=1e-5)


def test_dice_diversity_by_hand():
    m = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]]])  # one sample, 3 masks
    pairs = [(0, 1), (0, 2), (1, 2)]
    def dice(a, b):
        return 2 * sum(x * y for x, y in zip(a, b)) / (sum(x * x for x in a) + sum(y * y for y in b))
    want = sum(dice(m[0, i].tolist(), m[0, j].tolist()) for i, j in pairs) / 3
    assert dice_diversity(m).item() == pytest.approx(want, rel=1e-5)
    assert dice_diversity(torch.ones(2, 1, 4)).item() == 0.0  # one mask: nothing to diversify


def _pair(**kw) -> ACAM:
    torch.manual_seed(0)
    s = build_model("cnn2d", {"width": 4, "depth": 3}, (8, 8), 4)
    t = build_model("cnn2d", {"width": 6, "depth": 3}, (8, 8), 4)
    params = ACAMParams(student_layers=["body.4"], teacher_layers=["body.4"], num_masks=2, **kw)
    return ACAM(s, t, params, TaskInfo(4, 16, (8, 8)))


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"x": torch.randn(3, 8, 8, generator=g), "y": torch.tensor([0, 1, -1]), "index": torch.arange(3)}


def test_training_step_by_hand():
    d, b = _pair(distill_weight=0.5, diversity_weight=0.25), _batch()
    mod = d.projector("body.4")
    with torch.no_grad():  # sharp attention, so which side gives the query shows in the masks
        mod.q.weight.mul_(30.0)
        mod.k.weight.mul_(30.0)
        mod.spatial.weight.mul_(10.0)
    step = d.training_step(b)
    with torch.no_grad():
        x = b["x"]
        fs = d.student.body[:5](x)  # conv, relu, conv, relu: the 4x4 map
        ft = d.teacher.body[:5](x)
        a = mod.align(fs)
        n, c, h, w = ft.shape
        q, k, v = mod.q(ft).flatten(2), mod.k(a).flatten(2), mod.v(a).flatten(2)
        att = torch.softmax(torch.einsum("ndi,ndj->nij", q, k) / math.sqrt(q.shape[1]), -1)
        fused = torch.einsum("nij,ncj->nci", att, v).reshape(n, c, h, w)
        sp = torch.sigmoid(mod.spatial(fused))
        ch = torch.sigmoid(mod.channel(fused.mean((2, 3)))).view(n, 2, c)
        logits = d.student(b["x"])
    ls, lc = _losses_by_hand(a, ft, sp, ch)
    ce = sum(-torch.log_softmax(logits[i], -1)[int(b["y"][i])].item() for i in range(2)) / 2
    div = dice_diversity(sp).item() + dice_diversity(ch).item()
    assert step.metrics["spatial"].item() == pytest.approx(ls, rel=1e-4)
    assert step.metrics["channel"].item() == pytest.approx(lc, rel=1e-4)
    assert step.losses["student"].item() == pytest.approx(ce + 0.5 * (ls + lc) + 0.25 * div, rel=1e-4)


def _grads(objective: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d, b = _pair(mask_objective=objective, ce_weight=0.0, diversity_weight=0.0), _batch()
    d.training_step(b).losses["student"].backward()
    mod = d.projector("body.4")
    return mod.spatial.weight.grad.clone(), mod.align.weight.grad.clone(), d.student.body[1].weight.grad.clone()


def test_mask_units_ascend_the_masked_error_and_the_student_descends_it():
    assert ACAMParams().mask_objective == "max"
    mask_max, align_max, stu_max = _grads("max")
    mask_min, align_min, stu_min = _grads("min")
    assert mask_max.abs().sum() > 0
    assert torch.allclose(mask_max, -mask_min, atol=1e-7)  # the mask units' gradient flips
    assert torch.allclose(align_max, align_min, atol=1e-7)  # the student side does not
    assert torch.allclose(stu_max, stu_min, atol=1e-7)


def test_masks_follow_the_student():
    d, b = _pair(), _batch()
    mod = d.projector("body.4")
    x = b["x"]
    ft = d.teacher.body[:5](x)
    with torch.no_grad():
        _, sp1, _ = mod(d.student.body[:5](x), ft)
        d.student.body[1].weight.mul_(-1.0)
        _, sp2, _ = mod(d.student.body[:5](x), ft)
    assert not torch.allclose(sp1, sp2)  # cooperative: the student's features change the masks


def test_errors_are_one_line():
    s = build_model("mlp", {"width": 8, "depth": 1}, (8, 8), 4)
    t = build_model("cnn2d", {"width": 6, "depth": 3}, (8, 8), 4)
    with pytest.raises(RecipeError, match="2-D feature maps"):
        ACAM(s, t, ACAMParams(student_layers=["body.1"], teacher_layers=["body.4"]), TaskInfo(4, 16, (8, 8)))
    with pytest.raises(RecipeError, match="pair one to one"):
        _pair_layers = ACAMParams(student_layers=["body.4"], teacher_layers=["body.2", "body.4"])
        ACAM(t, t, _pair_layers, TaskInfo(4, 16, (8, 8)))


def test_recipe_shares_the_baselines_budget():
    r, kd, ce = load_recipe("digits-acam"), load_recipe("digits-kd"), load_recipe("digits-ce")
    for base in (kd, ce):
        assert base.student.name == r.student.name and base.student.params == r.student.params
        assert base.train.epochs == r.train.epochs and base.train.lr == r.train.lr


@pytest.mark.slow
def test_recipe_runs_end_to_end(tmp_runs):
    data = yaml.safe_load(shipped_recipe("digits-acam").read_text())  # the shipped recipe, shrunk
    data["task"] = {"name": "digits", "num_train": 200, "num_val": 50, "num_test": 100}
    teacher = yaml.safe_load(shipped_recipe("digits-teacher").read_text())
    teacher |= {"task": data["task"]}
    teacher["train"] |= {"epochs": 1, "progress": False, "trackers": "none"}
    data["teacher"] = {"recipe": teacher}
    data["train"] |= {"epochs": 1, "progress": False, "trackers": "none"}
    res = run_recipe(recipe_from_dict(data), out=tmp_runs)
    assert 0 <= res.metrics["test/accuracy"] <= 1
    exported = load_file(str(res.run_dir / "student" / "model.safetensors"))
    assert not any("projectors" in k for k in exported)
