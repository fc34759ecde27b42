"""KD-AIF (S43): logit derivatives and last-layer influence against autograd on a tiny linear model
(closed form ``I_i = −∇L_valᵀ (H + λI)⁻¹ ∇ℓ_i``), the weights by hand, the refresh schedule, the
weights keyed by dataset index, resume, and a tiny end-to-end run."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_recipe, tiny_teacher, resume_round_trip
from safetensors.torch import load_file
from torch.autograd.functional import hessian, jacobian

from distill.core.distiller import TaskInfo
from distill.core.recipe import load_recipe
from distill.errors import RecipeError
from distill.logits.methods.kd_aif import KDAIF, KDAIFParams, influence_weights, last_layer_influence, logit_derivatives
from distill.tasks.base import ArrayDataset
from distill.tasks.models import Classifier

T, CE_W, KD_W = 2.0, 0.3, 0.7


def _sample_loss(z, t, y):
    """ℓ(z) for one sample, written out: kd_w · T² · Σ q (log q − log p) + ce_w · CE (if labeled)."""
    q = F.softmax(t / T, -1)
    kd = (q * (q.log() - F.log_softmax(z / T, -1))).sum() * T * T
    ce = -F.log_softmax(z, -1)[y] if y >= 0 else z.sum() * 0
    return KD_W * kd + CE_W * ce


def _closed_form(W, b, h, t, y, hv, yv, damping=None):
    """Influences by brute force: full parameter gradients and Hessian from autograd."""
    theta0 = torch.cat([W.flatten(), b]).double()
    c, f = W.shape

    def logits(theta, feats):
        return feats @ theta[: c * f].view(c, f).T + theta[c * f :]

    def train_loss(theta, i):
        return _sample_loss(logits(theta, h[i : i + 1])[0], t[i], int(y[i]))

    g_val = jacobian(lambda th: F.cross_entropy(logits(th, hv), yv), theta0)
    out = []
    if damping is not None:
        H = hessian(lambda th: torch.stack([train_loss(th, i) for i in range(len(h))]).mean(), theta0)
        v = torch.linalg.solve(H + damping * torch.eye(len(theta0), dtype=torch.float64), g_val)
    else:
        v = g_val
    for i in range(len(h)):
        out.append(-(v @ jacobian(lambda th: train_loss(th, i), theta0)))
    return torch.stack(out)


def _data(seed=0, n=7, m=5, f=3, c=4):
    g = torch.Generator().manual_seed(seed)
    h, hv = torch.randn(n, f, generator=g, dtype=torch.float64), torch.randn(m, f, generator=g, dtype=torch.float64)
    t = 2 * torch.randn(n, c, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g)
    y[1] = -1  # one unlabeled (transfer) sample: KD term only
    yv = torch.randint(0, c, (m,), generator=g)
    W, b = torch.randn(c, f, generator=g, dtype=torch.float64), torch.randn(c, generator=g, dtype=torch.float64)
    return W, b, h, t, y, hv, yv


def test_logit_derivatives_match_autograd():
    _, _, _, t, y, _, _ = _data()
    z = torch.randn(len(t), t.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    grad, hess = logit_derivatives(z, t, y, T, CE_W, KD_W)
    for i in range(len(z)):
        f = lambda zz: _sample_loss(zz, t[i], int(y[i]))  # noqa: E731
        assert torch.allclose(grad[i], jacobian(f, z[i]), atol=1e-10)
        assert torch.allclose(hess[i], hessian(f, z[i]), atol=1e-10)


@pytest.mark.parametrize("damping", [None, 0.01, 1.0])
def test_last_layer_influence_matches_the_closed_form(damping):
    W, b, h, t, y, hv, yv = _data()
    z, zv = h @ W.T + b, hv @ W.T + b
    grad, hess = logit_derivatives(z, t, y, T, CE_W, KD_W)
    gv = F.softmax(zv, -1) - F.one_hot(yv, 4).double()
    got = last_layer_influence(h, grad, hv, gv, None if damping is None else hess, damping or 0.0, chunk=3)
    assert torch.allclose(got, _closed_form(W, b, h, t, y, hv, yv, damping), atol=1e-9)


def test_influence_weights_by_hand():
    w = influence_weights(torch.tensor([-1.0, 0.0, 1.0]))  # std 1; sigmoids average 0.5
    s = 1 / (1 + math.exp(-1))
    assert w.tolist() == pytest.approx([2 * s, 1.0, 2 * (1 - s)], rel=1e-6)
    assert influence_weights(torch.tensor([-1.0, 0.0, 1.0]), temperature=2.0)[0].item() < w[0].item()
    assert torch.equal(influence_weights(torch.full((4,), 3.0)), torch.ones(4))
    big = influence_weights(torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 1e-9)
    assert big.mean().item() == pytest.approx(1.0) and big.min() > 0


def _distiller(**params) -> KDAIF:
    torch.manual_seed(0)
    n, c, f = 10, 3, 4
    train = ArrayDataset(torch.randn(n, f), torch.tensor([0, 1, 2, 0, 1, 2, -1, -1, -1, -1]))
    val = ArrayDataset(torch.randn(6, f), torch.tensor([0, 1, 2, 2, 1, 0]))
    info = TaskInfo(c, n, (f,), num_labeled=6, train=train, val=val)
    student = Classifier(torch.nn.Identity(), f, c)  # a linear model: embed(x) = x
    p = {"temperature": T, "ce_weight": CE_W, "kd_weight": KD_W, **params}
    return KDAIF(student, torch.nn.Linear(f, c), KDAIFParams(**p), info)


def test_refresh_computes_the_closed_form_weights_of_the_training_set():
    d = _distiller(damping=0.1)
    influence = d.refresh_weights()
    train, val = d.info.train, d.info.val
    W, b = d.student.head.weight.detach().double(), d.student.head.bias.detach().double()
    t = d.teacher(train.x).detach().double()
    ref = _closed_form(W, b, train.x.double(), t, train.y, val.x.double(), val.y, damping=0.1)
    assert torch.allclose(influence, ref, atol=1e-5)
    assert torch.allclose(d.weights, influence_weights(ref).float(), atol=1e-5)


def test_weights_apply_by_dataset_index():
    d = _distiller()
    d.weights.copy_(torch.arange(10, dtype=torch.float32))
    idx = torch.tensor([7, 2, 5])
    batch = {"x": d.info.train.x[idx], "y": d.info.train.y[idx], "index": idx}
    s, t = d.student(batch["x"]), d.teacher(batch["x"])
    kd = [_sample_loss(s[i].double(), t[i].double(), -1) for i in range(3)]  # KD_W · KD term only
    full = [_sample_loss(s[i].double(), t[i].double(), int(batch["y"][i])) for i in range(3)]
    w = (7.0, 2.0, 5.0)
    labeled = int((batch["y"] >= 0).sum())
    assert labeled == 2  # index 7 is a transfer sample
    # KD over the batch, CE over its labeled samples (as kd does)
    expected = sum(wi * k for wi, k in zip(w, kd)) / 3 + sum(wi * (f - k) for wi, f, k in zip(w, full, kd)) / labeled
    assert d.training_step(batch).losses["student"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_with_every_weight_one_it_is_exactly_kd():
    """Issue 12.9: uniform influence weights give Hinton KD's loss exactly, transfer samples included."""
    from distill.logits.methods.kd import HintonKD, KDParams

    d = _distiller()
    kd = HintonKD(d.student, d.teacher, KDParams(temperature=T, ce_weight=CE_W, kd_weight=KD_W), d.info)
    idx = torch.tensor([0, 6, 1, 7, 8])  # labeled and unlabeled (transfer) samples
    batch = {"x": d.info.train.x[idx], "y": d.info.train.y[idx], "index": idx}
    assert d.training_step(batch).losses["student"].item() == pytest.approx(
        kd.training_step(batch).losses["student"].item(), rel=1e-6)


def test_refresh_schedule_warmup_epochs_and_steps():
    d = _distiller(warmup_epochs=1)
    d.on_epoch_start(0)
    assert torch.equal(d.weights, torch.ones(10))  # uniform during warm-up
    d.on_epoch_start(1)
    first = d.weights.clone()
    assert not torch.equal(first, torch.ones(10)) and int(d.computed_epoch) == 1
    with torch.no_grad():
        d.student.head.weight.add_(1.0)
    d.on_epoch_start(1)  # as after a resume in the middle of epoch 1: keep the saved weights
    assert torch.equal(d.weights, first)
    d.on_epoch_start(2)
    assert not torch.equal(d.weights, first)

    e = _distiller(warmup_epochs=0, refresh_every=2)
    e.on_epoch_start(0)
    assert torch.equal(e.weights, torch.ones(10))  # step mode: nothing at the epoch start
    e.on_optimizer_step()
    assert torch.equal(e.weights, torch.ones(10))
    e.on_optimizer_step()
    assert not torch.equal(e.weights, torch.ones(10)) and int(e.steps) == 2


def test_needs_validation_data_and_a_linear_head():
    info = TaskInfo(3, 4, (4,))
    with pytest.raises(RecipeError, match="num_val"):
        KDAIF(Classifier(torch.nn.Identity(), 4, 3), torch.nn.Linear(4, 3), KDAIFParams(), info)
    info.val = ArrayDataset(torch.randn(2, 4), torch.tensor([0, 1]))
    with pytest.raises(RecipeError, match="Linear head"):
        KDAIF(torch.nn.Linear(4, 3), torch.nn.Linear(4, 3), KDAIFParams(), info)


def test_resume_keeps_the_weights_and_is_exact(tmp_runs):
    # 512 samples / 64 = 8 steps per epoch, 2 epochs; weights computed at the start of epoch 1;
    # interrupt in the middle of epoch 1, when they must come from the checkpoint
    saved = {}

    def inspect(ckpt):
        saved.update(load_file(str(ckpt / "model.safetensors")))
        assert saved["weights"].shape == (512,) and int(saved["computed_epoch"]) == 1
        assert saved["weights"].mean().item() == pytest.approx(1.0, rel=1e-5) and saved["weights"].std() > 0

    data = tiny_recipe("aif", {"name": "kd_aif"}, {"recipe": tiny_teacher()}, epochs=2)
    straight, _ = resume_round_trip(data, tmp_runs, 11, inspect)
    sa = load_file(str(straight.run_dir / "checkpoints" / "latest" / "model.safetensors"))
    assert torch.equal(sa["weights"], saved["weights"])


def test_recipe_loads():
    r = load_recipe("mnist1d-kd_aif")
    assert r.method.name == "kd_aif" and r.task.params["num_val"] > 0 and r.train.epochs == 20
