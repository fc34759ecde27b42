"""``detr_kd``: plain output distillation for DETR students, the detection methods' KD baseline.

Ours, kept simple (no paper of its own; in the spirit of DETRDistill's Hungarian-matching logit
distillation, Chang et al. 2023): the teacher's ``Q_t`` predictions are the targets; the student's
queries are matched one-to-one to them with DETR's matcher (``hungarian_match``, the teacher's top class
over all C + 1 as label, its box as box), then

    loss = det_weight · DETR(student, ground truth)
           + kd_weight · [ T² · KL(p_t/T ‖ p_s/T) over matched pairs (mean)
                           + Σ_pairs w · (5 · L1 + 2 · (1 − GIoU)) / Σ w ],   w = 1 − p_t(no object)

so the boxes of queries the teacher calls background carry no weight. No features, no ground-truth
queries: what ``clock`` adds on top is exactly its memory and target-aware-query terms.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from distill.core.distiller import Step
from distill.core.registry import METHODS, Params
from distill.features.detection import DetectionDistiller, box_distill_loss, hungarian_match
from distill.logits.losses import kd_loss


def matched_output_kd(s_logits: Tensor, s_boxes: Tensor, t_logits: Tensor, t_boxes: Tensor, temperature: float,
                      bbox_weight: float = 5.0, giou_weight: float = 2.0) -> tuple[Tensor, Tensor]:
    """(class KD, box KD) of student queries Hungarian-matched to the teacher's predictions (see module)."""
    match = hungarian_match(s_logits, s_boxes, t_logits.argmax(-1), t_boxes)
    q = torch.cat([q for q, _ in match])
    o = torch.cat([o for _, o in match])
    b = torch.cat([torch.full_like(qq, i) for i, (qq, _) in enumerate(match)])
    cls = kd_loss(s_logits[b, q], t_logits[b, o], temperature)
    fg = 1 - t_logits[b, o].float().softmax(-1)[:, -1]
    box = box_distill_loss(s_boxes[b, q], t_boxes[b, o], fg, bbox_weight, giou_weight)
    return cls, box


class DETRKDParams(Params):
    temperature: float = Field(1.0, gt=0, description="divides both logits; T² scales the class KL")
    det_weight: float = Field(1.0, ge=0, description="weight of the DETR loss on the ground truth")
    kd_weight: float = Field(1.0, ge=0, description="weight of the matched-output distillation (class + boxes)")


@METHODS.register("detr_kd", "DETR output KD: student queries Hungarian-matched to the teacher's predictions (baseline)",
                  DETRKDParams)
class DETRKD(DetectionDistiller):
    params: DETRKDParams

    def training_step(self, batch: dict[str, Tensor]) -> Step:
        p = self.params
        s = self.student(batch["x"])
        t = self.teacher_outputs(batch["x"])
        det = self.detection_loss(s, batch)
        cls, box = matched_output_kd(s["logits"], s["boxes"], t["logits"], t["boxes"], p.temperature)
        loss = p.det_weight * det["loss"] + p.kd_weight * (cls + box)
        return Step({"student": loss}, {"det": det["loss"].detach(), "kd_cls": cls.detach(), "kd_box": box.detach()})
