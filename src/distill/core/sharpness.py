"""Sharpness-aware minimization as an optimizer wrapper (``train.sharpness``).

The engine computes the gradient at w, calls ``perturb`` (move to the adversarial point), computes
the gradient there, calls ``restore`` (back to w, keeping the new gradient) and steps the base
optimizer. Methods run ``training_step`` twice per optimizer step under this option.
"""

from __future__ import annotations

import torch
from torch import nn

from distill.core.functional import kl_rows


class SAM:
    """SAM (Foret et al. 2021, Eq. 2): ``ε = ρ · g / ‖g‖₂``; the update uses ∇L(w + ε)."""

    def __init__(self, params: list[nn.Parameter], rho: float = 0.05) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.rho = rho
        self.direction = "gradient"
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
            # "ones": the official TRAM first_step's ε = scale · 1 (every weight moved by the same amount)
            e = None if p.grad is None else (torch.ones_like(p) * scale if self.direction == "ones" else p.grad * scale)
            if e is not None:
                p.add_(e)
            self._eps.append(e)

    @torch.no_grad()
    def restore(self) -> None:
        for p, e in zip(self.params, self._eps):
            if e is not None:
                p.sub_(e)
        self._eps = []


class TRAM(SAM):
    """TRAM-x (Sherborne et al. 2024, S02): SAM whose radius is a trust-region estimate in function
    space, ``ρ_t = scale · KL(f(x + z) ‖ f(x))`` with input noise ``z`` (normal: ``N(0, noise²)``,
    uniform: ``U(−noise, noise)``), then ``ε = ρ_t · g / ‖g‖₂`` as SAM (official
    tomsherborne/tram_optimizer: ``InputPerturbationTarget``, ``kl.py``, ``TRAM.first_step``).

    The divergence needs the model's outputs on the current batch: TRAM holds the distiller,
    records each micro-batch it is called on before ``perturb`` (a forward pre-hook), and in
    ``perturb`` runs the student on them again, with and without noise (no gradient), averaging the
    KL over the micro-batches of the step. The radius is normalised as the official code's
    ``F.kl_div(reduction="mean") / batch``: ``Σ_rows KL / (B² · C)`` for a micro-batch of B rows and C
    classes, so ``scale = 1`` is the official radius at any B and C (the batch-mean KL is B · C times it).
    Deviations from the official code: the noise is added to
    the inputs (the official code noises token embeddings; our tasks have no embedding layer);
    ``ε`` follows the gradient direction by default (``direction="gradient"``, the paper's SAM
    direction); the official ``first_step`` multiplies ``radius / ‖g‖`` by a tensor of ones instead
    of ``p.grad`` (``direction="ones"``, ``train.tram_direction: ones``), which we read as a bug.
    Measured on MNIST-1D (README, issue 12.6) the two directions gave the same accuracy within the
    seeds' spread. The student's extra forward passes are not in the training graph; they run
    in the student's current (training) mode, as the official code's.
    """

    def __init__(self, params: list[nn.Parameter], distiller: nn.Module, noise: float = 0.1,
                 noise_type: str = "normal", scale: float = 1.0, direction: str = "gradient") -> None:
        super().__init__(params, rho=0.0)
        self.direction = direction
        self.student, self.noise, self.noise_type, self.scale = distiller.student, noise, noise_type, scale
        self._inputs: list[torch.Tensor] = []
        distiller.register_forward_pre_hook(self._record)
        self.last_radius = 0.0

    def _record(self, module: nn.Module, args: tuple) -> None:
        if not getattr(module, "replaying", False) and args and isinstance(args[0], dict):
            self._inputs.append(args[0]["x"])

    def _noise_like(self, x: torch.Tensor) -> torch.Tensor:
        if self.noise_type == "normal":
            return torch.randn_like(x) * self.noise
        return (torch.rand_like(x) * 2 - 1) * self.noise

    @torch.no_grad()
    def radius(self) -> float:
        kls = []
        for x in self._inputs:
            log_clean = torch.log_softmax(self.student(x).float(), dim=-1)
            log_noisy = torch.log_softmax(self.student(x + self._noise_like(x)).float(), dim=-1)
            # the official normalisation: F.kl_div(reduction="mean") / batch = Σ_rows KL / (B² · C)
            kls.append(kl_rows(log_noisy, log_clean).sum() / (x.shape[0] ** 2 * log_clean.shape[-1]))
        self.last_radius = self.scale * torch.stack(kls).mean().item() if kls else 0.0
        return self.last_radius

    def perturb(self) -> None:
        super().perturb()
        self._inputs = []  # the engine's second pass (at w + ε, ``replaying``) is not recorded
