"""``reviewkd``: knowledge review (Chen, Liu, Zhao & Jia 2021, "Distilling Knowledge via Knowledge Review").

Official code: dvlab-research/ReviewKD; mdistiller ``distillers/ReviewKD.py :: ReviewKD, ABF, hcl_loss``
(``CE_WEIGHT 1``, ``REVIEWKD_WEIGHT 1`` (5 for resnet32x4 → resnet8x4), ``WARMUP_EPOCHS 20`` of 240,
``MAX_MID_CHANNEL 512``, pyramid levels 4, 2, 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from distill.core.distiller import Step, TaskInfo
from distill.core.registry import METHODS
from distill.errors import RecipeError
from distill.features.losses import hcl_loss
from distill.features.classic import ClassicDistiller, LayerParams


class ABF(nn.Module):
    """Attention-based fusion (the official ``ABF``), 1-D or 2-D: a 1×1 conv + BN brings the student's
    stage to ``mid`` channels; with ``fuse``, the residual from the deeper stage (upsampled, nearest) and
    it are mixed by two spatial attention maps (1×1 conv on their concatenation, sigmoid); the result,
    resized (nearest) to the teacher stage's size, is the next residual, and a 3×3 conv + BN of it is
    this stage's output, compared with the teacher's stage."""

    def __init__(self, c_in: int, c_mid: int, c_out: int, fuse: bool, rank: int) -> None:
        super().__init__()
        conv, bn = (nn.Conv1d, nn.BatchNorm1d) if rank == 1 else (nn.Conv2d, nn.BatchNorm2d)
        self.conv1 = nn.Sequential(conv(c_in, c_mid, 1, bias=False), bn(c_mid))
        self.conv2 = nn.Sequential(conv(c_mid, c_out, 3, padding=1, bias=False), bn(c_out))
        self.att_conv = nn.Sequential(conv(2 * c_mid, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: Tensor, residual: Tensor | None, out_size: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        x = self.conv1(x)
        if self.att_conv is not None:
            assert residual is not None
            residual = F.interpolate(residual, size=tuple(x.shape[2:]), mode="nearest")
            z = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * z[:, :1] + residual * z[:, 1:2]
        if tuple(x.shape[2:]) != tuple(out_size):
            x = F.interpolate(x, size=tuple(out_size), mode="nearest")
        return self.conv2(x), x


def pooled(f: Tensor) -> Tensor:
    """The global average of a map, kept as a ``1`` (``1×1``) map: ReviewKD's last level."""
    return f.mean(dim=tuple(range(2, f.dim())), keepdim=True)


class ReviewKDParams(LayerParams):
    review_weight: float = Field(1.0, ge=0, description="weight of the HCL sum (mdistiller REVIEWKD_WEIGHT: 1; 5 for resnet32x4 → resnet8x4)")
    warmup_epochs: int = Field(20, ge=0, description="linear warm-up of the review term, min((epoch + 1) / warmup, 1) (mdistiller: 20 of 240 epochs)")
    levels: list[int] = Field([4, 2, 1], description="HCL pyramid levels (official: 4, 2, 1)")
    max_mid_channels: int = Field(512, ge=1, description="ABF width: min(this, the student's deepest channels)")


@METHODS.register("reviewkd", "knowledge review: ABF fusion across stages + hierarchical context loss (Chen2021)", ReviewKDParams)
class ReviewKD(ClassicDistiller):
    """Knowledge review (Chen et al. 2021, §3.2-3.3)::

        loss = ce_weight·CE + kd_weight·KD + review_weight · min((epoch+1)/warmup, 1) · Σ_i HCL(F_i, T_i)

    Levels ``i``: the paired feature layers (default every one) plus a last pooled level (the global
    average of the deepest tapped map, as the models' ``pooled_feat``). From the deepest level up, each
    student stage is fused with the residual of the deeper ones by an ``ABF`` (review: a shallow teacher
    stage is learned from the student's deeper stages too); ``F_i`` is the ABF output at the teacher
    stage's size and channels, ``HCL`` the hierarchical context loss (``hcl_loss``, pyramid 4, 2, 1).
    Ours: teacher features are the tapped outputs (post-activation for our CNNs; the official taps
    the teacher pre-activation), and the pooled level is computed from the deepest tapped map.
    """

    maps = True  # a ViT's tokens become [B, D, h, w] maps (classic.tokens_to_map)
    params: ReviewKDParams

    def __init__(self, student: nn.Module, teacher: nn.Module | None, params: ReviewKDParams, info: TaskInfo) -> None:
        super().__init__(student, teacher, params, info)
        ranks = {len(s) for s, t in self.shapes} | {len(t) for s, t in self.shapes}
        if len(ranks) != 1 or ranks.pop() not in (2, 3):
            raise RecipeError(f"reviewkd: student and teacher layers must all be 1-D or all 2-D maps, got {self.shapes}")
        rank = len(self.shapes[0][0]) - 1
        s_ch = [s[0] for s, _ in self.shapes] + [self.shapes[-1][0][0]]
        t_ch = [t[0] for _, t in self.shapes] + [self.shapes[-1][1][0]]
        self.out_sizes = [tuple(t[1:]) for _, t in self.shapes] + [(1,) * rank]
        mid = min(params.max_mid_channels, s_ch[-1])
        # abfs[i] serves level i (shallow to deep); the deepest (pooled) level fuses nothing
        self.projectors["abfs"] = nn.ModuleList(ABF(c, mid, o, i < len(s_ch) - 1, rank) for i, (c, o) in enumerate(zip(s_ch, t_ch)))

    def review(self, s_levels: list[Tensor]) -> list[Tensor]:
        """The ABF outputs, shallow to deep, from the student's levels (deepest processed first)."""
        abfs = self.projectors["abfs"]
        out, residual = [], None
        for i in reversed(range(len(s_levels))):
            y, residual = abfs[i](s_levels[i], residual, self.out_sizes[i])
            out.insert(0, y)
        return out

    def training_step(self, batch: dict[str, Tensor]) -> Step:
        p = self.params
        s, t = self.forwards(batch["x"])
        results = self.review(s.feats + [pooled(s.feats[-1])])
        t_levels = t.feats + [pooled(t.feats[-1])]
        hcl = torch.stack([hcl_loss(f, g, tuple(p.levels)) for f, g in zip(results, t_levels)]).sum()
        warm = min((self.epoch + 1) / p.warmup_epochs, 1.0) if p.warmup_epochs else 1.0
        return self.step(s, t, batch, p.review_weight * warm * hcl, {"review": hcl, "warmup": warm})
