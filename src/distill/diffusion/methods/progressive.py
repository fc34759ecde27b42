"""``progressive``: progressive distillation (B6, Salimans & Ho 2022, Alg. 2), as the official
google-research ``diffusion_distillation/dpm.py :: Model.training_losses``.

Rounds halve the sampler's steps: the first teacher samples with ``start_steps`` DDIM steps, and each
round's student (initialised from the teacher: ``init: {recipe: ...}``) learns to do with one DDIM step
what its teacher does with two. In a round whose student takes N steps on the grid t_i = t_max·i/N, a
training example draws i ∈ {0..N−1}, t = t_{i+1}, s = t_i, z_t = α_t x + σ_t ε; the teacher takes two
DDIM steps t → (t+s)/2 → s and the student's target is the x̃ whose DDIM step t → s lands on the same z_s:
x̃ = (z_s − (σ_s/σ_t) z_t) / (α_s − (σ_s/σ_t) α_t) (x̃ = z_s at s = 0; ``consistency.progressive_target``),
ε̃ from x̃ and z_t. Loss: ``snr_trunc`` (the official default for distillation), per sample
max(‖x̂ − x̃‖², ‖ε̂ − ε̃‖²) = x-MSE·max(SNR, 1); ``x_mse`` / ``eps_mse`` also offered.

At the end of a round the student becomes the next round's teacher: a frozen copy ``round_teacher``
(a submodule, so it resumes) takes the student's weights; round 0's teacher is the given teacher (with
CFG at ``guidance``), later rounds' teachers are students (w = 1: they learnt the guided teacher).
Ours: the run's optimizer steps are split evenly over the rounds (``total_steps`` / rounds; the official
code trains each round for a fixed number of steps) and Adam's state and the learning-rate schedule run
on across rounds (the official restarts them per round). The student samples with DDIM at ``steps``.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from distill.core.distiller import Step
from distill.core.registry import METHODS
from distill.diffusion import consistency as C
from distill.diffusion.base import DiffusionDistiller, DiffusionParams
from distill.diffusion.sampling import default_t_max


class ProgressiveParams(DiffusionParams):
    steps: int = Field(1, ge=1, description="the final student's DDIM steps")
    sampler: Literal["euler", "ddim", "heun", "sde", "consistency"] | None = "ddim"
    start_steps: int = Field(32, ge=2, description="the first teacher's DDIM steps (steps × a power of two)")
    weighting: Literal["snr_trunc", "x_mse", "eps_mse"] = Field("snr_trunc", description="official: snr_trunc")

    @model_validator(mode="after")
    def _rounds(self) -> "ProgressiveParams":
        C.progressive_rounds(self.start_steps, self.steps)
        return self


@METHODS.register("progressive", "progressive distillation: rounds halving DDIM steps, two teacher steps -> one (B6)",
                  ProgressiveParams)
class Progressive(DiffusionDistiller):
    student_sampler = "ddim"

    def __init__(self, student, teacher, params: ProgressiveParams, info) -> None:
        super().__init__(student, teacher, params, info)
        self.rounds = C.progressive_rounds(params.start_steps, params.steps)
        self.round_teacher = self.make_ema(student)  # overwritten with the student at each round's end
        self.register_buffer("round", torch.zeros((), dtype=torch.long))
        self.t_max = default_t_max(student.diffusion)

    def current_round(self) -> int:
        return C.stage_index(int(self.updates), self.total_steps, len(self.rounds))

    def round_teacher_fn(self, cond: Tensor | None) -> C.X0Eps:
        if int(self.round) == 0:
            model, w = self.teacher, self.params.guidance
        else:
            model, w = self.round_teacher, 1.0

        def fn(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
            return C.cfg_x0_eps(model, x, t, cond, w, self.num_classes)

        return fn

    def training_step(self, batch: dict[str, Tensor]) -> Step:
        x0_data, cond = batch["x"], self.cond(batch)
        n = self.rounds[int(self.round)]
        i = torch.randint(0, n, (x0_data.shape[0],), device=x0_data.device)
        t = (self.t_max * (i + 1) / n).to(x0_data.dtype)
        s = (self.t_max * i / n).to(x0_data.dtype)
        z_t, _ = self.noisy(x0_data, t)
        with torch.no_grad():
            x_target, eps_target = C.progressive_target(self.round_teacher_fn(cond), z_t, t, s, self.s_sched)
        x0, eps = self.student_x0_eps(z_t, t, cond)
        w = self.params.weighting
        if w == "snr_trunc":
            loss = C.snr_trunc_loss(x0, eps, x_target, eps_target)
        elif w == "x_mse":
            loss = ((x0 - x_target) ** 2).mean()
        else:
            loss = ((eps - eps_target) ** 2).mean()
        return Step({"student": loss}, {"round": float(self.round), "round_steps": float(n)})

    def on_optimizer_step(self) -> None:
        super().on_optimizer_step()
        r = self.current_round()
        if r != int(self.round):  # the round ends: the student is the next teacher
            with torch.no_grad():
                for pt, ps in zip(self.round_teacher.parameters(), self.student.parameters()):
                    pt.copy_(ps)
                for bt, bs in zip(self.round_teacher.buffers(), self.student.buffers()):
                    bt.copy_(bs)
            self.round.fill_(r)
