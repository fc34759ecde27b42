"""``detr_train``: a DETR detector on its ground truth alone (no teacher): how detection teachers train,
and the student-alone baseline of the detection methods."""

from __future__ import annotations

from torch import Tensor

from distill.core.distiller import Step
from distill.core.registry import METHODS, Params
from distill.features.detection import DetectionDistiller


@METHODS.register("detr_train", "DETR set loss on the ground truth only (no teacher): detection teachers and baseline",
                  Params)
class DETRTrain(DetectionDistiller):
    """DETR's loss (``features.detection.detr_loss``): Hungarian matching, CE (no-object weight 0.1) +
    5 · L1 + 2 · (1 − GIoU), the box terms divided by the batch's object count."""

    needs_teacher = False

    def training_step(self, batch: dict[str, Tensor]) -> Step:
        det = self.detection_loss(self.student(batch["x"]), batch)
        return Step({"student": det["loss"]}, {k: v.detach() for k, v in det.items() if k != "loss"})
