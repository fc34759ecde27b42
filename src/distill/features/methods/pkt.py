"""``pkt``: probabilistic knowledge transfer (Passalis & Tefas 2018, "Learning Deep Representations
with Probabilistic Knowledge Transfer").

Official code: passalis/probabilistic_kt ``nn/pkt.py :: cosine_similarity_loss``, as copied in
RepDistiller ``distiller_zoo/PKT.py :: PKT`` (``--distill pkt -a 0 -b 30000``, on ``feat[-1]``).
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from distill.core.distiller import Step
from distill.core.registry import METHODS
from distill.features.losses import pkt_loss
from distill.features.classic import ClassicDistiller, ClassicParams


class PKTParams(ClassicParams):
    pkt_weight: float = Field(30000.0, ge=0, description="β of the PKT term (RepDistiller -b 30000)")


@METHODS.register("pkt", "probabilistic KT: KL between cosine-kernel densities of the batch embeddings (Passalis2018)", PKTParams)
class PKT(ClassicDistiller):
    """Probabilistic knowledge transfer (Passalis & Tefas 2018, §3)::

        loss = ce_weight·CE + kd_weight·KD + pkt_weight · KL(P_T ‖ Q_S)

    ``P``/``Q`` are the conditional densities ``p_{i|j}`` of the batch under the cosine-similarity kernel
    ``(cos + 1) / 2`` of the teacher's and the student's penultimate embeddings (``pkt_loss``, the authors'
    ``cosine_similarity_loss``: diagonal kept, KL averaged over the ``b²`` entries, hence β 30000).
    Widths may differ: no projector.
    """

    layer_pick = None
    params: PKTParams

    def training_step(self, batch: dict[str, Tensor]) -> Step:
        s, t = self.forwards(batch["x"])
        pkt = pkt_loss(s.embed, t.embed)
        return self.step(s, t, batch, self.params.pkt_weight * pkt, {"pkt": pkt})
