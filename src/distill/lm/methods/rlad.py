"""``rlad``: RL-aware distillation with Trust Region Ratio Distillation (S01, "Reinforcement-aware Knowledge
Distillation for LLM Reasoning", Zhang et al. 2026, arXiv 2602.22495).

TRRD replaces the teacher–student KL regulariser of KD-with-RL by GRPO's own clipped likelihood ratio,
anchored to a mixture of the teacher and the old policy instead of the old policy alone:

``Σ_tokens −min(ρ·A, clip(ρ, 1 − ε, 1 + ε)·A) / num_items``,  ``ρ = π_θ(y_t) / π_mix(y_t)``,
``π_mix = α·π_T + (1 − α)·π_old``,

with ``A`` GRPO's group-normalised verifier advantage (:mod:`distill.lm.policy`; samples, rewards,
advantages, k3 KL option, μ reuse and reduction are ``grpo``'s). ``α`` = 0 is GRPO exactly (the anchor is
π_old; the teacher is not even run); ``α`` = 1 anchors the trust region at the teacher. Why it imitates
selectively: where the teacher prefers a token of a good sequence (A > 0) the anchor rises above π_old,
so ρ < 1 and the update may push π_θ up to (1 + ε)·π_mix, past GRPO's bound; where it prefers a token of
a bad sequence (A < 0), ρ < 1 − ε soon puts the token on the flat clipped branch, so it is not pushed down.

The mixture (``mixture``):

- ``prob`` (default): the probability-space mixture above, a proper distribution; at the sampled token
  ``log π_mix = logaddexp(log α + log π_T, log(1 − α) + log π_old)``. It bounds ρ ≤ 1/(1 − α) at the
  start of a step whatever the teacher says.
- ``log``: the geometric (log-space) mixture ``log π_mix = α·log π_T + (1 − α)·log π_old`` (unnormalised);
  a token the teacher deems impossible then makes ρ unbounded.

Faithfulness: no official code was found, and the paper's method section (its equation and the form of
the mixture) was not available here beyond the abstract ("a PPO/GRPO-style likelihood-ratio objective
anchored to a teacher–old-policy mixture"); ``prob`` is our reading, ``log`` the alternative, and the
default ``alpha`` is ours. Teacher log-probs are of the sampled tokens at the sampling temperature, fixed
at sampling time (like π_old) for the μ reuses.

Logged: as ``grpo`` (``reward``, ``clip_frac``, ``ratio``, ``kl``), plus ``anchor_gap``, the mean of
``log π_mix − log π_old`` over the step's tokens (how far the teacher moves the trust region).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from distill.core.registry import METHODS
from distill.lm.methods.grpo import GRPO, GRPOParams
from distill.lm.policy import token_mean

Mixture = Literal["prob", "log"]


class RLADParams(GRPOParams):
    alpha: float = Field(0.5, ge=0, le=1, description="teacher weight of the anchor π_mix; 0 is GRPO")
    mixture: Mixture = Field("prob", description="prob: α·π_T + (1−α)·π_old; log: geometric mixture")


def mixture_logprobs(teacher_logp: Tensor, old_logp: Tensor, alpha: float, mixture: Mixture = "prob") -> Tensor:
    """Per token ``log π_mix`` of the TRRD anchor (module docstring); ``alpha`` 0 returns ``old_logp`` and 1
    returns ``teacher_logp`` themselves (exact ends)."""
    if alpha == 0.0:
        return old_logp
    if alpha == 1.0:
        return teacher_logp
    if mixture == "log":
        return alpha * teacher_logp + (1 - alpha) * old_logp
    if mixture == "prob":
        return torch.logaddexp(teacher_logp + math.log(alpha), old_logp + math.log1p(-alpha))
    raise ValueError(f"unknown mixture '{mixture}'; use 'prob' or 'log'")


@METHODS.register("rlad", "RLAD / TRRD (S01): GRPO whose clipped ratio is anchored to a teacher/old-policy "
                  "mixture (alpha 0 = GRPO)", RLADParams)
class RLAD(GRPO):
    method = "rlad"
    needs_teacher = True
    params: RLADParams

    def score(self, batch: dict[str, Tensor]) -> None:
        if self.params.alpha > 0:
            assert self.teacher is not None
            batch["teacher_logprobs"] = self.frozen_logprobs(self.teacher, batch)

    def anchor_logprobs(self, batch: dict[str, Tensor], old: Tensor) -> Tensor:
        p = self.params
        if p.alpha == 0.0:
            return old
        return mixture_logprobs(batch["teacher_logprobs"], old, p.alpha, p.mixture)

    def extra_metrics(self, batch: dict[str, Tensor], old: Tensor, mask: Tensor) -> dict[str, Tensor]:
        return {"anchor_gap": token_mean(self.anchor_logprobs(batch, old) - old, mask, batch.get("num_items"))}
