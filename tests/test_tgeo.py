"""TGeo-KD (S08): geometry features and fused loss by hand, the look-ahead hypergradient against an
independent formula, T̄ as exact running class means, the ratio network learning, resume, recipe."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_recipe, tiny_teacher, resume_round_trip
from safetensors.torch import load_file

from distill.core.distiller import TaskInfo
from distill.core.recipe import load_recipe
from distill.errors import RecipeError
from distill.logits.losses import fusion_kd_loss, kd_loss
from distill.logits.methods.tgeo import TGeoKD, TGeoParams, geometry_features
from distill.tasks.base import ArrayDataset


def _distiller(**params) -> TGeoKD:
    torch.manual_seed(0)
    val = ArrayDataset(torch.randn(20, 4), torch.randint(0, 3, (20,)))
    info = TaskInfo(3, 12, (4,), num_labeled=8, val=val)
    return TGeoKD(torch.nn.Linear(4, 3), torch.nn.Linear(4, 3), TGeoParams(**params), info)


def test_geometry_features_by_hand():
    s, t, g, m = (torch.tensor([v]) for v in ([0.5, 0.5], [0.8, 0.2], [1.0, 0.0], [0.6, 0.4]))
    f = geometry_features(s, t, g, m)[0]
    edges = [-0.3, -0.5, -0.2, -0.1, 0.2, 0.4]  # first coordinate of S−T, S−G, T−G, S−T̄, T−T̄, G−T̄
    assert f[:12].tolist() == pytest.approx([v for e in edges for v in (e, -e)], abs=1e-6)
    assert f[12:].tolist() == pytest.approx([abs(e) * math.sqrt(2) for e in edges], abs=1e-6)


def test_fusion_loss_by_hand_and_limits():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    y = torch.tensor([0, 3, -1, 2])
    alpha = torch.tensor([0.25, 1.0, 0.0, 0.0])
    kd = kd_loss(s, t, 2.0, reduction="none")
    ce = F.cross_entropy(s, y.clamp(min=0), reduction="none")
    expected = [0.25 * kd[0] + 0.75 * ce[0], kd[1], kd[2], ce[3]]  # the unlabeled sample: KD alone
    got = fusion_kd_loss(s, t, y, alpha, 2.0, reduction="none")
    assert got.tolist() == pytest.approx([v.item() for v in expected], rel=1e-6)
    lab = torch.tensor([0, 3, 1, 2])
    assert fusion_kd_loss(s, t, lab, torch.ones(4), 2.0).item() == pytest.approx(kd_loss(s, t, 2.0).item(), rel=1e-6)
    ce_all = F.cross_entropy(s, lab).item()
    assert fusion_kd_loss(s, t, lab, torch.zeros(4), 2.0).item() == pytest.approx(ce_all, rel=1e-6)


def test_lookahead_hypergradient_matches_an_independent_formula():
    d = _distiller(temperature=2.0, lookahead_lr=0.5)
    g = torch.Generator().manual_seed(2)
    x, xv = torch.randn(6, 4, generator=g), torch.randn(5, 4, generator=g)
    y, yv = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([2, 1, 0, 0, 1])
    t = d.teacher(x).detach()
    alpha = torch.rand(6, generator=g).requires_grad_()
    (got,) = torch.autograd.grad(d.lookahead_loss(x, t, y, alpha, xv, yv), alpha)

    # by hand for z = W x + b: θ' = θ − η ∇θ mean_i [α_i T² KL(q_i ‖ p_i) + (1 − α_i) CE_i]
    W, b = d.student.weight.detach().clone().requires_grad_(), d.student.bias.detach().clone().requires_grad_()
    a = alpha.detach().clone().requires_grad_()
    z = x @ W.T + b
    kl = (F.softmax(t / 2, -1) * (F.log_softmax(t / 2, -1) - F.log_softmax(z / 2, -1))).sum(-1) * 4
    inner = (a * kl + (1 - a) * F.cross_entropy(z, y, reduction="none")).mean()
    gW, gb = torch.autograd.grad(inner, (W, b), create_graph=True)
    val = F.cross_entropy(xv @ (W - 0.5 * gW).T + (b - 0.5 * gb), yv)
    (ref,) = torch.autograd.grad(val, a)
    assert torch.allclose(got, ref, atol=1e-6) and got.abs().sum() > 0


def test_ratio_loss_trains_only_the_ratio_network_and_it_learns():
    d = _distiller()
    batch = {"x": torch.randn(8, 4), "y": torch.tensor([0, 1, 2, 0, 1, 2, -1, -1]), "index": torch.arange(8)}
    step = d.training_step(batch)
    step.losses["ratio"].backward()
    assert all(p.grad is None for p in d.student.parameters())
    assert d.ratio_net[-1].weight.grad.abs().sum() > 0  # zero-initialised output layer gets a gradient

    d = _distiller()
    groups = d.param_groups()
    assert set(groups) == {"student", "ratio"}
    opts = {k: torch.optim.Adam(v, lr=0.01) for k, v in groups.items()}
    before = {k: [p.detach().clone() for p in v] for k, v in groups.items()}
    for _ in range(3):  # as the engine: one backward of the summed losses, then every optimizer steps
        out = d.training_step(batch)
        sum(out.losses.values()).backward()
        for o in opts.values():
            o.step()
            o.zero_grad()
        d.on_optimizer_step()
    for k, ps in groups.items():
        for p, p0 in zip(ps, before[k]):
            assert not torch.equal(p, p0), k  # every tensor of both groups moved
    assert 0 < out.metrics["alpha"] < 1


def test_class_mean_is_the_running_mean_of_teacher_predictions():
    d = _distiller()
    b1 = {"x": torch.randn(4, 4), "y": torch.tensor([0, 1, 1, -1]), "index": torch.tensor([0, 1, 2, 8])}
    b2 = {"x": torch.randn(3, 4), "y": torch.tensor([1, 2, -1]), "index": torch.tensor([3, 4, 9])}
    d.training_step(b1)
    d.replaying = True  # a SAM replay of the same micro-batch (flag set by the engine): not counted again
    d.training_step(b1)
    d.replaying = False
    d.on_optimizer_step()
    d.training_step(b2)
    d.on_optimizer_step()
    x = torch.cat([b1["x"], b2["x"]])
    y = torch.cat([b1["y"], b2["y"]])
    probs = F.softmax(d.teacher(x), -1).double()
    for c in range(3):
        rows = probs[y == c]
        assert d.class_count[c].item() == len(rows)
        assert torch.allclose(d.class_sum[c] / d.class_count[c], rows.mean(0), atol=1e-6)
    # before any optimizer step, the current batch alone supplies T̄
    fresh = _distiller()
    t = fresh.teacher(b1["x"]).detach()
    mean = fresh.class_mean(F.softmax(t, -1), b1["y"])
    assert torch.allclose(mean[1].float(), F.softmax(t[1:3], -1).mean(0), atol=1e-6)


def test_needs_a_validation_split():
    with pytest.raises(RecipeError, match="num_val"):
        TGeoKD(torch.nn.Linear(4, 3), torch.nn.Linear(4, 3), TGeoParams(), TaskInfo(3, 12, (4,)))


def test_resume_is_exact_and_the_ratio_network_learns_end_to_end(tmp_runs):
    # 256 labeled + 256 transfer samples / 64 = 8 steps per epoch, 2 epochs; stop mid-epoch 0
    data = tiny_recipe("tgeo", {"name": "tgeo", "val_batch_size": 32}, {"recipe": tiny_teacher()}, epochs=2)
    straight, _ = resume_round_trip(data, tmp_runs, 5)  # student, ratio network and T̄ sums alike
    sa = load_file(str(straight.run_dir / "checkpoints" / "latest" / "model.safetensors"))
    assert sa["class_count"].sum().item() == 2 * 256  # every labeled sample, once per epoch
    assert sa["ratio_net.2.weight"].abs().sum() > 0  # started at zero: the ratio network learned


def test_recipe_loads():
    r = load_recipe("mnist1d-tgeo")
    assert r.method.name == "tgeo" and r.task.params["num_val"] > 0 and r.train.lr == 0.01
