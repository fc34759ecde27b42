"""``cd``: consistency distillation (Song et al. 2023, Alg. 2) as Latent Consistency Models train it.

Follows diffusers ``examples/consistency_distillation/train_lcm_distill_sd_wds.py`` (LCM, Luo et al. 2023):

1. a solver index n is drawn uniformly; start t = t_max·(n+1)·k/grid, end s = t − t_max·k/grid (≥ 0),
   k the skipping step ``skip`` (LCM: 20 of 1000 timesteps, a 50-step solver); x_t = α_t x₀ + σ_t ε;
2. the online student's f_θ(x_t, t) = c_skip(t)·x_t + c_out(t)·x̂₀ (LCM's boundary scalings, σ_data 0.5,
   timestep scaling 10 on the discrete timestep grid·t: ``consistency.boundary_scalings``);
3. the frozen teacher takes one solver step t → s with CFG (``solver``: Heun, CD's; or DDIM, LCM's);
4. the target f_θ⁻(x̂_s, s) comes from the EMA copy θ⁻ (a submodule: it resumes), updated after every
   optimizer step θ⁻ ← μθ⁻ + (1 − μ)θ (LCM ``ema_decay`` 0.95);
5. loss = pseudo-Huber(f_θ, sg(f_θ⁻)), c = 0.001 (LCM ``huber_c``), or L2.

Guidance as LCM: with ``w_max`` set, w ~ U[w_min, w_max] per sample, the teacher uses CFG at w (our
u + w(c − u); LCM's ``cond + w(cond − uncond)`` is ours at w + 1) and a student built with
``guidance_embed: true`` receives w as an input; without it the teacher uses the fixed ``guidance``.
Our adaptation: continuous t ∈ [0, 1] (LCM's discrete timestep = grid·t). The student samples with the
multistep ``consistency`` sampler at ``steps`` (1, 2, 4), which re-noises x̂₀ between steps (Alg. 1); it
reads the network's x̂₀, which is f_θ up to c_skip(t)·(x_t − x̂₀), c_skip < 1e-6 at every sampling time t ≥ 0.2.

``ConsistencyDistiller`` is also the base of ``scott`` (the teacher step is an SDE step) and ``tscd``
(the target maps to the start of a time segment instead of t = 0).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from distill.core.distiller import Step
from distill.core.registry import METHODS
from distill.diffusion import consistency as C
from distill.diffusion.base import DiffusionDistiller, DiffusionParams
from distill.diffusion.models import ema_update
from distill.diffusion.sampling import default_t_max


class CDParams(DiffusionParams):
    steps: int = Field(1, ge=1, description="the student's sampling steps (multistep consistency sampling)")
    solver: Literal["heun", "ddim"] = Field("heun", description="the teacher's ODE solver step (CD: Heun; LCM: DDIM)")
    grid: int = Field(1000, ge=2, description="discrete timesteps t ∈ [0, t_max] is cut into (LCM: SD's 1000)")
    skip: int = Field(20, ge=1, description="skipping step k: the teacher step spans k timesteps (LCM: 20)")
    ema_decay: float = Field(0.95, ge=0, lt=1, description="EMA decay μ of the target network (LCM 0.95)")
    loss: Literal["huber", "l2"] = Field("huber", description="pseudo-Huber (LCM) or L2")
    huber_c: float = Field(0.001, gt=0, description="pseudo-Huber c (LCM 0.001)")
    sigma_data: float = Field(0.5, gt=0, description="σ_data of the boundary scalings (LCM 0.5)")
    timestep_scaling: float = Field(10.0, gt=0, description="LCM's timestep scaling of c_skip/c_out")
    w_min: float = Field(1.0, ge=0, description="guidance sampled in [w_min, w_max] (with w_max)")
    w_max: float | None = Field(None, ge=0, description="sample w per example (LCM); None: the fixed guidance")


class ConsistencyDistiller(DiffusionDistiller):
    """CD's step with two hooks: ``segments()`` (1: map to t = 0) and ``teacher_step`` (the ODE step)."""

    student_sampler = "consistency"

    def __init__(self, student, teacher, params: CDParams, info) -> None:
        super().__init__(student, teacher, params, info)
        self.target = self.make_ema(student)  # θ⁻ starts at θ (the teacher's weights when init from it)
        self.t_max = default_t_max(student.diffusion)
        guide = getattr(getattr(student, "emb", None), "guide", None)
        self.embeds_w = guide is not None

    # --- hooks ----------------------------------------------------------------------------------------------
    def segments(self) -> int:
        return 1

    def teacher_step(self, fn: C.X0Eps, x: Tensor, t: Tensor, s: Tensor) -> Tensor:
        return C.ode_step(fn, x, t, s, self.t_sched, self.params.solver)

    # --- pieces ---------------------------------------------------------------------------------------------
    def f(self, x: Tensor, x0: Tensor, eps: Tensor, t: Tensor, start: Tensor) -> Tensor:
        p = self.params
        return C.consistency_fn(x, x0, eps, t, start, self.s_sched, p.sigma_data, p.timestep_scaling, p.grid)

    def guidance_scale(self, n: int, device: torch.device) -> Tensor | float:
        p = self.params
        if p.w_max is None:
            return p.guidance
        return p.w_min + (p.w_max - p.w_min) * torch.rand(n, device=device)

    def cd_pair(self, x0_data: Tensor, cond: Tensor | None,
                t: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, int]:
        """(f_θ(x_t, t → b), sg(f_θ⁻(x̂_s, s → b)), x̂_s, segments): b the segment start (0 for CD)."""
        p = self.params
        b, dev = x0_data.shape[0], x0_data.device
        if t is None:
            n = torch.randint(0, C.num_solver_steps(p.grid, p.skip), (b,), device=dev)
            t, s = C.solver_interval(n, p.grid, p.skip, self.t_max)
        else:
            s = (t - self.t_max * p.skip / p.grid).clamp_min(0.0)
        t, s = t.to(x0_data.dtype), s.to(x0_data.dtype)
        nseg = self.segments()
        start = C.segment_start(t, nseg, self.t_max)
        s = torch.maximum(s, start)  # the teacher step never crosses the segment's start
        x_t, _ = self.noisy(x0_data, t)
        w = self.guidance_scale(b, dev)
        w_in = (w if torch.is_tensor(w) else torch.full((b,), float(w), device=dev)) if self.embeds_w else None
        x0, eps = self.student_x0_eps(x_t, t, cond, w_input=w_in)
        pred = self.f(x_t, x0, eps, t, start)
        with torch.no_grad():
            def teacher(x: Tensor, tt: Tensor) -> tuple[Tensor, Tensor]:
                return C.cfg_x0_eps(self.teacher, x, tt, cond, w, self.num_classes)

            x_s = self.teacher_step(teacher, x_t, t, s)
            tx0, teps = self.student_x0_eps(x_s, s, cond, model=self.target, w_input=w_in)
            target = self.f(x_s, tx0, teps, s, start)
        return pred, target, x_s, nseg

    def training_step(self, batch: dict[str, Tensor]) -> Step:
        pred, target, _, nseg = self.cd_pair(batch["x"], self.cond(batch))
        p = self.params
        loss = C.pseudo_huber(pred, target, p.huber_c) if p.loss == "huber" else ((pred - target) ** 2).mean()
        return Step({"student": loss}, {"segments": float(nseg)})

    def on_optimizer_step(self) -> None:
        super().on_optimizer_step()
        ema_update(self.target, self.student, self.params.ema_decay)


@METHODS.register("cd", "consistency distillation (LCM form): EMA target, Heun/DDIM teacher step, pseudo-Huber",
                  CDParams)
class CD(ConsistencyDistiller):
    pass
