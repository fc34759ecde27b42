"""Pure logit-distillation losses for classifiers: tensors in, tensor out.

Shapes: logits ``[batch, classes]``, targets ``[batch]`` (class ids). Everything is computed in
float32 whatever the input dtype, and stays finite for logits of magnitude 1e4.
Conventions (``docs/conventions.md``): ``temperature`` divides teacher and student logits; KD
losses are summed over classes, averaged over the batch and multiplied by T².
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def standardize(logits: Tensor, eps: float = 1e-7) -> Tensor:
    """Logit standardization (S35, Sun et al. 2024, Eq. 7 / Algorithm 1 ``normalize``).

    ``(z − mean(z)) / (std(z) + eps)`` over the class dimension, with the unbiased std as in the
    official code. Invariant to adding a constant to, or positively scaling, the logits; applied
    to teacher and student before the (base) temperature.
    """
    z = logits.float()
    return (z - z.mean(dim=-1, keepdim=True)) / (z.std(dim=-1, keepdim=True) + eps)


def _prep(logits: Tensor, temperature: float, std: bool) -> Tensor:
    z = standardize(logits) if std else logits.float()
    return z / temperature


def _reduce(per_sample: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_sample.mean() if per_sample.numel() else per_sample.sum()
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "none":
        return per_sample
    raise ValueError(f"reduction must be mean, sum or none, not {reduction!r}")


def kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p ‖ q) per row from log-probabilities, summed over the last dimension ``[..., C] -> [...]``.

    Terms with p = 0 contribute exactly 0 (no 0·log 0 NaNs).
    """
    p = log_p.exp()
    off = p == 0  # fill both logs there, so no -inf reaches the product or its gradient
    return (p * (log_p.masked_fill(off, 0.0) - log_q.masked_fill(off, 0.0))).sum(-1)


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 4.0,
    standardize: bool = False,
    reduction: str = "mean",
) -> Tensor:
    """Hinton et al. 2015 (B1), Eq. 2 of the paper with the gradient-scale fix:
    ``T² · KL(softmax(t/T) ‖ softmax(s/T))``, summed over classes, mean over the batch.

    ``standardize=True`` applies S35's logit standardization to both logits first (then
    ``temperature`` is S35's base temperature). Returns a scalar (or ``[batch]`` for
    ``reduction="none"``); the CE term is the caller's (see ``distill.logits.kd``).
    """
    log_p_t = F.log_softmax(_prep(teacher_logits, temperature, standardize), dim=-1)
    log_p_s = F.log_softmax(_prep(student_logits, temperature, standardize), dim=-1)
    return _reduce(kl_rows(log_p_t, log_p_s), reduction) * temperature**2


def _binary_log_probs(z: Tensor, gt: Tensor) -> Tensor:
    """log [p_target, p_non-target] per row, ``[batch, 2]``, computed without subtracting probs."""
    lse_all = torch.logsumexp(z, dim=-1)
    log_t = z.gather(-1, gt[:, None]).squeeze(-1) - lse_all
    log_nt = torch.logsumexp(z.masked_fill(F.one_hot(gt, z.shape[-1]).bool(), float("-inf")), dim=-1) - lse_all
    return torch.stack([log_t, log_nt], dim=-1)


def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    standardize: bool = False,
    reduction: str = "mean",
) -> Tensor:
    """Decoupled KD (Zhao et al. 2022, B2), Eq. 7: ``alpha · TCKD + beta · NCKD``, each times T².

    TCKD is the KL between the binary (target, all non-targets) distributions of teacher and
    student; NCKD is the KL between their distributions over the non-target classes only (the
    target masked out, as mdistiller's ``logits − 1000·gt_mask`` but with −inf in float32, so it
    cannot overflow in half precision). The warm-up factor is applied by the method, not here.
    """
    zt = _prep(teacher_logits, temperature, standardize)
    zs = _prep(student_logits, temperature, standardize)
    target = target.long()
    tckd = kl_rows(_binary_log_probs(zt, target), _binary_log_probs(zs, target))
    gt_mask = F.one_hot(target, zs.shape[-1]).bool()
    log_nt_t = F.log_softmax(zt.masked_fill(gt_mask, float("-inf")), dim=-1)
    log_nt_s = F.log_softmax(zs.masked_fill(gt_mask, float("-inf")), dim=-1)
    nckd = kl_rows(log_nt_t, log_nt_s)
    return _reduce(alpha * tckd + beta * nckd, reduction) * temperature**2


def soft_cross_entropy(student_logits: Tensor, target_probs: Tensor, reduction: str = "mean") -> Tensor:
    """``−Σ_c q_c · log softmax(s)_c`` against a target distribution ``q`` ``[batch, classes]``."""
    return _reduce(-(target_probs.float() * F.log_softmax(student_logits.float(), dim=-1)).sum(-1), reduction)
