"""Consistency and progressive distillation: the pure pieces ``progressive``, ``cd``, ``scott`` and ``tscd`` share.

Everything works on the (x̂₀, ε̂) of ``schedules.py`` through a callable ``fn(x_t, t) -> (x̂₀, ε̂)``, so
the same code serves every schedule and parameterisation, and tests can pass an analytic teacher.

- ``boundary_scalings``: LCM's c_skip / c_out (diffusers ``scalings_for_boundary_conditions``, σ_data 0.5,
  timestep scaling 10) on the *discrete* timestep; our t ∈ [0, 1] is mapped to ``grid · t`` (grid 1000 as
  SD's), so c_skip(0) = 1, c_out(0) = 0 (the boundary condition f(x, 0) = x) and c_skip ≈ 0 for t ≫ 1/grid.
- ``consistency_fn``: f(x_t, t → s) = c_skip(t − s)·x_t + c_out(t − s)·(α_s x̂₀ + σ_s ε̂); s = 0 is LCM's
  c_skip·x_t + c_out·x̂₀ (Song et al. 2023 Eq. 3 form); s > 0 is the segment-wise map of TSCD (S25): the
  DDIM jump to the segment's start, which equals x_t at t = s (the boundary condition at the segment start).
  Applying the scalings to t − s is ours (Hyper-SD publishes no code).
- ``pseudo_huber``: √(‖a − b‖² + c²) − c (iCT, Song & Dhariwal 2023; LCM's ``loss_type huber`` is the
  element-wise form with c = 0.001, which is what is computed here).
- ``ode_step``: a teacher solver step t → s: ``ddim`` (x_s = α_s x̂₀ + σ_s ε̂, LCM's DDIMSolver) or ``heun``
  (Karras et al. 2022 Alg. 1, as CD's EDM teacher; Euler at s = 0).
- ``sde_step``: the stochastic teacher step of SCott (S36): generalised DDIM with noise η (Song et al. 2021,
  Eq. 12/16) for any α, σ: x_s = α_s x̂₀ + √(σ_s² − c²) ε̂ + c z, c = η·σ_s·√(1 − (α_t σ_s / α_s σ_t)²)
  (η = 0 the DDIM/ODE step, η = 1 the DDPM posterior = the ancestral ``sde`` sampler's step).
- ``cfg_x0_eps``: a teacher's (x̂₀, ε̂) with classifier-free guidance at a per-sample w (LCM samples w).
- ``progressive_target``: B6 (official ``dpm.py :: training_losses``): two teacher DDIM steps t → t_mid → s
  and the x-target that one student DDIM step t → s must predict to land on the same z_s:
  x̃ = (z_s − (σ_s/σ_t) z_t) / (α_s − (σ_s/σ_t) α_t) (= z_s at s = 0); ``snr_trunc_loss`` = max(x-MSE, ε-MSE).
- ``segment_start`` / ``segment_boundaries`` / ``tscd_segments``: TSCD's time segments and its stage schedule
  (8 → 4 → 2 → 1 segments, the run split evenly over the stages).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from distill.diffusion.models import diffusion_spec
from distill.diffusion.sampling import cfg, null_labels
from distill.diffusion.schedules import Schedule, bcast, get_schedule, to_x0_eps

X0Eps = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]  # (x_t, t [B]) -> (x̂₀, ε̂)


# --- the consistency parameterisation ------------------------------------------------------------------------
def boundary_scalings(t: Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0,
                      grid: int = 1000) -> tuple[Tensor, Tensor]:
    """LCM's (c_skip, c_out) at continuous ``t`` (discrete timestep ``grid·t``)."""
    st = timestep_scaling * grid * t
    c_skip = sigma_data**2 / (st**2 + sigma_data**2)
    c_out = st / (st**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def consistency_fn(x_t: Tensor, x0: Tensor, eps: Tensor, t: Tensor, s: Tensor | float, sched: Schedule,
                   sigma_data: float = 0.5, timestep_scaling: float = 10.0, grid: int = 1000) -> Tensor:
    """f(x_t, t → s) = c_skip(t − s)·x_t + c_out(t − s)·(α_s x̂₀ + σ_s ε̂) (s = 0: LCM's consistency function)."""
    s = torch.as_tensor(s, dtype=x_t.dtype, device=x_t.device).expand(x_t.shape[0])
    c_skip, c_out = boundary_scalings(bcast(t - s, x_t), sigma_data, timestep_scaling, grid)
    a_s, s_s = sched.alpha_sigma(bcast(s, x_t))
    return c_skip * x_t + c_out * (a_s * x0 + s_s * eps)


def pseudo_huber(a: Tensor, b: Tensor, c: float) -> Tensor:
    """mean(√((a − b)² + c²) − c), element-wise as LCM (c = 0: L1; large c: MSE / 2c)."""
    return (torch.sqrt((a - b) ** 2 + c**2) - c).mean()


# --- teacher calls and solver steps ----------------------------------------------------------------------
def cfg_x0_eps(model: nn.Module, x_t: Tensor, t: Tensor, cond: Tensor | None, w: Tensor | float,
               num_classes: int) -> tuple[Tensor, Tensor]:
    """(x̂₀, ε̂) of ``model`` with CFG u + w(c − u) on the raw prediction, w a float or per-sample [B]."""
    spec = diffusion_spec(model)
    sched = get_schedule(spec["schedule"])
    guided = cond is not None and num_classes and (torch.is_tensor(w) or w != 1.0)
    if guided:
        both = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, null_labels(cond, num_classes)]))
        c, u = both.chunk(2)
        pred = cfg(u, c, bcast(w, x_t) if torch.is_tensor(w) else w)
    else:
        pred = model(x_t, t, cond)
    return to_x0_eps(pred, spec["prediction"], x_t, t, sched)


def ddim_step(x0: Tensor, eps: Tensor, s: Tensor, sched: Schedule) -> Tensor:
    a_s, s_s = sched.alpha_sigma(bcast(s, x0))
    return a_s * x0 + s_s * eps


def ode_step(fn: X0Eps, x: Tensor, t: Tensor, s: Tensor, sched: Schedule, solver: str = "heun") -> Tensor:
    """One probability-flow ODE step t → s (per-sample [B] times) of the solver ``ddim`` or ``heun``."""
    x0, eps = fn(x, t)
    if solver == "ddim":
        return ddim_step(x0, eps, s, sched)
    if solver != "heun":
        raise ValueError(f"unknown ODE solver '{solver}': heun or ddim")
    da, ds = sched.derivatives(bcast(t, x))
    d1 = da * x0 + ds * eps
    h = bcast(s - t, x)
    x_e = x + h * d1
    x0b, epsb = fn(x_e, s)
    da2, ds2 = sched.derivatives(bcast(s, x))
    d2 = da2 * x0b + ds2 * epsb
    heun = x + h * (d1 + d2) / 2
    return torch.where(bcast(s, x) > 0, heun, ddim_step(x0, eps, s, sched))  # Euler (= DDIM) onto s = 0


def sde_noise_scale(t: Tensor, s: Tensor, sched: Schedule, eta: float, like: Tensor) -> Tensor:
    """c = η·σ_s·√(1 − (α_t σ_s / (α_s σ_t))²): the std of the fresh noise of a generalised DDIM step."""
    a_t, s_t = sched.alpha_sigma(bcast(t, like))
    a_s, s_s = sched.alpha_sigma(bcast(s, like))
    r = (a_t * s_s) / (a_s.clamp_min(1e-12) * s_t.clamp_min(1e-12))
    return eta * s_s * (1 - r**2).clamp_min(0).sqrt()


def sde_step(fn: X0Eps, x: Tensor, t: Tensor, s: Tensor, sched: Schedule, eta: float, noise: Tensor) -> Tensor:
    """A stochastic step t → s: α_s x̂₀ + √(σ_s² − c²)·ε̂ + c·z (η = 0: DDIM; η = 1: the DDPM posterior)."""
    x0, eps = fn(x, t)
    a_s, s_s = sched.alpha_sigma(bcast(s, x))
    c = sde_noise_scale(t, s, sched, eta, x)
    return a_s * x0 + (s_s**2 - c**2).clamp_min(0).sqrt() * eps + c * noise


# --- time grids --------------------------------------------------------------------------------------------
def solver_interval(n: Tensor, grid: int, skip: int, t_max: float = 1.0) -> tuple[Tensor, Tensor]:
    """LCM's (start, end) times for solver indices ``n`` ∈ {0..⌈grid/skip⌉−1}: start = t_max·((n+1)·skip)/grid
    (LCM: timesteps (n+1)·k − 1 of 1000), end = start − t_max·skip/grid, clamped at 0."""
    start = t_max * ((n + 1) * skip).clamp(max=grid).to(torch.float32) / grid
    end = (start - t_max * skip / grid).clamp_min(0.0)
    return start, end


def num_solver_steps(grid: int, skip: int) -> int:
    return math.ceil(grid / skip)


# --- progressive distillation (B6) ---------------------------------------------------------------------------
def progressive_target(fn: X0Eps, z_t: Tensor, t: Tensor, s: Tensor, sched: Schedule) -> tuple[Tensor, Tensor]:
    """(x̃, ε̃): the targets under which one DDIM step t → s of the student equals two teacher DDIM steps
    t → (t + s)/2 → s (official ``dpm.py``; x̃ = z_s where s = 0)."""
    mid = (t + s) / 2
    x0, eps = fn(z_t, t)
    z_mid = ddim_step(x0, eps, mid, sched)
    x0, eps = fn(z_mid, mid)
    z_s = ddim_step(x0, eps, s, sched)
    a_t, s_t = sched.alpha_sigma(bcast(t, z_t))
    a_s, s_s = sched.alpha_sigma(bcast(s, z_t))
    ratio = s_s / s_t
    x_target = torch.where(bcast(s, z_t) > 0, (z_s - ratio * z_t) / (a_s - ratio * a_t), z_s)
    eps_target = (z_t - a_t * x_target) / s_t
    return x_target, eps_target


def snr_trunc_loss(x0: Tensor, eps: Tensor, x_target: Tensor, eps_target: Tensor) -> Tensor:
    """The official ``snr_trunc`` weighting: per sample max(x-MSE, ε-MSE) (= x-MSE·max(SNR, 1)), batch mean."""
    x_mse = ((x0 - x_target) ** 2).flatten(1).mean(1)
    eps_mse = ((eps - eps_target) ** 2).flatten(1).mean(1)
    return torch.maximum(x_mse, eps_mse).mean()


def progressive_rounds(start_steps: int, steps: int) -> list[int]:
    """The student step counts of the rounds: start/2, start/4, ..., steps (each round halves the teacher's)."""
    if start_steps <= steps or start_steps % steps or (start_steps // steps) & (start_steps // steps - 1):
        raise ValueError(f"start_steps ({start_steps}) must be steps ({steps}) times a power of two ≥ 2")
    out, n = [], start_steps
    while n > steps:
        n //= 2
        out.append(n)
    return out


def stage_index(updates: int, total_steps: int, num_stages: int) -> int:
    """Which of ``num_stages`` equal parts of a run of ``total_steps`` the step ``updates`` falls in."""
    per = max(1, total_steps // num_stages) if total_steps else 1
    return min(updates // per, num_stages - 1)


# --- trajectory segments (TSCD, S25) -------------------------------------------------------------------------
def segment_boundaries(num_segments: int, t_max: float = 1.0) -> Tensor:
    """The num_segments + 1 boundaries 0, t_max/n, ..., t_max."""
    return torch.linspace(0.0, t_max, num_segments + 1)


def segment_start(t: Tensor, num_segments: int, t_max: float = 1.0) -> Tensor:
    """The lower boundary of the segment (b_{j−1}, b_j] holding each t (t = 0 stays 0)."""
    j = torch.ceil(t * num_segments / t_max - 1e-6) - 1
    return (j.clamp(0, num_segments - 1) * t_max / num_segments).to(t.dtype)


def tscd_segments(updates: int, total_steps: int, stages: Sequence[int] = (8, 4, 2, 1)) -> int:
    """The number of segments at step ``updates``: ``stages`` in order, the run split evenly over them."""
    return int(stages[stage_index(updates, total_steps, len(stages))])
