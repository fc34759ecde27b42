"""DistillNearest / DistillWeighted (S22, ``multi_source``): the task-similarity scores against explicit
loops, the source weights by hand, a training step against an independent computation of the whole
objective (z-scored source features, projector per source, softmax-weighted probe mixture), the
selection of the related source over an unrelated one, the ``sources`` reference kind and its folder,
and the recipe end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from torch import nn

from distill.core.distiller import TaskInfo
from distill.core.recipe import load_recipe, recipe_from_dict, shipped_recipe
from distill.core.refs import load_student
from distill.core.runner import run_recipe
from distill.errors import ModelError, RecipeError
from distill.features.methods.multi_source import (
    MultiSource, MultiSourceParams, gbc_score, ncc_loo_score, source_weights,
)
from distill.features.sources import SOURCES_FORMAT, SourceSet, load_sources, resolve_sources
from distill.tasks.base import ArrayDataset
from distill.tasks.models import build_model
from distill.tasks.ops import save_student


def ref_ncc_loo(g: list[list[float]], y: list[int]) -> float:
    """Leave-one-out nearest centroid, written out: recompute every centroid without sample i."""
    right = 0
    for i in range(len(g)):
        best, best_c = math.inf, None
        for c in sorted(set(y)):
            members = [g[j] for j in range(len(g)) if y[j] == c and j != i]
            if not members:
                continue
            mu = [sum(col) / len(members) for col in zip(*members)]
            d = sum((a - b) ** 2 for a, b in zip(g[i], mu))
            if d < best:
                best, best_c = d, c
        right += best_c == y[i]
    return right / len(g)


def ref_gbc(g: list[list[float]], y: list[int]) -> float:
    classes = sorted(set(y))
    stats = {}
    for c in classes:
        rows = [g[j] for j in range(len(g)) if y[j] == c]
        mu = [sum(col) / len(rows) for col in zip(*rows)]
        var = [max(sum((r[k] - mu[k]) ** 2 for r in rows) / len(rows), 1e-6) for k in range(len(mu))]
        stats[c] = (mu, var)
    total = 0.0
    for c in classes:
        for d in classes:
            if c == d:
                continue
            (m1, v1), (m2, v2) = stats[c], stats[d]
            db = 0.0
            for k in range(len(m1)):
                v = (v1[k] + v2[k]) / 2
                db += (m1[k] - m2[k]) ** 2 / v / 8 + 0.5 * math.log(v / math.sqrt(v1[k] * v2[k]))
            total += math.exp(-db)
    return -total


def _clusters(seed: int = 0, n: int = 24, d: int = 3, classes: int = 3, spread: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    centres = torch.randn(classes, d, generator=g) * 2
    return centres[y] + spread * torch.randn(n, d, generator=g), y


@pytest.mark.parametrize("spread", [0.5, 2.0, 4.0])
def test_ncc_leave_one_out_by_explicit_loops(spread):
    g, y = _clusters(spread=spread)
    assert ncc_loo_score(g, y, 3).item() == pytest.approx(ref_ncc_loo(g.tolist(), y.tolist()))
    y1 = y.clone()
    y1[0] = 4  # a class of one sample is never right; an absent class (3) is never predicted
    assert ncc_loo_score(g, y1, 5).item() == pytest.approx(ref_ncc_loo(g.tolist(), y1.tolist()))


def test_gbc_by_explicit_loops():
    g, y = _clusters(1, spread=1.5)
    assert gbc_score(g, y, 4).item() == pytest.approx(ref_gbc(g.tolist(), y.tolist()), rel=1e-5)
    far, near = _clusters(2, spread=0.3)[0], _clusters(2, spread=3.0)[0]
    assert gbc_score(far, y, 3) > gbc_score(near, y, 3)  # separated classes score higher (closer to 0)


def test_source_weights_by_hand():
    s = torch.tensor([0.8, 0.5, 0.2])
    assert source_weights(s, "nearest", 0.1).tolist() == [1.0, 0.0, 0.0]
    e = [math.exp(v / 0.1) for v in (0.8, 0.5, 0.2)]
    assert source_weights(s, "weighted", 0.1).tolist() == pytest.approx([v / sum(e) for v in e], rel=1e-5)


class _Slice(nn.Module):
    """A fixed 'source': its features are columns ``cols`` of the input (times a scale), its head unused."""

    def __init__(self, cols: list[int], scale: float = 1.0, classes: int = 2) -> None:
        super().__init__()
        self.cols, self.scale = cols, scale
        self.head = nn.Linear(len(cols), classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.cols] * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def _setup(select: str = "weighted", temperature: float = 0.5, **kw):
    """Inputs whose columns 0-1 carry the 3 target classes and columns 2-3 are noise; the related source
    reads 0-1 (scaled, so z-scoring matters), the unrelated one 2-3."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    n = 30
    y = torch.arange(n) % 3
    centres = torch.tensor([[2.0, 0.0], [-1.0, 2.0], [-1.0, -2.0]])
    x = torch.cat([centres[y] + 0.8 * torch.randn(n, 2, generator=g), torch.randn(n, 2, generator=g)], 1)
    y_train = torch.cat([y[:18], torch.full((12,), -1)])  # 18 labelled, 12 transfer samples
    train = ArrayDataset(x, y_train)
    sources = SourceSet([_Slice([0, 1], 3.0), _Slice([2, 3], 0.5)], ["related", "noise"])
    student = build_model("mlp", {"width": 5, "depth": 1}, (4,), 3)
    info = TaskInfo(3, n, (4,), 18, train, None, None)
    params = MultiSourceParams(select=select, temperature=temperature, **kw)
    return MultiSource(student, sources, params, info), x, y_train, y


def test_the_related_source_is_chosen_and_weighted_up():
    ms, *_ = _setup("weighted", 0.2)
    t = ms.teacher
    assert t.scores[0] > t.scores[1]
    assert t.weights[0] > 0.5 > t.weights[1] > 0
    assert t.active == [0, 1]
    near, *_ = _setup("nearest")
    assert near.teacher.weights.tolist() == [1.0, 0.0] and near.teacher.active == [0]
    assert list(near.projectors) == ["source0"]  # no projector for a source that is never run


@pytest.mark.parametrize("select", ["weighted", "nearest"])
def test_training_step_by_an_independent_computation(select):
    ms, x, y_train, _ = _setup(select, 0.5, pl_temperature=2.0, ce_weight=0.7, feat_weight=1.3, pl_weight=0.9)
    batch = {"x": x[10:22], "y": y_train[10:22], "index": torch.arange(10, 22)}
    step = ms.training_step(batch)
    lab = y_train >= 0
    # scores and weights, recomputed here: LOO nearest centroid on z-scored features of the labelled set
    feats = [x[:, [0, 1]] * 3.0, x[:, [2, 3]] * 0.5]
    stats = [(f[lab].mean(0), f[lab].std(0, unbiased=False)) for f in feats]
    scores = [ref_ncc_loo(((f[lab] - m) / s).tolist(), y_train[lab].tolist()) for f, (m, s) in zip(feats, stats)]
    if select == "nearest":
        w = [1.0 if i == max(range(2), key=lambda i: scores[i]) else 0.0 for i in range(2)]
    else:
        e = [math.exp(v / 0.5) for v in scores]
        w = [v / sum(e) for v in e]
    assert ms.teacher.weights.tolist() == pytest.approx(w, rel=1e-5)
    # the objective, written out per sample
    xb, yb = batch["x"], batch["y"]
    f_s = ms.student.embed(xb)
    s = ms.student.head(f_s)
    T = 2.0
    ce_terms, feat, pl = [], 0.0, 0.0
    for i in range(2):
        if w[i] == 0:
            continue
        m, sd = stats[i]
        zt = ((feats[i][10:22] - m) / sd)
        proj = ms.projector(f"source{i}")(f_s)
        feat += w[i] * ((proj - zt) ** 2).mean()
    for n in range(len(xb)):
        mix = torch.zeros(3)
        for i in range(2):
            if w[i] == 0:
                continue
            m, sd = stats[i]
            zt = (feats[i][10 + n] - m) / sd
            mix += w[i] * torch.softmax(ms.teacher.probes[i](zt), -1)
        pt = torch.softmax(torch.log(mix) / T, -1)
        log_ps = torch.log_softmax(s[n] / T, -1)
        pl += (pt * (pt.log() - log_ps)).sum() * T * T
        if yb[n] >= 0:
            ce_terms.append(-torch.log_softmax(s[n], -1)[yb[n]])
    pl = pl / len(xb)
    ce = torch.stack(ce_terms).mean()
    want = 0.7 * ce + 1.3 * feat + 0.9 * pl
    assert step.losses["student"].item() == pytest.approx(want.item(), rel=1e-4)
    assert step.metrics["pl"].item() == pytest.approx(pl.item(), rel=1e-4)
    assert step.metrics["feat"].item() == pytest.approx(feat.item(), rel=1e-4)


def test_probes_fit_the_labelled_target_data_and_the_teacher_is_their_mixture():
    ms, x, y_train, y = _setup("nearest")
    acc = (ms.teacher(x).argmax(-1) == y).float().mean().item()
    assert acc > 0.8  # the related source's probe separates the 3 clusters
    lp = ms.teacher(x)
    assert torch.allclose(lp.exp().sum(-1), torch.ones(len(x)), atol=1e-5)  # log-probabilities


def test_projectors_get_gradients_and_sources_none(tmp_path):
    ms, x, y_train, _ = _setup("weighted", 0.5)
    step = ms.training_step({"x": x, "y": y_train, "index": torch.arange(len(x))})
    step.losses["student"].backward()
    assert all(p.grad is not None for p in ms.projectors.parameters())
    assert all(p.grad is None for p in ms.teacher.parameters())
    assert set(ms.param_groups()) == {"student", "projectors"}


def test_sources_kind_resolves_writes_a_manifest_and_loads_a_source_set(tmp_path):
    folders = []
    for i, classes in enumerate((2, 5)):
        m = build_model("cnn2d", {"width": 4, "depth": 2}, (8, 8), classes)
        f = tmp_path / f"src{i}"
        save_student(f, m, {"name": "cnn2d", "params": {"width": 4, "depth": 2}}, (8, 8), classes)
        folders.append(f)

    class Ctx:
        out = tmp_path / "out"

        def folder(self, ref):
            return ref

    got = resolve_sources(Ctx(), folders)
    cfg = json.loads((got / "config.json").read_text())
    assert cfg["format"] == SOURCES_FORMAT and cfg["names"] == ["src0", "src1"]
    assert resolve_sources(Ctx(), folders) == got  # written once, reused
    s = load_student(got)  # through the registered formats, as TaskOps.load_model does
    assert isinstance(s, SourceSet) and len(s) == 2 and isinstance(load_sources(got), SourceSet)
    assert s.members[1].head.out_features == 5
    with pytest.raises(ModelError, match="multi_source"):
        s(torch.zeros(1, 8, 8))


def test_recipe_validates_the_sources_kind():
    r = load_recipe("digits-multi_source")
    assert r.teacher.kind == "sources" and len(r.teacher.value) == 4
    with pytest.raises(RecipeError, match="at least 1 item"):
        recipe_from_dict({**yaml.safe_load(shipped_recipe("digits-multi_source").read_text()), "teacher": {"sources": []}})


@pytest.mark.slow
def test_recipe_runs_end_to_end(tmp_runs):
    data = yaml.safe_load(shipped_recipe("digits-multi_source").read_text())
    task = {"name": "digits_related", "num_labeled": 30, "source_size": 200, "num_val": 50, "num_test": 100}

    def src(labels):
        return {"recipe": {"name": f"s-{labels}", "seed": 0, "task": {**task, "labels": labels, "pool": "source"},
                           "student": {"arch": "cnn2d", "width": 4, "depth": 2}, "method": {"name": "ce"},
                           "train": {"epochs": 1, "batch_size": 64, "progress": False, "trackers": "none"}}}

    data["task"] = task
    data["teacher"] = {"sources": [src("mod5"), src("ink")]}
    data["train"] |= {"epochs": 1, "progress": False, "trackers": "none"}
    res = run_recipe(recipe_from_dict(data), out=tmp_runs)
    assert 0 <= res.metrics["test/accuracy"] <= 1 and "teacher/accuracy" in res.metrics
    saved = yaml.safe_load((res.run_dir / "recipe.yaml").read_text())
    assert [s["recipe"]["name"] for s in saved["teacher"]["sources"]] == ["s-mod5", "s-ink"]
    assert load_student(res.run_dir).head.out_features == 10
