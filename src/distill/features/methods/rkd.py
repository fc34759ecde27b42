"""``rkd``: relational KD (Park et al. 2019, "Relational Knowledge Distillation").

Official code: lenscloth/RKD ``metric/loss.py :: RkdDistance, RKdAngle``; RepDistiller
``distiller_zoo/RKD.py :: RKDLoss`` (``w_d = 25``, ``w_a = 50``; ``--distill rkd -a 0 -b 1`` on ``feat[-1]``).
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from distill.core.distiller import Step
from distill.core.registry import METHODS
from distill.features.losses import rkd_angle_loss, rkd_distance_loss
from distill.features.classic import ClassicDistiller, ClassicParams


class RKDParams(ClassicParams):
    distance_weight: float = Field(25.0, ge=0, description="λ_D of the distance-wise term (paper and RepDistiller: 25)")
    angle_weight: float = Field(50.0, ge=0, description="λ_A of the angle-wise term (paper and RepDistiller: 50)")


@METHODS.register("rkd", "relational KD: distance-wise (25) and angle-wise (50) Huber terms on batch embeddings (Park2019)", RKDParams)
class RKD(ClassicDistiller):
    """Relational KD (Park et al. 2019, Eq. 3-6)::

        loss = ce_weight·CE + kd_weight·KD + distance_weight·L_RKD-D + angle_weight·L_RKD-A

    on the penultimate embeddings: ``L_RKD-D`` compares the batch's pairwise distances, each divided by
    the batch's mean distance (``rkd_distance_loss``), ``L_RKD-A`` the cosines of the angles of every
    triple (``rkd_angle_loss``), both with the Huber loss (δ = 1). Relations only: widths may differ.
    """

    layer_pick = None
    params: RKDParams

    def training_step(self, batch: dict[str, Tensor]) -> Step:
        s, t = self.forwards(batch["x"])
        dist, angle = rkd_distance_loss(s.embed, t.embed), rkd_angle_loss(s.embed, t.embed)
        p = self.params
        return self.step(s, t, batch, p.distance_weight * dist + p.angle_weight * angle,
                         {"rkd_distance": dist, "rkd_angle": angle})
