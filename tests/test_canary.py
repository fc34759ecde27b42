"""Canary exposure (Carlini et al. 2019) and the mnist1d-canary task; a tiny teacher -> KD run
shows the exposure of a memorising teacher and of its distilled student."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_recipe
from torch import Tensor, nn

from distill.core.recipe import recipe_from_dict
from distill.core.runner import build_task, load_student, run_recipe
from distill.tasks.mnist1d_canary import canary_exposure, exposure
from distill.tasks.mnist1d import MNIST1DParams, build_mnist1d
from distill.tasks.mnist1d_canary import CanaryParams, build_mnist1d_canary


def test_exposure_by_hand():
    losses = torch.tensor([[0.1, 0.5, 0.3, 0.9]] * 4)
    secret = torch.tensor([0, 2, 1, 3])  # ranks 1, 2, 3, 4 among 4 candidates
    expected = [2.0, 1.0, 2 - math.log2(3), 0.0]  # log2(4) - log2(rank)
    assert exposure(losses, secret).tolist() == pytest.approx(expected)
    # ties count against the secret: indistinguishable candidates give exposure 0
    assert exposure(torch.zeros(1, 10), torch.tensor([4])).item() == pytest.approx(0.0)


def test_canary_task_plants_repeated_canaries():
    p = CanaryParams(num_train=100, num_val=10, num_test=20, num_transfer=30, num_canaries=3, canary_repeats=5)
    d = build_mnist1d_canary(p)
    base = build_mnist1d(MNIST1DParams(num_train=100, num_val=10, num_test=20, num_transfer=30))
    assert len(d.train) == 100 + 15
    assert torch.equal(d.train.x[:100], base.train.x) and torch.equal(d.test.x, base.test.x)
    cx, cy = d.meta["canary_x"], d.meta["canary_y"]
    for i in range(3):  # each canary appears 5 times, with its secret label
        rows = (d.train.x == cx[i]).all(-1).nonzero().squeeze(1)
        assert len(rows) == 5 and (d.train.y[rows] == cy[i]).all()


class _Lookup(nn.Module):
    """Answers the canaries' secrets (a perfectly memorising model), uniform elsewhere."""

    def __init__(self, x: Tensor, y: Tensor, classes: int = 10) -> None:
        super().__init__()
        self.x, self.y, self.classes = x, y, classes
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.zeros(len(x), self.classes)
        for i, row in enumerate(x):
            hit = (self.x == row).all(-1).nonzero()
            if len(hit):
                out[i, self.y[hit[0, 0]]] = 10.0
        return out


def test_canary_exposure_of_memorising_and_ignorant_models():
    d = build_mnist1d_canary(CanaryParams(num_train=50, num_val=10, num_test=20))
    assert canary_exposure(_Lookup(d.meta["canary_x"], d.meta["canary_y"]), d) == pytest.approx(math.log2(10))
    assert canary_exposure(_Lookup(d.meta["canary_x"][:0], d.meta["canary_y"][:0]), d) == pytest.approx(0.0)


def test_exposure_of_a_teacher_and_its_kd_student(tmp_runs):
    # how the owner reports it: canary_exposure(load_student(run_dir), build_task(recipe))
    task = {"name": "mnist1d-canary", "num_train": 256, "num_val": 64, "num_test": 128, "num_transfer": 256,
            "num_canaries": 4, "canary_repeats": 8}
    t = tiny_recipe("canary-teacher", {"name": "ce"}, epochs=15, lr=0.01) | {"task": task}
    t["student"] = {"arch": "cnn1d", "width": 16, "depth": 2}
    teacher = run_recipe(recipe_from_dict(t), out=tmp_runs)
    data = build_task(recipe_from_dict(t))
    exp_teacher = canary_exposure(load_student(teacher.run_dir), data)
    assert exp_teacher > 3.0  # memorised: the secrets rank first (max log2 10 ≈ 3.32)
    s = tiny_recipe("canary-kd", {"name": "kd", "ce_weight": 0.0, "kd_weight": 1.0}, {"run": str(teacher.run_dir)},
                    epochs=5, lr=0.01) | {"task": task}
    student = run_recipe(recipe_from_dict(s), out=tmp_runs)
    exp_student = canary_exposure(load_student(student.run_dir), data)
    assert 0.0 <= exp_student <= math.log2(10)
    print(f"canary exposure: teacher {exp_teacher:.2f}, KD student {exp_student:.2f} (max {math.log2(10):.2f})")
