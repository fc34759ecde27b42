"""``pld``: Plackett–Luce Distillation (Bassam, Zhu and Bian 2025, S11)."""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from distill.core.distiller import Distiller, Step
from distill.core.registry import METHODS, Params
from distill.logits.methods.kd import targets_or_teacher
from distill.logits.losses import pld_loss


class PLDParams(Params):
    teacher_temperature: float = Field(
        1.0, gt=0, description="τ_T of the teacher softmax that weights the ranked positions (S11 Table 6: best at 1)"
    )


@METHODS.register(
    "pld",
    "Plackett–Luce list-wise KD: teacher-optimal ranking, teacher-confidence weights, no CE term (S11)",
    PLDParams,
)
class PlackettLuceKD(Distiller):
    """The PLD loss alone (S11, §4.2; ``distill.logits.losses.pld_loss``): the ranking target is the
    label first, then the other classes by descending teacher logit, each position weighted by the
    teacher's softmax probability of its class. There is no separate CE term (the first position is
    the teacher-weighted CE). Unlabeled transfer samples take the teacher's top-1 class as their label
    (a choice of this library: the paper trains on labeled data only), so their ranking is the teacher's.
    """

    params: PLDParams

    def training_step(self, batch: dict[str, Tensor]) -> Step:
        s = self.student(batch["x"])
        t = self.teacher_logits(batch["x"], batch["index"])
        loss = pld_loss(s, t, targets_or_teacher(batch, t), self.params.teacher_temperature)
        return Step({"student": loss}, {"pld": loss.detach()})
