"""Pure pieces of the distribution-matching methods beyond ``dmd.py`` (``dmd``, ``decoupled_dmd``,
``phased_dmd``, ``flash_dmd``).

- ``GANHead`` and ``gan_critic_loss`` / ``gan_generator_loss``: DMD2's classifier branch on the fake
  network's features (official ``cls_pred_branch`` on the UNet bottleneck, ``compute_cls_logits`` on
  clean images) with its softplus losses (``compute_guidance_clean_cls_loss``,
  ``compute_generator_clean_cls_loss``);
- ``ca_grad``, ``dm_grad`` (with ``dmd.grad_loss``): S16's split of the CFG'd DMD gradient into the CFG
  augmentation (CA) "engine" (α − 1)(s_cond − s_uncond) and the distribution-matching (DM)
  "regulariser" s_cond − s_fake (Eq. 6), each in DMD2's x₀ form with DMD2's per-sample normaliser;
- ``phase_times`` / ``phase_index``: S17's phases, sub-intervals of the time by signal-to-noise ratio;
- ``mode_reward`` / ``nearest_data_reward`` / ``reward_loss``: S54's reward term (ours: the paper's
  rewards are image-preference models; ours are functions of the samples).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.diffusion.sampling import cfg, time_grid
from distill.diffusion.schedules import Schedule


# --- the fake-score critic --------------------------------------------------------------------------
# --- DMD2's GAN head -------------------------------------------------------------------------------
def feature_module(model: nn.Module) -> nn.Module:
    """The layer whose output the GAN head reads: the last residual block of ``mlp_denoiser``, the
    bottleneck (``mid2``) of ``unet_small`` (DMD2: the UNet bottleneck)."""
    if hasattr(model, "mid2"):
        return model.mid2
    if hasattr(model, "blocks"):
        return model.blocks[-1]
    raise ValueError(f"no GAN feature layer known for {type(model).__name__} (mlp_denoiser, unet_small)")


class GANHead(nn.Module):
    """A realism classifier on the critic's features at t = 0 (DMD2 ``cls_on_clean_image``): image
    features are averaged over space, then Linear–SiLU–Linear to one logit (ours; DMD2's branch is
    strided convolutions to 1×1)."""

    def __init__(self, critic: nn.Module, example: Tensor, cond: Tensor | None) -> None:
        super().__init__()
        with torch.no_grad():
            c = self.features(critic, example, cond).shape[1]
        self.net = nn.Sequential(nn.Linear(c, c), nn.SiLU(), nn.Linear(c, 1))

    @staticmethod
    def features(critic: nn.Module, x: Tensor, cond: Tensor | None) -> Tensor:
        out: list[Tensor] = []
        hook = feature_module(critic).register_forward_hook(lambda m, i, o: out.append(o))
        try:
            critic(x, torch.zeros(len(x), device=x.device, dtype=x.dtype), cond)
        finally:
            hook.remove()
        f = out[0]
        return f.flatten(2).mean(2) if f.dim() > 2 else f

    def forward(self, critic: nn.Module, x: Tensor, cond: Tensor | None) -> Tensor:
        return self.net(self.features(critic, x, cond)).squeeze(1)


def gan_critic_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """softplus(D(fake)) + softplus(−D(real)), each averaged (DMD2 ``guidance_cls_loss``)."""
    return F.softplus(logits_fake).mean() + F.softplus(-logits_real).mean()


def gan_generator_loss(logits_fake: Tensor) -> Tensor:
    """softplus(−D(G(z))) averaged (DMD2 ``gen_cls_loss``): the non-saturating generator loss."""
    return F.softplus(-logits_fake).mean()


# --- S16: CFG augmentation and distribution matching ------------------------------------------------
def _norm(x: Tensor, x0_real: Tensor) -> Tensor:
    n = (x - x0_real).double().abs().flatten(1).mean(1).clamp_min(1e-12)
    return n.reshape(-1, *([1] * (x.dim() - 1)))


def ca_grad(x: Tensor, x0_cond: Tensor, x0_uncond: Tensor, guidance: float) -> Tensor:
    """The CA term in DMD2's x₀ form: −(α − 1)(x̂₀_cond − x̂₀_uncond) / mean|x − x̂₀_cfg| (per sample).

    In scores s = (αₜx̂₀ − x_t)/σₜ², (α − 1)(s_cond − s_uncond) ∝ (α − 1)(x̂₀_cond − x̂₀_uncond); DMD2's
    gradient (p_real − p_fake) with p = x − x̂₀ carries it with the minus sign."""
    x0_cfg = cfg(x0_uncond.double(), x0_cond.double(), guidance)
    g = -(guidance - 1.0) * (x0_cond.double() - x0_uncond.double()) / _norm(x, x0_cfg)
    return torch.nan_to_num(g)


def dm_grad(x: Tensor, x0_cond: Tensor, x0_uncond: Tensor, x0_fake: Tensor, guidance: float) -> Tensor:
    """The DM term: (x̂₀_fake − x̂₀_cond) / mean|x − x̂₀_cfg|, so that at one noisy input
    ``ca_grad + dm_grad`` is DMD2's ``dmd_grad(x, x̂₀_cfg, x̂₀_fake)`` exactly."""
    x0_cfg = cfg(x0_uncond.double(), x0_cond.double(), guidance)
    return torch.nan_to_num((x0_fake.double() - x0_cond.double()) / _norm(x, x0_cfg))


# --- S17: phases by SNR ----------------------------------------------------------------------------
def phase_times(steps: int, t_max: float) -> Tensor:
    """The phase edges t_0 = t_max > t_1 > … > t_K = 0: the student sampler's grid (``time_grid``), so
    the expert of phase k is the one the sampler calls at its k-th step."""
    return time_grid(steps, t_max)


def phase_index(t: Tensor, edges: Tensor, sched: Schedule) -> Tensor:
    """Phase k holds t_{k+1} < t ≤ t_k, decided by log-SNR: log SNR(t_k) ≤ log SNR(t) < log SNR(t_{k+1}).
    Returns, per entry of ``t``, the number of inner edges whose log-SNR is ≤ that of t."""
    def logsnr(u: Tensor) -> Tensor:
        return torch.log(sched.snr(u.double()).clamp_min(1e-30))

    inner = logsnr(edges[1:-1].to(t.device))
    return (logsnr(t)[:, None] >= inner[None, :] - 1e-9).sum(1)


# --- S54: rewards ----------------------------------------------------------------------------------
def mode_reward(x: Tensor, centers: Tensor) -> Tensor:
    """Negative squared distance to the nearest mode centre, per sample (ours, for mixtures)."""
    d2 = ((x[:, None, :] - centers[None].to(x)) ** 2).sum(-1)
    return -d2.min(1).values


def nearest_data_reward(x: Tensor, data: Tensor, cond: Tensor | None = None, data_y: Tensor | None = None) -> Tensor:
    """Negative mean squared distance to the nearest data point (of the sample's class when both
    labels are given), per sample (ours, for images)."""
    xf, df = x.flatten(1), data.flatten(1).to(x)
    d2 = torch.cdist(xf.double(), df.double()).pow(2).to(x.dtype) / xf.shape[1]
    if cond is not None and data_y is not None:
        d2 = torch.where(cond[:, None] == data_y[None].to(cond.device), d2, torch.full_like(d2, float("inf")))
    idx = d2.argmin(1)
    return -((xf - df[idx]) ** 2).mean(1)


def reward_loss(reward: Tensor, weight: Tensor | float) -> Tensor:
    """−mean(w · r): descending it raises the (weighted) reward."""
    return -(weight * reward).mean()
