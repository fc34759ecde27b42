"""``sp``: similarity-preserving KD (Tung & Mori 2019, "Similarity-Preserving Knowledge Distillation").

Official code: none public from the authors; RepDistiller ``distiller_zoo/SP.py :: Similarity``
("verified by original author"; ``--distill similarity -a 0 -b 3000``, layer ``feat[-2]``).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from distill.core.distiller import Step
from distill.core.registry import METHODS
from distill.features.losses import sp_loss
from distill.features.classic import ClassicDistiller, LayerParams


class SPParams(LayerParams):
    sp_weight: float = Field(3000.0, ge=0, description="γ of the similarity loss (paper's CIFAR-10 and RepDistiller: 3000)")


@METHODS.register("sp", "similarity-preserving KD: row-normalised batch Gram matrices, γ 3000 (Tung2019)", SPParams)
class SP(ClassicDistiller):
    """Similarity-preserving KD (Tung & Mori 2019, Eq. 1-4)::

        loss = ce_weight·CE + kd_weight·KD + sp_weight · Σ_pairs ‖G̃_T − G̃_S‖²_F / b²

    ``G̃ = row_normalise(Q Qᵀ)`` of the flattened activations ``Q`` (``similarity_matrix``): which
    samples of the batch the teacher finds alike, a ``[b, b]`` matrix whatever the widths. Default
    layer: the last feature layer (RepDistiller's ``feat[-2]``, the last block before pooling).
    """

    layer_pick = "last"
    params: SPParams

    def training_step(self, batch: dict[str, Tensor]) -> Step:
        s, t = self.forwards(batch["x"])
        sp = torch.stack([sp_loss(fs, ft) for fs, ft in zip(s.feats, t.feats)]).sum()
        return self.step(s, t, batch, self.params.sp_weight * sp, {"sp": sp})
