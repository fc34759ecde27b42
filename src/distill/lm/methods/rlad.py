"""``rlad``: RL-aware distillation with Trust Region Ratio Distillation (S01, "Reinforcement-aware Knowledge
Distillation for LLM Reasoning", Zhang et al. 2026, arXiv 2602.22495).

TRRD keeps GRPO's clipped surrogate and replaces its ratio ``π_θ / π_old`` by a ratio against an anchor
that mixes the old policy and the teacher ("a PPO/GRPO-style likelihood-ratio objective anchored to a
teacher–old-policy mixture", the abstract):

``Σ_tokens −min(r·A, clip(r, 1 − ε, 1 + ε)·A) / num_items``,

``r = (π_θ / π_old)^α · (π_θ / π_T)^(1−α) = π_θ / (π_old^α · π_T^(1−α))``      (``anchor: geometric``, default)

with ``A`` GRPO's group-normalised verifier advantage (:mod:`distill.lm.policy`; samples, rewards,
advantages, k3 KL option, μ reuse and reduction are ``grpo``'s). ``α`` (``alpha``) weighs the *old
policy*: ``α = 1`` is GRPO exactly (the teacher is not even run), ``α = 0`` anchors the trust region at
the teacher. Why it imitates selectively: where the teacher prefers a token of a good sequence (A > 0)
the anchor rises above π_old, so r < 1 and the update may push π_θ past GRPO's bound; where it prefers a
token of a bad sequence (A < 0), r < 1 − ε soon puts the token on the flat clipped branch.

Source of the form. The paper's method section could not be read here: the stored arXiv pages
(``arxiv.org/html/2602.22495v1`` and mirrors) give only the abstract and the introduction, and no
official code was found. The ratio above is the one a secondary reading of the paper reports (a public
blog survey of on-policy distillation hosted on GitHub, ``posts/opd_deep_research``, section
"Reinforcement-aware Knowledge Distillation for LLM Reasoning (RLAD)", "RLAD 的核心是 TRRD ratio":
``r^TRRD_{i,t} = (π_{θ^S}/π_{θ^S,old})^α · (π_{θ^S}/π_{θ^T})^{1−α}``, "α = 1 退化成标准 GRPO", i.e.
α = 1 reduces to standard GRPO; it also notes
that one sentence of the paper's main text seems to state the endpoints the other way round, and
follows the equation and the appendix). We implement that equation; the default ``alpha`` 0.5 is ours.

``anchor: arithmetic`` (an option, ours): the probability-space mixture ``π_mix = α·π_old + (1 − α)·π_T``
(``log π_mix = logaddexp(log α + log π_old, log(1 − α) + log π_T)``), a proper distribution with the
same ends (α = 1 GRPO, α = 0 the teacher); it bounds ``r ≤ 1/α`` at the start of a step whatever the
teacher says, where the geometric anchor lets a token the teacher deems impossible make r unbounded.

Teacher log-probs are of the sampled tokens at the sampling temperature, fixed at sampling time (like
π_old) for the μ reuses.

Logged: as ``grpo`` (``reward``, ``clip_frac``, ``ratio``, ``kl``), plus ``anchor_gap``, the mean of
``log π_anchor − log π_old`` over the step's tokens (how far the teacher moves the trust region).
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

Anchor = Literal["geometric", "arithmetic"]


class RLADParams(GRPOParams):
    alpha: float = Field(0.5, ge=0, le=1, description="the paper's α: weight of π_old in the anchor; 1 is GRPO, "
                         "0 anchors at the teacher")
    anchor: Anchor = Field("geometric", description="geometric: π_old^α·π_T^(1−α) (the paper's ratio); "
                           "arithmetic: α·π_old + (1−α)·π_T")


def trrd_anchor_logprobs(old_logp: Tensor, teacher_logp: Tensor, alpha: float,
                         anchor: Anchor = "geometric") -> Tensor:
    """Per token ``log`` of the TRRD anchor (the ratio's denominator; module docstring): ``α·log π_old +
    (1 − α)·log π_T`` (geometric) or ``log(α·π_old + (1 − α)·π_T)`` (arithmetic). ``alpha`` 1 returns
    ``old_logp`` and 0 returns ``teacher_logp`` themselves (exact ends)."""
    if anchor not in ("geometric", "arithmetic"):
        raise ValueError(f"unknown anchor '{anchor}'; use 'geometric' or 'arithmetic'")
    if alpha == 1.0:
        return old_logp
    if alpha == 0.0:
        return teacher_logp
    if anchor == "geometric":
        return alpha * old_logp + (1 - alpha) * teacher_logp
    return torch.logaddexp(old_logp + math.log(alpha), teacher_logp + math.log1p(-alpha))


@METHODS.register("rlad", "RLAD / TRRD (S01): GRPO whose clipped ratio is π_θ / (π_old^α·π_T^(1−α)) "
                  "(alpha 1 = GRPO)", RLADParams)
class RLAD(GRPO):
    method = "rlad"
    needs_teacher = True
    params: RLADParams

    def score(self, batch: dict[str, Tensor]) -> None:
        if self.params.alpha < 1:
            assert self.teacher is not None
            batch["teacher_logprobs"] = self.frozen_logprobs(self.teacher, batch)

    def anchor_logprobs(self, batch: dict[str, Tensor], old: Tensor) -> Tensor:
        p = self.params
        if p.alpha == 1.0:
            return old
        return trrd_anchor_logprobs(old, batch["teacher_logprobs"], p.alpha, p.anchor)

    def extra_metrics(self, batch: dict[str, Tensor], old: Tensor, mask: Tensor) -> dict[str, Tensor]:
        return {"anchor_gap": token_mean(self.anchor_logprobs(batch, old) - old, mask, batch.get("num_items"))}
