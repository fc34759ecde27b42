"""Sharpness-aware minimization as an optimizer wrapper (``train.sharpness``).

The engine computes the gradient at w, calls ``perturb`` (move to the adversarial point), computes
the gradient there, calls ``restore`` (back to w, keeping the new gradient) and steps the base
optimizer. Methods run ``training_step`` twice per optimizer step under this option.
"""

from __future__ import annotations

import torch
from torch import nn


class SAM:
    """SAM (Foret et al. 2021, Eq. 2): ``ε = ρ · g / ‖g‖₂``; the update uses ∇L(w + ε)."""

    def __init__(self, params: list[nn.Parameter], rho: float = 0.05) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.rho = rho
        self._eps: list[torch.Tensor | None] = []

    def radius(self) -> float:
        return self.rho

    @torch.no_grad()
    def perturb(self) -> None:
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.norm(torch.stack([g.norm(2) for g in grads]), 2) if grads else torch.zeros(())
        scale = self.radius() / (norm + 1e-12)
        self._eps = []
        for p in self.params:
            e = None if p.grad is None else p.grad * scale
            if e is not None:
                p.add_(e)
            self._eps.append(e)

    @torch.no_grad()
    def restore(self) -> None:
        for p, e in zip(self.params, self._eps):
            if e is not None:
                p.sub_(e)
        self._eps = []
