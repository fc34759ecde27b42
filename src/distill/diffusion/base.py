"""``DiffusionDistiller``: the base of the step-distillation methods.

It sets the student's sampling (``model.diffusion``: the sampler, step count and guidance it is
evaluated and saved with), calls the frozen teacher as (x₀, ε) with classifier-free guidance, and
runs several parameter groups at different rates through the ordinary ``Distiller`` contract: a
method returns, at each optimizer step, only the losses of the groups that step trains (``phase``
reads a cycle such as ``["critic"] * k + ["student"]`` at the step counter ``updates``, a buffer, so
the cycle resumes exactly); a group without a loss gets no gradient and its optimizer skips it.
An EMA copy (``make_ema``) is a submodule for the same reason: it is in the checkpoint.
"""

from __future__ import annotations

import copy
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from distill.core.distiller import Distiller, TaskInfo
from distill.core.registry import Params
from distill.diffusion.models import diffusion_spec
from distill.diffusion.sampling import predict
from distill.diffusion.schedules import Schedule, bcast, get_schedule
from distill.errors import MismatchError


class DiffusionParams(Params):
    steps: int = Field(1, ge=1, description="the student's sampling steps (evaluation and the saved model)")
    sampler: Literal["euler", "ddim", "heun", "sde", "consistency"] | None = Field(
        None, description="the student's sampler (default: the method's)")
    guidance: float = Field(1.0, ge=0, description="the teacher's CFG scale w in u + w(c − u), where the method uses it")


class DiffusionDistiller(Distiller):
    uses_unlabeled = True
    student_sampler: ClassVar[str] = "consistency"  # one- and few-step generators re-noise between steps
    same_schedule: ClassVar[bool] = True  # teacher and student must share a schedule

    def __init__(self, student: nn.Module, teacher: nn.Module | None, params: Params, info: TaskInfo) -> None:
        super().__init__(student, teacher, params, info)
        self.num_classes = info.num_classes
        s_spec = diffusion_spec(student)
        student.diffusion = {**s_spec, "sampler": getattr(params, "sampler", None) or self.student_sampler,
                             "steps": int(getattr(params, "steps", s_spec["steps"])), "guidance": 1.0}
        self.s_sched: Schedule = get_schedule(s_spec["schedule"])
        if teacher is not None:
            t_spec = diffusion_spec(teacher)
            self.t_sched: Schedule = get_schedule(t_spec["schedule"])
            if t_spec["schedule"] != s_spec["schedule"] and self.same_schedule:
                raise MismatchError(f"{type(self).__name__}: teacher ({t_spec['schedule']}) and student "
                                    f"({s_spec['schedule']}) must share a schedule")
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    # --- data ---------------------------------------------------------------------------------------
    def cond(self, batch: dict[str, Tensor]) -> Tensor | None:
        return batch["y"] if self.num_classes else None

    # --- models as (x0, eps) ----------------------------------------------------------------------------
    def teacher_x0_eps(self, x_t: Tensor, t: Tensor, cond: Tensor | None, guidance: float | None = None,
                       model: nn.Module | None = None) -> tuple[Tensor, Tensor]:
        """The frozen teacher's (x₀, ε) with CFG at ``guidance`` (default the method's ``guidance``)."""
        w = self.params.guidance if guidance is None else guidance
        with torch.no_grad():
            x0, eps = predict(model or self.teacher, x_t, t, cond, w, self.num_classes)
        return x0.detach(), eps.detach()

    def student_x0_eps(self, x_t: Tensor, t: Tensor, cond: Tensor | None, model: nn.Module | None = None,
                       w_input: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return predict(model or self.student, x_t, t, cond, 1.0, self.num_classes, w_input)

    def noisy(self, x0: Tensor, t: Tensor, sched: Schedule | None = None) -> tuple[Tensor, Tensor]:
        """(x_t, ε) with fresh Gaussian ε."""
        eps = torch.randn_like(x0)
        return (sched or self.s_sched).add_noise(x0, eps, t), eps

    def generate(self, noise: Tensor, cond: Tensor | None, t: Tensor | float = 1.0,
                 model: nn.Module | None = None) -> Tensor:
        """A one-step generator's sample: the student's x̂₀ from pure noise at time ``t`` (default 1)."""
        tt = torch.as_tensor(t, dtype=noise.dtype, device=noise.device).expand(noise.shape[0])
        _, s = self.s_sched.alpha_sigma(bcast(tt, noise))
        return self.student_x0_eps(s * noise, tt, cond, model)[0]  # x_t carries no x₀ at t = 1

    def cache_teacher(self, x: Tensor, batch_size: int = 1024) -> None:
        """No logits cache: a denoiser's output depends on (x_t, t, cond), drawn afresh every step."""

    # --- multi-rate and EMA -------------------------------------------------------------------------------
    def phase(self, cycle: list[str]) -> str:
        """Which group this optimizer step trains: ``cycle[updates mod len(cycle)]``."""
        return cycle[int(self.updates) % len(cycle)]

    def on_optimizer_step(self) -> None:
        self.updates += 1

    def make_ema(self, model: nn.Module) -> nn.Module:
        ema = copy.deepcopy(model).requires_grad_(False)
        ema.diffusion = dict(diffusion_spec(model))
        return ema
