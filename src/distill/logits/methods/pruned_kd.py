"""``pruned_kd``: KD on a pruned training set (S27, Ben-Baruch et al., "Distilling the Knowledge in Data Pruning")."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from distill.core.distiller import Distiller, Step, TaskInfo
from distill.core.metrics import predict
from distill.core.registry import METHODS, Params
from distill.logits.losses import kd_loss


class PrunedKDParams(Params):
    fraction: float = Field(0.3, gt=0, le=1, description="f, the kept fraction of the labeled training set")
    selection: Literal["random", "el2n"] = Field(
        "random", description="random subset, or the samples with the largest teacher EL2N score")
    temperature: float = Field(4.0, gt=0)
    kd_weight: float | None = Field(
        None, ge=0, le=1,
        description="α, the KD weight (CE gets 1 − α); null ties it to the fraction (kd_weight_at_full_data)",
    )
    kd_weight_at_full_data: float = Field(
        0.5, ge=0, le=1,
        description="α at f = 1 when tied: α(f) = 1 − (1 − kd_weight_at_full_data)·f, rising to 1 as f → 0",
    )


def kd_weight_for_fraction(fraction: float, kd_weight_at_full_data: float = 0.5) -> float:
    """The KD weight tied to the kept fraction: ``α(f) = 1 − (1 − α₁)·f`` (α₁ = α at f = 1).

    S27 (§ on the KD weight and the pruning factor) finds the best α rising as f falls: about 0.5 on
    the full data, towards 1 for small fractions (their CIFAR-100 sweep spans α ∈ [0.5, 1]); this
    linear rule through those two ends is this library's reading, not a formula quoted from the paper.
    """
    return 1.0 - (1.0 - kd_weight_at_full_data) * fraction


def el2n_scores(teacher_logits: Tensor, labels: Tensor) -> Tensor:
    """EL2N (Paul et al. 2021): ``‖softmax(z) − onehot(y)‖₂`` per sample ``[n]``; large = hard."""
    return (F.softmax(teacher_logits.float(), dim=-1) - F.one_hot(labels.long(), teacher_logits.shape[-1])).norm(dim=-1)


def select_subset(num_train: int, labels: Tensor, fraction: float, scores: Tensor | None = None) -> Tensor:
    """Boolean mask ``[num_train]`` keeping ``round(f · n)`` of the ``n`` labeled samples (at least 1):
    a random subset from the global torch RNG, or the largest ``scores`` (EL2N keeps the hard ones)."""
    labeled = torch.nonzero(labels >= 0).squeeze(-1)
    k = max(1, round(fraction * len(labeled)))
    if scores is None:
        chosen = labeled[torch.randperm(len(labeled))[:k]]
    else:
        chosen = labeled[torch.argsort(scores[labeled], descending=True, stable=True)[:k]]
    mask = torch.zeros(num_train, dtype=torch.bool)
    mask[chosen] = True
    return mask


@METHODS.register(
    "pruned_kd", "KD on a pruned (random or EL2N) subset, KD weight tied to the kept fraction (S27)", PrunedKDParams
)
class PrunedKD(Distiller):
    """``(1 − α) · CE(s, y) + α · T² · KL(softmax(t/T) ‖ softmax(s/T))`` over the kept subset only (S27).

    The subset (``select_subset``) is chosen once at construction from ``info.train`` and kept in
    the buffer ``keep`` keyed by dataset index: a random ``fraction`` of the labeled samples (the
    paper's main finding: with KD, random pruning matches score-based pruning), or the hardest by
    EL2N. Deviation: S27 takes EL2N from briefly trained models (Paul et al.); the frozen teacher's
    EL2N is used here, the only model at hand. α is ``kd_weight``, or tied to the fraction
    (``kd_weight_for_fraction``) when that is null. The teacher is trained on the full data.

    The engine still iterates the whole training set: samples outside the subset are dropped from
    each batch before the forward pass (no compute, zero loss); the loss is the mean over the
    batch's kept samples. So an epoch visits each kept sample once, but a batch holds about
    ``fraction · batch_size`` of them: scale ``train.batch_size`` by 1/fraction to keep the paper's
    batch size. A batch with no kept sample gives a zero loss (its optimizer step changes nothing
    but momentum).
    """

    uses_unlabeled = False
    params: PrunedKDParams

    def __init__(self, student: nn.Module, teacher: nn.Module | None, params: PrunedKDParams, info: TaskInfo) -> None:
        super().__init__(student, teacher, params, info)
        y = info.train.y
        scores = el2n_scores(predict(teacher, info.train.x), y.clamp(min=0)) if params.selection == "el2n" else None
        self.register_buffer("keep", select_subset(len(y), y, params.fraction, scores))
        self.kd_weight = params.kd_weight if params.kd_weight is not None else kd_weight_for_fraction(
            params.fraction, params.kd_weight_at_full_data)

    def training_step(self, batch: dict[str, Tensor]) -> Step:
        keep = self.keep[batch["index"]]
        if not keep.any():  # differentiable zero, so the engine's backward pass still works
            return Step({"student": sum(p.sum() for p in self.student.parameters()) * 0.0}, {"kept": 0.0})
        x, y, index = batch["x"][keep], batch["y"][keep], batch["index"][keep]
        s = self.student(x)
        t = self.teacher_logits(x, index)
        ce = F.cross_entropy(s.float(), y)
        kd = kd_loss(s, t, self.params.temperature)
        loss = (1 - self.kd_weight) * ce + self.kd_weight * kd
        metrics = {"ce": ce.detach(), "kd": kd.detach(), "kept": float(keep.sum()), "kd_weight": self.kd_weight}
        return Step({"student": loss}, metrics)
