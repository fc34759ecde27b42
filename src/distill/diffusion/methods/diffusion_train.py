"""``diffusion_train``: train a denoiser from data (the teachers of this family).

Denoising score matching in the model's own parameterisation (Ho et al. 2020 Eq. 14 for ε; x₀, v
and the flow-matching velocity (Lipman et al. 2023, Eq. 23) likewise): t ~ U(t_min, 1) or, for
``time: logit_normal``, σ(𝒩(0, 1)) (SD3's sampling); the MSE between the prediction and its target
built from the same (x₀, ε). Conditional tasks drop the label with probability ``p_uncond`` (the null
label), so the model serves classifier-free guidance (Ho & Salimans 2022). No teacher.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from distill.core.distiller import Step
from distill.core.registry import METHODS
from distill.diffusion.base import DiffusionDistiller, DiffusionParams
from distill.diffusion.sampling import null_labels
from distill.diffusion.schedules import denoising_loss


class TrainParams(DiffusionParams):
    steps: int = Field(50, ge=1, description="sampling steps of the trained model (evaluation, saved)")
    sampler: Literal["euler", "ddim", "heun", "sde", "consistency"] | None = "euler"
    p_uncond: float = Field(0.1, ge=0, lt=1, description="label dropout for classifier-free guidance")
    time: Literal["uniform", "logit_normal"] = "uniform"
    t_min: float = Field(1e-3, ge=0, lt=1)


def sample_times(n: int, how: str, t_min: float, device: torch.device) -> Tensor:
    if how == "logit_normal":
        return torch.sigmoid(torch.randn(n, device=device)).clamp(t_min, 1.0)
    return t_min + (1 - t_min) * torch.rand(n, device=device)


@METHODS.register("diffusion_train", "train a denoiser on data (denoising score / flow matching): the teachers",
                  TrainParams)
class DiffusionTrain(DiffusionDistiller):
    needs_teacher = False

    def __init__(self, student, teacher, params: TrainParams, info) -> None:
        super().__init__(student, teacher, params, info)
        self.student.diffusion["guidance"] = params.guidance  # the teacher samples with its CFG scale

    def training_step(self, batch: dict[str, Tensor]) -> Step:
        x0 = batch["x"]
        cond = self.cond(batch)
        if cond is not None and self.params.p_uncond > 0:
            drop = torch.rand(len(x0), device=x0.device) < self.params.p_uncond
            cond = torch.where(drop, null_labels(cond, self.num_classes), cond)
        t = sample_times(len(x0), self.params.time, self.params.t_min, x0.device)
        x_t, eps = self.noisy(x0, t)
        kind = self.student.diffusion["prediction"]
        loss = denoising_loss(self.student(x_t, t, cond), x0, eps, kind, t, self.s_sched)
        return Step({"student": loss})
