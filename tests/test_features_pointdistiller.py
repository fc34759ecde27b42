"""PointDistiller (S20): the kNN helpers, the local-graph loss against explicit loops (centres by the
teacher's saliency, kNN on the teacher's features, the same indices for the student, adapters, softmax
re-weighting, 2·mean), a training step by hand, the points task and arch, and the recipe end to end."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from distill.core.distiller import TaskInfo
from distill.core.recipe import load_recipe, recipe_from_dict, shipped_recipe
from distill.core.runner import run_recipe
from distill.errors import RecipeError
from distill.features.data.points import SHAPES, PointsParams, build_points, random_rotations
from distill.features.methods.pointdistiller import (PointDistiller, PointDistillerParams, point_saliency, reweight,
                                                     weighted_graph_mse)
from distill.features.points import knn
from distill.logits.losses import kd_loss
from distill.tasks.models import build_model


def test_knn_by_brute_force():
    g = torch.Generator().manual_seed(0)
    keys, query = torch.randn(2, 10, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    idx = knn(query, keys, 4)
    for b in range(2):
        for s in range(3):
            d = [sum((query[b, s, c] - keys[b, m, c]).item() ** 2 for c in range(4)) for m in range(10)]
            assert sorted(idx[b, s].tolist()) == sorted(sorted(range(10), key=d.__getitem__)[:4])
    with pytest.raises(RecipeError, match="neighbours"):
        knn(query, keys, 11)


def _pair(**kw) -> PointDistiller:
    torch.manual_seed(0)
    s = build_model("pointnet", {"width": 4, "depth": 2}, (12, 3), 3)
    t = build_model("pointnet", {"width": 6, "depth": 2}, (12, 3), 3)
    return PointDistiller(s, t, PointDistillerParams(**({"num_points": 3, "k": 4} | kw)), TaskInfo(3, 8, (12, 3)))


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"x": torch.randn(2, 12, 3, generator=g), "y": torch.tensor([0, 2]), "index": torch.arange(2)}


def ref_local_kd(d: PointDistiller, x: torch.Tensor, tf: torch.Tensor, sf: torch.Tensor) -> float:
    """The official get_knn_point_backbone written out with loops: per sample, the top-S points by the
    max over the teacher's channels, each one's k nearest points in the teacher's feature space, the graph
    [f_j, f_q] through each side's adapter (conv + BN over the whole batch of graphs + ReLU), max over
    j, squared error weighted by S·softmax(saliency/T), 2·mean."""
    p = d.params
    b, n, _ = tf.shape
    sal = [[max(tf[i, j].tolist()) for j in range(n)] for i in range(b)]
    cent = [sorted(range(n), key=lambda j: -sal[i][j])[: p.num_points] for i in range(b)]

    def near(i: int, q: int) -> list[int]:
        dist = [sum((tf[i, q, c] - tf[i, m, c]).item() ** 2 for c in range(tf.shape[2])) for m in range(n)]
        return sorted(range(n), key=dist.__getitem__)[: p.k]

    nbrs = [[near(i, q) for q in cent[i]] for i in range(b)]

    def adapt(f: torch.Tensor, adapter: torch.nn.Module) -> torch.Tensor:  # -> [b, S, C'] (pooled over k)
        rows = [[[torch.cat([f[i, j], f[i, q]]) for j in nbrs[i][s]] for s, q in enumerate(cent[i])] for i in range(b)]
        g = torch.stack([torch.stack([torch.stack(r) for r in row]) for row in rows])  # b S k 2C
        conv, bn = adapter[0], adapter[1]
        z = g @ conv.weight[:, :, 0, 0].T  # b S k C'
        mu, var = z.mean((0, 1, 2)), z.var((0, 1, 2), unbiased=False)
        z = torch.relu((z - mu) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias)
        return z.amax(2)

    gt, gs = adapt(tf, d.projectors["teacher"]), adapt(sf, d.projectors["student"])
    total = 0.0
    for i in range(b):
        e = [math.exp(sal[i][q] / p.temperature) for q in cent[i]]
        for s in range(p.num_points):
            w = p.num_points * e[s] / sum(e) if p.reweight else 1.0
            total += w * ((gt[i, s] - gs[i, s]) ** 2).sum().item()
    return 2 * total / (b * p.num_points * gt.shape[-1])


@pytest.mark.parametrize("temperature,use_w", [(0.5, True), (2.0, True), (1.0, False)])
def test_local_kd_by_explicit_loops(temperature, use_w):
    d, b = _pair(temperature=temperature, reweight=use_w), _batch()
    with torch.no_grad():
        tf = d.teacher.stages[1](d.teacher.stages[0](b["x"])).transpose(1, 2)
        d.student.train()
        sf = d.student.stages[1](d.student.stages[0](b["x"])).transpose(1, 2)
        got, _ = d.distill_loss(b["x"], tf, sf)
        want = ref_local_kd(d, b["x"], tf, sf)
    assert got.item() == pytest.approx(want, rel=1e-4)


def test_training_step_is_ce_plus_local_kd_not_kd():
    d, b = _pair(kd_weight=3.0), _batch()
    torch.manual_seed(5)
    step = d.training_step(b)
    with torch.no_grad():
        tf = d.teacher.stages[1](d.teacher.stages[0](b["x"])).transpose(1, 2)
        logits = d.student(b["x"])  # train mode: same batch statistics as in the step
        sf = d.student.stages[1](d.student.stages[0](b["x"])).transpose(1, 2)
        ce = torch.nn.functional.cross_entropy(logits, b["y"]).item()
        local = ref_local_kd(d, b["x"], tf, sf)
        t_logits = d.teacher(b["x"])
    assert step.losses["student"].item() == pytest.approx(ce + 3.0 * local, rel=1e-4)
    assert abs(step.losses["student"].item() - (ce + 3.0 * kd_loss(logits, t_logits, 4.0).item())) > 1e-3
    step.losses["student"].backward()  # both adapters train (the official teacher adapter too); the teacher does not
    assert d.projectors["teacher"][0].weight.grad.abs().sum() > 0 and d.projectors["student"][0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in d.teacher.parameters())
    assert d.student.stages[0].net[0].weight.grad.abs().sum() > 0
    assert set(d.param_groups()) == {"student", "projectors"}


def test_reweight_and_saliency():
    s = torch.tensor([[1.0, 2.0, 4.0]])
    w = reweight(s, 1.0)
    e = [math.exp(v) for v in (1.0, 2.0, 4.0)]
    assert w.tolist()[0] == pytest.approx([3 * v / sum(e) for v in e], rel=1e-6)
    assert reweight(s, 1e-3).tolist()[0] == pytest.approx([0.0, 0.0, 3.0], abs=1e-6)  # T -> 0: the top centre
    g_t, g_s = torch.ones(1, 3, 2), torch.zeros(1, 3, 2)
    assert weighted_graph_mse(g_t, g_s, None).item() == pytest.approx(2.0)
    g_s[0, 2] = 1.0  # the heaviest centre matches: only the light ones count
    assert weighted_graph_mse(g_t, g_s, w).item() == pytest.approx(2 * 2 * (w[0, 0] + w[0, 1]).item() / 6, rel=1e-6)
    feats = torch.tensor([[[0.1, 0.5], [0.9, -1.0], [0.0, 0.0]]])
    assert point_saliency(feats, torch.zeros(1, 3, 3), "max").tolist()[0] == pytest.approx([0.5, 0.9, 0.0])
    pts = torch.tensor([[[0.0, 0, 0], [0.1, 0, 0], [1.0, 0, 0]]])
    assert point_saliency(feats, pts, "density", radius=0.2).tolist() == [[2.0, 2.0, 1.0]]


def test_checks_and_task():
    with pytest.raises(RecipeError, match="at most"):
        _pair(num_points=13)
    t = build_model("pointnet", {"width": 6, "depth": 2}, (12, 3), 3)
    with pytest.raises(RecipeError, match=r"point-set inputs"):
        PointDistiller(build_model("mlpnet", {}, (8, 8), 3), t, PointDistillerParams(), TaskInfo(3, 8, (8, 8)))
    d = build_points(PointsParams(num_train=12, num_val=0, num_test=6, num_points=32))
    assert d.train.x.shape == (12, 32, 3) and d.num_classes == len(SHAPES)
    assert torch.bincount(torch.cat([d.train.y, d.test.y]), minlength=6).tolist() == [3] * 6
    assert d.train.x.norm(dim=-1).amax().item() == pytest.approx(1.0, abs=1e-5)  # unit radius, no clutter
    r = random_rotations(50, torch.Generator().manual_seed(0))
    torch.testing.assert_close(torch.linalg.det(r), torch.ones(50))
    # the plane patch is flat: its smallest principal extent is the noise only
    plane = d.train.x[d.train.y == 5][0]
    assert torch.linalg.svdvals(plane - plane.mean(0))[-1] < 0.2 * torch.linalg.svdvals(plane - plane.mean(0))[0]


@pytest.mark.slow
def test_recipe_runs_end_to_end(tmp_runs):
    r = load_recipe("points-pointdistiller")
    assert r.method.name == "pointdistiller"
    data = yaml.safe_load(shipped_recipe("points-pointdistiller").read_text())
    data["task"] = {"name": "points", "num_train": 60, "num_val": 12, "num_test": 30, "num_points": 32}
    data["method"] |= {"num_points": 8, "k": 4}
    small = {"epochs": 1, "batch_size": 16, "progress": False, "trackers": "none"}
    data["teacher"] = {"recipe": {"name": "t", "seed": 0, "task": data["task"], "student": {"arch": "pointnet", "width": 8, "depth": 2},
                                  "method": {"name": "ce"}, "train": small}}
    data["train"] |= small
    res = run_recipe(recipe_from_dict(data), out=tmp_runs)
    assert 0 <= res.metrics["test/accuracy"] <= 1 and "teacher/accuracy" in res.metrics
