"""S38 recursive meta-distillation: the anchored target, generation switching, resume."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_recipe, tiny_teacher, resume_round_trip
from safetensors.torch import load_file

from distill.core.distiller import TaskInfo
from distill.errors import RecipeError
from distill.logits.losses import anchored_kd_loss, kd_loss
from distill.logits.methods.recursive import RecursiveDistillation, RecursiveParams
from distill.tasks.base import ArrayDataset
from distill.tasks.models import MLPParams, mlp


def test_anchored_target_by_hand():
    s, t, prev = torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    a = math.exp(2) / (math.exp(2) + 1)  # softmax([2, 0])[0]
    q = [0.25 * a + 0.75 * (1 - a), 0.25 * (1 - a) + 0.75 * a]  # λ = 0.25
    kl = sum(qi * math.log(qi / 0.5) for qi in q)
    assert anchored_kd_loss(s, t, prev, 0.25, temperature=1.0).item() == pytest.approx(kl, rel=1e-6)
    # T = 2: both mixed distributions at T, times T²
    a2 = math.exp(1) / (math.exp(1) + 1)
    q2 = [0.25 * a2 + 0.75 * (1 - a2), 0.25 * (1 - a2) + 0.75 * a2]
    kl2 = sum(qi * math.log(qi / 0.5) for qi in q2)
    assert anchored_kd_loss(s, t, prev, 0.25, 2.0).item() == pytest.approx(4 * kl2, rel=1e-5)
    # special cases: no previous generation or λ = 1 is KD to the teacher; λ → 0 is KD to the previous student
    g = torch.Generator().manual_seed(0)
    s, t, prev = (torch.randn(6, 5, generator=g) for _ in range(3))
    assert anchored_kd_loss(s, t, None, 0.3).item() == pytest.approx(kd_loss(s, t).item(), rel=1e-6)
    assert anchored_kd_loss(s, t, prev, 1.0).item() == pytest.approx(kd_loss(s, t).item(), rel=1e-6)
    assert anchored_kd_loss(s, t, prev, 1e-9).item() == pytest.approx(kd_loss(s, prev).item(), rel=1e-5)
    huge = anchored_kd_loss(s * 1e4, t * 1e4, prev * 1e4, 0.5)
    assert torch.isfinite(huge)


def test_realised_generations_contract_towards_the_teacher():
    # if each generation realises its meta-teacher exactly, KL(p_T ‖ p_k) shrinks at least by (1 − λ)
    g = torch.Generator().manual_seed(1)
    t, student = torch.randn(8, 6, generator=g) * 3, torch.randn(8, 6, generator=g) * 3
    lam = 0.3

    def kl(a, b):
        return F.kl_div(F.log_softmax(b, -1), F.softmax(a, -1), reduction="batchmean").item()

    prev_kl = kl(t, student)
    for _ in range(6):
        student = torch.log(lam * F.softmax(t, -1) + (1 - lam) * F.softmax(student, -1))  # realises q_k
        assert anchored_kd_loss(student, t, None, 1.0, temperature=1.0) <= prev_kl  # the KL the method tracks
        new_kl = kl(t, student)
        assert new_kl <= (1 - lam) * prev_kl + 1e-7
        prev_kl = new_kl


def _method(generations: int = 3, epg: int | None = 2) -> RecursiveDistillation:
    torch.manual_seed(0)
    x, y = torch.randn(30, 5), torch.randint(0, 3, (30,))
    info = TaskInfo(3, 30, (5,), 30, ArrayDataset(x, y), ArrayDataset(torch.randn(12, 5), torch.randint(0, 3, (12,))))
    teacher, student = mlp(MLPParams(width=16, depth=1), (5,), 3), mlp(MLPParams(width=8, depth=1), (5,), 3)
    params = RecursiveParams(generations=generations, epochs_per_generation=epg)
    return RecursiveDistillation(student, teacher, params, info)


def test_generation_switching_and_kl_record():
    m = _method(generations=3, epg=2)
    val = m.info.val
    for epoch, gen in ((0, 0), (1, 0), (2, 1), (3, 1), (4, 2), (7, 2)):
        before = {k: v.clone() for k, v in m.student.state_dict().items()}
        log_s, p_t = F.log_softmax(m.student(val.x), -1), F.softmax(m.teacher(val.x), -1)
        expected_kl = F.kl_div(log_s, p_t, reduction="batchmean")
        old = int(m.generation)
        m.on_epoch_start(epoch)
        m.on_epoch_start(epoch)  # idempotent (the engine re-enters an epoch on resume)
        assert int(m.generation) == gen
        if gen > old:
            assert m.generation_kl[old].item() == pytest.approx(expected_kl.item(), rel=1e-5)
            assert all(torch.equal(m.previous.state_dict()[k], before[k]) for k in before)
        with torch.no_grad():  # the student moves on, as training would
            for p in m.student.parameters():
                p.add_(0.1)
    assert torch.isnan(m.generation_kl[2])  # the last generation's KL is the run's val/kl_to_teacher
    assert not any(p.requires_grad for p in m.previous.parameters())
    assert set(m.param_groups()) == {"student"} and all(p.requires_grad for p in m.param_groups()["student"])


def test_default_generation_length_splits_the_run():
    m = _method(generations=3, epg=None)
    m.on_train_start(total_steps=70, total_epochs=7)  # 7 // 3 = 2 epochs per generation, the last runs on
    gens = []
    for epoch in range(7):
        m.on_epoch_start(epoch)
        gens.append(int(m.generation))
    assert gens == [0, 0, 1, 1, 2, 2, 2]


def test_training_step_uses_previous_generation_after_the_switch():
    m = _method(generations=2, epg=1)
    batch = m.info.train.__getitems__(list(range(8)))
    first = m.training_step(batch)
    s, t = m.student(batch["x"]), m.teacher(batch["x"])
    ce = F.cross_entropy(s, batch["y"])
    assert first.losses["student"].item() == pytest.approx((0.1 * ce + 0.9 * kd_loss(s, t)).item(), rel=1e-5)
    m.on_epoch_start(1)
    with torch.no_grad():
        for p in m.student.parameters():
            p.mul_(0.5)
    step = m.training_step(batch)
    s, prev = m.student(batch["x"]), m.previous(batch["x"])
    q = 0.5 * F.softmax(t / 4, -1) + 0.5 * F.softmax(prev / 4, -1)
    kd = F.kl_div(F.log_softmax(s / 4, -1), q, reduction="batchmean") * 16
    ce = F.cross_entropy(s, batch["y"])
    assert step.losses["student"].item() == pytest.approx((0.1 * ce + 0.9 * kd).item(), rel=1e-5)
    assert step.metrics["generation"] == 1.0 and "kl_to_teacher_gen0" in step.metrics


def test_needs_a_validation_split():
    torch.manual_seed(0)
    info = TaskInfo(3, 10, (5,), 10, ArrayDataset(torch.randn(10, 5), torch.randint(0, 3, (10,))), None)
    net = mlp(MLPParams(width=4, depth=1), (5,), 3)
    with pytest.raises(RecipeError, match="validation"):
        RecursiveDistillation(net, mlp(MLPParams(width=4, depth=1), (5,), 3), RecursiveParams(generations=2), info)


@pytest.mark.parametrize("stop", [8, 11])  # at a generation boundary (8 steps per epoch) and inside generation 1
def test_resume_is_bitwise_exact_across_generations(tmp_runs, stop):
    method = {"name": "recursive", "generations": 3, "epochs_per_generation": 1, "anchor_weight": 0.5}
    data = tiny_recipe("rec", method, {"recipe": tiny_teacher()}, epochs=3)
    straight, resumed = resume_round_trip(data, tmp_runs, stop)
    state = load_file(str(resumed.run_dir / "checkpoints/latest/model.safetensors"))
    assert state["generation"].item() == 2 and not torch.isnan(state["generation_kl"][:2]).any()
    logged = [r["train/kl_to_teacher_gen1"] for r in straight.history if "train/kl_to_teacher_gen1" in r]
    assert logged and logged[-1] == pytest.approx(state["generation_kl"][1].item(), rel=1e-6)
