"""``ofa``: One-for-All KD (S40, OFA-KD) for heterogeneous teacher/student pairs.

Official code: Hao840/OFAKD, ``distillers/ofa.py :: ofa_loss, OFA.__init__, OFA.forward``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from distill.core.distiller import Step, TaskInfo
from distill.core.registry import METHODS, Params
from distill.errors import RecipeError
from distill.features.base import FeatureDistiller
from distill.features.tap import FeatureTap, default_layers, feature_shapes
from distill.logits.methods.kd import labeled_ce, targets_or_teacher


def ofa_loss(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, eps: float,
             temperature: float = 1.0) -> Tensor:
    """S40's adaptive target enhancement, the official ``ofa_loss`` (the formula is the code's; the
    paper's equation number is not cited: only its abstract is in the seed listing):
    ``mean_n Σ_c −[(p_t + 1_y)^eps − 1_y]_c · log p_s,c`` at temperature ``temperature`` (no T²).

    For the target class the weight is ``(1 + p_t,y)^eps − 1``, for the others ``p_t,c^eps``: eps > 1
    shrinks the non-target mass and enlarges the target's as the teacher grows sure; eps = 1 is the
    cross-entropy to the teacher (KD at T = 1, no T²). ``target`` holds class indices. Ours: log_softmax instead of
    the official log(softmax) (equal where the latter is finite).
    """
    p_t = F.softmax(teacher_logits.float() / temperature, dim=-1)
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    mask = F.one_hot(target, p_t.shape[-1]).to(p_t.dtype)
    weight = (p_t + mask) ** eps - mask
    return (-(weight * log_p_s).sum(-1)).mean()


class SepConv(nn.Sequential):
    """The official ``SepConv``: depthwise 3×3 (stride 2) + pointwise, BN, ReLU, then depthwise 3×3 +
    pointwise to ``c_out``, BN, ReLU; halves the map."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_in, 3, 2, 1, groups=c_in, bias=False), nn.Conv2d(c_in, c_in, 1, bias=False),
            nn.BatchNorm2d(c_in), nn.ReLU(),
            nn.Conv2d(c_in, c_in, 3, 1, 1, groups=c_in, bias=False), nn.Conv2d(c_in, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out), nn.ReLU())


class _ClsToken(nn.Module):
    """The official ``TokenFilter(1, remove_mode=False)`` + ``Flatten``: the [CLS] token's state."""

    def forward(self, x: Tensor) -> Tensor:
        return x[:, 0]


class _Blocks(nn.Module):
    """Pre-norm transformer blocks (timm's ``Block``, mlp ratio 4) on ``[B, T, D]`` tokens."""

    def __init__(self, dim: int, depth: int, heads: int) -> None:
        super().__init__()
        heads = heads if dim % heads == 0 else 1
        self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu",
                                                               batch_first=True, norm_first=True)
                                    for _ in range(depth))

    def forward(self, x: Tensor) -> Tensor:
        for b in self.blocks:
            x = b(x)
        return x


def stage_branch(shape: tuple[int, ...], stages_left: int, feat_s: int, feat_t: int, num_classes: int,
                 heads: int = 4) -> nn.Module:
    """The official stage projector (``OFA.__init__``) from a student feature of per-sample ``shape``
    into logit space; ``stages_left`` = stages after this one (the official ``4 - stage``).

    - map ``(C, H, W)`` (CNN student): ``stages_left`` SepConvs doubling channels, the last to
      ``max(feat_s, feat_t)`` (a 1×1 conv when none are left), global average pool, Linear;
    - tokens ``(T, D)`` with [CLS] first (ViT student): ``max(stages_left, 1)`` transformer blocks
      (4 heads), the [CLS] token, Linear. No patch merging: the official merges down to a 7×7 grid
      and small grids (≤ 7×7, ours) get none;
    - vector ``(D,)`` (our staged MLP, no official counterpart, ours): Linear to ``max(feat_s, feat_t)``,
      GELU, Linear.
    """
    width = max(feat_s, feat_t)
    if len(shape) == 3:
        c, blocks = shape[0], []
        for i in range(stages_left):
            out = width if i == stages_left - 1 else c * 2
            blocks.append(SepConv(c, out))
            c *= 2
        body = blocks or [nn.Conv2d(c, width, 1)]
        return nn.Sequential(*body, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))
    if len(shape) == 2:
        return nn.Sequential(_Blocks(shape[-1], max(stages_left, 1), heads), _ClsToken(),
                             nn.Linear(shape[-1], num_classes))
    if len(shape) == 1:
        return nn.Sequential(nn.Linear(shape[0], width), nn.GELU(), nn.Linear(width, num_classes))
    raise RecipeError(f"ofa: no stage branch for student features of shape {shape} (maps (C, H, W), tokens (T, D) or vectors (D,))")


def _init_branch(m: nn.Module) -> None:
    """The official ``init_weights``: Kaiming-normal (fan out) convolutions, truncated-normal (std 0.02)
    Linear weights, zero biases (batch norm keeps its default ones/zeros)."""
    if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class OFAParams(Params):
    stages: list[int] | None = Field(None, description="student stages (indices into its feature layers) that get a branch; default all")
    layers: list[str] | None = Field(None, description="student layer names instead of stages (e.g. vit.layers.0)")
    eps: float = Field(1.0, gt=0, description="target-enhancement exponent (official: 1.0 CIFAR, 1.5 ImageNet CNN)")
    temperature: float = Field(1.0, gt=0)
    ce_weight: float = Field(1.0, ge=0, description="official gt_loss_weight")
    kd_weight: float = Field(1.0, ge=0, description="official kd_loss_weight: OFA loss on the final logits")
    ofa_weight: float = Field(1.0, ge=0, description="official ofa_loss_weight: sum of the stage-branch OFA losses")


@METHODS.register("ofa", "OFA-KD: stage branches into logit space + adaptive target enhancement (S40), CNN↔ViT↔MLP", OFAParams)
class OFA(FeatureDistiller):
    """S40 OFA-KD, the official ``OFA.forward``::

        loss = ce_weight · CE(s, y) + kd_weight · ofa(s, t, y, eps)
               + ofa_weight · Σ_stages ofa(branch_i(feature_i), t, y, eps)

    ``ofa`` is ``ofa_loss``; each branch (``stage_branch``) maps an intermediate student stage
    into logit space, so the teacher's logits, the one space every architecture shares, supervise the
    student's early stages whatever their shapes. Only the teacher's logits are used (a
    cached teacher works). Branches live in ``self.projectors`` (own parameter group, checkpointed,
    not exported). Ours: one eps for every stage; unlabeled transfer samples (label -1) take the
    teacher's top-1 class as ``y`` in the OFA terms and are left out of CE; the branch shapes for small
    inputs (no patch merging, MLP branches) as ``stage_branch`` says.
    """

    params: OFAParams

    def __init__(self, student: nn.Module, teacher: nn.Module | None, params: OFAParams, info: TaskInfo) -> None:
        super().__init__(student, teacher, params, info)
        all_layers = default_layers(student)
        if params.layers is not None:
            self.layers = list(params.layers)
        elif params.stages is not None:
            bad = [i for i in params.stages if not -len(all_layers) <= i < len(all_layers)]
            if bad:
                raise RecipeError(f"ofa: stages {bad} out of range; the student has {len(all_layers)} ({', '.join(all_layers)})")
            self.layers = [all_layers[i] for i in params.stages]
        else:
            self.layers = all_layers
        shapes = feature_shapes(student, self.layers, self.example_input())
        feat_s = student.head.in_features if isinstance(getattr(student, "head", None), nn.Linear) else info.num_classes
        feat_t = teacher.head.in_features if isinstance(getattr(teacher, "head", None), nn.Linear) else feat_s
        depth = {name: i for i, name in enumerate(all_layers)}
        for name in self.layers:
            left = len(all_layers) - 1 - depth.get(name, len(all_layers) - 1)
            branch = stage_branch(shapes[name], left, feat_s, feat_t, info.num_classes)
            branch.apply(_init_branch)
            self.projectors[name.replace(".", "__")] = branch

    def training_step(self, batch: dict[str, Tensor]) -> Step:
        p = self.params
        with FeatureTap(self.student, self.layers) as tap:  # attached per step: the exported student carries no hooks
            s = self.student(batch["x"])
            feats = tap.features()
        t = self.teacher_logits(batch["x"], batch["index"])
        y = targets_or_teacher(batch, t)
        ce = labeled_ce(s, batch)
        kd = ofa_loss(s, t, y, p.eps, p.temperature)
        stage = [ofa_loss(self.projector(name)(f), t, y, p.eps, p.temperature) for name, f in zip(self.layers, feats)]
        ofa = torch.stack(stage).sum()
        loss = p.ce_weight * ce + p.kd_weight * kd + p.ofa_weight * ofa
        metrics = {"ce": ce.detach(), "kd": kd.detach(), "ofa": ofa.detach()}
        metrics |= {f"ofa_stage{i}": v.detach() for i, v in enumerate(stage)}
        return Step({"student": loss}, metrics)
