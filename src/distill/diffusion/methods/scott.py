"""``scott``: stochastic consistency distillation (S36 SCott, Liu et al. 2024, arXiv 2403.01505).

SCott is consistency distillation (``cd``: EMA target, c_skip/c_out, pseudo-Huber) whose teacher
trajectory step is an SDE-solver step instead of an ODE step: from x_t the teacher moves to s with
fresh noise, and the EMA target maps that stochastic point to x̂₀. No official code was found; only the
abstract was available, so the SDE solver and its noise control are ours:

- the step is generalised DDIM with noise η (Song et al. 2021, Eq. 12/16; ``consistency.sde_step``):
  x_s = α_s x̂₀ + √(σ_s² − c²)·ε̂ + c·z, c = η·σ_s·√(1 − (α_t σ_s / α_s σ_t)²); η = 0 is the DDIM (ODE) step,
  η = 1 the DDPM posterior (the ancestral sampler); ``eta`` is the "controllable noise strength";
- ``substeps``: the teacher covers t → s in that many SDE sub-steps (a longer stochastic trajectory
  per target; 1 by default);
- SCott's adversarial term is not implemented (the abstract's "further incorporated" loss).

The student samples with the multistep ``consistency`` sampler (stochastic re-noising, as SCott's
multi-step sampling) at ``steps``.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from distill.core.registry import METHODS
from distill.diffusion import consistency as C
from distill.diffusion.methods.cd import CDParams, ConsistencyDistiller


class ScottParams(CDParams):
    eta: float = Field(0.5, ge=0, le=1, description="noise strength η of the teacher's SDE step (0: the ODE step)")
    substeps: int = Field(1, ge=1, description="SDE sub-steps the teacher takes from t to s")


@METHODS.register("scott", "stochastic consistency distillation: the teacher's trajectory step is an SDE step (S36)",
                  ScottParams)
class Scott(ConsistencyDistiller):
    def teacher_step(self, fn: C.X0Eps, x: Tensor, t: Tensor, s: Tensor) -> Tensor:
        m = self.params.substeps
        for i in range(m):
            a, b = t + (s - t) * i / m, t + (s - t) * (i + 1) / m
            x = C.sde_step(fn, x, a, b, self.t_sched, self.params.eta, torch.randn_like(x))
        return x
