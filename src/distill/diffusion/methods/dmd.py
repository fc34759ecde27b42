"""``dmd``: DMD2 (Yin et al. 2024b, "Improved Distribution Matching Distillation"; catalogue B6/DMD2).

Official code tianweiy/DMD2 ``main/sd_guidance.py`` (``compute_distribution_matching_loss``,
``compute_loss_fake``, ``compute_cls_logits``) and ``main/sd_unified_model.py`` (backward simulation):

- a few-step generator G (the student, initialised from the teacher) sampled as a multistep
  consistency sampler over the fixed times of ``time_grid(steps)``; for ``steps`` > 1 DMD2's backward
  simulation: the generator's own chain (no gradient) from noise to a random step k, then G's x̂₀ at
  step k (with gradient) is the training sample, so training sees the inputs sampling sees;
- the generator loss is ``dmd_loss`` (DMD2's normalised gradient, float64) at τ ~ U(0.02, 0.98): the
  real score is the frozen teacher with CFG (``guidance``), the fake score a critic with guidance 1;
- the critic (a copy of the teacher, its own parameter group ``critic``) learns the generator's
  distribution by the denoising loss on detached samples (τ ~ U(0.001, 1): DMD2 draws every step);
  it is trained ``critic_steps`` times per generator step (DMD2's ``dfake_gen_update_ratio``, 5 or 10
  in the scripts): the cycle ``["critic"] * k + ["student"]`` at the step counter (``phase``). DMD2
  also steps the critic on generator steps; here a step trains one group (ours);
- optional GAN head (``gan_weight`` > 0): a classifier on the critic's features at t = 0 (real data
  vs generator samples), softplus losses, its parameters in the ``critic`` group.

The generator step computes the fake score under ``no_grad`` and runs the GAN head with the critic's
parameters frozen (``requires_grad_(False)``), so it leaves the critic untouched; the critic step
draws its samples under ``no_grad``.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from distill.core.distiller import Step
from distill.core.registry import METHODS
from distill.diffusion.base import DiffusionDistiller, DiffusionParams
from distill.diffusion.dmd import dmd_loss
from distill.diffusion.dmd_parts import GANHead, gan_critic_loss, gan_generator_loss
from distill.diffusion.models import diffusion_spec
from distill.diffusion.sampling import default_t_max, predict, time_grid
from distill.diffusion.schedules import denoising_loss


class DMDParams(DiffusionParams):
    sampler: Literal["euler", "ddim", "heun", "sde", "consistency"] | None = Field(
        None, description="the student's sampler (default consistency: x̂₀, then re-noise)")
    critic_steps: int = Field(5, ge=1, description="critic updates per generator update (DMD2: 5 or 10)")
    t_min: float = Field(0.02, ge=0, lt=1, description="the DMD loss's noise times τ ~ U(t_min, t_max) (DMD2: 0.02)")
    t_max: float = Field(0.98, gt=0, le=1, description="(DMD2: 0.98)")
    critic_t_min: float = Field(1e-3, ge=0, lt=1, description="the critic's denoising times τ ~ U(critic_t_min, 1)")
    dmd_weight: float = Field(1.0, ge=0, description="weight of the distribution-matching loss")
    gan_weight: float = Field(0.0, ge=0, description="generator GAN loss weight (0: no GAN head; DMD2 ImageNet 3e-3)")
    gan_critic_weight: float = Field(1e-2, ge=0, description="the head's classification loss weight (DMD2: 1e-2)")


@METHODS.register("dmd", "DMD2: few-step generator by distribution matching with a fake-score critic (+ GAN)",
                  DMDParams)
class DMD(DiffusionDistiller):
    def __init__(self, student, teacher, params: DMDParams, info) -> None:
        super().__init__(student, teacher, params, info)
        self.critic = copy.deepcopy(teacher).requires_grad_(True).train()
        self.critic.diffusion = dict(diffusion_spec(teacher))
        self.times = time_grid(params.steps, default_t_max(student.diffusion))  # the sampler's grid
        self.gan = None
        if params.gan_weight > 0:
            x = info.train.x[:2]
            self.gan = GANHead(self.critic, x, torch.zeros(2, dtype=torch.long) if self.num_classes else None)

    def param_groups(self) -> dict[str, list]:
        critic = list(self.critic.parameters()) + (list(self.gan.parameters()) if self.gan is not None else [])
        return {"student": [p for p in self.student.parameters() if p.requires_grad], "critic": critic}

    # --- the generator ------------------------------------------------------------------------------
    def draw_steps(self, n: int, device) -> Tensor:
        """Which step of the sampler each sample trains (DMD2: uniform)."""
        return torch.randint(0, self.params.steps, (n,), device=device)

    def simulate(self, noise: Tensor, cond: Tensor | None, k: Tensor) -> tuple[Tensor, Tensor]:
        """DMD2's backward simulation: the generator's own consistency chain from noise, without
        gradient, stopped at step ``k`` (per sample): its input x_{t_k} and t_k."""
        ts = self.times.to(noise.device)
        x = noise * self.s_sched.alpha_sigma(ts[0])[1]
        x_in = x.clone()
        with torch.no_grad():
            for i in range(int(k.max())):
                x0 = self.student_x0_eps(x, ts[i].expand(len(x)), cond)[0]
                a, s = self.s_sched.alpha_sigma(ts[i + 1])
                x = a * x0 + s * torch.randn_like(x0)
                x_in = torch.where((k == i + 1).reshape(-1, *([1] * (x.dim() - 1))), x, x_in)
        return x_in, ts[k]

    def generator_sample(self, batch: dict[str, Tensor], grad: bool) -> tuple[Tensor, Tensor, Tensor]:
        """(x̂₀, t_in, k): the generator's output at a random step of its sampler."""
        noise = torch.randn_like(batch["x"])
        k = self.draw_steps(len(noise), noise.device)
        cond = self.cond(batch)
        x_in, t_in = self.simulate(noise, cond, k)
        with torch.set_grad_enabled(grad):
            x0 = self.student_x0_eps(x_in, t_in, cond)[0]
        return x0, t_in, k

    def dmd_times(self, t_in: Tensor, k: Tensor) -> Tensor:
        p = self.params
        return p.t_min + (p.t_max - p.t_min) * torch.rand_like(t_in)

    def fake_x0(self, x_t: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        with torch.no_grad():
            return predict(self.critic, x_t, t, cond, 1.0, self.num_classes)[0].detach()

    def generator_losses(self, x0: Tensor, t_in: Tensor, k: Tensor, batch: dict[str, Tensor]) -> tuple[Tensor, dict]:
        cond = self.cond(batch)
        tau = self.dmd_times(t_in, k)
        x_t, _ = self.noisy(x0.detach(), tau)
        x0_real = self.teacher_x0_eps(x_t, tau, cond)[0]
        loss = self.params.dmd_weight * dmd_loss(x0, x0_real, self.fake_x0(x_t, tau, cond))
        return loss, {"dmd": loss.detach()}

    def gan_logits(self, x: Tensor, cond: Tensor | None) -> Tensor:
        assert self.gan is not None
        return self.gan(self.critic, x, cond)

    # --- the step -----------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor]) -> Step:
        if self.phase(["critic"] * self.params.critic_steps + ["student"]) == "critic":
            return self.critic_step(batch)
        x0, t_in, k = self.generator_sample(batch, grad=True)
        loss, metrics = self.generator_losses(x0, t_in, k, batch)
        if self.gan is not None and self.params.gan_weight > 0:
            frozen = [p for p in self.param_groups()["critic"] if p.requires_grad]
            for p in frozen:  # the generator's GAN loss reaches x through the critic, never its weights
                p.requires_grad_(False)
            try:
                g = gan_generator_loss(self.gan_logits(x0, self.cond(batch)))
            finally:
                for p in frozen:
                    p.requires_grad_(True)
            loss = loss + self.params.gan_weight * g
            metrics["gan_g"] = g.detach()
        return Step({"student": loss}, metrics)

    def critic_times(self, t_in: Tensor, k: Tensor) -> Tensor:
        lo = self.params.critic_t_min
        return lo + (1 - lo) * torch.rand_like(t_in)

    def critic_step(self, batch: dict[str, Tensor]) -> Step:
        with torch.no_grad():
            x0, t_in, k = self.generator_sample(batch, grad=False)
        cond = self.cond(batch)
        tau = self.critic_times(t_in, k)
        x_t, eps = self.noisy(x0, tau)
        kind = self.critic.diffusion["prediction"]
        loss = denoising_loss(self.critic(x_t, tau, cond), x0, eps, kind, tau, self.s_sched)
        metrics = {"critic": loss.detach()}
        if self.gan is not None:
            d = gan_critic_loss(self.gan_logits(batch["x"], cond), self.gan_logits(x0, cond))
            loss = loss + self.params.gan_critic_weight * d
            metrics["gan_d"] = d.detach()
        return Step({"critic": loss}, metrics)
