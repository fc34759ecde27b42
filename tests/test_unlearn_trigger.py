"""Sealing the backdoor (S37): the poisoned task, attack success rate, the self-distillation
objective, weight copying, and attack success / clean accuracy before and after unlearning."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_recipe
from torch import Tensor, nn

from distill.core.distiller import TaskInfo
from distill.core.recipe import recipe_from_dict
from distill.core.runner import build_task, load_student, run_recipe
from distill.errors import MismatchError
from distill.logits.methods.unlearn_trigger import UnlearnTrigger, UnlearnTriggerParams
from distill.tasks.mnist1d import MNIST1DParams, build_mnist1d
from distill.tasks.mnist1d_backdoor import (
    BackdoorParams,
    Trigger,
    apply_trigger,
    attack_success_rate,
    build_mnist1d_backdoor,
)


def test_apply_trigger_by_hand_and_idempotent():
    x = torch.zeros(2, 8)
    out = apply_trigger(x, Trigger(start=5, width=3, value=2.0))
    assert out[0].tolist() == [0, 0, 0, 0, 0, 2.0, -2.0, 2.0]
    assert torch.equal(apply_trigger(out, Trigger(start=5, width=3, value=2.0)), out)
    assert torch.equal(x, torch.zeros(2, 8))  # the input is not modified


def test_backdoor_task_poisons_only_the_labeled_train_set():
    p = BackdoorParams(num_train=200, num_val=20, num_test=50, num_transfer=30, poison_fraction=0.1, target_class=3)
    d = build_mnist1d_backdoor(p)
    base = build_mnist1d(MNIST1DParams(num_train=200, num_val=20, num_test=50, num_transfer=30))
    poisoned = d.meta["poisoned"]
    assert len(poisoned) == 20 and (base.train.y[poisoned] != 3).all()
    assert (d.train.y[poisoned] == 3).all()
    assert torch.equal(d.train.x[poisoned], apply_trigger(base.train.x[poisoned], p.trigger))
    clean = torch.ones(200, dtype=torch.bool)
    clean[poisoned] = False
    assert torch.equal(d.train.x[clean], base.train.x[clean]) and torch.equal(d.train.y[clean], base.train.y[clean])
    for split in ("val", "test", "transfer"):
        assert torch.equal(getattr(d, split).x, getattr(base, split).x)


class _Backdoored(nn.Module):
    """Predicts class 3 when the trigger's first sample is +3, else class 0."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        return 10.0 * F.one_hot(torch.where(x[:, 36] == 3.0, 3, 0), 10).float()


def test_attack_success_rate_by_hand():
    d = build_mnist1d_backdoor(BackdoorParams(num_train=50, num_val=10, num_test=40, target_class=3))
    assert attack_success_rate(_Backdoored(), d) == 1.0
    d.meta["target_class"] = 0  # triggered inputs now go to 3, not to the target 0
    assert attack_success_rate(_Backdoored(), d) == 0.0


def _method(clean_weight: float = 0.0) -> UnlearnTrigger:
    torch.manual_seed(0)
    teacher, student = nn.Linear(40, 10), nn.Linear(40, 10)
    info = TaskInfo(num_classes=10, num_train=6, input_shape=(40,))
    return UnlearnTrigger(student, teacher, UnlearnTriggerParams(temperature=2.0, clean_weight=clean_weight), info)


def test_student_starts_from_the_teacher_and_mismatch_is_an_error():
    m = _method()
    for a, b in zip(m.student.parameters(), m.teacher.parameters()):
        assert torch.equal(a, b)
        assert a.data_ptr() != b.data_ptr()  # a copy, not shared: the teacher stays frozen
    with pytest.raises(MismatchError, match="architectures differ"):
        UnlearnTrigger(nn.Linear(40, 5), nn.Linear(40, 10), UnlearnTriggerParams(), TaskInfo(10, 6, (40,)))


@pytest.mark.parametrize("clean_weight", [0.0, 0.5])
def test_objective_against_an_independent_formula(clean_weight):
    m = _method(clean_weight)
    with torch.no_grad():  # make the student differ from the teacher
        m.student.weight.add_(0.1)
    g = torch.Generator().manual_seed(1)
    batch = {"x": torch.randn(6, 40, generator=g), "y": torch.tensor([2, -1, -1, 5, -1, -1]), "index": torch.arange(6)}
    loss = m.training_step(batch).losses["student"]
    # only the unlabeled (clean, defender's) samples; T = 2: T² · KL(softmax(t(x)/2) ‖ softmax(s(trig(x))/2))
    x = batch["x"][[1, 2, 4, 5]].double()
    xt = x.clone()
    xt[:, 36:40] = torch.tensor([3.0, -3.0, 3.0, -3.0], dtype=torch.double)
    wt, bt = m.teacher.weight.double(), m.teacher.bias.double()
    ws, bs = m.student.weight.detach().double(), m.student.bias.detach().double()
    p_t = torch.softmax((x @ wt.T + bt) / 2, -1)

    def kl(z):
        return 4 * (p_t * (p_t.log() - torch.log_softmax(z / 2, -1))).sum(-1).mean()

    expected = kl(xt @ ws.T + bs) + clean_weight * kl(x @ ws.T + bs)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_unlearning_lowers_attack_success_and_keeps_clean_accuracy(tmp_runs):
    task = {"name": "mnist1d-backdoor", "num_train": 1000, "num_val": 64, "num_test": 256, "num_transfer": 1000,
            "poison_fraction": 0.1}
    arch = {"arch": "cnn1d", "width": 32, "depth": 3}
    t = tiny_recipe("backdoor-teacher", {"name": "ce"}, epochs=20, lr=0.01) | {"task": task, "student": arch}
    teacher = run_recipe(recipe_from_dict(t), out=tmp_runs)
    data = build_task(recipe_from_dict(t))
    asr_before, acc_before = attack_success_rate(load_student(teacher.run_dir), data), teacher.metrics["test/accuracy"]
    assert asr_before > 0.9  # the trigger was planted
    u = tiny_recipe("unlearn", {"name": "unlearn_trigger", "clean_weight": 1.0}, {"run": str(teacher.run_dir)},
                    epochs=6, lr=0.001) | {"task": task, "student": arch}
    res = run_recipe(recipe_from_dict(u), out=tmp_runs)
    asr_after, acc_after = attack_success_rate(load_student(res.run_dir), data), res.metrics["test/accuracy"]
    print(f"attack success {asr_before:.2f} -> {asr_after:.2f}; clean accuracy {acc_before:.3f} -> {acc_after:.3f}")
    assert asr_after < 0.2
    assert acc_after > acc_before - 0.1
