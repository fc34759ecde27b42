"""SAM against the closed form on a quadratic."""

from __future__ import annotations

import torch

from distill.core.sharpness import SAM


def test_sam_gradient_is_taken_at_the_adversarial_point():
    # L(w) = 0.5 * w^T A w: g = A w; eps = rho * g/|g|; the SAM gradient is A (w + eps)
    A = torch.diag(torch.tensor([1.0, 4.0]))
    w = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    sam = SAM([w], rho=0.1)
    (0.5 * w @ A @ w).backward()
    g = A @ torch.tensor([1.0, 1.0])
    sam.perturb()
    expected_point = torch.tensor([1.0, 1.0]) + 0.1 * g / g.norm()
    assert torch.allclose(w.detach(), expected_point)
    w.grad = None
    (0.5 * w @ A @ w).backward()
    sam.restore()
    assert torch.allclose(w.detach(), torch.tensor([1.0, 1.0]))
    assert torch.allclose(w.grad, A @ expected_point)


def test_engine_flags_the_sam_replay():
    from distill.core.distiller import TaskInfo
    from distill.core.recipe import TrainConfig
    from distill.core.trainer import Trainer
    from distill.logits.methods.ce import CEParams, CrossEntropy
    from distill.tasks.base import ArrayDataset

    seen: list[bool] = []

    class Spy(CrossEntropy):
        def training_step(self, batch):
            seen.append(self.replaying)
            return super().training_step(batch)

    d = Spy(torch.nn.Linear(3, 2), None, CEParams(), TaskInfo(2, 8, (3,)))
    cfg = TrainConfig(epochs=1, batch_size=4, sharpness="sam", progress=False, trackers="none")
    Trainer(d, ArrayDataset(torch.randn(8, 3), torch.randint(0, 2, (8,))), cfg).fit()
    assert seen == [False, True, False, True]
