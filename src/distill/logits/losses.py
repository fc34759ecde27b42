"""Pure logit-distillation losses for classifiers: tensors in, tensor out.

Shapes: logits ``[batch, classes]``, targets ``[batch]`` (class ids). Everything is computed in
float32 whatever the input dtype, and stays finite for logits of magnitude 1e4.
Conventions (``docs/conventions.md``): ``temperature`` divides teacher and student logits; KD
losses are summed over classes, averaged over the batch and multiplied by T².
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.core.functional import kl_rows  # noqa: F401  (re-exported: part of this module's API)


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
    ``reduction="none"``); the CE term is the caller's (see ``distill.logits.methods.kd``).
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


def teacher_optimal_permutation(teacher_logits: Tensor, target: Tensor) -> Tensor:
    """PLD's π* (S11, §4.1): the true label first, then the other classes by descending teacher
    logit (ties in class-index order). ``[batch, classes]`` of class ids."""
    order = teacher_logits.float().argsort(dim=-1, descending=True, stable=True)
    positions = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, positions)  # rank[c] = place of class c
    rank = rank.scatter(-1, target.long()[:, None], -1)  # the label outranks every class
    return rank.argsort(dim=-1)


def pld_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    teacher_temperature: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    """Plackett–Luce Distillation (S11, Bassam et al. 2025, Eq. of §4.2; Appendix C ``plackett_luce_loss``).

    ``L = Σ_k α_k · (log Σ_{l≥k} exp(s_{π*_l}) − s_{π*_k})`` with π* the teacher-optimal
    permutation (``teacher_optimal_permutation``) and ``α_k = softmax(t / teacher_temperature)_{π*_k}``.
    The student's logits are not tempered (the paper's "unsoftened" PL likelihood); the k = 1 term
    is ``α_1 · CE(s, y)``, so there is no separate CE term. Summed over ranked positions, mean over
    the batch. Ties among teacher logits are ranked in class-index order (the official code's
    ``torch.sort`` leaves their order unspecified).
    """
    s = student_logits.float()
    perm = teacher_optimal_permutation(teacher_logits, target)
    s_perm = s.gather(-1, perm)
    tail_lse = torch.logcumsumexp(s_perm.flip(-1), dim=-1).flip(-1)  # log Σ_{l≥k} exp(s_{π*_l})
    weights = F.softmax(teacher_logits.float() / teacher_temperature, dim=-1).gather(-1, perm)
    return _reduce((weights * (tail_lse - s_perm)).sum(-1), reduction)


def taid_loss(student_logits: Tensor, teacher_logits: Tensor, t: float | Tensor, reduction: str = "mean") -> Tensor:
    """TAID (S60, Shing et al. 2025, the interpolated target p_t of §3; official SakanaAI/TAID
    ``src/distil_losses/taid.py``, ``TAID.compute_loss``), in the official cross-entropy form:

    ``−Σ_c p_t,c · log softmax(s)_c`` with the interpolated target
    ``p_t = softmax((1 − t) · sg(s) + t · z_teacher)``, summed over classes, mean over the batch.
    Its gradient equals that of ``KL(p_t ‖ softmax(s))`` (the target is detached); at ``t = 1`` it
    is forward KL to the teacher plus the teacher's entropy. No temperature, as the official code.
    The whole target is detached (the official teacher is frozen, so this changes nothing there).
    """
    s = student_logits.float()
    target = F.softmax((1 - t) * s.detach() + t * teacher_logits.detach().float(), dim=-1)
    return soft_cross_entropy(s, target, reduction)


FirstScaling = Literal["probs", "logprobs"]
StudentNorm = Literal["topk", "full"]


def first_normalize(topk_logprobs: Tensor, temperature: float = 1.0, scaling: FirstScaling = "probs") -> Tensor:
    """FIRST's normalisation of top-k entries (S03; official SHUMKASHUN/FIRST ``distill.py`` l. 279-281,
    ``normalization`` with ``use_norm="softmax"``): log-probs ``[..., k]`` from top-k log-probs ``[..., k]``.

    ``scaling="probs"``: ``log softmax(exp(ℓ) / temperature)``, the official softmax over the top-k
    *probabilities* (the official data path feeds probabilities, ``teacher_top_prob``);
    ``scaling="logprobs"``: ``log softmax(ℓ / temperature)``, i.e. tempering and renormalising over the
    top k (what the official code computes if it is fed the log-probs its own ``generate.py`` stores).
    In float32 (float64 stays float64). A row of −inf (a position a cache lookup leaves unfilled,
    never read by the losses) gives a uniform row instead of nan.
    """
    if not temperature > 0:
        raise ValueError(f"calibration_temperature must be positive, not {temperature}")
    if scaling not in ("probs", "logprobs"):
        raise ValueError(f"scaling must be 'probs' or 'logprobs', not {scaling!r}")
    lp = topk_logprobs.to(torch.promote_types(topk_logprobs.dtype, torch.float32))
    x = lp.exp() if scaling == "probs" else lp.masked_fill(torch.isneginf(lp).all(-1, keepdim=True), 0.0)
    return F.log_softmax(x / temperature, dim=-1)


def first_student_logprobs(
    student_logits: Tensor, ids: Tensor, student_norm: StudentNorm = "topk", scaling: FirstScaling = "probs"
) -> Tensor:
    """The student's side of FIRST at the teacher's top-k ids ``[..., k]`` from logits ``[..., C]``.

    ``student_norm="topk"`` (official, ``distill.py`` l. 268-271 and 292): the student's full softmax
    gathered at the ids, then normalised over them as the teacher is (``first_normalize`` at the
    official ``--student_temp`` default 1): with ``scaling="probs"`` a softmax of its top-k
    probabilities, with ``"logprobs"`` its log-probs minus their logsumexp over the k.
    ``student_norm="full"`` (ours): the full log-softmax gathered at the ids, unnormalised, so student
    mass outside the top k is penalised (the sparse-teacher convention of ``docs/conventions.md``).
    """
    log_q = F.log_softmax(student_logits.to(torch.promote_types(student_logits.dtype, torch.float32)), dim=-1)
    log_q = log_q.gather(-1, ids.long())
    if student_norm == "full":
        return log_q
    if student_norm == "topk":
        return first_normalize(log_q, 1.0, scaling)
    raise ValueError(f"student_norm must be 'topk' or 'full', not {student_norm!r}")


def first_divergence(
    student_logits: Tensor,
    ids: Tensor,
    target_logprobs: Tensor,
    student_norm: StudentNorm = "topk",
    scaling: FirstScaling = "probs",
) -> Tensor:
    """FIRST's per-row forward KL ``Σ_j q_T,j · (log q_T,j − log q_S,j)`` over the k ids (official
    ``F.kl_div(s, t, log_target=True)``, ``distill.py`` l. 310/318), shared by the classifier ``first``
    and ``lm_first``: ``student_logits [..., C]``, ``ids``/``target_logprobs [..., k]`` (the calibrated
    target as log-probs, detached here), ``q_S`` from ``first_student_logprobs``. Returns ``[...]``."""
    return kl_rows(target_logprobs.detach(), first_student_logprobs(student_logits, ids, student_norm, scaling))


def _first_target_logprobs(teacher_logits: Tensor, top_k: int, calibration_temperature: float) -> tuple[Tensor, Tensor]:
    top_lp, idx = F.log_softmax(teacher_logits.float(), dim=-1).topk(top_k, dim=-1)
    return first_normalize(top_lp, calibration_temperature, "probs"), idx


def first_targets(
    teacher_logits: Tensor, top_k: int = 5, calibration_temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """FIRST's calibrated "concentrated knowledge" (S03, Shum et al. 2024, trustworthy maximization;
    official SHUMKASHUN/FIRST ``distill.py``, ``use_norm="softmax"``): the teacher's top-k probabilities
    ``p = topk(softmax(t))`` re-normalised by a softmax at the calibration temperature,
    ``softmax(p / calibration_temperature)`` (the softmax acts on probabilities, not logits, as the
    official code's ``normalization``; ``first_normalize``). The tail beyond the top k is dropped.
    Returns the target ``[batch, k]`` and the class ids ``[batch, k]`` (descending teacher probability).
    """
    log_target, idx = _first_target_logprobs(teacher_logits, top_k, calibration_temperature)
    return log_target.exp(), idx


def first_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    top_k: int = 5,
    calibration_temperature: float = 1.0,
    student_norm: StudentNorm = "topk",
    reduction: str = "mean",
) -> Tensor:
    """FIRST (S03): ``KL(q_T ‖ q_S)`` over the teacher's top-k classes (``first_divergence``), with
    ``q_T`` from ``first_targets`` and ``q_S`` the student normalised over the same k classes
    (``student_norm="topk"``, official: a softmax of its top-k probabilities) or its full-class
    log-softmax gathered there (``"full"``, ours). Summed over the k classes, mean over the batch;
    no T² (the student is not tempered, as the official ``--student_temp 1``).
    """
    log_target, idx = _first_target_logprobs(teacher_logits, top_k, calibration_temperature)
    return _reduce(first_divergence(student_logits, idx, log_target, student_norm, "probs"), reduction)


def ferkd_regions(
    teacher_logits: Tensor, target: Tensor, discard_below: float = 0.1, soft_above: float = 0.5
) -> Tensor:
    """FerKD's regions of augmented views (S13, "hard regions mining"), from the teacher's
    probability of the target class ``c = softmax(t)_y`` (temperature 1): 0 = hard negative
    (``c < discard_below``: dropped), 1 = hard positive (``discard_below ≤ c < soft_above``: a
    smoothed hard label), 2 = easy positive (``c ≥ soft_above``: the teacher's soft label). ``[batch]``.
    """
    conf = F.softmax(teacher_logits.float(), dim=-1).gather(-1, target.long()[:, None]).squeeze(-1)
    return (conf >= discard_below).long() + (conf >= soft_above).long()


def ferkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    discard_below: float = 0.1,
    soft_above: float = 0.5,
    smoothing: float = 0.1,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    """FerKD's calibrated soft/hard label loss on augmented views (S13, Shen 2023; the objective of
    FKD's ``Soft_CrossEntropy`` in the official szq0214/FKD code, with FerKD's region calibration).

    Per view, by ``ferkd_regions``: easy positives ``T² · (−Σ softmax(t/T) · log softmax(s/T))``
    (FKD's soft cross-entropy; FKD and FerKD use T = 1); hard positives ``−Σ q · log softmax(s)``
    with the smoothed label ``q = (1 − smoothing) · onehot(y) + smoothing / C``; hard negatives 0.
    ``reduction="mean"`` averages over the views that are not dropped (dropped views are simply
    absent from FerKD's training set); 0 when all are dropped. ``"none"`` gives ``[batch]``.
    """
    region = ferkd_regions(teacher_logits, target, discard_below, soft_above)
    n_cls = student_logits.shape[-1]
    smooth = F.one_hot(target.long(), n_cls).float() * (1 - smoothing) + smoothing / n_cls
    hard = soft_cross_entropy(student_logits, smooth, reduction="none")
    soft_t = F.softmax(teacher_logits.float() / temperature, dim=-1)
    soft = soft_cross_entropy(student_logits.float() / temperature, soft_t, reduction="none") * temperature**2
    per = torch.where(region == 2, soft, torch.where(region == 1, hard, torch.zeros_like(hard)))
    if reduction == "mean":
        return per.sum() / (region > 0).sum().clamp(min=1)
    return _reduce(per, reduction)


def fusion_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    ratio: Tensor,
    temperature: float = 4.0,
    reduction: str = "mean",
) -> Tensor:
    """Sample-wise knowledge fusion (S08 TGeo-KD, Hu et al. 2024: KD and CE fused per sample):
    ``α_i · T² · KL(softmax(t_i/T) ‖ softmax(s_i/T)) + (1 − α_i) · CE(s_i, y_i)``.

    ``ratio`` is α ``[batch]`` in [0, 1]. Samples without a label (``target`` −1, the transfer set)
    have no CE term and take the KD term alone (α_i = 1), whatever ``ratio`` says there.
    """
    kd = kd_loss(student_logits, teacher_logits, temperature, reduction="none")
    labeled = target >= 0
    ce = F.cross_entropy(student_logits.float(), target.long().clamp(min=0), reduction="none") * labeled
    alpha = torch.where(labeled, ratio.float(), torch.ones_like(kd))
    return _reduce(alpha * kd + (1 - alpha) * ce, reduction)


def self_distill_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    label_weight: float,
    loss: str = "mse",
    reduction: str = "mean",
) -> Tensor:
    """Self-distillation with weighted ground truth (S09, Borup & Andersen 2021; official
    ``self_distiller.py``): the student's probabilities fitted to ``q = ξ·onehot(y) + (1 − ξ)·softmax(t)``.

    ``loss="mse"``: ``Σ_c (softmax(s)_c − q_c)²``, which equals the official
    ``ξ·MSE(softmax(s), y) + (1 − ξ)·MSE(softmax(s), softmax(t))`` up to a term without the student
    (same gradients); ``loss="ce"``: ``−Σ_c q_c · log softmax(s)_c``. Summed over classes, mean over
    the batch (the official ``F.mse_loss`` also averages over classes: a factor 1/C). No temperature,
    as the official code. ``label_weight`` ξ = 1 is training on labels alone, 0 pure self-distillation.
    """
    q = label_weight * F.one_hot(target.long(), student_logits.shape[-1]).float()
    q = q + (1 - label_weight) * F.softmax(teacher_logits.float(), dim=-1)
    if loss == "ce":
        return soft_cross_entropy(student_logits, q, reduction)
    if loss == "mse":
        return _reduce((F.softmax(student_logits.float(), dim=-1) - q).square().sum(-1), reduction)
    raise ValueError(f"loss must be mse or ce, not {loss!r}")


def anchored_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    previous_logits: Tensor | None,
    anchor_weight: float,
    temperature: float = 4.0,
    reduction: str = "mean",
) -> Tensor:
    """KD towards an anchored meta-teacher (S38, recursive meta-distillation):
    ``T² · KL(q ‖ softmax(s/T))`` with the probability-domain mixture
    ``q = λ·softmax(t/T) + (1 − λ)·softmax(p/T)`` of the base teacher ``t`` and the previous
    generation's student ``p`` (``λ = anchor_weight``). With ``previous_logits=None`` (the first
    generation) or λ = 1 it is ``kd_loss``. Summed over classes, mean over the batch. ``log q`` is
    a log-sum-exp of the two tempered log-softmaxes, so it stays finite for huge logits.
    """
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if previous_logits is None or anchor_weight >= 1:
        log_q = log_t
    else:
        log_p = F.log_softmax(previous_logits.float() / temperature, dim=-1)
        w = torch.tensor(anchor_weight, dtype=torch.float32, device=log_t.device)
        log_q = torch.logaddexp(log_t + w.log(), log_p + torch.log1p(-w))  # λ = 0: log w = −inf, q = p
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return _reduce(kl_rows(log_q, log_s), reduction) * temperature**2
