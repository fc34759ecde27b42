"""``decoupled_dmd``: Decoupled DMD (S16, Liu et al. 2025, arXiv 2511.22677; no official training code).

With a CFG'd real score, DMD's gradient splits (Eq. 6) into the CFG-augmentation term
(α − 1)(s_cond − s_uncond), the "engine", and the distribution-matching term s_cond − s_fake, the
"regulariser". Decoupled DMD (Eq. 8, App. B Alg. 1) weights them separately and re-noises the
generator's output for each at its own time:

- CA at τ_CA ~ U(t, 1) in the paper's time (t = 0 noise, 1 clean; t the generator's input time):
  in ours (t = 0 data) the noise levels below the generator's input, τ_CA ~ U(t_min, min(t_in, t_max));
- DM at τ_DM ~ U(0, 1), ours τ_DM ~ U(t_min, t_max), with fresh noise (a separate noisy input).

Each term is DMD2's x₀-form gradient with DMD2's per-sample normaliser mean|x − x̂₀_cfg| at its own
noisy input (``dmd_parts.ca_grad`` / ``dm_grad``: at one input their sum is DMD2's gradient exactly),
and the loss ``ca_weight·½‖x − sg(x − g_CA)‖² + dm_weight·½‖x − sg(x − g_DM)‖²`` (per element).
Everything else (critic, its ratio, backward simulation) is ``dmd``'s. Ours: the normaliser of each
term, the clipping of both ranges to [t_min, t_max]. The optional mean/variance regulariser (Eq. 7)
is not implemented. Needs a conditional task (the CA term is zero without classes).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from distill.core.registry import METHODS
from distill.diffusion.dmd import grad_loss
from distill.diffusion.dmd_parts import ca_grad, dm_grad
from distill.diffusion.methods.dmd import DMD, DMDParams
from distill.diffusion.sampling import null_labels
from distill.errors import RecipeError


class DecoupledParams(DMDParams):
    guidance: float = Field(2.0, ge=0, description="α: the real score's CFG scale in the CA term")
    ca_weight: float = Field(1.0, ge=0, description="weight of the CFG-augmentation (engine) term")
    dm_weight: float = Field(1.0, ge=0, description="weight of the distribution-matching (regulariser) term")


@METHODS.register("decoupled_dmd", "Decoupled DMD (S16): CFG-augmentation engine and DM regulariser, "
                  "separate weights and noise ranges", DecoupledParams)
class DecoupledDMD(DMD):
    def __init__(self, student, teacher, params: DecoupledParams, info) -> None:
        if not info.num_classes:
            raise RecipeError("decoupled_dmd needs a conditional task (its CA term is (α − 1)(s_cond − s_uncond))")
        super().__init__(student, teacher, params, info)

    def noise_times(self, t_in: Tensor) -> tuple[Tensor, Tensor]:
        """(τ_CA, τ_DM): CA below the generator's input time, DM over the whole range."""
        p = self.params
        hi_ca = t_in.clamp(p.t_min, p.t_max)
        tau_ca = p.t_min + (hi_ca - p.t_min) * torch.rand_like(t_in)
        tau_dm = p.t_min + (p.t_max - p.t_min) * torch.rand_like(t_in)
        return tau_ca, tau_dm

    def cond_uncond(self, x_t: Tensor, t: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        """The teacher's conditional and unconditional x̂₀ (one batched call, no guidance)."""
        both = self.teacher_x0_eps(torch.cat([x_t, x_t]), torch.cat([t, t]),
                                   torch.cat([cond, null_labels(cond, self.num_classes)]), guidance=1.0)[0]
        return both.chunk(2)

    def generator_losses(self, x0: Tensor, t_in: Tensor, k: Tensor, batch: dict[str, Tensor]) -> tuple[Tensor, dict]:
        p, cond = self.params, self.cond(batch)
        tau_ca, tau_dm = self.noise_times(t_in)
        x_ca, _ = self.noisy(x0.detach(), tau_ca)
        c, u = self.cond_uncond(x_ca, tau_ca, cond)
        l_ca = grad_loss(x0, ca_grad(x0.detach(), c, u, p.guidance))
        x_dm, _ = self.noisy(x0.detach(), tau_dm)
        c, u = self.cond_uncond(x_dm, tau_dm, cond)
        l_dm = grad_loss(x0, dm_grad(x0.detach(), c, u, self.fake_x0(x_dm, tau_dm, cond), p.guidance))
        return p.ca_weight * l_ca + p.dm_weight * l_dm, {"ca": l_ca.detach(), "dm": l_dm.detach()}
