"""Classifier-free guidance and samplers over the continuous time of ``schedules.py``.

``predict`` calls a denoiser (with CFG ``u + w·(c − u)``: w = 1 is no guidance) and returns (x₀, ε);
a student with a guidance input (LCM's w-embedding) gets ``model.diffusion["w"]`` when it is set;
every sampler is written in those terms, so it serves every parameterisation and schedule:

- ``euler`` / ``ddim``: the deterministic DDIM update x_s = α_s·x̂₀ + σ_s·ε̂ (Song et al. 2021, Eq. 12
  with η = 0), which for the flow schedule is the Euler step of the probability-flow ODE;
- ``heun``: Heun's second-order step on dx/dt (Karras et al. 2022, Alg. 1), Euler at the last step;
- ``sde``: ancestral DDPM sampling (η = 1: the posterior q(x_s | x_t, x̂₀) sampled, fresh noise);
- ``consistency``: multistep consistency sampling (Song et al. 2023, Alg. 1): x̂₀ = f(x_t, t), then
  re-noised to the next time with fresh noise. One-step generators (DMD, sCM) sample this way.

``time_grid(n)`` is n + 1 uniformly spaced times from 1 to 0 (from 0.999 for ε-prediction, whose x̂₀
divides by α, and α(1) = 0).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor, nn

from distill.diffusion.models import diffusion_spec
from distill.diffusion.schedules import Schedule, bcast, get_schedule, to_x0_eps

SAMPLERS = ("euler", "ddim", "heun", "sde", "consistency")


def cfg(u: Tensor, c: Tensor, w: float | Tensor) -> Tensor:
    """Classifier-free guidance ``u + w·(c − u)`` (w = 1: the conditional prediction alone)."""
    return u + w * (c - u)


def null_labels(cond: Tensor, num_classes: int) -> Tensor:
    return torch.full_like(cond, num_classes)


def predict(model: nn.Module, x_t: Tensor, t: Tensor, cond: Tensor | None = None, guidance: float = 1.0,
            num_classes: int = 0, w_input: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(x₀, ε) of ``model`` at ``(x_t, t)``; with ``guidance`` ≠ 1 and labels, CFG on the raw predictions
    (one batched call over conditional and null labels). ``w_input`` goes to a w-embedding model."""
    spec = diffusion_spec(model)
    sched = get_schedule(spec["schedule"])
    t = t.expand(x_t.shape[0]) if t.dim() == 0 else t
    if w_input is None and spec.get("w") is not None:  # a w-embedding student samples at its saved w
        w_input = torch.full((x_t.shape[0],), float(spec["w"]), device=x_t.device)
    if cond is not None and guidance != 1.0 and num_classes:
        both = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, null_labels(cond, num_classes)]),
                     None if w_input is None else torch.cat([w_input, w_input]))
        c, u = both.chunk(2)
        pred = cfg(u, c, guidance)
    else:
        pred = model(x_t, t, cond, w_input) if w_input is not None else model(x_t, t, cond)
    return to_x0_eps(pred, spec["prediction"], x_t, t, sched)


def time_grid(n: int, t_max: float = 1.0, t_min: float = 0.0, device: Any = None) -> Tensor:
    return torch.linspace(t_max, t_min, n + 1, device=device)


def default_t_max(spec: dict[str, Any]) -> float:
    """1, except for ε-prediction: α(1) = 0 in every schedule here, and x̂₀ = (x_t − σε̂)/α."""
    return 0.999 if spec["prediction"] == "eps" else 1.0


@torch.no_grad()
def sample(model: nn.Module, noise: Tensor, cond: Tensor | None = None, steps: int | None = None,
           sampler: str | None = None, guidance: float | None = None, num_classes: int = 0,
           generator: torch.Generator | None = None, times: Tensor | None = None) -> Tensor:
    """x₀ samples from ``noise`` (x at t = 1). Defaults: the model's own ``diffusion`` settings."""
    spec = diffusion_spec(model)
    sched = get_schedule(spec["schedule"])
    steps = int(steps or spec["steps"])
    sampler = sampler or spec["sampler"]
    guidance = float(spec.get("guidance", 1.0) if guidance is None else guidance)
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler '{sampler}': one of {SAMPLERS}")
    ts = times if times is not None else time_grid(steps, default_t_max(spec), device=noise.device)
    was = model.training
    model.eval()
    try:
        x = noise * sched.alpha_sigma(ts[:1])[1] if ts[0] < 1 else noise
        for i in range(len(ts) - 1):
            x = step(model, sched, sampler, x, ts[i], ts[i + 1], cond, guidance, num_classes, generator)
        return x
    finally:
        model.train(was)


def step(model: nn.Module, sched: Schedule, sampler: str, x: Tensor, t: Tensor, s: Tensor, cond: Tensor | None,
         guidance: float, num_classes: int, generator: torch.Generator | None = None) -> Tensor:
    """One update of ``sampler`` from time ``t`` to the earlier time ``s`` (< t)."""
    tb = t.expand(x.shape[0])
    x0, eps = predict(model, x, tb, cond, guidance, num_classes)
    a_s, s_s = sched.alpha_sigma(bcast(s, x))
    if sampler in ("euler", "ddim"):
        return a_s * x0 + s_s * eps
    if sampler == "consistency":
        if float(s) <= 0:
            return x0
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return a_s * x0 + s_s * z
    if sampler == "sde":
        if float(s) <= 0:
            return x0
        a_t, s_t = sched.alpha_sigma(bcast(t, x))
        # DDPM posterior q(x_s | x_t, x0): a_ts = α_t/α_s, σ²_ts = σ_t² − a_ts² σ_s²
        a_ts = a_t / a_s
        var_ts = (s_t**2 - a_ts**2 * s_s**2).clamp_min(0)
        mean = (a_ts * s_s**2 / s_t**2) * x + (a_s * var_ts / s_t**2) * x0
        std = (var_ts * s_s**2 / s_t**2).clamp_min(0).sqrt()
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return mean + std * z
    # heun: dx/dt = α'x₀ + σ'ε; Euler to s, then average the slopes (Euler at s = 0)
    da, ds = sched.derivatives(bcast(t, x))
    d1 = da * x0 + ds * eps
    x_e = x + (s - t) * d1
    if float(s) <= 0:
        return a_s * x0 + s_s * eps
    x0b, epsb = predict(model, x_e, s.expand(x.shape[0]), cond, guidance, num_classes)
    da2, ds2 = sched.derivatives(bcast(s, x))
    d2 = da2 * x0b + ds2 * epsb
    return x + (s - t) * (d1 + d2) / 2


def nfe(sampler: str, steps: int, guidance: float, conditional: bool) -> int:
    """Network evaluations per sample (a CFG call counts twice: conditional and null)."""
    per = 2 if conditional and guidance != 1.0 else 1
    return per * (2 * steps - 1 if sampler == "heun" else steps)


def timed_sample(model: nn.Module, noise: Tensor, cond: Tensor | None, num_classes: int,
                 generator: torch.Generator | None = None, batch: int = 2048) -> tuple[Tensor, float]:
    """Samples in batches and the wall-clock seconds per sample."""
    t0 = time.perf_counter()
    out = [sample(model, noise[i : i + batch], None if cond is None else cond[i : i + batch], num_classes=num_classes,
                  generator=generator) for i in range(0, len(noise), batch)]
    return torch.cat(out), (time.perf_counter() - t0) / max(len(noise), 1)
