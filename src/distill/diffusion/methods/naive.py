"""``naive``: a denoiser sampled at a given step count, untrained (the "teacher@N" rows).

The student starts from the teacher (``init: {recipe: ...}``) and is only re-labelled with the
sampler, step count and guidance to be scored at; its one optimizer step has a zero loss (Adam
moves no weight on a zero gradient, weight decay 0 in the recipes). This is the baseline every step
distillation method must beat: the teacher run naively at the student's step count.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from distill.core.distiller import Step
from distill.core.registry import METHODS
from distill.diffusion.base import DiffusionDistiller, DiffusionParams


class NaiveParams(DiffusionParams):
    sampler: Literal["euler", "ddim", "heun", "sde", "consistency"] | None = "euler"


@METHODS.register("naive", "a denoiser sampled at N steps with no training (teacher@N rows)", NaiveParams)
class Naive(DiffusionDistiller):
    needs_teacher = False

    def __init__(self, student, teacher, params: NaiveParams, info) -> None:
        super().__init__(student, teacher, params, info)
        self.student.diffusion["guidance"] = params.guidance

    def training_step(self, batch: dict[str, Tensor]) -> Step:
        zero = sum(p.sum() for p in self.student.parameters()) * 0.0
        return Step({"student": zero})
