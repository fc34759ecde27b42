"""``clock``: CLoCKDistill (S39), consistent location-and-context-aware distillation for DETRs.

No official code was available to us (official-code.md: none; a repository named after the WACV 2026
version could not be fetched here), and only the abstract and the section titles of arXiv 2502.10683
were readable, so the equations below are ours, built on what the abstract states:

1. **Location-and-context-aware memory distillation** (Sec. 3.1): distil the transformer *encoder output*
   (the memory ``A ∈ R^{H×W×D}``, global context) rather than backbone features, "enriched with object
   location details" from the ground truth so the student prioritises object regions. Ours: the
   ground-truth mask and scale normalisation of FGD (Yang et al. 2022, the feature loss this line of
   detector KD builds on), without FGD's teacher-attention and global terms::

       L_mem = (1/B) Σ_b Σ_ij [ α · M_ij · S_ij + β · (1 − M_ij) · S_ij ] · ‖A^t_ij − f(A^s_ij)‖²

   ``M_ij`` = 1 when memory cell ij overlaps a ground-truth box; ``S_ij`` = 1 / (cells of the smallest box
   covering ij) in the foreground and 1 / (background cells) elsewhere; ``f`` a linear projector D_s→D_t
   (``features.projectors``, own parameter group), the sum over channels. ``location_masks`` and
   ``memory_distill_loss``.
2. **Target-aware consistent logit distillation** (Sec. 3.2): queries built from the ground truth are fed
   to *both* decoders, so teacher and student attend to the same, correct places and their outputs pair up
   one to one without matching on the teacher's (possibly wrong) predictions. Ours: our DETR's queries are
   anchor boxes (DAB-DETR, the paper's single-scale model), so a target-aware query is an object's
   ground-truth box as anchor with zero content, decoded by each model in a pass of its own (padding slots
   masked out of self-attention, no noise added to the boxes)::

       L_query = T² · KL(p_t/T ‖ p_s/T) + (5 · L1 + 2 · (1 − GIoU))(b_s, b_t)     (means over objects)

   ``target_query_loss``.

Total: ``det_weight · DETR(student, ground truth) + memory_weight · L_mem + query_weight · L_query``.
Memory distillation needs teacher and student memories on the same grid (same input, same stride).
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import Tensor, nn

from distill.core.distiller import Step, TaskInfo
from distill.core.registry import METHODS, Params
from distill.errors import MismatchError
from distill.features.detection import DETR, DetectionDistiller, box_distill_loss, box_xyxy
from distill.logits.losses import kd_loss


def location_masks(boxes: Tensor, labels: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """``(M, S)`` of ``[B, H·W]`` (row-major cells): M = 1 on cells overlapping a ground-truth box; S =
    1 / (cell count of the smallest such box) there, 1 / (background cell count) elsewhere. Cell ``(i, j)``
    covers ``[j/W, (j+1)/W) × [i/H, (i+1)/H)``; a box covers columns ``floor(x0·W) .. ceil(x1·W) − 1``."""
    h, w = grid
    n = len(boxes)
    area = torch.full((n, h, w), math.inf, device=boxes.device)
    xyxy = box_xyxy(boxes.float())
    for b in range(n):
        for k in (labels[b] >= 0).nonzero().flatten().tolist():
            x0, y0, x1, y1 = xyxy[b, k].tolist()
            c0, r0 = max(math.floor(x0 * w), 0), max(math.floor(y0 * h), 0)
            c1, r1 = min(max(math.ceil(x1 * w), c0 + 1), w), min(max(math.ceil(y1 * h), r0 + 1), h)
            cells = float((c1 - c0) * (r1 - r0))
            area[b, r0:r1, c0:c1] = area[b, r0:r1, c0:c1].clamp(max=cells)
    fg = torch.isfinite(area).flatten(1)
    scale = torch.where(fg, 1.0 / area.flatten(1), 0.0)
    bg_count = (~fg).sum(1, keepdim=True).clamp(min=1).float()
    scale = torch.where(fg, scale, 1.0 / bg_count)
    return fg.float(), scale


def memory_distill_loss(student_mem: Tensor, teacher_mem: Tensor, fg: Tensor, scale: Tensor, alpha: float,
                        beta: float) -> Tensor:
    """``L_mem`` of the module docstring: memories ``[B, H·W, D]`` (the student's already projected),
    masks ``[B, H·W]`` from ``location_masks``; summed over cells and channels, mean over the batch."""
    sq = (teacher_mem.float() - student_mem.float()).pow(2).sum(-1)
    weight = (alpha * fg + beta * (1 - fg)) * scale
    return (weight * sq).sum() / len(sq)


def target_query_loss(s_logits: Tensor, s_boxes: Tensor, t_logits: Tensor, t_boxes: Tensor, valid: Tensor,
                      temperature: float, bbox_weight: float = 5.0, giou_weight: float = 2.0) -> tuple[Tensor, Tensor]:
    """(class, box) parts of ``L_query``: outputs ``[B, M, ·]`` of the target-aware queries of both
    decoders, paired slot by slot (no matching); ``valid [B, M]`` the real objects."""
    cls = kd_loss(s_logits[valid], t_logits[valid], temperature)
    box = box_distill_loss(s_boxes[valid], t_boxes[valid], None, bbox_weight, giou_weight)
    return cls, box


def target_queries(boxes: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Anchors ``[B, M, 4]`` from the ground-truth boxes (padding slots get a dummy box) and the padding mask."""
    pad = labels < 0
    dummy = boxes.new_tensor([0.5, 0.5, 0.1, 0.1])
    return torch.where(pad[..., None], dummy, boxes.float()), pad


class CLoCKParams(Params):
    det_weight: float = Field(1.0, ge=0, description="weight of the student's DETR loss on the ground truth")
    memory_weight: float = Field(0.02, ge=0, description="weight of L_mem (ours: post-LayerNorm memories make L_mem "
                                 "about 2·D per object at the start, 0.02 brings it to the DETR loss's scale)")
    alpha: float = Field(1.0, ge=0, description="foreground (inside ground-truth boxes) weight in L_mem (FGD's α)")
    beta: float = Field(0.5, ge=0, description="background weight in L_mem (FGD's β)")
    query_weight: float = Field(1.0, ge=0, description="weight of the target-aware-query logit distillation L_query")
    temperature: float = Field(1.0, gt=0, description="divides both decoders' class logits in L_query; T² scales it")


@METHODS.register("clock", "CLoCKDistill (S39): GT-masked encoder-memory distillation + target-aware (GT box) queries "
                  "through both DETR decoders", CLoCKParams)
class CLoCK(DetectionDistiller):
    params: CLoCKParams

    def __init__(self, student: nn.Module, teacher: nn.Module | None, params: CLoCKParams, info: TaskInfo) -> None:
        super().__init__(student, teacher, params, info)
        for who, m in (("student", student), ("teacher", teacher)):
            if not isinstance(m, DETR):
                raise MismatchError(f"clock: the {who} must be a detr detector (encode/decode), got {type(m).__name__}")
        if student.grid != teacher.grid:
            raise MismatchError(f"clock: student memory grid {student.grid} differs from the teacher's {teacher.grid}")
        cells = student.grid[0] * student.grid[1]
        self.add_projector("memory", "linear", (cells, student.width), (cells, teacher.width))

    def training_step(self, batch: dict[str, Tensor]) -> Step:
        p = self.params
        x, boxes, labels = batch["x"], batch["boxes"], batch["labels"]
        anchors, pad = target_queries(boxes, labels)
        mem_s, pos_s = self.student.encode(x)
        s = self.student.decode(mem_s, pos_s, torch.sigmoid(self.student.anchors).expand(len(x), -1, -1))
        det = self.detr_terms(s, batch)
        with torch.inference_mode():
            mem_t, pos_t = self.teacher.encode(x)
            tq_logits, tq_boxes = self.teacher.decode(mem_t, pos_t, anchors, pad)
        mem_t, tq_logits, tq_boxes = mem_t.clone(), tq_logits.clone(), tq_boxes.clone()
        sq_logits, sq_boxes = self.student.decode(mem_s, pos_s, anchors, pad)
        fg, scale = location_masks(boxes, labels, self.student.grid)
        mem = memory_distill_loss(self.projector("memory")(mem_s), mem_t, fg, scale, p.alpha, p.beta)
        cls, box = target_query_loss(sq_logits, sq_boxes, tq_logits, tq_boxes, ~pad, p.temperature)
        loss = p.det_weight * det["loss"] + p.memory_weight * mem + p.query_weight * (cls + box)
        return Step({"student": loss}, {"det": det["loss"].detach(), "memory": mem.detach(),
                                        "query_cls": cls.detach(), "query_box": box.detach()})

    def detr_terms(self, out: tuple[Tensor, Tensor], batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return self.detection_loss({"logits": out[0], "boxes": out[1]}, batch)
