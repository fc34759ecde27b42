"""DDK (S48; Liu et al. 2024, "DDK: Distilling Domain Knowledge for Efficient Large Language Models",
arXiv 2407.16154): a data sampler, usable with any language-model method (``train.sampler: {name: ddk}``),
that draws more of the domains where the student trails the teacher most.

With ``ℓ_S[i]``, ``ℓ_T[i]`` the perplexities ``exp(CE)`` of student and teacher on the validation
examples of domain ``i`` (of ``N``):

- Eq. 1, the domain discrepancy factor: ``r[i] = exp(ℓ_S[i]/ℓ_T[i]) / Σ_i' exp(ℓ_S[i']/ℓ_T[i'])``;
  the initial mixture ``r_0`` (Algorithm 1, line 1), from the student before training.
- Eq. 2, factor smooth updating, every ``K`` (``every``) optimizer steps:
  ``ψ_{t+1}[i] = r_t[i] · exp(ℓ^{t+1}_S[i] / ℓ^{t+1}_T[i])``,
  ``r_{t+1}[i] = α · ψ_{t+1}[i] / Σ_i ψ_{t+1}[i] + (1 − α)/N``, ``α`` = ``smoothing`` (0.5 in the paper).
- Sampling (Sec. 3.2, Algorithm 1 line 12): interval ``t``'s ``K`` steps of data are drawn from the
  training set with domain probabilities ``r_t``, cycling through a domain's examples when it runs out
  (``distill.core.sampler.DomainSampler``).

Our conventions: perplexities are token-level (``exp`` of the mean NLL over the domain's supervised
validation tokens; ``distill.lm.metrics.token_metrics``), on at most ``eval_batches`` batches of
``train.batch_size`` per domain (default all of its validation examples); computed in float64, Eq. 2
in log space (``ψ`` overflows ``exp`` for perplexity ratios above ~700). The frozen teacher's
perplexities are computed once. The loss is the method's: DDK's own, Eq. 3 ``CE + γ·KL`` at temperature
``T``, is ``lm_kd`` with ``ce_weight: 1, kd_weight: γ, temperature: T`` (the paper writes
``KL(Softmax(z_S, T), Softmax(z_T, T))``; we read it as the usual forward ``KL(p_T ‖ q_S)``,
``kind: forward_kl``; ``kind: reverse_kl`` is the literal argument order). The weights are logged as ``sampler/weight/<domain>`` and the ratios ``ℓ_S/ℓ_T`` as
``sampler/ppl_ratio/<domain>``; they are checkpointed, so a resumed run draws the same data.

Deviations: the official code is not public. A domain's permutations restart at each interval instead
of continuing where the last interval stopped (so a step's batches depend only on the seed, its
interval and the interval's weights). With several processes each computes the perplexities on the
whole validation split (identical results, repeated work).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from distill.core.recipe import SamplerConfig
from distill.core.sampler import SAMPLERS, DomainSampler, domains_of
from distill.errors import RecipeError
from distill.lm.metrics import token_metrics
from distill.lm.data.task import TokenDataset


def discrepancy_factor(ppl_student: Tensor, ppl_teacher: Tensor) -> Tensor:
    """S48 Eq. 1: ``softmax(ℓ_S / ℓ_T)`` over the ``N`` domains (``[N]`` perplexities in, ``[N]`` float64 out)."""
    return torch.softmax(ppl_student.double() / ppl_teacher.double(), dim=0)


def smooth_update(r: Tensor, ppl_student: Tensor, ppl_teacher: Tensor, alpha: float) -> Tensor:
    """S48 Eq. 2: ``α · ψ / Σψ + (1 − α)/N`` with ``ψ = r · exp(ℓ_S / ℓ_T)`` (normalised in log space)."""
    log_psi = torch.log(r.double()) + ppl_student.double() / ppl_teacher.double()
    return alpha * torch.softmax(log_psi, dim=0) + (1.0 - alpha) / r.numel()


@SAMPLERS.register("ddk", "DDK (S48): domain mixture re-weighted every K steps from the student/teacher "
                   "perplexity ratio per domain, smoothed")
class DDKSampler(DomainSampler):
    """``train.sampler: {name: ddk, every: K, smoothing: α, eval_batches: ...}`` (see the module doc)."""

    def __init__(self, cfg: SamplerConfig, train_set: Any, distiller: nn.Module, seed: int, batch_size: int,
                 grad_accum: int, rank: int = 0, world: int = 1) -> None:
        super().__init__(cfg, train_set, distiller, seed, batch_size, grad_accum, rank, world)
        if getattr(distiller, "teacher", None) is None:
            raise RecipeError("train.sampler 'ddk' compares the student with a live teacher: give 'teacher: "
                              "{recipe|run|model: ...}' (a teacher cache has no perplexities)")
        info = distiller.info
        val = info.val
        vdom, vnames = domains_of(val, "ddk", "validation")
        if vnames != self.names:
            raise RecipeError(f"ddk: validation domains {vnames} differ from the training domains {self.names}")
        limit = None if cfg.eval_batches is None else cfg.eval_batches * batch_size
        self.val_parts: list[TokenDataset] = []
        for d, name in enumerate(self.names):
            idx = torch.nonzero(vdom == d).flatten().tolist()[:limit]
            if not idx:
                raise RecipeError(f"ddk: domain '{name}' has no validation example; raise the task's validation size")
            self.val_parts.append(TokenDataset([val.examples[i] for i in idx], val.pad_id))
        self.vocab = info.num_classes
        self.frozen_teacher = not getattr(distiller, "teacher_trainable", False)
        self._teacher_ppl: Tensor | None = None
        self.weights = None  # r_0 comes from Eq. 1 on the untrained student (update at step 0)

    def initial_weights(self) -> Tensor | None:
        return None

    def perplexities(self, model: nn.Module) -> Tensor:
        """``[N]`` token-level perplexities of ``model`` on each domain's validation examples."""
        return torch.tensor([token_metrics(model, part, None, self.vocab, self.bs)["perplexity"]
                             for part in self.val_parts], dtype=torch.float64)

    def update(self, step: int, student: nn.Module, teacher: nn.Module | None) -> dict[str, float] | None:
        if step % self.cfg.every != 0 or (step == 0 and self.weights is not None):
            return None
        assert teacher is not None
        if self._teacher_ppl is None or not self.frozen_teacher:
            self._teacher_ppl = self.perplexities(teacher)
        ppl_s = self.perplexities(student)
        if self.weights is None:
            r = discrepancy_factor(ppl_s, self._teacher_ppl)
        else:
            r = smooth_update(self.weights, ppl_s, self._teacher_ppl, self.cfg.smoothing)
        self.set_weights(r)
        ratio = ppl_s / self._teacher_ppl
        return {**self.logged(), **{f"ppl_ratio/{n}": float(x) for n, x in zip(self.names, ratio)}}
