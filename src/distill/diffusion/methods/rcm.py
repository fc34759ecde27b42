"""``rcm``: sCM with a score-distillation (reverse-divergence) regulariser (S47 rCM).

Official code: NVlabs/rcm ``rcm/models/t2v_model_distill_rcm.py`` (``_student_scm_step`` /
``training_step_generator``, ``training_step_critic``, ``is_student_phase``). As there:

- times: s = arctan(σ), σ ~ LogNormal(−0.8, 1.6) (``EDMSDE(p_mean=-0.8, p_std=1.6)``, σ_d = 1); the
  critic's and DMD's times: a flow time u ~ U(0, 1) shifted by ``shift`` (u' = k·u/(1 + (k − 1)u)),
  s = arctan(u'/(1 − u')) (``draw_training_time_D``);
- sCM: g = −cos s·√(1 − r²sin²s)·(σ_d F⁻ − dx/ds) − r·cos s sin s·(x_s + σ_d dF⁻/ds), rows with a NaN
  masked, g/(‖g‖ + 0.1) in float64, loss ``scm_scale``·Σ_dims (F − F⁻ − g)² (no time weight, no
  log-variance), r = min(1, step/``tangent_warmup``);
- after the warm-up, DMD on the student's sample G (from pure noise at π/2, backward-simulated for
  eff mod ``max_sim`` extra steps): grad = (x̂₀_fake − x̂₀_teacher)/mean|G − x̂₀_teacher| (DMD2's
  normaliser, ``distill.diffusion.dmd``), loss ``dmd_scale``·Σ_dims (G − sg(G − grad))²;
- the critic (a copy of the teacher, group "critic") learns the student's samples by
  ``critic_scale``·Σ_dims ‖G − x̂₀_fake‖²/sin²s;
- phases: the student at every step of the warm-up, then at steps ≡ 0 (mod ``student_every``) (official
  ``student_update_freq`` 5: four critic steps per student step), the critic otherwise.

Our choices: the student and critic are the teacher's network read in TrigFlow (``distill.diffusion.scm``);
the official sums over dimensions are kept (so on 2-D data DMD is weak beside the 100× sCM term); the
DMD term is ``dmd_loss`` × 2·numel (equal to the official sum); no EMA. Defaults official except the
warm-up and lr (the recipe's budget) and ``shift`` 1 (official 5 for 480p video).
"""

from __future__ import annotations

import copy

import torch
from pydantic import Field
from torch import Tensor, nn

from distill.core.distiller import Step
from distill.core.registry import METHODS
from distill.diffusion import scm as S
from distill.diffusion.base import DiffusionParams
from distill.diffusion.dmd import dmd_loss
from distill.diffusion.methods.scm import SCMBase
from distill.diffusion.models import diffusion_spec


class RCMParams(DiffusionParams):
    sigma_d: float = Field(1.0, gt=0, description="TrigFlow σ_d (official rCM 1.0)")
    p_mean: float = Field(-0.8, description="student time: log σ mean (official −0.8)")
    p_std: float = Field(1.6, gt=0, description="student time: log σ std (official 1.6)")
    shift: float = Field(1.0, gt=0, description="critic/DMD time shift of U(0,1) flow time (official 5, video)")
    tangent_warmup: int = Field(1000, ge=1, description="steps of the tangent warm-up; DMD and the critic start after it")
    tangent_c: float = Field(0.1, gt=0, description="tangent normalisation g/(‖g‖ + c)")
    student_every: int = Field(5, ge=1, description="after the warm-up the student trains at steps ≡ 0 mod this (official 5)")
    scm_scale: float = Field(100.0, ge=0, description="official loss_scale")
    dmd_scale: float = Field(1.0, ge=0, description="official loss_scale_dmd")
    critic_scale: float = Field(1.0, ge=0, description="official loss_scale_fake_score")
    max_sim: int = Field(4, ge=1, description="backward-simulation steps of G cycle through 0..max_sim−1 (official 4)")


@METHODS.register("rcm", "sCM + DMD regulariser with a fake-score critic (S47 rCM)", RCMParams)
class RCM(SCMBase):
    def __init__(self, student, teacher, params: RCMParams, info) -> None:
        super().__init__(student, teacher, params, info)
        self.critic = copy.deepcopy(teacher).requires_grad_(True).train()  # official: net_fake_score ← teacher
        self.critic.diffusion = dict(diffusion_spec(teacher))

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {**super().param_groups(), "critic": list(self.critic.parameters())}

    # --- the official schedule of phases ----------------------------------------------------------------
    def is_student(self, it: int) -> bool:
        return it < self.params.tangent_warmup or it % self.params.student_every == 0

    def effective(self, it: int) -> int:
        w, k = self.params.tangent_warmup, self.params.student_every
        return it if it < w else w + (it - w) // k

    def _d_angle(self, n: int, device) -> Tensor:
        k = self.params.shift
        u = torch.rand(n, device=device, dtype=torch.float64)
        u = k * u / (1 + (k - 1) * u)
        return torch.atan2(u, 1 - u).float()

    def _x0(self, model: nn.Module, x: Tensor, s: Tensor, cond: Tensor | None, guidance: float = 1.0) -> Tensor:
        x0, _ = S.trig_x0_eps(model, x / self.params.sigma_d, s, cond, guidance, self.num_classes)
        return x0 * self.params.sigma_d

    def generator_sample(self, x0: Tensor, cond: Tensor | None, sims: int) -> tuple[Tensor, Tensor]:
        """(x_G, s_G): pure noise at π/2, then ``sims`` backward-simulation steps of the student (no grad)."""
        s = torch.full((len(x0),), S.HALF_PI, device=x0.device)
        x = self.renoise(x0, s)
        for _ in range(sims):
            with torch.no_grad():
                g0 = self._x0(self.student, x, s, cond)
            s = torch.minimum(self._d_angle(len(x0), x0.device), s)
            x = self.renoise(g0, s)
        return x, s

    def training_step(self, batch: dict[str, Tensor]) -> Step:
        it = int(self.updates)
        x0, cond = self.data(batch), self.cond(batch)
        self.critic.requires_grad_(not self.is_student(it))
        if self.is_student(it):
            return self._student_step(x0, cond, it)
        return self._critic_step(x0, cond, it)

    def _student_step(self, x0: Tensor, cond: Tensor | None, it: int) -> Step:
        p = self.params
        s = S.sample_angle(len(x0), p.p_mean, p.p_std, p.sigma_d, x0.device)
        r = S.warmup_ratio(it, p.tangent_warmup)
        t = self.scm_terms(x0, cond, s, r, form="rcm")
        g, F_, F_minus = S.mask_nan_rows(t["g"], t["F"], t["F_minus"])
        g = S.normalise_tangent(g, p.tangent_c, double=True)
        loss = p.scm_scale * S.rcm_scm_loss(F_, F_minus, g).mean()
        metrics: dict[str, Tensor | float] = {"scm": loss.detach(), "r": r}
        if it > p.tangent_warmup:
            x_g, s_g = self.generator_sample(x0, cond, self.effective(it) % p.max_sim)
            G = self._x0(self.student, x_g, s_g, cond)
            s_d = self._d_angle(len(x0), x0.device)
            x_d = self.renoise(G.detach(), s_d)
            with torch.no_grad():
                fake = self._x0(self.critic, x_d, s_d, cond)
                real = self._x0(self.teacher, x_d, s_d, cond, p.guidance)
            dmd = 2 * G[0].numel() * dmd_loss(G, real, fake)  # = official Σ_dims (G − sg(G − grad))², batch mean
            loss = loss + p.dmd_scale * dmd
            metrics["dmd"] = dmd.detach()
        return Step({"student": loss.float()}, metrics)

    def _critic_step(self, x0: Tensor, cond: Tensor | None, it: int) -> Step:
        p = self.params
        sims = (it - self.effective(it) - 1) % p.max_sim  # official get_effective_iteration_fake
        x_g, s_g = self.generator_sample(x0, cond, sims)
        with torch.no_grad():
            G = self._x0(self.student, x_g, s_g, cond)
        s_d = self._d_angle(len(x0), x0.device)
        fake = self._x0(self.critic, self.renoise(G, s_d), s_d, cond)
        w = torch.sin(S.bcast(s_d, G)) ** 2
        loss = p.critic_scale * (((G - fake) ** 2) / w).flatten(1).sum(1).mean()
        return Step({"critic": loss}, {"critic_loss": loss.detach()})
