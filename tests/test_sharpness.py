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
