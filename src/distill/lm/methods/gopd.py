"""``gopd``: Generalized On-Policy Distillation and its reward extrapolation ExOPD (S18, "Learning beyond
Teacher: Generalized On-Policy Distillation with Reward Extrapolation", arXiv 2602.12125; official code
RUCBM/G-OPD on verl).

On-policy distillation (OPD) is dense KL-constrained RL with the per-token reward ``log π_T − log π_ref``
and the KL to π_ref weighted equally; G-OPD scales the reward by λ (Eq. 11):

``max_θ E_{y∼π_θ} [ λ·log(π_T(y|x) / π_ref(y|x)) − KL(π_θ(y|x) ‖ π_ref(y|x)) ]``,

whose optimum is ``π ∝ π_T^λ · π_ref^(1−λ)`` (Eq. 12): λ = 1 is OPD (reverse KL to the teacher, π_ref
cancels), λ < 1 interpolates towards π_ref, λ > 1 extrapolates beyond the teacher (ExOPD). Per sampled
token the advantage is (Eq. 22 with an advantage's sign, as the official ``dp_actor.py`` computes it)

``A_t = λ·(log π_T − log π_ref) − (log π_old − log π_ref)``,

used in the clipped objective of :mod:`distill.lm.policy` (no verifier reward, no group normalisation):
``Σ_tokens −min(ρ·A_t, clip(ρ)·A_t) / num_items``. With μ = 1 (ρ ≡ 1) its gradient is the REINFORCE
gradient of the per-token reverse KL ``Σ_t (log π − log π_T)`` (discount 0, as the official code).

- Reference (``reference``): the student's initial weights by default (a frozen copy), or any model
  folder / run folder, e.g. the teacher's base before its RL ("reward correction" in the strong-to-weak
  setting). One π_ref serves both terms, as the official single-teacher path (``base_log_prob``).
- λ = 1: π_ref cancels, so as the official code we skip it (no copy, no forward) unless ``kl_coef > 0``;
  the advantage is then ``log π_T − log π_old`` exactly.
- All log-probs are of the sampled tokens at the sampling temperature (verl passes the rollout
  temperature to the reference and teacher log-prob passes too). ``log π_old`` is the student at sampling
  time (fixed over the μ reuses, as the official ``old_log_prob``).
- Deviations: the official code uses verl's dual-clip PPO loss (``clip_ratio_c = 3``) and its own loss
  aggregation; we use the plain clip and, by default, the token mean over the optimizer step
  (``loss_type``, shared with ``grpo``: ``grpo`` / ``dr_grpo`` / ``bnpo`` are TRL's other reductions;
  ``scale_rewards`` does not apply, there is no group normalisation). With μ = 1 (the paper's on-policy
  setting) neither clip acts.

Logged: ``train/reverse_kl`` (``Σ (log π_old − log π_T) / num_items``: the on-policy reverse-KL estimate of
the step's rollouts), ``train/clip_frac``, ``train/ratio``, with a reference ``train/kl`` (k3 to π_ref), and
where the task has a verifier ``train/reward`` (a diagnostic; the objective has no verifier reward).
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor, nn

from distill.core.registry import METHODS, PathField
from distill.lm.policy import PolicyDistiller, PolicyParams, frozen_copy, load_reference, reference_folder, token_mean


class GOPDParams(PolicyParams):
    group_size: int = Field(1, ge=1, description="completions per prompt (no group normalisation here)")
    lmbda: float = Field(1.0, ge=0, description="reward scale λ: 1 is OPD, > 1 extrapolates (ExOPD)")
    reference: str | None = PathField(None, description="π_ref: a model or run folder; default the student's initial weights")


def gopd_advantages(teacher_logp: Tensor, ref_logp: Tensor | None, old_logp: Tensor, lmbda: float) -> Tensor:
    """S18 per-token advantage ``λ·(log π_T − log π_ref) − (log π_old − log π_ref)`` (``[N, T]``); without
    ``ref_logp`` (only valid at λ = 1, where it cancels) ``log π_T − log π_old``."""
    if ref_logp is None:
        if lmbda != 1.0:
            raise ValueError("the G-OPD advantage needs the reference log-probs unless lmbda is 1")
        return teacher_logp - old_logp
    return lmbda * (teacher_logp - ref_logp) - (old_logp - ref_logp)


@METHODS.register("gopd", "G-OPD / ExOPD (S18): on-policy distillation as KL-constrained RL, per-token advantage "
                  "λ·(log π_T − log π_ref) − (log π_old − log π_ref), PPO clip", GOPDParams)
class GOPD(PolicyDistiller):
    method = "gopd"
    needs_teacher = True
    uses_verifier = False
    params: GOPDParams

    def make_reference(self, student: nn.Module) -> nn.Module | None:
        p = self.params
        folder = reference_folder(p.reference) if p.reference is not None else None  # a bad path fails early
        if p.lmbda == 1.0 and p.kl_coef == 0:
            return None  # π_ref cancels in the advantage
        return load_reference(self.data, folder) if folder is not None else frozen_copy(student)

    def score(self, batch: dict[str, Tensor]) -> None:
        assert self.teacher is not None
        batch["teacher_logprobs"] = self.frozen_logprobs(self.teacher, batch)

    def advantages(self, batch: dict[str, Tensor], old: Tensor) -> Tensor:
        ref = batch.get("ref_logprobs") if self.params.lmbda != 1.0 else None
        return gopd_advantages(batch["teacher_logprobs"], ref, old, self.params.lmbda)

    def extra_metrics(self, batch: dict[str, Tensor], old: Tensor, mask: Tensor) -> dict[str, Tensor]:
        return {"reverse_kl": token_mean(old - batch["teacher_logprobs"], mask, batch.get("num_items"))}
