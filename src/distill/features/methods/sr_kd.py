"""Super-resolution training: ``sr_train`` (IMDN's own objective, S34) and ``sr_kd`` (a teacher SR
network distilled into a small student, e.g. IMDN; issue 13's setting, ours).

IMDN (S34) is an architecture paper: its "information multi-distillation" is the channel split inside
each block (``distill.features.sr.IMDModule``), not a teacher. Its official training
(Zheng222/IMDN ``train_IMDN.py :: train``) is a plain L1 loss to the HR image, Adam at 2e-4, the lr
halved every 200 epochs, random flips and 90° rotations (``data/common.py :: augment``); ``sr_train``
is that objective. ``sr_kd`` adds a teacher: an L1 term to the teacher's SR output and optionally an
L1 feature hint (1×1-conv projected student blocks to teacher blocks); neither is in S34, both are
ours (the output term is the usual SR-KD baseline).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from distill.core.distiller import Distiller, Step, TaskInfo
from distill.core.registry import METHODS, Params
from distill.errors import RecipeError
from distill.features.base import FeatureDistiller
from distill.features.losses import hint_loss
from distill.features.tap import FeatureTap, default_layers


def sr_l1(sr: Tensor, target: Tensor) -> Tensor:
    """The official ``nn.L1Loss()``: mean absolute error over every pixel of the batch, float32."""
    return (sr.float() - target.float()).abs().mean()


def feature_l1(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean absolute error between two feature maps of one shape (the L1 twin of ``hint_loss``)."""
    if student.shape != teacher.shape:
        raise ValueError(f"feature_l1: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ")
    return (student.float() - teacher.float()).abs().mean()


def dihedral(x: Tensor, k: Tensor) -> Tensor:
    """Per-sample transform ``k ∈ 0..7`` of ``[B, C, H, W]`` square images: bit 0 a horizontal flip,
    bit 1 a vertical flip, bit 2 a transpose, applied in that order (the official ``augment``)."""
    outs = []
    for code in range(8):
        y = x
        if code & 1:
            y = y.flip(-1)
        if code & 2:
            y = y.flip(-2)
        if code & 4:
            y = y.transpose(-1, -2)
        outs.append(y)
    return torch.stack(outs)[k.to(x.device), torch.arange(len(x), device=x.device)]


def augmented(batch: dict[str, Tensor], augment: bool) -> tuple[Tensor, Tensor, bool]:
    """``(lr, hr, changed)``: one random dihedral transform per sample, the same for LR and HR (bicubic
    and area downsampling commute with flips and transposes), drawn from the seeded torch RNG."""
    if not augment:
        return batch["x"], batch["hr"], False
    k = torch.randint(0, 8, (len(batch["x"]),))
    return dihedral(batch["x"], k), dihedral(batch["hr"], k), True


class SRTrainParams(Params):
    augment: bool = Field(True, description="random flips and 90° rotations per sample (official augment)")


@METHODS.register("sr_train", "super-resolution training alone: L1 to the HR image (IMDN's objective, S34)", SRTrainParams)
class SRTrain(Distiller):
    """The official ``train_IMDN.py`` objective: ``L1(student(lr), hr)``, no teacher."""

    needs_teacher = False
    uses_unlabeled = False
    params: SRTrainParams

    def training_step(self, batch: dict[str, Tensor]) -> Step:
        lr, hr, _ = augmented(batch, self.params.augment)
        loss = sr_l1(self.student(lr), hr)
        return Step({"student": loss}, {"l1_hr": loss.detach()})


class SRKDParams(Params):
    augment: bool = Field(True, description="random flips and 90° rotations per sample (official augment)")
    sr_weight: float = Field(1.0, ge=0, description="weight of L1 to the HR image (the official loss)")
    kd_weight: float = Field(1.0, ge=0, description="weight of L1 to the teacher's SR output (ours)")
    hint_weight: float = Field(0.0, ge=0, description="weight of the feature hint (ours); 0: output KD only")
    student_layers: list[str] | None = Field(None, description="student layers for the hint (default: its blocks)")
    teacher_layers: list[str] | None = Field(
        None, description="teacher layers paired with them (default: evenly spaced blocks, the last to the last)")
    hint: Literal["l1", "l2"] = Field("l1", description="hint distance: L1 (SR's pixel loss) or FitNets' squared error")
    projector: str = Field("conv1x1", description="student -> teacher feature projector (features/projectors.py)")


def paired_layers(student: list[str], teacher: list[str]) -> list[str]:
    """For each of ``len(student)`` student blocks, the teacher block at the same relative depth:
    teacher ``ceil((i + 1) · T / S) − 1`` (so the last student block meets the last teacher block)."""
    s, t = len(student), len(teacher)
    return [teacher[-(-(i + 1) * t // s) - 1] for i in range(s)]


@METHODS.register("sr_kd", "SR distillation: L1 to HR + L1 to the teacher's SR output (+ optional feature hint)", SRKDParams)
class SRKD(FeatureDistiller):
    """``loss = sr_weight · L1(s, hr) + kd_weight · L1(s, t) + hint_weight · mean_l d(P_l(f_s,l), f_t,l)``

    ``s``, ``t``: student and teacher SR outputs of the same (augmented) LR batch; ``f_s,l``, ``f_t,l``
    paired student / teacher block outputs (LR resolution); ``P_l`` a 1×1 conv projector (own
    parameter group, not exported); ``d`` the mean L1 (``hint: l1``) or squared error (``l2``,
    ``features.losses.hint_loss``). The first term is S34's official loss; the teacher terms are ours.
    With ``augment: false`` and no hint the teacher's outputs are computed once (``train.cache_teacher``).
    """

    uses_unlabeled = False
    params: SRKDParams

    def __init__(self, student: nn.Module, teacher: nn.Module | None, params: SRKDParams, info: TaskInfo) -> None:
        super().__init__(student, teacher, params, info)
        if teacher is None:
            raise RecipeError("sr_kd needs a teacher; for the student alone use method sr_train")
        self.s_layers: list[str] = []
        self.t_layers: list[str] = []
        if params.hint_weight > 0:
            self.s_layers = list(params.student_layers or default_layers(student))
            t_all = default_layers(teacher)
            self.t_layers = list(params.teacher_layers or paired_layers(self.s_layers, t_all))
            if len(self.t_layers) != len(self.s_layers):
                raise RecipeError(f"sr_kd: {len(self.s_layers)} student_layers but {len(self.t_layers)} teacher_layers")
            self.pair_projectors(params.projector, self.s_layers, self.t_layers)

    def training_step(self, batch: dict[str, Tensor]) -> Step:
        p = self.params
        lr, hr, changed = augmented(batch, p.augment)
        if not self.s_layers:
            s = self.student(lr)
            t = self.teacher_logits(lr, None if changed else batch["index"])  # cached when not augmented
            hint = torch.zeros((), device=s.device)
        else:
            with FeatureTap(self.student, self.s_layers) as tap:  # attached per step: the export carries no hooks
                s = self.student(lr)
                f_s = tap.features()
            t_tap = FeatureTap(self.teacher, self.t_layers)
            with torch.inference_mode():
                t = t_tap.run(self.teacher, lr)
            t, f_t = t.clone(), [t_tap[n].clone() for n in self.t_layers]  # normal tensors outside inference mode
            dist = feature_l1 if p.hint == "l1" else hint_loss
            hint = torch.stack([dist(self.projector(n)(f), g) for n, f, g in zip(self.s_layers, f_s, f_t)]).mean()
        l1_hr, l1_t = sr_l1(s, hr), sr_l1(s, t)  # t: a fixed target, computed without gradient
        loss = p.sr_weight * l1_hr + p.kd_weight * l1_t + p.hint_weight * hint
        return Step({"student": loss}, {"l1_hr": l1_hr.detach(), "l1_teacher": l1_t.detach(), "hint": hint.detach()})
