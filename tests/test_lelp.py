"""S49 LELP: pseudo-subclasses from linear projections of teacher embeddings."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_recipe
from safetensors.torch import load_file

from distill.core.checkpoint import trainable_state
from distill.core.distiller import TaskInfo
from distill.core.recipe import recipe_from_dict
from distill.core.registry import TASKS
from distill.core.runner import run_recipe
from distill.errors import RecipeError
from distill.logits.methods.lelp import (
    LELP,
    LELPParams,
    SubclassClassifier,
    aggregate_subclasses,
    fit_subclass_directions,
    null_space_projector,
    subclass_logits,
)
from distill.tasks.base import ArrayDataset
from distill.tasks.models import MLPParams, mlp


def test_subclass_logits_by_hand():
    # 2 classes, 1 direction each, 3-d embeddings
    dirs = torch.tensor([[[0.0, 0.0, 1.0]], [[0.0, 1.0, 0.0]]])
    centers = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    scales = torch.tensor([[2.0], [0.5]])
    h = torch.tensor([[5.0, 3.0, 2.0]])
    z = torch.tensor([[1.0, -1.0]])
    s0, s1 = (2.0 - 1.0) / 2.0, (3.0 - 2.0) / 0.5  # standardised projections: 0.5 and 2
    ls = lambda a: [a - math.log(math.exp(a) + math.exp(-a)), -a - math.log(math.exp(a) + math.exp(-a))]
    expected = [1.0 + v for v in ls(s0)] + [-1.0 + v for v in ls(s1)]
    out = subclass_logits(z, h, dirs, centers, scales)
    assert torch.allclose(out, torch.tensor([expected]), atol=1e-6)
    # the subclasses of a class carry exactly the teacher's class probability
    assert torch.allclose(aggregate_subclasses(out, 2), z, atol=1e-6)


def test_aggregate_is_the_sum_of_subclass_probabilities():
    g = torch.Generator().manual_seed(0)
    sub = torch.randn(4, 3 * 5, generator=g) * 3
    summed = F.softmax(sub, -1).reshape(4, 3, 5).sum(-1)
    assert torch.allclose(F.softmax(aggregate_subclasses(sub, 3), -1), summed, atol=1e-6)


def test_directions_are_principal_and_ignored_by_the_head():
    g = torch.Generator().manual_seed(1)
    d, n = 6, 400
    w = torch.randn(2, d, generator=g)
    p = null_space_projector(w)
    assert torch.allclose(w.double() @ p, torch.zeros(2, d, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(p @ p, p, atol=1e-10)
    # class 0 spreads mostly along a known null-space direction v (std 5), little elsewhere (std 0.1)
    v = p @ torch.randn(d, generator=g, dtype=torch.float64)
    v = (v / v.norm()).float()
    emb = torch.randn(2 * n, d, generator=g) * 0.1 + 3.0
    emb[:n] += torch.randn(n, 1, generator=g) * 5.0 * v
    y = torch.cat([torch.zeros(n), torch.ones(n)]).long()
    dirs, centers, scales = fit_subclass_directions(emb, y, w, 2, 2, "pca")
    assert dirs.shape == (2, 2, d) and centers.shape == (2, d) and scales.shape == (2, 2)
    assert abs(float(dirs[0, 0] @ v)) > 0.999  # the first principal direction of class 0 is v
    assert torch.allclose(w @ dirs.reshape(-1, d).T, torch.zeros(2, 4), atol=1e-4)  # no logit changes
    assert torch.allclose(centers[0], emb[:n].mean(0), atol=1e-5)
    proj = ((emb[:n] - centers[0]).double() @ p.T).float() @ dirs[0, 0]
    assert scales[0, 0].item() == pytest.approx(proj.std().item(), rel=1e-4)
    torch.manual_seed(0)
    rd, _, _ = fit_subclass_directions(emb, y, w, 2, 3, "random")
    gram = rd[1] @ rd[1].T
    assert torch.allclose(gram, torch.eye(3), atol=1e-5) and torch.allclose(w @ rd[1].T, torch.zeros(2, 3), atol=1e-4)
    with pytest.raises(RecipeError, match="num_directions"):
        fit_subclass_directions(emb, y, w, 2, 5)  # only 6 - 2 = 4 null-space dimensions


def _tiny_lelp(num_directions: int = 2) -> LELP:
    torch.manual_seed(0)
    x = torch.randn(40, 5)
    y = (x[:, 0] > 0).long()
    teacher = mlp(MLPParams(width=16, depth=1), (5,), 2)
    student = mlp(MLPParams(width=8, depth=1), (5,), 2)
    info = TaskInfo(2, 40, (5,), 40, ArrayDataset(x, y))
    return LELP(student, teacher, LELPParams(num_directions=num_directions), info)


def test_training_step_objective():
    m = _tiny_lelp()
    assert isinstance(m.student, SubclassClassifier) and m.student.base.head.out_features == 2 * 4
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(2))
    batch = {"x": x, "y": torch.tensor([0, 1, -1, 1, 0, -1]), "index": torch.arange(6)}
    step = m.training_step(batch)
    s_sub = m.student.subclass_logits(x)
    h = m.teacher.embed(x)
    t_sub = subclass_logits(m.teacher.head(h), h, m.directions, m.centers, m.scales)
    T = 4.0
    kd = F.kl_div(F.log_softmax(s_sub / T, -1), F.softmax(t_sub / T, -1), reduction="batchmean") * T * T
    cls = torch.logsumexp(s_sub.reshape(6, 2, 4), -1)
    ce = F.cross_entropy(cls[batch["y"] >= 0], batch["y"][batch["y"] >= 0])
    assert step.losses["student"].item() == pytest.approx((0.1 * ce + 0.9 * kd).item(), rel=1e-5)
    assert m.student(x).shape == (6, 2)  # the engine evaluates class logits
    assert {"directions", "centers", "scales"} <= set(trainable_state(m))  # fitted state is checkpointed


def test_mnist1d_binary_task():
    e = TASKS.get("mnist1d-binary")
    d = e.obj(e.params(num_train=300, num_val=50, num_test=100, num_transfer=40))
    ten = TASKS.get("mnist1d")
    full = ten.obj(ten.params(num_train=300, num_val=50, num_test=100, num_transfer=40))
    assert d.num_classes == 2 and torch.equal(d.train.x, full.train.x)
    assert torch.equal(d.train.y, (full.train.y >= 5).long()) and torch.equal(d.test.y, (full.test.y >= 5).long())
    assert (d.transfer.y == -1).all()


def test_lelp_runs_end_to_end_on_the_binary_task(tmp_runs):
    task = {"name": "mnist1d-binary", "num_train": 256, "num_val": 64, "num_test": 128, "num_transfer": 256}
    teacher = tiny_recipe("bin-teacher", {"name": "ce"}) | {"task": task,
                                                             "student": {"arch": "cnn1d", "width": 16, "depth": 2}}
    r = tiny_recipe("bin-lelp", {"name": "lelp", "num_directions": 3}, {"recipe": teacher}) | {"task": task}
    res = run_recipe(recipe_from_dict(r), out=tmp_runs)
    assert 0.0 <= res.metrics["test/accuracy"] <= 1.0 and "test/agreement" in res.metrics
    w = load_file(str(res.run_dir / "student" / "model.safetensors"))
    assert w["base.head.weight"].shape[0] == 2 * 2 * 3  # classes x (2 halves x 3 directions)
    # the saved wide student rebuilds from its config and predicts exactly as the trained one
    from distill.core.metrics import predict
    from distill.core.runner import build_task, load_student

    loaded = load_student(res.run_dir)
    x = build_task(recipe_from_dict(r)).test.x
    assert torch.equal(predict(loaded, x), predict(res.student, x))
