"""FerKD (S13): the regions and the loss by hand, its limits (all soft = FKD's soft CE, all hard =
label-smoothed CE), the teacher labelling the augmented view, resume, and a tiny end-to-end run."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_recipe, tiny_teacher, resume_round_trip
from pydantic import ValidationError

from distill.core.distiller import TaskInfo
from distill.core.recipe import load_recipe
from distill.logits.methods.ferkd import FerKD, FerKDParams
from distill.logits.losses import ferkd_loss, ferkd_regions


def _log(v: float) -> float:
    return math.log(v)


def test_regions_and_loss_by_hand():
    # 2 classes, target 0. Teacher logits ln(p/(1-p)) give p(target) = 0.05, 0.3, 0.8 exactly.
    p = [0.05, 0.3, 0.8]
    t = torch.tensor([[_log(q / (1 - q)), 0.0] for q in p])
    y = torch.tensor([0, 0, 0])
    assert ferkd_regions(t, y, 0.1, 0.5).tolist() == [0, 1, 2]
    s = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    eps = 0.2  # smoothed label of 2 classes: [1 - eps + eps/2, eps/2] = [0.9, 0.1]
    ls1 = [1 - math.log(math.e + 1), -math.log(math.e + 1)]  # log softmax([1, 0])
    hard = -(0.9 * ls1[0] + 0.1 * ls1[1])
    ls2 = [-math.log(1 + math.e), 1 - math.log(1 + math.e)]  # log softmax([0, 1])
    soft = -(0.8 * ls2[0] + 0.2 * ls2[1])  # T = 1: FKD's soft cross-entropy
    got = ferkd_loss(s, t, y, 0.1, 0.5, smoothing=eps, temperature=1.0)
    assert got.item() == pytest.approx((hard + soft) / 2, rel=1e-6)  # mean over the 2 kept views
    per = ferkd_loss(s, t, y, 0.1, 0.5, smoothing=eps, reduction="none")
    assert per.tolist() == pytest.approx([0.0, hard, soft], rel=1e-6)


def test_limits_all_soft_is_fkd_and_all_hard_is_label_smoothing():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(9, 5, generator=g), 2 * torch.randn(9, 5, generator=g)
    y = torch.randint(0, 5, (9,), generator=g)
    T = 2.0
    fkd = -(F.softmax(t / T, -1) * F.log_softmax(s / T, -1)).sum(-1).mean() * T * T
    assert ferkd_loss(s, t, y, 0.0, 0.0, temperature=T).item() == pytest.approx(fkd.item(), rel=1e-5)
    ls = F.cross_entropy(s, y, label_smoothing=0.1)
    assert ferkd_loss(s, t, y, 0.0, 1.0, smoothing=0.1).item() == pytest.approx(ls.item(), rel=1e-5)


def test_all_views_dropped_gives_zero_with_a_gradient():
    s = torch.randn(3, 4, requires_grad=True)
    t = torch.tensor([[-9.0, 9.0, 0.0, 0.0]]).repeat(3, 1)  # ~0 probability on the target 0
    loss = ferkd_loss(s, t, torch.zeros(3, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(s.grad, torch.zeros_like(s))


def test_thresholds_must_be_ordered():
    with pytest.raises(ValidationError, match="must not exceed"):
        FerKDParams(discard_below=0.6, soft_above=0.5)


class _Spy(torch.nn.Module):
    """A teacher that records what it is shown."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(40, 3)
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.clone())
        return self.lin(x)


def test_teacher_labels_the_view_the_student_sees():
    torch.manual_seed(0)
    teacher, student = _Spy(), torch.nn.Linear(40, 3)
    d = FerKD(student, teacher, FerKDParams(discard_below=0.0, soft_above=0.0), TaskInfo(3, 4, (40,)))
    x = torch.randn(4, 40)
    batch = {"x": x, "y": torch.tensor([0, 1, 2, -1]), "index": torch.arange(4)}
    student_inputs: list[torch.Tensor] = []
    student.register_forward_hook(lambda m, i, o: student_inputs.append(i[0].clone()))
    step = d.training_step(batch)
    # the clean input (pseudo-label of the unlabeled sample), then the view; cloned out of inference mode
    clean, view = (v.clone() for v in teacher.seen)
    assert torch.equal(clean, x) and torch.equal(student_inputs[0], view) and not torch.equal(view, x)
    # all soft (thresholds 0): the loss is FKD's soft CE of the student against the teacher on the view
    expected = -(F.softmax(teacher.lin(view), -1) * F.log_softmax(student(view), -1)).sum(-1).mean()
    assert step.losses["student"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert step.metrics["soft_frac"].item() == 1.0


@pytest.mark.parametrize("mix", [0.0, 1.0])
def test_self_mix_of_two_views_is_what_the_student_sees(mix):
    from distill.tasks.augment import random_view, self_mix

    torch.manual_seed(0)
    teacher, student = _Spy(), torch.nn.Linear(40, 3)
    p = FerKDParams(self_mix_prob=mix)
    d = FerKD(student, teacher, p, TaskInfo(3, 4, (40,)))
    x = torch.randn(4, 40)
    batch = {"x": x, "y": torch.tensor([0, 1, 2, -1]), "index": torch.arange(4)}
    seen: list[torch.Tensor] = []
    student.register_forward_hook(lambda m, i, o: seen.append(i[0].clone()))
    torch.manual_seed(5)
    d.training_step(batch)
    torch.manual_seed(5)  # replay the step's draws: view a, view b, SelfMix (only when it is on)
    a = random_view(x, p.max_shift, (p.crop_min, 1.0), p.noise_std)
    expected = a
    if mix:
        expected, _ = self_mix(a, random_view(x, p.max_shift, (p.crop_min, 1.0), p.noise_std))
        assert not torch.equal(expected, a)
    assert torch.equal(seen[0], expected)


def test_resume_restores_the_augmentation_stream(tmp_runs):
    data = tiny_recipe("ferkd", {"name": "ferkd"}, {"recipe": tiny_teacher()}, epochs=2)
    straight, _ = resume_round_trip(data, tmp_runs, 3)
    rows = [row for row in straight.history if "train/soft_frac" in row]
    fracs = [row["train/dropped_frac"] + row["train/hard_frac"] + row["train/soft_frac"] for row in rows]
    assert rows and fracs == pytest.approx([1.0] * len(rows))
    assert 0.0 <= straight.metrics["test/accuracy"] <= 1.0


def test_recipe_loads():
    r = load_recipe("mnist1d-ferkd")
    assert r.method.name == "ferkd" and r.train.epochs == 20 and r.task.params["num_transfer"] == 20000
