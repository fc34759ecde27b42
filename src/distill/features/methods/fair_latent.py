"""S46 (Sikder, Ramachandranpillai, de Leng & Heintz 2024, "Generating Synthetic Fair Syntax-agnostic
Data by Learning and Distilling Fair Representation", arXiv 2408.10755): learn a fair latent space, then
distil it into a smaller model that generates fair synthetic data. No official code is public.

Two methods, one per stage, on the ``fair_tabular`` task (``features/data/fair_tabular.py``) with the
``tab_vae`` model (``features/fair.py``):

- ``fair_vae`` (stage 1, the teacher; no teacher of its own): a VAE over records ``r = [x, y]`` whose
  latent means are made independent of the sensitive attribute ``a`` by a distance-covariance penalty
  (the paper's summary: "a distance-covariance regularized VAE")::

      L₁ = recon(D(z), r) + beta · KL(q(z|r) ‖ N(0, I)) + dcov_weight · dCov²(μ(r), a),   z ~ q(z|r)

- ``fair_latent`` (stage 2, the student): a smaller encoder distilled into the teacher's fair latent
  space; the teacher's decoder is shared (copied into the student and frozen), so the student's latents
  are decoded into synthetic records by the very decoder the fair space was learned with::

      L₂ = quality_weight · (‖μ_S(r) − μ_T(r)‖² + ‖log σ²_S(r) − log σ²_T(r)‖²)
           + utility_weight · KL(Bern(σ(ŷ_T)) ‖ Bern(σ(ŷ_S)))

  the quality loss ("for fair distillation": the student's posterior lands where the teacher's fair one
  is, means and log-variances by MSE averaged over latent dims, ``features.losses.hint_loss``) and the
  utility loss ("for data utility", KL-based as the paper's summary says): the label the shared decoder
  reads from the student's latent mean, ``ŷ_S = D_y(μ_S)``, matches the one it reads from the teacher's.

Ours (only the abstract and a summary could be read): the two terms' exact forms and weights above,
a one-hidden-layer MLP encoder/decoder, Gaussian/Bernoulli record likelihoods, dCov² on the latent
means, and synthetic data drawn as one posterior sample per real record (``fair.synthesize``).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from distill.core.distiller import Distiller, Step, TaskInfo
from distill.core.registry import METHODS, Params
from distill.errors import MismatchError, RecipeError
from distill.features import fair
from distill.features.losses import hint_loss


def fair_vae_loss(x_hat: Tensor, log_sigma: Tensor, y_logit: Tensor, x: Tensor, y: Tensor, mu: Tensor,
                  logvar: Tensor, a: Tensor, beta: float, dcov_weight: float) -> tuple[Tensor, dict[str, Tensor]]:
    """S46 stage 1: ``recon + beta · KL(q ‖ N(0, I)) + dcov_weight · dCov²(μ, a)``, and its parts."""
    rec, kl, dc = fair.recon_loss(x_hat, log_sigma, y_logit, x, y), fair.gaussian_kl(mu, logvar), fair.dcov2(mu, a)
    return rec + beta * kl + dcov_weight * dc, {"recon": rec.detach(), "kl": kl.detach(), "dcov": dc.detach()}


def fair_distill_loss(mu_s: Tensor, logvar_s: Tensor, mu_t: Tensor, logvar_t: Tensor, y_logit_s: Tensor,
                      y_logit_t: Tensor, quality_weight: float, utility_weight: float) -> tuple[Tensor, dict[str, Tensor]]:
    """S46 stage 2: ``quality_weight · (MSE(μ_S, μ_T) + MSE(log σ²_S, log σ²_T)) + utility_weight ·
    KL(Bern(σ(ŷ_T)) ‖ Bern(σ(ŷ_S)))``, and its parts."""
    quality = hint_loss(mu_s, mu_t) + hint_loss(logvar_s, logvar_t)
    utility = fair.bernoulli_kl(y_logit_t, y_logit_s)
    return quality_weight * quality + utility_weight * utility, {"quality": quality.detach(), "utility": utility.detach()}


def _check_vae(model: nn.Module, who: str) -> fair.TabVAE:
    if not isinstance(model, fair.TabVAE):
        raise RecipeError(f"the {who} must be a tab_vae on the fair_tabular task, not a {type(model).__name__}")
    return model


class FairVAEParams(Params):
    beta: float = Field(1.0, ge=0, description="weight of the KL to the N(0, I) prior")
    dcov_weight: float = Field(10.0, ge=0, description="weight of dCov²(μ, a), the fairness penalty (0: a plain VAE)")


@METHODS.register("fair_vae", "S46 stage 1: a VAE over records with a distance-covariance fairness penalty on its latents", FairVAEParams)
class FairVAE(Distiller):
    """S46 stage 1 (see the module docstring): ``recon + beta·KL + dcov_weight·dCov²(μ, a)``."""

    needs_teacher = False
    uses_unlabeled = False
    params: FairVAEParams

    def __init__(self, student: nn.Module, teacher: nn.Module | None, params: FairVAEParams, info: TaskInfo) -> None:
        super().__init__(_check_vae(student, "student"), teacher, params, info)

    def training_step(self, batch: dict[str, Tensor]) -> Step:
        mu, logvar = self.student.encode(fair.records(batch["x"], batch["y"]))
        z = mu + (0.5 * logvar).exp() * torch.randn_like(mu)
        x_hat, y_logit = self.student.decode(z)
        loss, parts = fair_vae_loss(x_hat, self.student.decoder.log_sigma, y_logit, batch["x"], batch["y"], mu, logvar, batch["a"],
                                    self.params.beta, self.params.dcov_weight)
        return Step({"student": loss}, parts)


class FairLatentParams(Params):
    quality_weight: float = Field(1.0, ge=0, description="latent matching to the teacher's fair posterior (MSE of μ and log σ²)")
    utility_weight: float = Field(1.0, ge=0, description="KL between the labels the shared decoder reads from teacher and student latents")


@METHODS.register("fair_latent", "S46 stage 2: distil a fair VAE's latent space into a small encoder sharing its decoder", FairLatentParams)
class FairLatent(Distiller):
    """S46 stage 2 (see the module docstring). The student's decoder is the teacher's, copied and
    frozen at construction (so it is exported with the student); its encoder is the small part trained."""

    uses_unlabeled = False
    params: FairLatentParams

    def __init__(self, student: nn.Module, teacher: nn.Module | None, params: FairLatentParams, info: TaskInfo) -> None:
        student, teacher = _check_vae(student, "student"), _check_vae(teacher, "teacher")
        if student.latent != teacher.latent or student.decoder.hidden != teacher.decoder.hidden:
            raise MismatchError(
                f"fair_latent: the student shares the teacher's decoder, so its latent ({student.latent}) and dec_hidden "
                f"({student.decoder.hidden}) must equal the teacher's ({teacher.latent}, {teacher.decoder.hidden})")
        super().__init__(student, teacher, params, info)
        student.decoder.load_state_dict(teacher.decoder.state_dict())
        student.decoder.requires_grad_(False)

    def cache_teacher(self, x: Tensor, batch_size: int = 1024) -> None:
        """Nothing to precompute: the teacher's posterior and decoded label are read per batch of records."""

    def training_step(self, batch: dict[str, Tensor]) -> Step:
        r = fair.records(batch["x"], batch["y"])
        mu_s, logvar_s = self.student.encode(r)
        with torch.inference_mode():
            mu_t, logvar_t = self.teacher.encode(r)
            y_logit_t = self.teacher.decode(mu_t)[1]
        mu_t, logvar_t, y_logit_t = mu_t.clone(), logvar_t.clone(), y_logit_t.clone()
        y_logit_s = self.student.decode(mu_s)[1]
        loss, parts = fair_distill_loss(mu_s, logvar_s, mu_t, logvar_t, y_logit_s, y_logit_t,
                                        self.params.quality_weight, self.params.utility_weight)
        return Step({"student": loss}, parts)
