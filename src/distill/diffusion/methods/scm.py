"""``scm``: continuous-time consistency distillation in TrigFlow (S56 SANA-Sprint's sCM part; Lu & Song
2024, "Simplifying, stabilizing and scaling continuous-time consistency models", sCM).

Official code: NVlabs/Sana ``train_scripts/train_scm_ladd.py`` (the branch ``scm_loss``), config
``configs/sana_sprint_config/1024ms/SanaSprint_1600M_1024px_allqknorm_bf16_scm_ladd.yaml``. Per step
(formulas in ``distill.diffusion.scm``):

1. x₀ ← σ_d·data, z ~ 𝒩(0, σ_d²), s = arctan(e^τ/σ_d), τ ~ 𝒩(0.2, 1.6) (``logit_normal_trigflow``),
   x_s = cos(s)x₀ + sin(s)z;
2. the teacher's dx_s/ds = σ_d·F_teacher(x_s/σ_d, s) with CFG (a flow-matching teacher, converted by
   ``model_point``);
3. (F⁻, dF⁻/ds) = ``torch.func.jvp`` of the student's F along (dx_s/ds, 1), no gradient;
4. g = −cos²s(σ_d F⁻ − dx_s/ds) − r·cos s sin s(x_s + σ_d dF⁻/ds) (sCM Eq. 8 rearranged, §5.1), r the
   tangent warm-up min(1, step/``tangent_warmup``) (sCM §4.1), then g/(‖g‖ + 0.1) (§4.2);
5. loss (1/(σ_d tan s))/e^{w(s)}·‖F_θ − F⁻ − g‖² + w(s), mean (Eq. 10; adaptive weight §4.3).

Our choices: the student is the teacher's own network (flow schedule, velocity), initialised from it
and read as F_θ through the lossless flow→TrigFlow transformation of SANA-Sprint §3.1, so it is saved
and sampled as a flow model with the multistep consistency sampler (``steps`` 1, 2, 4 on the uniform
flow-time grid; SANA's own 2-step schedule is [π/2, 1.0, 0] in angle). A student of any schedule works
(``model_point``). The log-variance head w(s) is a linear map of the angle's sinusoidal embedding,
trained with the student (official: ``logvar_linear`` inside the student), not saved with it.
Not done: the embedded CFG scale of SANA-Sprint (the student distils the teacher at one ``guidance``),
EMA (off in the SANA-Sprint config).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from distill.core.distiller import Step
from distill.core.registry import METHODS
from distill.diffusion import scm as S
from distill.diffusion.base import DiffusionDistiller, DiffusionParams


class SCMParams(DiffusionParams):
    sigma_d: float = Field(0.5, gt=0, description="TrigFlow σ_d: data are scaled by it (official SANA-Sprint 0.5)")
    p_mean: float = Field(0.2, description="τ mean of the training angle s = arctan(e^τ/σ_d) (official 0.2)")
    p_std: float = Field(1.6, gt=0, description="τ std (official 1.6)")
    tangent_warmup: int = Field(4000, ge=0, description="optimizer steps of the tangent warm-up r: 0 → 1 (official 4000)")
    tangent_c: float = Field(0.1, gt=0, description="tangent normalisation g/(‖g‖ + c) (sCM §4.2: 0.1)")
    adaptive_weight: bool = Field(True, description="learn the log-variance weight w(s) (sCM §4.3, official logvar)")
    logvar_dim: int = Field(64, ge=2, description="sinusoidal embedding size of the log-variance head")


class SCMBase(DiffusionDistiller):
    """The sCM machinery shared by ``scm``, ``sana_sprint`` (and the JVP part of ``rcm``)."""

    same_schedule = False  # every schedule is read in TrigFlow through model_point
    student_sampler = "consistency"

    def __init__(self, student, teacher, params, info) -> None:
        super().__init__(student, teacher, params, info)
        self.logvar = S.LogVarHead(params.logvar_dim) if getattr(params, "adaptive_weight", False) else None

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        extra = list(self.logvar.parameters()) if self.logvar is not None else []
        return {"student": [p for p in self.student.parameters() if p.requires_grad] + extra}

    # --- TrigFlow views of the models (x in σ_d-scaled coordinates) -------------------------------------
    def data(self, batch: dict[str, Tensor]) -> Tensor:
        return batch["x"] * self.params.sigma_d

    def teacher_dxds(self, x: Tensor, s: Tensor, cond: Tensor | None) -> Tensor:
        """σ_d·F_teacher(x/σ_d, s) with the teacher's CFG: the PF-ODE's dx_s/ds."""
        with torch.no_grad():
            F_T = S.trig_F(self.teacher, x / self.params.sigma_d, s, cond, self.params.guidance, self.num_classes)
        return self.params.sigma_d * F_T

    def student_F(self, x: Tensor, s: Tensor, cond: Tensor | None, model: nn.Module | None = None) -> Tensor:
        return S.trig_F(model or self.student, x / self.params.sigma_d, s, cond, 1.0, self.num_classes)

    def student_x0(self, x: Tensor, s: Tensor, cond: Tensor | None) -> Tensor:
        """f_θ(x_s, s) = cos s·x_s − sin s·σ_d·F_θ (σ_d-scaled coordinates)."""
        return S.consistency_f(x, s, self.student_F(x, s, cond), self.params.sigma_d)

    def renoise(self, x0: Tensor, s: Tensor) -> Tensor:
        sb = S.bcast(s, x0)
        return torch.cos(sb) * x0 + torch.sin(sb) * torch.randn_like(x0) * self.params.sigma_d

    # --- the sCM terms -----------------------------------------------------------------------------------
    def scm_terms(self, x0: Tensor, cond: Tensor | None, s: Tensor, r: float, form: str = "sana") -> dict[str, Tensor]:
        """F_θ (with gradient), F⁻, the raw tangent g, x_s and dx_s/ds at angles ``s``."""
        sd = self.params.sigma_d
        x = self.renoise(x0, s)
        dxds = self.teacher_dxds(x, s, cond)

        def F_fn(x_u: Tensor, ss: Tensor) -> Tensor:
            return S.trig_F(self.student, x_u, ss, cond, 1.0, self.num_classes)

        with torch.no_grad():
            _, dF = S.jvp_F(F_fn, x / sd, s, dxds / sd)
        F_theta = F_fn(x / sd, s)
        F_minus = F_theta.detach()
        g = S.tangent(x, s, F_minus, dxds, dF.detach(), r, sd, form)
        return {"F": F_theta, "F_minus": F_minus, "g": g, "x": x, "dxds": dxds}

    def r(self) -> float:
        return S.warmup_ratio(int(self.updates), self.params.tangent_warmup)

    def scm_loss(self, x0: Tensor, cond: Tensor | None) -> tuple[Tensor, dict[str, Tensor | float]]:
        p = self.params
        s = S.sample_angle(len(x0), p.p_mean, p.p_std, p.sigma_d, x0.device)
        t = self.scm_terms(x0, cond, s, self.r())
        g = S.normalise_tangent(t["g"], p.tangent_c)
        logvar = self.logvar(s) if self.logvar is not None else None
        loss = S.scm_loss(t["F"], t["F_minus"], g, s, p.sigma_d, logvar)
        gnorm = torch.linalg.vector_norm(t["g"].flatten(1), dim=1).mean().detach()
        return loss, {"g_norm": gnorm, "r": self.r()}


@METHODS.register("scm", "continuous-time consistency distillation in TrigFlow (sCM; S56 SANA-Sprint's sCM part)",
                  SCMParams)
class SCM(SCMBase):
    def training_step(self, batch: dict[str, Tensor]) -> Step:
        loss, metrics = self.scm_loss(self.data(batch), self.cond(batch))
        return Step({"student": loss}, metrics)
