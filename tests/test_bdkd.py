"""BD-KD (S04): the balanced student loss, the entropy-gap weight and the teacher's reverse KL against
explicit per-sample loops; the two parameter groups train their own model; the recipe runs online
(teacher trained, checkpointed, resumed exactly)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import resume_round_trip, tiny_recipe
from safetensors.torch import load_file

from distill.core.distiller import TaskInfo
from distill.core.recipe import load_recipe
from distill.logits.losses import kd_loss
from distill.logits.methods.bdkd import (
    BDKD, BDKDParams, balance_weights, balanced_kd_loss, entropy, teacher_reverse_kd_loss,
)


def _probs(row: list[float], temp: float) -> list[float]:
    e = [math.exp(v / temp) for v in row]
    return [v / sum(e) for v in e]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)


def _h(p: list[float]) -> float:
    return -sum(pi * math.log(pi) for pi in p if pi > 0)


def _logits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(5, 4, generator=g) * 2
    t = torch.randn(5, 4, generator=g) * 3
    return s, t


def test_entropy_and_weights_by_hand():
    s, t = _logits()
    temp, k = 2.0, 3.0
    w = balance_weights(s, t, temp, k)
    for i in range(len(s)):
        hs, ht = _h(_probs(s[i].tolist(), temp)), _h(_probs(t[i].tolist(), temp))
        assert entropy(s[i : i + 1], temp).item() == pytest.approx(hs, rel=1e-5)
        # an under-confident student (higher entropy than the teacher) leans on reverse KL
        assert w[i].item() == pytest.approx(1 / (1 + math.exp(-k * (hs - ht))), rel=1e-5)
    flat, sharp = torch.zeros(1, 4), torch.tensor([[8.0, 0.0, 0.0, 0.0]])
    assert balance_weights(flat, sharp, 1.0, 10.0).item() > 0.99  # student flat, teacher sure: reverse
    assert balance_weights(sharp, flat, 1.0, 10.0).item() < 0.01  # student sure, teacher flat: forward


def test_balanced_and_teacher_losses_by_explicit_loops():
    s, t = _logits(1)
    w = torch.tensor([0.0, 0.25, 0.5, 0.9, 1.0])
    temp = 3.0
    got = balanced_kd_loss(s, t, w, temp, reduction="none")
    got_t = teacher_reverse_kd_loss(t, s, temp, reduction="none")
    for i in range(len(s)):
        ps, pt = _probs(s[i].tolist(), temp), _probs(t[i].tolist(), temp)
        ref = temp**2 * (w[i].item() * _kl(ps, pt) + (1 - w[i].item()) * _kl(pt, ps))
        assert got[i].item() == pytest.approx(ref, rel=1e-5)
        assert got_t[i].item() == pytest.approx(temp**2 * _kl(pt, ps), rel=1e-5)
    # w = 0 is Hinton KD; any other weight is not
    assert balanced_kd_loss(s, t, torch.zeros(5), temp).item() == pytest.approx(kd_loss(s, t, temp).item(), rel=1e-6)
    assert abs(balanced_kd_loss(s, t, w, temp).item() - kd_loss(s, t, temp).item()) > 1e-3


def _distiller(**params) -> BDKD:
    torch.manual_seed(0)
    return BDKD(torch.nn.Linear(4, 3), torch.nn.Linear(4, 3), BDKDParams(**params), TaskInfo(3, 8, (4,)))


def test_training_step_losses_and_gradients_by_hand():
    d = _distiller(temperature=2.0, ce_weight=0.5, kd_weight=0.7, teacher_kd_weight=0.3, sharpness=4.0)
    g = torch.Generator().manual_seed(3)
    batch = {"x": torch.randn(6, 4, generator=g), "y": torch.tensor([0, 1, 2, 0, -1, -1]), "index": torch.arange(6)}
    out = d.training_step(batch)
    s, t = d.student(batch["x"]).detach(), d.teacher(batch["x"]).detach()
    kd_s = kd_t = 0.0
    ce_s = ce_t = 0.0
    for i in range(6):
        ps, pt = _probs(s[i].tolist(), 2.0), _probs(t[i].tolist(), 2.0)
        wi = 1 / (1 + math.exp(-4.0 * (_h(ps) - _h(pt))))
        kd_s += 4 * (wi * _kl(ps, pt) + (1 - wi) * _kl(pt, ps)) / 6
        kd_t += 4 * _kl(pt, ps) / 6
        y = batch["y"][i].item()
        if y >= 0:  # CE on the four labeled samples only
            ce_s -= math.log(_probs(s[i].tolist(), 1.0)[y]) / 4
            ce_t -= math.log(_probs(t[i].tolist(), 1.0)[y]) / 4
    assert out.losses["student"].item() == pytest.approx(0.5 * ce_s + 0.7 * kd_s, rel=1e-5)
    assert out.losses["teacher"].item() == pytest.approx(ce_t + 0.3 * kd_t, rel=1e-5)
    # each loss trains its own model only (the peer is detached)
    out.losses["student"].backward()
    assert all(p.grad is None for p in d.teacher.parameters())
    assert all(p.grad.abs().sum() > 0 for p in d.student.parameters())
    d.zero_grad(set_to_none=True)
    d.training_step(batch).losses["teacher"].backward()
    assert all(p.grad is None for p in d.student.parameters())


def test_fixed_divergences_and_groups():
    batch = {"x": torch.randn(4, 4), "y": torch.tensor([0, 1, 2, 0]), "index": torch.arange(4)}
    for div, w in (("forward", 0.0), ("reverse", 1.0)):
        assert _distiller(divergence=div).training_step(batch).metrics["reverse_weight"].item() == w
    d = _distiller()
    assert set(d.param_groups()) == {"student", "teacher"} and d.teacher_trainable
    assert all(p.requires_grad for p in d.teacher.parameters())


def test_reset_teacher_reinitialises_only_when_asked():
    torch.manual_seed(1)
    teacher = torch.nn.Linear(4, 3)
    with torch.no_grad():
        teacher.weight.fill_(7.0)
    frozen = teacher.requires_grad_(False)
    kept = BDKD(torch.nn.Linear(4, 3), frozen, BDKDParams(reset_teacher=False), TaskInfo(3, 8, (4,)))
    assert (kept.teacher.weight == 7.0).all() and kept.teacher.weight.requires_grad
    reset = BDKD(torch.nn.Linear(4, 3), frozen, BDKDParams(), TaskInfo(3, 8, (4,)))
    assert (reset.teacher.weight.abs() < 1).all()  # Linear's init bound 1/sqrt(4)


@pytest.mark.slow
def test_recipe_runs_online_and_resumes_exactly(tmp_runs):
    r = load_recipe("mnist1d-bdkd")
    assert r.method.name == "bdkd" and r.train.groups["teacher"].lr == 0.003
    arch = tiny_recipe("arch", {"name": "ce"}, epochs=1) | {"student": {"arch": "cnn1d", "width": 16, "depth": 2}}
    data = tiny_recipe("bdkd", r.method.model_dump(), {"recipe": arch}, epochs=2)
    data["train"]["groups"] = {"teacher": {"lr": 0.003}}
    teacher_w = {}

    def inspect(ckpt):
        teacher_w.update({k: v for k, v in load_file(str(ckpt / "model.safetensors")).items()
                          if k.startswith("teacher.")})

    straight, _ = resume_round_trip(data, tmp_runs, 5, inspect)  # the teacher is checkpointed and resumed too
    assert teacher_w, "the trainable teacher is in the checkpoint"
    final = load_file(str(straight.run_dir / "checkpoints" / "latest" / "model.safetensors"))
    assert any(not torch.equal(final[k], v) for k, v in teacher_w.items())  # the teacher kept training
    for key in ("test/accuracy", "test/ece", "teacher/accuracy"):
        assert key in straight.metrics


def test_validation_agreement_follows_an_online_teacher():
    """The evaluator compares with the teacher as it is now when the teacher trains (bdkd), and with the
    logits computed once when it is frozen."""
    from torch import nn

    from distill.tasks.base import ArrayDataset
    from distill.tasks.ops import evaluator

    g = torch.Generator().manual_seed(0)
    data = ArrayDataset(torch.randn(64, 5, generator=g), torch.randint(0, 3, (64,), generator=g))
    student, teacher = nn.Linear(5, 3), nn.Linear(5, 3)
    frozen = nn.Linear(5, 3).requires_grad_(False)
    online_eval, frozen_eval = evaluator(data, teacher), evaluator(data, frozen)
    before = frozen_eval(student)["agreement"]
    with torch.no_grad():
        for m in (teacher, frozen):
            m.weight.copy_(student.weight)
            m.bias.copy_(student.bias)
        assert online_eval(student)["agreement"] == 1.0  # the teacher as it is now
        assert frozen_eval(student)["agreement"] == before  # cached at the start
