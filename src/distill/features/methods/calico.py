"""``calico``: CALICO's region-aware distillation (RAD), region-level contrastive distillation from a
teacher on one modality to a student on another (S55, "CALICO: Self-Supervised Camera-LiDAR Contrastive
Pre-training for BEV Perception", arXiv 2306.00349).

No official code was found (docs/official-code.md) and only the abstract was available: "RAD
effectively achieves contrastive distillation on our self-trained teacher model", the teacher being the
LiDAR backbone (pre-trained by PRC), the student the camera backbone, both in BEV. What follows from the
abstract is the objective's kind (contrastive, between the two modalities' BEV features, region-level);
every concrete choice below is ours and says so.
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from distill.core.distiller import Step, TaskInfo
from distill.core.registry import METHODS, Params
from distill.errors import RecipeError
from distill.features.base import FeatureDistiller
from distill.features.losses import info_nce
from distill.features.tap import FeatureTap, default_layers, feature_shapes
from distill.logits.methods.kd import labeled_ce


# --- pure pieces ---------------------------------------------------------------------------------
def region_features(maps: Tensor, regions: int) -> Tensor:
    """Average-pool BEV maps ``[B, C, H, W]`` over a ``regions``×``regions`` grid -> ``[B, R, C]``
    (R = regions², row-major): the same index is the same place of the scene in either modality."""
    return F.adaptive_avg_pool2d(maps.float(), regions).flatten(2).transpose(1, 2)


def region_infonce(student: Tensor, teacher: Tensor, temperature: float, negatives: str = "all",
                   symmetric: bool = False) -> Tensor:
    """InfoNCE over region embeddings ``[B, R, D]`` (L2-normalised here): for student region (b, r) the
    positive is the teacher's region (b, r), the negatives the teacher's other regions, of every scene in
    the batch (``negatives="all"``) or of the same scene only (``"scene"``)::

        L = −mean_{b,r} log( exp(s_br·t_br / τ) / Σ_{(b',r') ∈ 𝒩(b,r) ∪ {(b,r)}} exp(s_br·t_b'r' / τ) )

    ``symmetric`` adds the teacher → student direction and halves the sum (CLIP-style)."""
    b, r, d = student.shape
    if negatives == "all":
        return info_nce(student.reshape(b * r, d), teacher.reshape(b * r, d), temperature, symmetric)
    if negatives == "scene":
        return info_nce(student, teacher, temperature, symmetric)
    raise ValueError(f"negatives must be all or scene, not {negatives!r}")


class RegionHead(nn.Sequential):
    """Projection head on region features: Linear, ReLU, Linear to ``dim`` (ours: the usual SimCLR head)."""

    def __init__(self, c_in: int, dim: int) -> None:
        super().__init__(nn.Linear(c_in, max(c_in, dim)), nn.ReLU(), nn.Linear(max(c_in, dim), dim))


# --- the method ----------------------------------------------------------------------------------
class CALICOParams(Params):
    student_layer: str | None = Field(None, description="student BEV map layer [B, C, H, W]; default its last feature layer")
    teacher_layer: str | None = Field(None, description="teacher BEV map layer [B, C, H, W]; default its last feature layer")
    regions: int = Field(4, ge=1, description="regions per side: the maps are pooled on a regions×regions grid")
    dim: int = Field(32, ge=1, description="embedding width of the projection heads")
    temperature: float = Field(0.1, gt=0, description="InfoNCE τ")
    negatives: str = Field("all", pattern="^(all|scene)$", description="other regions of every scene in the batch, or of the same scene")
    symmetric: bool = Field(False, description="add the teacher → student direction")
    ce_weight: float = Field(1.0, ge=0, description="CE on labeled samples (ours: fine-tuning folded into the same steps)")
    rad_weight: float = Field(1.0, ge=0, description="weight of the region contrastive loss (all samples, unlabeled included)")


@METHODS.register("calico", "CALICO RAD: region-level InfoNCE between a teacher's BEV features on one modality and the "
                  "student's on another, then the task (S55; abstract only, choices ours)", CALICOParams)
class CALICO(FeatureDistiller):
    """S55 region-aware distillation, as we read the abstract::

        z_T = norm(head_T(pool_R(teacher_map(x_A))))      z_S = norm(head_S(pool_R(student_map(x_B))))
        loss = rad_weight · InfoNCE(z_S, z_T; τ) + ce_weight · CE(student(x_B), y)

    Teacher and student see different modalities of the same scene (on the ``paired`` task: ``bevnet``
    with ``modality: a`` and ``b``); each one's tapped BEV map is average-pooled on a common
    ``regions``×``regions`` grid, so region r is the same place in both; the positive of a student
    region is the teacher's same region, the negatives the teacher's other regions (of the batch, or of
    the scene). The teacher is frozen; both projection heads are trainable projectors (own group, not
    exported). The contrastive term covers every sample, the unlabeled transfer set included (CALICO is
    self-supervised pre-training); CE only the labeled ones.

    Ours (no paper text or code): the regions are a fixed grid, not CALICO's LiDAR-derived regions; the
    heads (2-layer MLPs on both sides), τ, the negatives and the one-sided loss; pre-training and
    fine-tuning folded into one run (``ce_weight``; set it to 0 for pre-training alone); a frozen
    supervised teacher on modality A stands for CALICO's self-trained (PRC) LiDAR teacher.
    """

    params: CALICOParams

    def __init__(self, student: nn.Module, teacher: nn.Module | None, params: CALICOParams, info: TaskInfo) -> None:
        super().__init__(student, teacher, params, info)
        assert teacher is not None
        self.student_layer = params.student_layer or default_layers(student)[-1]
        self.teacher_layer = params.teacher_layer or default_layers(teacher)[-1]
        x = self.example_input()
        s_shape = feature_shapes(student, [self.student_layer], x)[self.student_layer]
        t_shape = feature_shapes(teacher, [self.teacher_layer], x)[self.teacher_layer]
        for role, shape in (("student", s_shape), ("teacher", t_shape)):
            if len(shape) != 3:
                raise RecipeError(f"calico: the {role} layer must give BEV maps [C, H, W], got {list(shape)}")
        self.projectors["student"] = RegionHead(s_shape[0], params.dim)
        self.projectors["teacher"] = RegionHead(t_shape[0], params.dim)

    def rad_loss(self, s_map: Tensor, t_map: Tensor) -> Tensor:
        p = self.params
        z_s = self.projectors["student"](region_features(s_map, p.regions))
        z_t = self.projectors["teacher"](region_features(t_map, p.regions))
        return region_infonce(z_s, z_t, p.temperature, p.negatives, p.symmetric)

    def training_step(self, batch: dict[str, Tensor]) -> Step:
        p, x = self.params, batch["x"]
        t_map = self.teacher_features(FeatureTap(self.teacher, [self.teacher_layer], stop_after=True), x)[self.teacher_layer]
        with FeatureTap(self.student, [self.student_layer]) as tap:
            logits = self.student(x)
            s_map = tap[self.student_layer]
        rad = self.rad_loss(s_map, t_map)
        ce = labeled_ce(logits, batch)
        loss = p.rad_weight * rad + p.ce_weight * ce
        return Step({"student": loss}, {"ce": ce.detach(), "rad": rad.detach()})
