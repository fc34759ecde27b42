"""TAID (S60): the interpolated target, the t = 0 / t = 1 cases, the adaptive t update by hand,
once per optimizer step, and t surviving a resume."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_recipe, tiny_teacher

from distill.core.distiller import TaskInfo
from distill.core.recipe import RecipeError, TrainConfig, load_recipe, recipe_from_dict
from distill.core.runner import run_recipe
from distill.core.trainer import Trainer
from distill.errors import Interrupted
from distill.logits.losses import kd_loss, taid_loss
from distill.logits.methods.taid import TAID, TAIDParams, TAIDSchedule
from distill.tasks.base import ArrayDataset


def test_taid_loss_is_cross_entropy_to_the_interpolated_target():
    g = torch.Generator().manual_seed(0)
    s, z = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    t = 0.3
    mix = (0.7 * s + 0.3 * z).double()
    p = mix.exp() / mix.exp().sum(-1, keepdim=True)  # independent softmax in float64
    expected = -(p * F.log_softmax(s.double(), -1)).sum(-1).mean()
    assert taid_loss(s, z, t).item() == pytest.approx(expected.item(), rel=1e-6)
    assert taid_loss(s, z, torch.tensor(t)).item() == pytest.approx(expected.item(), rel=1e-6)


def test_taid_target_is_detached_and_t0_gives_no_gradient():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(3, 5, generator=g).requires_grad_()
    z = torch.randn(3, 5, generator=g)
    # t = 0: the target is the student's own (detached) distribution, so the gradient q − q vanishes
    (gs,) = torch.autograd.grad(taid_loss(s, z, 0.0), s)
    assert gs.abs().max().item() < 1e-7
    # gradient is (softmax(s) − p_t) / batch, with p_t treated as a constant
    (gs,) = torch.autograd.grad(taid_loss(s, z, 0.6), s)
    p = F.softmax(0.4 * s.detach() + 0.6 * z, -1)
    assert torch.allclose(gs, (F.softmax(s.detach(), -1) - p) / 3, atol=1e-6)


def test_taid_at_t1_is_forward_kl_plus_teacher_entropy():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(5, 7, generator=g).requires_grad_()
    z = torch.randn(5, 7, generator=g)
    p = F.softmax(z, -1)
    entropy = -(p * p.log()).sum(-1).mean()
    loss = taid_loss(s, z, 1.0)
    kl = kd_loss(s, z, temperature=1.0)
    assert loss.item() == pytest.approx((kl + entropy).item(), rel=1e-5)
    (g1,) = torch.autograd.grad(loss, s)
    (g2,) = torch.autograd.grad(kl, s)
    assert torch.allclose(g1, g2, atol=1e-6)


def test_schedule_update_by_hand():
    sch = TAIDSchedule(total_steps=10, t_start=0.4, t_end=1.0, alpha=0.5, beta=0.9)
    sch.update(torch.tensor(2.0))  # first call: remembers the loss, t unchanged
    assert sch.t.item() == pytest.approx(0.4) and sch.steps.item() == 1 and sch.prev_loss.item() == 2.0
    sch.update(torch.tensor(1.0))  # step k = 1 of K = 10
    rel = (2.0 - 1.0) / (2.0 + 1e-15)
    m = 0.9 * 0.0 + 0.1 * rel
    adaptive = 0.4 + 0.5 * (1 / (1 + math.exp(-m))) * (1 - 0.4)
    linear = 0.4 + 0.6 * 1 / 10
    assert sch.momentum.item() == pytest.approx(m, rel=1e-6)
    assert sch.t.item() == pytest.approx(max(linear, adaptive), rel=1e-6)  # the adaptive step wins here
    # with a small alpha the linear lower bound wins
    slow = TAIDSchedule(total_steps=10, t_start=0.4, alpha=1e-3, beta=0.9)
    slow.update(torch.tensor(2.0))
    slow.update(torch.tensor(1.0))
    assert slow.t.item() == pytest.approx(0.46, rel=1e-6)
    # t never exceeds t_end, even past total_steps; non-adaptive follows the line
    lin = TAIDSchedule(total_steps=4, t_start=0.2, t_end=0.8, adaptive=False)
    ts = []
    for k in range(7):
        lin.update(torch.tensor(1.0))
        ts.append(round(lin.t.item(), 6))
    assert ts == [0.2, 0.35, 0.5, 0.65, 0.8, 0.8, 0.8]


def test_taid_params_validate():
    assert recipe_from_dict(tiny_recipe("x", {"name": "taid"}, {"recipe": tiny_teacher()})).method.params["total_steps"] is None
    with pytest.raises(RecipeError, match="t_start"):
        bad = {"name": "taid", "total_steps": 5, "t_start": 0.9, "t_end": 0.5}
        recipe_from_dict(tiny_recipe("x", bad, {"recipe": tiny_teacher()}))


def _tiny_taid(student_seed: int = 0) -> tuple[TAID, ArrayDataset]:
    from distill.tasks.models import build_model

    torch.manual_seed(0)
    teacher = build_model("mlp", {"width": 16}, (6,), 3)  # frozen: not checkpointed, rebuilt the same
    torch.manual_seed(student_seed)
    student = build_model("mlp", {"width": 4}, (6,), 3)
    data = ArrayDataset(torch.randn(48, 6, generator=torch.Generator().manual_seed(5)), torch.randint(0, 3, (48,)))
    return TAID(student, teacher, TAIDParams(total_steps=12, alpha=0.05), TaskInfo(3, 48, (6,))), data


def test_t_steps_once_per_optimizer_step_not_per_micro_batch():
    d, data = _tiny_taid()
    cfg = TrainConfig(epochs=2, batch_size=8, grad_accum=2, progress=False, trackers="none")
    trainer = Trainer(d, data, cfg)
    trainer.fit()
    assert trainer.total_steps == 6  # 48 / 8 = 6 micro-batches per epoch, 3 optimizer steps
    assert d.schedule.steps.item() == 6
    assert 0.4 < d.schedule.t.item() <= 1.0


def test_resume_keeps_t(tmp_path):
    cfg = TrainConfig(epochs=3, batch_size=8, progress=False, trackers="none")
    straight, data = _tiny_taid()
    Trainer(straight, data, cfg).fit()
    first, _ = _tiny_taid()
    with pytest.raises(Interrupted):
        Trainer(first, data, cfg, run_dir=tmp_path).fit(stop_at_step=7)
    assert first.schedule.steps.item() == 7
    resumed, _ = _tiny_taid(student_seed=123)  # different initial weights: everything must come from the checkpoint
    Trainer(resumed, data, cfg, run_dir=tmp_path).fit(resume=True)
    for name in ("t", "momentum", "prev_loss", "steps"):
        assert torch.equal(getattr(straight.schedule, name), getattr(resumed.schedule, name)), name
    for k, v in straight.student.state_dict().items():
        assert torch.equal(v, resumed.student.state_dict()[k]), k
    assert straight.schedule.t.item() > 0.4


def test_taid_recipe_loads_and_tiny_run(tmp_runs):
    r = load_recipe("mnist1d-taid")
    assert r.method.name == "taid" and r.method.params["total_steps"] is None  # the run's length
    data = tiny_recipe("taid", {"name": "taid", "total_steps": 10}, {"recipe": tiny_teacher()})
    res = run_recipe(recipe_from_dict(data), out=tmp_runs)
    ts = [row["train/t"] for row in res.history if "train/t" in row]
    assert ts and ts[-1] > 0.4 and all(b >= a for a, b in zip(ts, ts[1:]))
    assert "test/ece" in res.metrics


def test_total_steps_defaults_to_the_run_length():
    from distill.tasks.models import build_model

    data = ArrayDataset(torch.randn(48, 6), torch.randint(0, 3, (48,)))
    d = TAID(build_model("mlp", {"width": 4}, (6,), 3), build_model("mlp", {"width": 8}, (6,), 3), TAIDParams(), TaskInfo(3, 48, (6,)))
    trainer = Trainer(d, data, TrainConfig(epochs=5, batch_size=8, progress=False, trackers="none"))
    assert d.schedule.total_steps == trainer.total_steps == 30
