"""``adpo``: Anchored Direct Preference Optimization (ADPO, S06; Wang Zixian 2025, arXiv 2510.18913).

For each prompt, a list of K completions ``y_1..y_K`` with sequence log-probs ``ℓ_i = log π_θ(y_i | x)``
(sum over completion tokens of the log-probs at the sampling temperature T, i.e. of
``log_softmax(logits / T)``, ``docs/conventions.md``) and anchor log-probs ``ℓ_i^ref = log π_ref(y_i | x)``
(the same, under the anchor); the loss is the KL from a target distribution ``q`` over the list to the
anchored softmax (the paper's central objective):

``L = KL(q ‖ p_θ),   p_θ(i) = softmax_i((ℓ_i − ℓ_i^ref) / τ_anc)``

summed over the step's prompts and divided by their count. KL and the official code's cross-entropy
``−Σ q log p_θ`` differ by the entropy of ``q``, a constant: the gradients are identical.

Choices (``method:`` keys):

- ``target`` (q): ``reward`` (default, the official trainer): ``softmax(Â / beta_reward)`` with ``Â`` the
  group-normalised verifier rewards ``(r − mean) / (std + 1e-4)`` (unbiased std, as TRL's GRPO;
  ``distill.lm.policy.group_advantages``) and ``beta_reward`` 0.5 (the official default);
  ``correct``: uniform over the completions with the highest reward (the verified-correct ones; uniform
  over all when none or all are correct), the ``beta_reward → 0`` limit; ``teacher``: teacher scores,
  ``softmax(ℓ^T / teacher_temperature)`` with ``ℓ^T`` the teacher's sequence log-probs of the same
  completions at the sampling temperature (the teacher renormalised on the list; ours, the official
  code has no teacher target).
- ``anchor`` (π_ref): ``on_policy`` (default, the official default): the policy that sampled the list.
  Our engine samples once per optimizer step and updates once, so that policy is the current one,
  detached (the official ``old_per_token_logps``, which TRL replaces by ``per_token_logps.detach()``
  in this case): the loss value is the constant ``KL(q ‖ uniform)`` and the gradient is
  ``(1/τ) Σ_i (1/K − q_i) ∇ℓ_i``, a REINFORCE step with advantage ``(q_i − 1/K)/τ``.
  ``fixed``: the initial student, frozen (the paper's "fixed anchor", best for offline
  distillation). ``ema``: an exponential moving average of the student, ``π_ref ← d·π_ref + (1−d)·π_θ``
  after every optimizer step (``ema_decay`` d = 0.99, the official ``ema_alpha``). ``none``:
  ``ℓ^ref = 0`` (a uniform anchor, which cancels in the softmax). The fixed and EMA anchors are a
  frozen copy of the student held as a submodule (``anchor.*`` in the checkpoint, so a resumed run
  continues the same EMA).
- ``source`` (the list): ``student`` (default): K samples of the student per prompt at every step
  (on-policy, as the official ADPO trainer, which is TRL's GRPO trainer with this loss); ``teacher``:
  K samples of the teacher per prompt at every step.

Matched to the official code (``wk222/TRL-ADPO``): ``trl/trainer/adpo_config.py :: ADPOConfig``
(``beta_reward`` 0.5, ``tau`` 1.0; ``temperature`` 1.0 from ``GRPOConfig``);
``trl/trainer/adpo_trainer.py :: ADPOTrainer._get_per_token_logps_and_entropies`` (``logits = logits /
self.temperature`` before ``selective_log_softmax``: every log-prob, current and anchor, is at the
sampling temperature); ``ADPOTrainer._generate_and_score_completions`` (advantages ``(r − mean) /
(std + 1e-4)``, ``scale_rewards="group"``); ``ADPOTrainer._compute_loss`` (``q_target = softmax((A −
mean A) / beta_reward)``, the centring a no-op under softmax; ``anchored_scores = (sequence_logps −
anchor_sequence_logps) / tau``; ``−(q_target · log_softmax(anchored_scores)).sum(-1)``, mean over prompts).

Special cases the paper names, as configurations here:

- **DPO**: K = 2, ``q`` one-hot on the preferred completion (``target: correct`` with one correct and
  one wrong sample), anchor = the reference (``fixed``): ``L = −log σ(((ℓ_w − ℓ_w^ref) − (ℓ_l −
  ℓ_l^ref)) / τ)``, DPO with β = 1/τ.
- **KD**: ``q`` = the teacher's distribution (``target: teacher``, ``teacher_temperature: 1``), uniform
  anchor (``anchor: none``), τ = 1: ``L = KL(softmax(ℓ^T) ‖ softmax(ℓ))``, forward KL from the teacher
  to the student, both renormalised on the list (log-probs at the sampling temperature T for both).
- **SFT** is ``q`` one-hot on a reference with a uniform anchor; max-entropy RL is ``q ∝ exp(r/β)``.

Deviations from the official code: the EMA is updated once per optimizer step (the official code
updates it in ``compute_loss``, once per micro-batch, before the optimizer step); its optional extra KL
penalty (``beta_anchor_kl``, 0 by default), adaptive τ (``use_adaptive_tau``, off by default),
``drop_all_failed_prompts`` (off by default) and ``kl_triggered`` anchor are not implemented; the
reduction is over the optimizer step's prompts (the official mean is per micro-batch).

Logged: ``train/reward`` (mean verifier reward of the step's completions, when the task has a
verifier), ``train/anchor_gap`` (mean ``|ℓ − ℓ^ref|``, the official ``adpo/anchor_kl``) and
``train/target_entropy`` (mean entropy of q).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from distill.core.distiller import Step, TaskInfo
from distill.core.registry import METHODS, Params
from distill.errors import RecipeError
from distill.lm.base import LMDistiller
from distill.lm.losses import sequence_logprob
from distill.lm.models import token_logits
from distill.lm.policy import frozen_copy, group_advantages, sample_groups, verifier_rewards
from distill.lm.data.task import require_prompts


class ADPOParams(Params):
    num_samples: int = Field(4, ge=2, description="K: completions per prompt (the list)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature; all log-probs are of logits / T")
    tau: float = Field(1.0, gt=0, description="τ_anc: temperature of the anchored softmax (DPO's β = 1/τ)")
    target: Literal["reward", "correct", "teacher"] = Field(
        "reward", description="q: softmax of group-normalised rewards, uniform over the best, or teacher scores")
    beta_reward: float = Field(0.5, gt=0, description="target reward: q = softmax(Â / beta_reward) (official 0.5)")
    teacher_temperature: float = Field(1.0, gt=0, description="target teacher: q = softmax(ℓ^T / teacher_temperature)")
    anchor: Literal["on_policy", "fixed", "ema", "none"] = Field(
        "on_policy", description="π_ref: the sampling policy (detached), the initial student, an EMA of it, or none")
    ema_decay: float = Field(0.99, ge=0, le=1, description="EMA anchor: π_ref ← d·π_ref + (1−d)·π_θ each step")
    source: Literal["student", "teacher"] = Field("student", description="who samples the completions (each step)")
    max_new_tokens: int | None = Field(None, ge=1, description="generation length; default the task's")
    gen_batch_size: int = Field(64, ge=1, description="prompts per generate call")


# ---------------------------------------------------------------------------------------------- losses


def adpo_loss(logp: Tensor, ref_logp: Tensor, q: Tensor, tau: float = 1.0,
              num_items: float | Tensor | None = None) -> Tensor:
    """``Σ_g KL(q_g ‖ softmax((logp_g − ref_logp_g)/τ))`` over groups, divided by ``num_items`` (default:
    the number of groups). ``logp``, ``ref_logp``, ``q``: ``[groups, K]`` (rows of ``q`` sum to 1;
    ``0·log 0 = 0``). S06's objective; the gradient flows to ``logp`` only through what is not detached."""
    log_p = torch.log_softmax((logp - ref_logp).float() / tau, dim=-1)
    q = q.to(log_p.dtype)
    kl = (torch.xlogy(q, q) - q * log_p).sum(-1)
    if num_items is None:
        return kl.mean()
    return kl.sum() / (num_items.to(kl.dtype) if isinstance(num_items, Tensor) else num_items)


def reward_target(rewards: Tensor, beta_reward: float = 0.5) -> Tensor:
    """q from rewards (the official trainer): ``softmax(Â / beta_reward)`` per row of ``[groups, K]`` rewards,
    ``Â`` GRPO's group-normalised advantages (:func:`distill.lm.policy.group_advantages`)."""
    g, k = rewards.shape
    ids = torch.arange(g, device=rewards.device).repeat_interleave(k)
    adv = group_advantages(rewards.float().reshape(-1), ids).view(g, k)
    return torch.softmax(adv / beta_reward, dim=-1)


def best_target(rewards: Tensor) -> Tensor:
    """q uniform over each group's highest-reward completions (all of them when the rewards tie)."""
    best = (rewards == rewards.max(-1, keepdim=True).values).float()
    return best / best.sum(-1, keepdim=True)


def teacher_target(teacher_logp: Tensor, temperature: float = 1.0) -> Tensor:
    """q from teacher scores: ``softmax(ℓ^T / temperature)`` over each group's list, ``[groups, K]``."""
    return torch.softmax(teacher_logp.float() / temperature, dim=-1)


# ---------------------------------------------------------------------------------------------- method


@METHODS.register("adpo", "Anchored DPO (S06): KL(q ‖ softmax((ℓ − ℓ_ref)/τ)) over K completions per prompt; q "
                  "from verifier rewards or teacher scores; fixed, on-policy or EMA anchor", ADPOParams)
class ADPO(LMDistiller):
    params: ADPOParams

    def __init__(self, student: nn.Module, teacher: nn.Module | None, params: ADPOParams, info: TaskInfo) -> None:
        super().__init__(student, teacher, params, info)
        train = require_prompts(info, "adpo")
        self.prompts, self.references = train.prompts, train.references
        self.has_verifier = self.data.verify is not None and self.references is not None
        if params.target in ("reward", "correct") and not self.has_verifier:
            raise RecipeError(f"method 'adpo' with target: {params.target} scores completions with the task's "
                              "verifier, and this task has none; use target: teacher")
        # a frozen copy of the student: a submodule, so it is checkpointed (the EMA survives a resume) and
        # placed on the device by the engine, but not optimised (param_groups takes requires_grad only)
        self.anchor: nn.Module | None = None
        if params.anchor in ("fixed", "ema"):
            self.anchor = frozen_copy(student)

    def train(self, mode: bool = True) -> "ADPO":
        super().train(mode)
        if self.anchor is not None:
            self.anchor.eval()
        return self

    @property
    def max_new_tokens(self) -> int:
        return self.params.max_new_tokens or self.data.max_new_tokens

    # --- batches ----------------------------------------------------------------------------------
    def prepare_batches(self, batches: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        return [self.sample_batch(b) for b in batches]

    def sample_batch(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """K completions of each prompt of the micro-batch (consecutive rows), with their rewards."""
        p, tok, k = self.params, self.data.tokenizer, self.params.num_samples
        model = self.student if p.source == "student" else self.teacher
        assert model is not None
        idx = batch["index"]
        out, r = sample_groups(model, [self.prompts[int(i)] for i in idx], idx, tok, group_size=k,
                               max_new_tokens=self.max_new_tokens, temperature=p.temperature,
                               batch_size=p.gen_batch_size)
        out["groups"] = torch.tensor(len(idx), device=idx.device)
        if self.has_verifier:
            refs = [self.references[int(i)] for i in out["index"]]
            out["rewards"] = verifier_rewards(r.texts(tok), refs, self.data.verify).to(idx.device)
        return out

    def count_items(self, batch: dict[str, Tensor]) -> int:
        """Prompts (groups of K completions): the loss is a mean over the step's prompts."""
        return int(batch["groups"])

    # --- anchor -----------------------------------------------------------------------------------
    def anchor_logprob(self, batch: dict[str, Tensor], logp: Tensor) -> Tensor:
        """``ℓ^ref`` ``[rows]`` for the anchor in use (``logp``: the student's, for ``on_policy``)."""
        a = self.params.anchor
        if a == "on_policy":
            return logp.detach()
        if a == "none":
            return torch.zeros_like(logp)
        assert self.anchor is not None
        with torch.no_grad():
            return sequence_logprob(token_logits(self.anchor, batch, self.vocab), batch["labels"],
                                    temperature=self.params.temperature)

    def on_optimizer_step(self) -> None:
        if self.params.anchor == "ema":
            assert self.anchor is not None
            d = self.params.ema_decay
            with torch.no_grad():
                for a, s in zip(self.anchor.parameters(), self.student.parameters()):
                    a.mul_(d).add_(s.detach(), alpha=1.0 - d)

    # --- loss -------------------------------------------------------------------------------------
    def target(self, batch: dict[str, Tensor], k: int) -> Tensor:
        p = self.params
        if p.target == "teacher":
            t = sequence_logprob(self.teacher_token_logits(batch), batch["labels"], temperature=p.temperature)
            return teacher_target(t.view(-1, k), p.teacher_temperature)
        rewards = batch["rewards"].view(-1, k)
        return reward_target(rewards, p.beta_reward) if p.target == "reward" else best_target(rewards)

    def training_step(self, batch: dict[str, Tensor]) -> Step:
        self.seen(batch)
        k = self.params.num_samples
        logp = sequence_logprob(self.student_logits(batch), batch["labels"], temperature=self.params.temperature)
        ref = self.anchor_logprob(batch, logp)
        q = self.target(batch, k)
        loss = adpo_loss(logp.view(-1, k), ref.view(-1, k), q, self.params.tau, batch.get("num_items"))
        metrics: dict[str, Tensor | float] = {
            "anchor_gap": (logp - ref).detach().abs().mean(),
            "target_entropy": -torch.xlogy(q, q).sum(-1).mean(),
        }
        if "rewards" in batch:
            metrics["reward"] = batch["rewards"].mean()
        return Step({"student": loss}, metrics)
