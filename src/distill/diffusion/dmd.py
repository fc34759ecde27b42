"""Distribution matching (DMD, Yin et al. 2024; DMD2, Yin et al. 2024b): the pieces several methods share.

The generator's sample x is noised to x_t; the real score (the frozen teacher, with CFG) and the fake
score (a critic trained on the generator's samples) give x̂₀_real and x̂₀_fake. The KL gradient of
DMD (Eq. 7) in x₀ form, with DMD2's per-sample normaliser (official ``main/sd_guidance.py ::
compute_distribution_matching_loss``; project conventions):

    grad = (p_real − p_fake) / mean|p_real|,  p = x − x̂₀     (mean over non-batch dims, per sample)
    loss = ½ · ‖x − sg(x − grad)‖² / numel                     (so ∂loss/∂x = grad / numel)

computed in float64 as the official code. The critic learns the generator's distribution by the
denoising loss in its own parameterisation (``compute_loss_fake``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def dmd_grad(x: Tensor, x0_real: Tensor, x0_fake: Tensor) -> Tensor:
    """DMD2's normalised gradient direction (float64): (p_real − p_fake) / mean|p_real|, p = x − x̂₀.
    The generator descends it: it moves x toward x̂₀_real and away from x̂₀_fake."""
    p_real = (x - x0_real).double()
    p_fake = (x - x0_fake).double()
    norm = p_real.abs().flatten(1).mean(1).clamp_min(1e-12)
    norm = norm.reshape(-1, *([1] * (x.dim() - 1)))
    return torch.nan_to_num((p_real - p_fake) / norm)


def grad_loss(x: Tensor, grad: Tensor) -> Tensor:
    """½·MSE(x, sg(x − grad)) in float64: ∂/∂x = grad / x.numel() (DMD2's surrogate)."""
    return 0.5 * F.mse_loss(x.double(), (x.double() - grad).detach()).to(x.dtype)


def dmd_loss(x: Tensor, x0_real: Tensor, x0_fake: Tensor) -> Tensor:
    """``grad_loss`` of DMD2's gradient: its gradient in x is ``dmd_grad`` / x.numel()."""
    return grad_loss(x, dmd_grad(x.detach(), x0_real.detach(), x0_fake.detach()))
