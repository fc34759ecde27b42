"""``sana_sprint``: sCM plus latent adversarial distillation (S56 SANA-Sprint, §3.3, Eq. 11-12).

Official code: NVlabs/Sana ``train_scripts/train_scm_ladd.py`` and ``diffusion/model/nets/sana_ladd.py``
(``SanaMSCMDiscriminator``), config ``SanaSprint_1600M_1024px_allqknorm_bf16_scm_ladd.yaml``. Phases
alternate, one optimizer step each (``phase(["student", "disc"])``; official ``phase = "G"``/``"D"``):

- student: ``scm_lambda``·sCM loss (``methods/scm.py``) + ``adv_lambda``·(−E D(x̃)), where x̃ is the
  student's one-step x̂₀ from a fresh angle (``train_largest_timestep``: π/2 with probability 0.5,
  otherwise the sCM angle), re-noised at s_D = arctan(e^τ/σ_d), τ ~ 𝒩(−0.6, 1.0); the heads are frozen;
- disc: hinge loss ½(E relu(1 − D(real)) + E relu(1 + D(fake))) on noised data and noised student
  samples (no student gradient); for labelled tasks a shifted (data, wrong label) pair is one more
  fake (``misaligned_pairs_D``).

D = heads (spectral-norm convs over feature tokens) on the frozen teacher's block outputs (forward
hooks; official: blocks [2, 8, 14, 19] of 20; ours: every residual block). The heads are the "disc"
group; the teacher is not trained. Defaults: the official config (adv_lambda 0.5, scm_lambda 1, hinge,
σ_d 0.5); the budget (tangent warm-up, lr) is the recipe's. Not done: BatchNormLocal in the heads,
the R1 penalty (off in the official config), the embedded CFG scale.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from distill.core.distiller import Step
from distill.core.registry import METHODS
from distill.diffusion import scm as S
from distill.diffusion.methods.scm import SCMBase, SCMParams


class SanaSprintParams(SCMParams):
    adv_lambda: float = Field(0.5, ge=0, description="weight of the generator's adversarial loss (official 0.5)")
    scm_lambda: float = Field(1.0, ge=0, description="weight of the sCM loss (official 1)")
    disc_loss: Literal["hinge", "bce"] = Field("hinge", description="official: hinge")
    d_mean: float = Field(-0.6, description="τ mean of the discriminator's angle (official −0.6)")
    d_std: float = Field(1.0, gt=0, description="τ std of the discriminator's angle (official 1.0)")
    largest_prob: float = Field(0.5, ge=0, le=1, description="probability of the angle π/2 for the adversarial sample")
    misaligned_pairs: bool = Field(True, description="labelled tasks: (data, shifted label) pairs as fakes")
    disc_features: list[str] | None = Field(None, description="teacher modules whose outputs feed heads (default: every block)")


@METHODS.register("sana_sprint", "sCM + latent adversarial distillation on teacher features (S56 SANA-Sprint)",
                  SanaSprintParams)
class SanaSprint(SCMBase):
    def __init__(self, student, teacher, params: SanaSprintParams, info) -> None:
        super().__init__(student, teacher, params, info)
        self.disc = S.LADDDiscriminator(teacher, tuple(info.input_shape), params.disc_features)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {**super().param_groups(), "disc": list(self.disc.parameters())}

    def _angles(self, n: int, device, largest: bool) -> Tensor:
        p = self.params
        s = S.sample_angle(n, p.p_mean, p.p_std, p.sigma_d, device)
        if largest and p.largest_prob > 0:
            s = torch.where(torch.rand(n, device=device) < p.largest_prob, torch.full_like(s, S.HALF_PI), s)
        return s

    def _d(self, x: Tensor, s: Tensor, cond: Tensor | None) -> Tensor:
        return self.disc(self.teacher, x / self.params.sigma_d, s, cond)

    def _d_angle(self, n: int, device) -> Tensor:
        return S.sample_angle(n, self.params.d_mean, self.params.d_std, self.params.sigma_d, device)

    def training_step(self, batch: dict[str, Tensor]) -> Step:
        p = self.params
        x0, cond = self.data(batch), self.cond(batch)
        phase = self.phase(["student", "disc"])
        self.disc.requires_grad_(phase == "disc")  # the student's adversarial loss trains no head
        self.disc.train(phase == "disc")  # spectral-norm power iterations only in the disc phase
        n, dev = len(x0), x0.device
        if phase == "student":
            loss_scm, metrics = self.scm_loss(x0, cond)
            s = self._angles(n, dev, largest=True)
            pred = self.student_x0(self.renoise(x0, s), s, cond)
            s_d = self._d_angle(n, dev)
            adv = S.g_loss(self._d(self.renoise(pred, s_d), s_d, cond), p.disc_loss)
            return Step({"student": p.scm_lambda * loss_scm + p.adv_lambda * adv}, {**metrics, "adv": adv.detach()})
        with torch.no_grad():
            s = self._angles(n, dev, largest=True)
            pred = self.student_x0(self.renoise(x0, s), s, cond)
        s_d = self._d_angle(n, dev)
        fake_x, fake_s, fake_c = self.renoise(pred, s_d), s_d, cond
        if cond is not None and p.misaligned_pairs and n > 1:
            s_m = self._d_angle(n, dev)
            fake_x = torch.cat([fake_x, self.renoise(torch.roll(x0, 1, 0), s_m)])
            fake_s, fake_c = torch.cat([s_d, s_m]), torch.cat([cond, cond])
        real = self._d(self.renoise(x0, s_d), s_d, cond)
        fake = self._d(fake_x, fake_s, fake_c)
        loss = S.d_loss(real, fake, p.disc_loss)
        return Step({"disc": loss}, {"d_real": real.mean().detach(), "d_fake": fake.mean().detach()})

