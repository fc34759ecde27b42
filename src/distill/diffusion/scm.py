"""Continuous-time consistency (sCM, S56 / Lu & Song 2024) in TrigFlow: the pure pieces of ``scm``,
``sana_sprint`` and ``rcm``.

TrigFlow (sCM Eq. 1): x_s = cos(s)·x₀ + sin(s)·z, z ~ 𝒩(0, σ_d² I), s ∈ [0, π/2]; the network F_θ
predicts the PF-ODE velocity, σ_d·F = dx_s/ds, and the consistency function is (sCM Eq. 9)

    f_θ(x_s, s) = cos(s)·x_s − sin(s)·σ_d·F_θ(x_s/σ_d, s).

Official code (NVlabs/Sana ``train_scripts/train_scm_ladd.py``) works in σ_d-scaled coordinates: the
data are x₀·σ_d ("clean_images = z * sigma_data") and the network reads x_s/σ_d. We do the same, so
x_s/σ_d = cos(s)·x₀ + sin(s)·ε is the *unit* TrigFlow point of the data x₀ with ε ~ 𝒩(0, I). Any of
our denoisers serves as F_θ through a change of time and scale (SANA-Sprint §3.1, "training-free
transformation"): the unit point equals, for the ``flow`` schedule x_t = (1 − t)x₀ + tε,

    t = sin s / (sin s + cos s),   x_t = (x_s/σ_d) / (sin s + cos s)          (``model_point``)

(divide cos(s)x₀ + sin(s)ε by sin s + cos s), and t = 2s/π, x_t = x_s/σ_d for ``trigflow``. The model's
(x̂₀, ε̂) at that point give F = cos(s)·ε̂ − sin(s)·x̂₀ (``velocity_F``): d(x_s/σ_d)/ds. So a flow-matching
teacher gives the tangent's dx_s/ds and the student keeps the teacher's own arch, schedule and
weights (our choice: it starts as the teacher, and is saved and sampled as a flow model).

The tangent (sCM Eq. 8 with the JVP rearrangement of §5.1; official ``g``):

    g = −cos²(s)·(σ_d F⁻ − dx_s/ds) − r·cos(s)sin(s)·(x_s + σ_d·dF⁻/ds)     (``tangent``, "sana")

with r the tangent warm-up (0 → 1) and dF⁻/ds the JVP along (dx_s/ds, 1); at r = 1 it is cos(s)·df⁻/ds.
rCM's form ("rcm", NVlabs/rcm ``_student_scm_step``) replaces cos² by cos(s)·√(1 − r²sin²s) (equal at
r = 1). Normalised g/(‖g‖ + 0.1) per sample (sCM §4.2, ``normalise_tangent``), the loss is

    (1/(σ_d tan s)) / e^{w_φ(s)} · ‖F_θ − F⁻ − g‖² + w_φ(s)                      (``scm_loss``, sCM Eq. 10)

with an adaptive log-variance head w_φ (``LogVarHead``), or rCM's sum over dimensions without weight
(``rcm_scm_loss``). Times: s = arctan(e^τ/σ_d), τ ~ 𝒩(P_mean, P_std) (``sample_angle``).

LADD (SANA-Sprint §3.3, official ``SanaMSCMDiscriminator``): heads on the frozen teacher's hidden
features at several blocks (forward hooks), hinge or BCE losses (``LADDDiscriminator``, ``d_loss``,
``g_loss``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from distill.diffusion.models import diffusion_spec, timestep_embedding
from distill.diffusion.sampling import predict
from distill.diffusion.schedules import _S, bcast

HALF_PI = math.pi / 2


# --- TrigFlow <-> our schedules ------------------------------------------------------------------------
def model_point(schedule: str, x_u: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """The (x_t, t) of ``schedule`` that carries the same (x₀, ε) as the unit TrigFlow point
    x_u = cos(s)x₀ + sin(s)ε at angle ``s`` ([B])."""
    sb = bcast(s, x_u)
    if schedule == "flow":
        d = torch.sin(sb) + torch.cos(sb)
        return x_u / d, torch.sin(s) / (torch.sin(s) + torch.cos(s))
    if schedule == "trigflow":
        return x_u, s / HALF_PI
    if schedule == "vp_cosine":  # α(t) = cos s: invert ᾱ(t) = cos²(((t + S)/(1 + S))π/2)/f(0)
        f0 = math.cos(_S / (1 + _S) * HALF_PI) ** 2
        u = torch.acos((torch.cos(s) * math.sqrt(f0)).clamp(-1.0, 1.0))
        return x_u, (u / HALF_PI * (1 + _S) - _S).clamp(0.0, 1.0)
    raise ValueError(f"unknown schedule '{schedule}'")


def flow_time(s: Tensor) -> Tensor:
    """The flow time t of TrigFlow angle s: t/(1 − t) = tan s."""
    return torch.sin(s) / (torch.sin(s) + torch.cos(s))


def angle_of_flow_time(t: Tensor) -> Tensor:
    return torch.atan2(t, 1 - t)


def velocity_F(x0: Tensor, eps: Tensor, s: Tensor) -> Tensor:
    """F = d(x_s/σ_d)/ds = cos(s)·ε − sin(s)·x₀ (the official F, σ_d·F = dx_s/ds)."""
    sb = bcast(s, x0)
    return torch.cos(sb) * eps - torch.sin(sb) * x0


def trig_x0_eps(model: nn.Module, x_u: Tensor, s: Tensor, cond: Tensor | None, guidance: float = 1.0,
                num_classes: int = 0) -> tuple[Tensor, Tensor]:
    """A denoiser's (x̂₀, ε̂) at the unit TrigFlow point (x_u, s), whatever its own schedule."""
    x_m, t_m = model_point(diffusion_spec(model)["schedule"], x_u, s)
    return predict(model, x_m, t_m, cond, guidance, num_classes)


def trig_F(model: nn.Module, x_u: Tensor, s: Tensor, cond: Tensor | None, guidance: float = 1.0,
           num_classes: int = 0) -> Tensor:
    x0, eps = trig_x0_eps(model, x_u, s, cond, guidance, num_classes)
    return velocity_F(x0, eps, s)


def consistency_f(x: Tensor, s: Tensor, F_: Tensor, sigma_d: float) -> Tensor:
    """sCM Eq. 9: f = cos(s)·x_s − sin(s)·σ_d·F (x_s in σ_d-scaled coordinates)."""
    sb = bcast(s, x)
    return torch.cos(sb) * x - torch.sin(sb) * sigma_d * F_


def jvp_F(F_fn: Callable[[Tensor, Tensor], Tensor], x_u: Tensor, s: Tensor, v_u: Tensor) -> tuple[Tensor, Tensor]:
    """(F, dF/ds) with ``torch.func.jvp`` of F(x_u, s) along the ODE direction (dx_u/ds, 1) = (v_u, 1)."""
    return torch.func.jvp(F_fn, (x_u, s), (v_u, torch.ones_like(s)))


# --- the sCM objective ---------------------------------------------------------------------------------
def tangent(x: Tensor, s: Tensor, F_minus: Tensor, dxds: Tensor, dF: Tensor, r: float, sigma_d: float,
            form: str = "sana") -> Tensor:
    """The (unnormalised) tangent g; ``x`` and ``dxds`` in σ_d-scaled coordinates, ``F_minus`` and ``dF``
    (the JVP dF⁻/ds along (dx/ds, 1)) in F units. Official: the JVP tangent is cos·sin·(dx/ds, 1), so
    its ``F_theta_grad`` is cos(s)sin(s)·dF."""
    sb = bcast(s, x)
    c, sn = torch.cos(sb), torch.sin(sb)
    if form == "sana":
        first = -c * c * (sigma_d * F_minus - dxds)
    elif form == "rcm":
        first = -c * torch.sqrt((1 - r**2 * sn**2).clamp_min(0)) * (sigma_d * F_minus - dxds)
    else:
        raise ValueError(f"unknown tangent form '{form}': sana or rcm")
    return first - r * (c * sn * x + sigma_d * c * sn * dF)


def normalise_tangent(g: Tensor, c: float = 0.1, double: bool = False) -> Tensor:
    """sCM §4.2: g / (‖g‖ + c), the norm per sample over all non-batch dimensions (rCM: in float64)."""
    gg = g.double() if double else g
    norm = torch.linalg.vector_norm(gg.flatten(1), dim=1).reshape(-1, *([1] * (g.dim() - 1)))
    return gg / (norm + c)


def scm_loss(F_: Tensor, F_minus: Tensor, g: Tensor, s: Tensor, sigma_d: float, logvar: Tensor | None) -> Tensor:
    """sCM Eq. 10 as the official code: mean of (1/(σ_d tan s))/e^logvar·(F − F⁻ − g)² + logvar."""
    w = 1 / (sigma_d * torch.tan(bcast(s, F_)))
    l2 = (F_ - F_minus - g.to(F_.dtype)) ** 2
    if logvar is None:
        return (w * l2).mean()
    lv = bcast(logvar.reshape(-1), F_)
    return ((w / torch.exp(lv)) * l2 + lv).mean()


def rcm_scm_loss(F_: Tensor, F_minus: Tensor, g: Tensor) -> Tensor:
    """rCM: ‖F − F⁻ − g‖² summed over dimensions per sample (no time weight, no log-variance); [B]."""
    return ((F_.double() - F_minus.double() - g.double()) ** 2).flatten(1).sum(1)


def mask_nan_rows(*ts: Tensor) -> tuple[Tensor, ...]:
    """rCM: rows where any of ``ts`` has a NaN are zeroed in all of them."""
    bad = torch.zeros(ts[0].shape[0], dtype=torch.bool, device=ts[0].device)
    for t in ts:
        bad |= torch.isnan(t).flatten(1).any(1)
    m = bad.reshape(-1, *([1] * (ts[0].dim() - 1)))
    return tuple(torch.where(m, torch.zeros_like(t), t) for t in ts)


def sample_angle(n: int, mean: float, std: float, sigma_d: float, device=None,
                 generator: torch.Generator | None = None) -> Tensor:
    """s = arctan(e^τ / σ_d), τ ~ 𝒩(mean, std) (official ``logit_normal_trigflow``; rCM's EDM log-normal)."""
    tau = torch.randn(n, device=device, generator=generator) * std + mean
    return torch.atan(tau.exp() / sigma_d)


def warmup_ratio(step: int, warmup: int) -> float:
    return 1.0 if warmup <= 0 else min(1.0, step / warmup)


class LogVarHead(nn.Module):
    """The adaptive weight w_φ(s) (sCM §4.3): a linear map of the sinusoidal embedding of the angle,
    zero-initialised (ours: w_φ = 0 at the start, the plain weighting)."""

    def __init__(self, dim: int = 64) -> None:
        super().__init__()
        self.dim = dim
        self.lin = nn.Linear(dim, 1)
        nn.init.zeros_(self.lin.weight)
        nn.init.zeros_(self.lin.bias)

    def forward(self, s: Tensor) -> Tensor:
        return self.lin(timestep_embedding(s / HALF_PI, self.dim)).squeeze(1)


# --- LADD: a discriminator on the frozen teacher's features --------------------------------------------
class DiscHead(nn.Module):
    """StyleGAN-T / official ``DiscHead`` on features as tokens [B, C, N]: spectral-norm conv k=1, a
    residual conv (k = 9 where N ≥ 9, circular), a spectral-norm conv to one logit per token. The
    official BatchNormLocal is left out (ours)."""

    def __init__(self, channels: int, tokens: int) -> None:
        super().__init__()
        k = 9 if tokens >= 9 else 1
        self.inp = spectral_norm(nn.Conv1d(channels, channels, 1))
        self.res = spectral_norm(nn.Conv1d(channels, channels, k, padding=k // 2, padding_mode="circular"))
        self.cls = spectral_norm(nn.Conv1d(channels, 1, 1))

    def forward(self, h: Tensor) -> Tensor:
        h = F.leaky_relu(self.inp(h), 0.2)
        h = h + F.leaky_relu(self.res(h), 0.2)
        return self.cls(h).flatten(1)


def _tokens(h: Tensor) -> Tensor:
    return h.unsqueeze(-1) if h.dim() == 2 else h.flatten(2)  # [B, C] -> [B, C, 1]; [B, C, H, W] -> [B, C, HW]


def default_feature_modules(teacher: nn.Module) -> list[str]:
    """Every residual block of the teacher: ``blocks.i`` (mlp_denoiser) or its ResBlocks (unet_small)."""
    names = [n for n, _ in teacher.named_modules() if n.startswith("blocks.") and n.count(".") == 1]
    return names or [n for n, m in teacher.named_modules() if type(m).__name__ == "ResBlock"]


class LADDDiscriminator(nn.Module):
    """Trainable heads on the frozen teacher's hidden features. The teacher is *not* a submodule (it is
    the distiller's); it is passed at call time, so only the heads are checkpointed and trained."""

    def __init__(self, teacher: nn.Module, input_shape: tuple[int, ...], modules: list[str] | None = None) -> None:
        super().__init__()
        self.modules_ = list(modules or default_feature_modules(teacher))
        if not self.modules_:
            raise ValueError("LADD: no feature modules found in the teacher; name them (disc_features)")
        with torch.no_grad():  # one dry call for the feature shapes
            device = next(teacher.parameters()).device
            feats = self.features(teacher, torch.zeros(2, *input_shape, device=device), torch.full((2,), 0.5, device=device), None)
        self.heads = nn.ModuleList(DiscHead(f.shape[1], f.shape[2]) for f in feats)

    def features(self, teacher: nn.Module, x_m: Tensor, t_m: Tensor, cond: Tensor | None) -> list[Tensor]:
        out: dict[str, Tensor] = {}
        mods = dict(teacher.named_modules())
        hooks = [mods[n].register_forward_hook(lambda _m, _i, o, n=n: out.__setitem__(n, o)) for n in self.modules_]
        try:
            teacher(x_m, t_m, cond)
        finally:
            for h in hooks:
                h.remove()
        return [_tokens(out[n]) for n in self.modules_]

    def forward(self, teacher: nn.Module, x_u: Tensor, s: Tensor, cond: Tensor | None) -> Tensor:
        """Logits [B, K] of the unit TrigFlow point (x_u, s) (official: the teacher reads x_s/σ_d)."""
        x_m, t_m = model_point(diffusion_spec(teacher)["schedule"], x_u, s)
        return torch.cat([head(f) for head, f in zip(self.heads, self.features(teacher, x_m, t_m, cond))], dim=1)


def d_loss(real: Tensor, fake: Tensor, kind: str = "hinge") -> Tensor:
    """Official: hinge ½(E relu(1 − D(real)) + E relu(1 + D(fake))), or BCE."""
    if kind == "hinge":
        return 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())
    return (F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
            + F.binary_cross_entropy_with_logits(real, torch.ones_like(real)))


def g_loss(fake: Tensor, kind: str = "hinge") -> Tensor:
    """Official: hinge −E D(fake), or BCE toward "real"."""
    if kind == "hinge":
        return -fake.mean()
    return F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))


__all__ = ["HALF_PI", "model_point", "flow_time", "angle_of_flow_time", "velocity_F", "trig_x0_eps", "trig_F",
           "consistency_f", "jvp_F", "tangent", "normalise_tangent", "scm_loss", "rcm_scm_loss", "mask_nan_rows",
           "sample_angle", "warmup_ratio", "LogVarHead", "DiscHead", "LADDDiscriminator", "d_loss", "g_loss"]
