"""``kd``: Hinton et al. 2015 (B1), optionally with logit standardization (S35)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from distill.core.distiller import Distiller, Step
from distill.core.registry import METHODS, Params
from distill.logits.losses import kd_loss


class KDParams(Params):
    temperature: float = Field(4.0, gt=0)
    ce_weight: float = Field(0.1, ge=0, description="weight of CE on labeled samples")
    kd_weight: float = Field(0.9, ge=0)
    standardize: bool = Field(False, description="S35 logit standardization before the temperature")


def labeled_ce(logits: Tensor, batch: dict[str, Tensor]) -> Tensor:
    """CE over the labeled samples of a batch (transfer-set samples carry label -1); 0 if none."""
    mask = batch["y"] >= 0
    if not mask.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[mask].float(), batch["y"][mask])


@METHODS.register("kd", "Hinton KD: T²·KL(teacher ‖ student) at temperature T + CE (B1; S35 option)", KDParams)
class HintonKD(Distiller):
    """``ce_weight · CE(s, y) + kd_weight · T² · KL(softmax(t/T) ‖ softmax(s/T))`` (B1, Eq. 2).

    The KD term covers every sample, the transfer set included; CE only the labeled ones. With
    ``standardize: true`` both logits are z-scored first (S35, Eq. 7), ``temperature`` acting as
    S35's base temperature.
    """

    params: KDParams

    def training_step(self, batch: dict[str, Tensor]) -> Step:
        s = self.student(batch["x"])
        t = self.teacher_logits(batch["x"], batch["index"])
        ce = labeled_ce(s, batch)
        kd = kd_loss(s, t, self.params.temperature, self.params.standardize)
        loss = self.params.ce_weight * ce + self.params.kd_weight * kd
        return Step({"student": loss}, {"ce": ce.detach(), "kd": kd.detach()})


def targets_or_teacher(batch: dict[str, Tensor], teacher_logits: Tensor) -> Tensor:
    """Labels, with the teacher's top-1 class standing in for unlabeled (transfer) samples."""
    return torch.where(batch["y"] >= 0, batch["y"], teacher_logits.argmax(-1))
