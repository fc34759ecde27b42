"""``dkd``: Decoupled Knowledge Distillation (Zhao et al. 2022, B2), mdistiller's recipe."""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from distill.core.distiller import Distiller, Step
from distill.core.registry import METHODS, Params
from distill.logits.methods.kd import labeled_ce, targets_or_teacher
from distill.logits.losses import dkd_loss


class DKDParams(Params):
    alpha: float = Field(1.0, ge=0, description="weight of TCKD (the paper's alpha)")
    beta: float = Field(8.0, ge=0, description="weight of NCKD (the paper's beta)")
    temperature: float = Field(4.0, gt=0)
    ce_weight: float = Field(1.0, ge=0)
    warmup_epochs: int = Field(20, ge=0, description="linear warm-up of the DKD term")
    standardize: bool = False


@METHODS.register("dkd", "Decoupled KD: alpha·TCKD + beta·NCKD with linear warm-up (B2; S35 option)", DKDParams)
class DecoupledKD(Distiller):
    """``ce_weight · CE + min(epoch / warmup, 1) · (alpha · TCKD + beta · NCKD)`` (B2, Eq. 7).

    As mdistiller's ``DKD.forward_train``: the warm-up factor uses the 1-based epoch. Unlabeled
    transfer samples have no ground truth; their target class is the teacher's top-1 (a choice of
    this library, needed to decouple target from non-target classes).
    """

    params: DKDParams

    def training_step(self, batch: dict[str, Tensor]) -> Step:
        p = self.params
        s = self.student(batch["x"])
        t = self.teacher_logits(batch["x"], batch["index"])
        ce = labeled_ce(s, batch)
        warm = min((self.epoch + 1) / p.warmup_epochs, 1.0) if p.warmup_epochs else 1.0
        dkd = dkd_loss(s, t, targets_or_teacher(batch, t), p.alpha, p.beta, p.temperature, p.standardize)
        loss = p.ce_weight * ce + warm * dkd
        return Step({"student": loss}, {"ce": ce.detach(), "dkd": dkd.detach(), "warmup": warm})
