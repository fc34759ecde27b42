"""``grpo``: Group Relative Policy Optimization (DeepSeekMath, Shao et al. 2024, arXiv 2402.03300), the RL
baseline of the reinforcement-aware distillation methods: no teacher, the task's verifier is the reward.

Per optimizer step (every μ-th; the others reuse the rollouts, ``num_iterations``): for each prompt of
the batch, ``group_size`` (G) completions sampled from the student at ``temperature``; reward 1 if the
verifier accepts a completion, else 0; advantage ``(r − mean_group) / (std_group + 1e-4)`` (§4.1.2,
sample std as TRL); the loss is Eq. 3 with the k3 KL of Eq. 4 as a loss term,

``Σ_tokens [−min(ρ·A, clip(ρ, 1 − ε, 1 + ε)·A) + kl_coef·k3(π ‖ π_ref)] / num_items``,

over the completion tokens of the whole step (TRL's default ``loss_type="dapo"``), ``ρ = π / π_old``.
``loss_type: grpo`` is the paper's own reduction (each sequence's token mean, then the mean over the
step's sequences), ``dr_grpo`` divides by sequences × ``max_new_tokens`` (Dr. GRPO), ``bnpo`` equals
``dapo`` in one big batch; ``scale_rewards`` divides the advantages by the group's std (``group``, the
paper), the step's (``batch``) or not at all (``none``, Dr. GRPO). Defaults as TRL v1.9.0's ``GRPOConfig``
(:mod:`distill.lm.policy`). The reference π_ref is a frozen copy of the student's initial weights, built
only when ``kl_coef > 0`` (TRL's default β is 0, DeepSeekMath's 0.04). All machinery lives in
:mod:`distill.lm.policy`; this method is its plain use.

Logged: ``train/reward`` (mean verifier reward of the step's samples), ``train/clip_frac`` (share of
tokens on a flat clipped branch; 0 when μ = 1, where ρ ≡ 1), ``train/ratio`` (mean ρ) and, with a
reference, ``train/kl`` (mean k3).
"""

from __future__ import annotations

from pydantic import Field

from distill.core.registry import METHODS
from distill.lm.policy import PolicyDistiller, PolicyParams


class GRPOParams(PolicyParams):
    group_size: int = Field(4, ge=2, description="completions per prompt (G); the group std needs two")


@METHODS.register("grpo", "GRPO (DeepSeekMath): G student samples per prompt, verifier reward, group-normalised "
                  "advantages, PPO clip, optional k3 KL to the initial student", GRPOParams)
class GRPO(PolicyDistiller):
    method = "grpo"
    params: GRPOParams
