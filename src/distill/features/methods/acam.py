"""``acam``: ACAM-KD, adaptive and cooperative attention masking for feature distillation (S53).

No official code (arXiv 2503.06307). Only the abstract is in the seed listing; the structure below
follows it and public summaries of the paper (the teacher gives the queries and the student the keys
and values of a cross-attention; spatial and channel masks come from the fused features through small
learnable selection units with a sigmoid; the masked feature losses are normalised by the masks' sums
and averaged over M masks; a diversity loss keeps the masks apart). Every unknown detail is ours and
says so.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from distill.core.distiller import Step, TaskInfo
from distill.core.registry import METHODS, Params
from distill.errors import RecipeError
from distill.features.base import FeatureDistiller
from distill.features.tap import FeatureTap, default_layers, feature_shapes
from distill.logits.methods.kd import labeled_ce


# --- pure pieces ---------------------------------------------------------------------------------
def cross_attention_fusion(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """STCA-FF's fusion: ``softmax(Q^T K / √d) V`` over the positions of ``[n, C, H, W]`` maps (queries
    from the teacher, keys and values from the student): each teacher position gathers the student's
    features where they match it. Returns ``[n, C_v, H, W]``."""
    n, d = q.shape[:2]
    qf, kf, vf = q.flatten(2), k.flatten(2), v.flatten(2)  # [n, C, HW]
    attn = torch.softmax(qf.transpose(1, 2) @ kf / math.sqrt(d), dim=-1)  # [n, HW_q, HW_k]
    return (vf @ attn.transpose(1, 2)).view(n, vf.shape[1], *q.shape[2:])


def masked_feature_losses(student: Tensor, teacher: Tensor, spatial: Tensor, channel: Tensor,
                          eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """ASCM's masked distillation terms for ``[n, C, H, W]`` features, spatial masks ``[n, M, H, W]`` and
    channel masks ``[n, M, C]`` (values in (0, 1)), the teacher detached::

        L_s = 1/M Σ_m  Σ_{c,h,w} S_m[h,w] (T − S)²[c,h,w] / (C · Σ_{h,w} S_m[h,w])
        L_c = 1/M Σ_m  Σ_{c,h,w} C_m[c]   (T − S)²[c,h,w] / (H·W · Σ_c C_m[c])

    each averaged over the batch: a mask-weighted mean squared error, so the masks choose *where* the
    error counts, not how much (their scale cancels)."""
    err = (teacher.detach().float() - student.float()) ** 2  # [n, C, H, W]
    c, hw = err.shape[1], err.shape[2] * err.shape[3]
    per_pos = err.sum(1).flatten(1)  # [n, HW]
    per_chan = err.flatten(2).sum(-1)  # [n, C]
    s = spatial.float().flatten(2)  # [n, M, HW]
    ch = channel.float()  # [n, M, C]
    l_s = (s * per_pos[:, None]).sum(-1) / (c * s.sum(-1) + eps)  # eps: saturated sigmoids may sum to 0
    l_c = (ch * per_chan[:, None]).sum(-1) / (hw * ch.sum(-1) + eps)
    return l_s.mean(), l_c.mean()


def dice_diversity(masks: Tensor) -> Tensor:
    """Mean pairwise Dice coefficient ``2 Σ a·b / (Σ a² + Σ b²)`` between the M masks of each sample
    (``[n, M, ...]``), averaged over pairs and samples: 0 when the masks are disjoint, 1 when equal.
    Minimised, it keeps the masks different (ours: the Dice form of MasKD's diversity loss)."""
    m = masks.float().flatten(2)
    pairs = list(itertools.combinations(range(m.shape[1]), 2))
    if not pairs:
        return m.sum() * 0.0
    dice = [2 * (m[:, i] * m[:, j]).sum(-1) / ((m[:, i] ** 2).sum(-1) + (m[:, j] ** 2).sum(-1) + 1e-8) for i, j in pairs]
    return torch.stack(dice).mean()


class _ReverseGrad(torch.autograd.Function):
    """Identity forward; the gradient negated backward (the mask units ascend what the student descends)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return -grad


def reverse_grad(x: Tensor) -> Tensor:
    return _ReverseGrad.apply(x)


# --- modules -------------------------------------------------------------------------------------
class ACAMModule(nn.Module):
    """One distilled layer: ``align`` (1×1 conv, student → teacher channels, then the teacher's spatial
    size), STCA-FF (1×1-conv query from the teacher, key and value from the aligned student) and ASCM
    (spatial masks: a 1×1 conv of the fused map to M channels; channel masks: global average pool, then
    Linear → ReLU → Linear to M·C; both through a sigmoid). Ours: the widths (key/query ``C/2``, the
    channel unit's hidden ``C``), no residual in the fusion."""

    def __init__(self, c_s: int, c_t: int, size: tuple[int, int], num_masks: int) -> None:
        super().__init__()
        d = max(c_t // 2, 1)
        self.size, self.m = size, num_masks
        self.align = nn.Conv2d(c_s, c_t, 1)
        self.q, self.k, self.v = nn.Conv2d(c_t, d, 1), nn.Conv2d(c_t, d, 1), nn.Conv2d(c_t, c_t, 1)
        self.spatial = nn.Conv2d(c_t, num_masks, 1)
        self.channel = nn.Sequential(nn.Linear(c_t, c_t), nn.ReLU(), nn.Linear(c_t, num_masks * c_t))

    def aligned(self, s: Tensor) -> Tensor:
        y = self.align(s)
        return y if tuple(y.shape[2:]) == self.size else F.adaptive_avg_pool2d(y, self.size)

    def forward(self, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(aligned student, spatial masks [n, M, H, W], channel masks [n, M, C])``."""
        a = self.aligned(s)
        ad = a.detach()  # the masks read the student (forward) but train only their own units
        fused = cross_attention_fusion(self.q(t), self.k(ad), self.v(ad))
        spatial = torch.sigmoid(self.spatial(fused))
        channel = torch.sigmoid(self.channel(fused.mean((2, 3)))).view(s.shape[0], self.m, -1)
        return a, spatial, channel


# --- the method ----------------------------------------------------------------------------------
class ACAMParams(Params):
    student_layers: list[str] | None = Field(None, description="student layers distilled (2-D maps); default its last feature layer")
    teacher_layers: list[str] | None = Field(None, description="teacher layers, paired one to one; default its last feature layer")
    num_masks: int = Field(4, ge=1, description="M, masks per kind (ours)")
    distill_weight: float = Field(1.0, ge=0, description="weight of L_s + L_c")
    diversity_weight: float = Field(1.0, ge=0, description="weight of the Dice diversity of the spatial and channel masks")
    ce_weight: float = Field(1.0, ge=0, description="the task loss (CE on the labels)")
    mask_objective: str = Field("max", pattern="^(min|max)$",
                                description="how the mask units learn from L_s + L_c (ours): max = ascend it (they seek where the student lags), min = descend it with the student")


@METHODS.register("acam", "ACAM-KD: teacher-query / student-key cross-attention fusion + adaptive spatial & channel masks on CNN features (S53)", ACAMParams)
class ACAM(FeatureDistiller):
    """S53 ACAM-KD on 2-D feature maps::

        a, S, C = ACAM(student_l(x), teacher_l(x))     # STCA-FF + ASCM, per distilled layer
        loss = ce_weight · CE(s, y) + Σ_layers distill_weight · (L_s + L_c)(a, teacher_l, S, C)
               + diversity_weight · (dice(S) + dice(C))

    ``masked_feature_losses`` gives ``L_s, L_c``, ``dice_diversity`` the diversity term. The masks are
    recomputed every step from both models' current features, so what is distilled follows the
    student as it learns (the paper's "adaptive and cooperative"). The fusion and mask units are
    projectors (own group, checkpointed, not exported).

    Ours (the abstract does not say how the selection units learn): with ``mask_objective: max``
    (default) the units *ascend* ``L_s + L_c`` (a gradient reversal on the masks) while the student
    descends it, so the masks seek the positions and channels where the student lags the teacher
    most, and the diversity term (descended) spreads the M masks over different ones; ``min``
    descends it jointly, which lets the normalised masks settle on positions the student already
    matches (on digits they collapsed there: spatial loss ~1e-14). The student's features enter the
    fusion detached: they steer the masks (forward) but learn only from the masked error. The
    feature scale is raw (no normalisation), so ``distill_weight`` is small (0.003 on digits).
    """

    params: ACAMParams

    def __init__(self, student: nn.Module, teacher: nn.Module | None, params: ACAMParams, info: TaskInfo) -> None:
        super().__init__(student, teacher, params, info)
        assert teacher is not None
        self.s_layers = params.student_layers or default_layers(student)[-1:]
        self.t_layers = params.teacher_layers or default_layers(teacher)[-1:]
        if len(self.s_layers) != len(self.t_layers):
            raise RecipeError(f"acam: student_layers {self.s_layers} and teacher_layers {self.t_layers} must pair one to one")
        x = self.example_input()
        s_shapes, t_shapes = feature_shapes(student, self.s_layers, x), feature_shapes(teacher, self.t_layers, x)
        for s, t in zip(self.s_layers, self.t_layers):
            if len(s_shapes[s]) != 3 or len(t_shapes[t]) != 3:
                raise RecipeError(f"acam: needs 2-D feature maps (C, H, W); student '{s}' gives {s_shapes[s]}, teacher '{t}' gives {t_shapes[t]}")
            self.projectors[s.replace(".", "__")] = ACAMModule(s_shapes[s][0], t_shapes[t][0], t_shapes[t][1:], params.num_masks)

    def training_step(self, batch: dict[str, Tensor]) -> Step:
        p, x = self.params, batch["x"]
        t_feats = self.teacher_features(FeatureTap(self.teacher, self.t_layers, stop_after=True), x)
        with FeatureTap(self.student, self.s_layers) as tap:
            logits = self.student(x)
            s_feats = tap.features()
        l_s = l_c = div = logits.sum() * 0.0
        for name, f, t in zip(self.s_layers, s_feats, self.t_layers):
            a, spatial, channel = self.projector(name)(f, t_feats[t])
            ws, wc = (reverse_grad(spatial), reverse_grad(channel)) if p.mask_objective == "max" else (spatial, channel)
            ls, lc = masked_feature_losses(a, t_feats[t], ws, wc)
            l_s, l_c = l_s + ls, l_c + lc
            div = div + dice_diversity(spatial) + dice_diversity(channel)
        ce = labeled_ce(logits, batch)
        loss = p.ce_weight * ce + p.distill_weight * (l_s + l_c) + p.diversity_weight * div
        return Step({"student": loss}, {"ce": ce.detach(), "spatial": l_s.detach(), "channel": l_c.detach(),
                                        "diversity": div.detach()})
