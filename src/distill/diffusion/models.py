"""Denoisers: any ``nn.Module`` called as ``model(x_t, t, cond=None, w=None) -> prediction``.

``t`` is the continuous time in [0, 1] (``schedules.py``), ``cond`` class labels (``num_classes`` is the
null label of classifier-free guidance; ``None`` for unconditional models), ``w`` an optional
guidance-scale input (LCM's w-embedding, SANA-Sprint's embedded CFG scale). A model carries how it
was trained and how it samples (``model.diffusion``, saved in its folder's config.json):
``{"schedule", "prediction", "sampler", "steps", "guidance"}``.

Archs here (factories carry ``family = "diffusion"``): ``mlp_denoiser`` (2-D mixtures) and
``unet_small`` (8×8 digits: two resolutions, FiLM time/class conditioning). ``ema_update`` keeps an
exponential moving average of weights (a method's EMA copy is a submodule: it resumes with the run).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from distill.core.registry import ARCHS, Params
from distill.errors import RecipeError

DEFAULT_SAMPLING = {"sampler": "euler", "steps": 50, "guidance": 1.0}


def timestep_embedding(t: Tensor, dim: int, scale: float = 1000.0) -> Tensor:
    """Sinusoidal embedding of ``t`` ([B] in [0, 1], times ``scale``) as in DDPM's UNet."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * scale)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class Conditioning(nn.Module):
    """Time (+ class, + guidance scale) -> one embedding of ``dim``."""

    def __init__(self, dim: int, num_classes: int, guidance_embed: bool, time_scale: float = 1000.0) -> None:
        super().__init__()
        self.dim, self.num_classes, self.time_scale = dim, num_classes, time_scale
        self.time = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.label = nn.Embedding(num_classes + 1, dim) if num_classes else None  # + the null label
        self.guide = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim)) if guidance_embed else None

    def forward(self, t: Tensor, cond: Tensor | None, w: Tensor | None) -> Tensor:
        t = t.reshape(-1).expand(t.numel() if t.numel() > 1 else 1)
        e = self.time(timestep_embedding(t, self.dim, self.time_scale))
        if self.label is not None:
            c = cond if cond is not None else torch.full((e.shape[0],), self.num_classes, device=e.device)
            e = e + self.label(c.clamp(0, self.num_classes))
        if self.guide is not None:
            w = torch.ones(e.shape[0], device=e.device) if w is None else torch.as_tensor(w, device=e.device).expand(e.shape[0])
            e = e + self.guide(timestep_embedding(w.float(), self.dim, scale=100.0))
        return e


class MLPDenoiser(nn.Module):
    def __init__(self, dim: int, hidden: int, depth: int, num_classes: int, guidance_embed: bool,
                 time_scale: float = 1000.0) -> None:
        super().__init__()
        self.emb = Conditioning(hidden, num_classes, guidance_embed, time_scale)
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden)) for _ in range(depth))
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None, w: Tensor | None = None) -> Tensor:
        e = self.emb(t.expand(x.shape[0]) if t.dim() == 0 else t, cond, w)
        h = self.inp(x) + e
        for blk in self.blocks:
            h = h + blk(h)  # residual MLP
        return self.out(h)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb: int) -> None:
        super().__init__()
        self.n1, self.c1 = nn.GroupNorm(min(8, cin), cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.film = nn.Linear(emb, 2 * cout)
        self.n2, self.c2 = nn.GroupNorm(min(8, cout), cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        h = self.c1(F.silu(self.n1(x)))
        scale, shift = self.film(F.silu(e))[:, :, None, None].chunk(2, dim=1)
        h = self.n2(h) * (1 + scale) + shift
        return self.skip(x) + self.c2(F.silu(h))


class SmallUNet(nn.Module):
    """8×8 (or any even side) images: res blocks at full and half resolution, one skip connection."""

    def __init__(self, channels: int, width: int, num_classes: int, guidance_embed: bool,
                 time_scale: float = 1000.0) -> None:
        super().__init__()
        w1, w2, e = width, 2 * width, 4 * width
        self.emb = Conditioning(e, num_classes, guidance_embed, time_scale)
        self.inp = nn.Conv2d(channels, w1, 3, padding=1)
        self.down1 = ResBlock(w1, w1, e)
        self.pool = nn.Conv2d(w1, w1, 3, stride=2, padding=1)
        self.mid1, self.mid2 = ResBlock(w1, w2, e), ResBlock(w2, w2, e)
        self.up1 = ResBlock(w2 + w1, w1, e)
        self.out = nn.Sequential(nn.GroupNorm(min(8, w1), w1), nn.SiLU(), nn.Conv2d(w1, channels, 3, padding=1))

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None, w: Tensor | None = None) -> Tensor:
        e = self.emb(t.expand(x.shape[0]) if t.dim() == 0 else t, cond, w)
        h1 = self.down1(self.inp(x), e)
        h = self.mid2(self.mid1(self.pool(h1), e), e)
        h = F.interpolate(h, size=h1.shape[-2:], mode="nearest")
        return self.out(self.up1(torch.cat([h, h1], dim=1), e))


class DenoiserParams(Params):
    prediction: Literal["eps", "x0", "v", "velocity"] = Field("velocity", description="what the network predicts")
    schedule: Literal["flow", "vp_cosine", "trigflow"] = Field("flow", description="x_t = α(t)x₀ + σ(t)ε")
    guidance_embed: bool = Field(False, description="take the guidance scale w as an input (LCM, SANA-Sprint)")
    time_scale: float = Field(1000.0, gt=0, description="the time embedding reads time_scale·t (DDPM: 1000); "
                              "continuous-time consistency (sCM) wants a small one: SANA-Sprint's dense time "
                              "embedding, a bounded ∂F/∂t for the tangent")


class MLPDenoiserParams(DenoiserParams):
    hidden: int = Field(128, ge=4)
    depth: int = Field(3, ge=1)


class UNetParams(DenoiserParams):
    width: int = Field(32, ge=8, description="channels at full resolution (twice that at half)")


def _diffusion_arch(factory):
    factory.family = "diffusion"
    return factory


@ARCHS.register("mlp_denoiser", "residual MLP denoiser for low-dimensional data (2-D mixtures)", MLPDenoiserParams)
@_diffusion_arch
def mlp_denoiser(p: MLPDenoiserParams, shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if len(shape) != 1:
        raise RecipeError(f"mlp_denoiser takes vectors, not data of shape {shape}: use unet_small for images")
    return MLPDenoiser(shape[0], p.hidden, p.depth, num_classes, p.guidance_embed, p.time_scale)


@ARCHS.register("unet_small", "two-resolution UNet denoiser for small images (8×8 digits)", UNetParams)
@_diffusion_arch
def unet_small(p: UNetParams, shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if len(shape) != 3:
        raise RecipeError(f"unet_small takes images [C, H, W], not data of shape {shape}: use mlp_denoiser")
    return SmallUNet(shape[0], p.width, num_classes, p.guidance_embed, p.time_scale)


def build_denoiser(name: str, params: dict[str, Any], shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A registered denoiser arch with ``model.diffusion`` set from its params and the default sampling."""
    entry = ARCHS.get(name)
    if getattr(entry.obj, "family", None) != "diffusion":
        raise RecipeError(f"arch '{name}' is not a denoiser; diffusion tasks take mlp_denoiser, unet_small")
    p = entry.params(**params)
    model = entry.obj(p, tuple(shape), num_classes)
    model.diffusion = {"schedule": p.schedule, "prediction": p.prediction, **DEFAULT_SAMPLING}
    return model


def diffusion_spec(model: nn.Module) -> dict[str, Any]:
    spec = getattr(model, "diffusion", None)
    if spec is None:
        raise RecipeError(f"{type(model).__name__} has no .diffusion (schedule, prediction, sampler, steps): "
                          "build it with distill.diffusion.models.build_denoiser or set the attribute")
    return spec


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema ← decay·ema + (1 − decay)·model``, parameter by parameter (buffers copied)."""
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm.detach(), 1 - decay)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)
