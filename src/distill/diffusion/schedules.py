"""Noise schedules and parameterisations, in one continuous time (``docs/conventions`` of the project).

``x_t = α(t)·x_0 + σ(t)·ε`` with t ∈ [0, 1], t = 0 data and t = 1 noise:

- ``flow`` (rectified flow, Liu et al. 2022): α = 1 − t, σ = t;
- ``vp_cosine`` (Nichol & Dhariwal 2021, Eq. 17, offset s = 0.008): ᾱ(t) = f(t)/f(0),
  f(t) = cos²(((t + s)/(1 + s))·π/2), α = √ᾱ, σ = √(1 − ᾱ);
- ``trigflow`` (S56, sCM Eq. 1 with σ_d = 1: data are standardised): α = cos(πt/2), σ = sin(πt/2);
  its angle s = πt/2 is what the sCM formulas call t.

A network predicts one of ``eps`` (ε), ``x0`` (x₀), ``v`` (Salimans & Ho 2022: v = α·ε − σ·x₀) or
``velocity`` (the probability-flow ODE's dx_t/dt = α'·x₀ + σ'·ε; for ``flow`` ε − x₀). ``to_x0_eps``
and ``from_x0_eps`` convert between them; every method works on (x₀, ε) and converts once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

ScheduleName = Literal["flow", "vp_cosine", "trigflow"]
Prediction = Literal["eps", "x0", "v", "velocity"]
PREDICTIONS = ("eps", "x0", "v", "velocity")
_S = 0.008  # Nichol & Dhariwal's cosine offset


def bcast(t: Tensor | float, x: Tensor) -> Tensor:
    """``t`` ([B] or scalar) shaped to broadcast against ``x`` ([B, ...])."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.reshape(-1, *([1] * (x.dim() - 1))) if t.dim() else t


@dataclass(frozen=True)
class Schedule:
    name: ScheduleName

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        if self.name == "flow":
            return 1 - t, t
        if self.name == "trigflow":
            return torch.cos(t * math.pi / 2), torch.sin(t * math.pi / 2)
        f0 = math.cos(_S / (1 + _S) * math.pi / 2) ** 2
        abar = (torch.cos((t + _S) / (1 + _S) * math.pi / 2) ** 2 / f0).clamp(0.0, 1.0)
        return abar.sqrt(), (1 - abar).sqrt()

    def derivatives(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """dα/dt and dσ/dt."""
        if self.name == "flow":
            return -torch.ones_like(t), torch.ones_like(t)
        if self.name == "trigflow":
            h = math.pi / 2
            return -h * torch.sin(t * h), h * torch.cos(t * h)
        a, s = self.alpha_sigma(t)
        c = math.pi / (2 * (1 + _S))
        u = (t + _S) / (1 + _S) * math.pi / 2
        f0 = math.cos(_S / (1 + _S) * math.pi / 2) ** 2
        dabar = -2 * torch.cos(u) * torch.sin(u) * c / f0  # d ᾱ / dt
        da = dabar / (2 * a.clamp_min(1e-12))
        ds = -dabar / (2 * s.clamp_min(1e-12))
        return da, ds

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        a, s = self.alpha_sigma(bcast(t, x0))
        return a * x0 + s * eps

    def snr(self, t: Tensor) -> Tensor:
        a, s = self.alpha_sigma(t)
        return a**2 / s.clamp_min(1e-12) ** 2


def get_schedule(name: str) -> Schedule:
    if name not in ("flow", "vp_cosine", "trigflow"):
        raise ValueError(f"unknown schedule '{name}': flow, vp_cosine or trigflow")
    return Schedule(name)  # type: ignore[arg-type]


def to_x0_eps(pred: Tensor, kind: str, x_t: Tensor, t: Tensor, sched: Schedule) -> tuple[Tensor, Tensor]:
    """(x₀, ε) from a prediction of ``kind`` at ``(x_t, t)``.

    x0/eps: x_t = αx₀ + σε solved for the other; v: x₀ = αx_t − σv, ε = σx_t + αv (α² + σ² = 1: VP
    schedules only); velocity u = α'x₀ + σ'ε with x_t = αx₀ + σε: a 2×2 linear system whose
    determinant is ασ' − σα' (≠ 0 for every schedule here)."""
    a, s = sched.alpha_sigma(bcast(t, x_t))
    if kind == "eps":
        return (x_t - s * pred) / a.clamp_min(1e-6), pred
    if kind == "x0":
        return pred, (x_t - a * pred) / s.clamp_min(1e-6)
    if kind == "v":
        if sched.name == "flow":
            raise ValueError("v-prediction needs a variance-preserving schedule (vp_cosine, trigflow)")
        return a * x_t - s * pred, s * x_t + a * pred
    if kind == "velocity":
        da, ds = sched.derivatives(bcast(t, x_t))
        det = a * ds - s * da
        return (ds * x_t - s * pred) / det, (a * pred - da * x_t) / det
    raise ValueError(f"unknown prediction '{kind}': one of {PREDICTIONS}")


def denoising_loss(pred: Tensor, x0: Tensor, eps: Tensor, kind: str, t: Tensor, sched: Schedule) -> Tensor:
    """MSE between a denoiser's prediction of ``kind`` at x_t = α x₀ + σ ε and its target from (x₀, ε):
    denoising score matching / flow matching (teachers, DMD2's fake-score critic)."""
    return F.mse_loss(pred, from_x0_eps(x0.detach(), eps, kind, t, sched))


def from_x0_eps(x0: Tensor, eps: Tensor, kind: str, t: Tensor, sched: Schedule) -> Tensor:
    """The prediction of ``kind`` whose (x₀, ε) are given (the inverse of ``to_x0_eps``)."""
    if kind == "eps":
        return eps
    if kind == "x0":
        return x0
    a, s = sched.alpha_sigma(bcast(t, x0))
    if kind == "v":
        return a * eps - s * x0
    if kind == "velocity":
        da, ds = sched.derivatives(bcast(t, x0))
        return da * x0 + ds * eps
    raise ValueError(f"unknown prediction '{kind}': one of {PREDICTIONS}")
