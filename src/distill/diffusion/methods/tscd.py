"""``tscd``: trajectory-segmented consistency distillation (S25 Hyper-SD, Ren et al. 2024, arXiv 2404.13686).

The time range [0, t_max] is cut into n equal segments; within a segment (b_{j−1}, b_j] the consistency
target maps to the segment's start b_{j−1} instead of t = 0: the student's f(x_t, t → b_{j−1}) must agree
with the EMA target's f(x̂_s, s → b_{j−1}) after a teacher ODE step t → s (never crossing b_{j−1}). The
number of segments shrinks over training 8 → 4 → 2 → 1 (``stages``; the run's optimizer steps split
evenly over them), and with one segment it is plain CD to t = 0 (``cd``). Everything else is ``cd``
(LCM's c_skip/c_out, EMA target, Heun/DDIM teacher step, pseudo-Huber).

Only the abstract and weights are public (no training code), so these are ours: the segment-wise
consistency function f(x_t, t → s) = c_skip(t − s)·x_t + c_out(t − s)·(α_s x̂₀ + σ_s ε̂) (a DDIM jump to
the segment's start, equal to x_t at t = s; ``consistency.consistency_fn``), equal-length segments, one
EMA target kept across stages, pseudo-Huber in every stage, and no human-feedback or score-distillation
stage (Hyper-SD's second and third parts). The student samples with the ``consistency`` sampler at
``steps`` (the final stage has one segment, so x̂₀ is the full consistency map).
"""

from __future__ import annotations

from pydantic import Field, field_validator

from distill.core.registry import METHODS
from distill.diffusion import consistency as C
from distill.diffusion.methods.cd import CDParams, ConsistencyDistiller


class TSCDParams(CDParams):
    stages: list[int] = Field([8, 4, 2, 1], description="segments per stage, in order (Hyper-SD: 8, 4, 2, 1)")

    @field_validator("stages")
    @classmethod
    def _stages(cls, v: list[int]) -> list[int]:
        if not v or any(n < 1 for n in v) or any(b > a for a, b in zip(v, v[1:])):
            raise ValueError("stages: a non-increasing list of segment counts ≥ 1, e.g. [8, 4, 2, 1]")
        return v


@METHODS.register("tscd", "trajectory-segmented consistency distillation, segments 8→4→2→1 (S25 Hyper-SD)",
                  TSCDParams)
class TSCD(ConsistencyDistiller):
    def segments(self) -> int:
        return C.tscd_segments(int(self.updates), self.total_steps, self.params.stages)
