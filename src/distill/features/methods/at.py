"""``at``: attention transfer (Zagoruyko & Komodakis 2017, "Paying More Attention to Attention").

Official code: szagoruyko/attention-transfer ``utils.py :: at, at_loss``; RepDistiller
``distiller_zoo/AT.py :: Attention`` (``--distill attention -a 0 -b 1000``, layers ``feat[1:-1]``).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from distill.core.distiller import Step
from distill.core.registry import METHODS
from distill.features.losses import at_loss, match_spatial
from distill.features.classic import ClassicDistiller, LayerParams


class ATParams(LayerParams):
    at_weight: float = Field(1000.0, ge=0, description="β of the summed attention losses (paper and RepDistiller: 1000)")
    p: float = Field(2.0, gt=0, description="exponent of the attention map F_sum^p (paper: 2)")


@METHODS.register("at", "attention transfer: normalised spatial attention maps, p = 2, several layer pairs (Zagoruyko2017)", ATParams)
class AT(ClassicDistiller):
    """Attention transfer (Zagoruyko & Komodakis 2017, §3.1, Eq. 2)::

        loss = ce_weight·CE + kd_weight·KD + at_weight · Σ_pairs mean((Q_S/‖Q_S‖₂ − Q_T/‖Q_T‖₂)²)

    ``Q = Σ_c |A_c|^p`` flattened (``attention_map``), one term per (student, teacher) layer pair
    (default: every feature layer, RepDistiller's ``feat[1:-1]``), the larger map average-pooled to the
    smaller's size first (RepDistiller ``at_loss``). Channels may differ: no projector. β = 1000 and the
    plain sum over pairs are RepDistiller's (the paper writes β/2 with β = 1000, a factor 2).
    """

    maps = True  # a ViT's tokens become [B, D, h, w] maps (classic.tokens_to_map)
    params: ATParams

    def training_step(self, batch: dict[str, Tensor]) -> Step:
        s, t = self.forwards(batch["x"])
        terms = [at_loss(*match_spatial(fs, ft), p=self.params.p) for fs, ft in zip(s.feats, t.feats)]
        at = torch.stack(terms).sum()
        return self.step(s, t, batch, self.params.at_weight * at, {"at": at})
