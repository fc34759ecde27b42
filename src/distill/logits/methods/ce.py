"""``ce``: plain cross-entropy on the labeled data, no teacher. The baseline, and how teachers train."""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from distill.core.distiller import Distiller, Step
from distill.core.registry import METHODS, Params


class CEParams(Params):
    label_smoothing: float = Field(0.0, ge=0, lt=1)


@METHODS.register("ce", "cross-entropy on labels only (no teacher): baseline and teacher training", CEParams)
class CrossEntropy(Distiller):
    needs_teacher = False
    uses_unlabeled = False
    params: CEParams

    def training_step(self, batch: dict[str, Tensor]) -> Step:
        logits = self.student(batch["x"])
        loss = F.cross_entropy(logits.float(), batch["y"], label_smoothing=self.params.label_smoothing)
        return Step({"student": loss}, {"ce": loss.detach()})
