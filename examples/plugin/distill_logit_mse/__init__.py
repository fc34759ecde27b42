"""A distill plug-in: one method (logit regression, Ba & Caruana 2014) and one architecture.

Installed beside distill (``pip install -e examples/plugin``), its entry point in the group
``distill.plugins`` makes ``logit_mse`` and ``wide_mlp`` appear in ``distill list`` and work in recipes.
"""

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from distill.core.distiller import Distiller, Step
from distill.core.registry import ARCHS, METHODS, Params
from distill.tasks.models import Classifier


class LogitMSEParams(Params):
    mse_weight: float = Field(1.0, ge=0, description="weight of the logit regression")
    ce_weight: float = Field(0.0, ge=0, description="weight of CE on labeled samples")


@METHODS.register("logit_mse", "regress the teacher's logits (Ba & Caruana 2014) + CE", LogitMSEParams)
class LogitMSE(Distiller):
    """``mse_weight · mean((s − t)²) + ce_weight · CE(s, y)`` over the batch (labels −1: unlabeled)."""

    def training_step(self, batch: dict[str, Tensor]) -> Step:
        s = self.student(batch["x"])
        t = self.teacher_logits(batch["x"], batch["index"])
        mse = F.mse_loss(s.float(), t.float())
        labeled = batch["y"] >= 0
        ce = F.cross_entropy(s[labeled].float(), batch["y"][labeled]) if labeled.any() else s.sum() * 0
        loss = self.params.mse_weight * mse + self.params.ce_weight * ce
        return Step({"student": loss}, {"mse": mse.detach(), "ce": ce.detach()})


class WideMLPParams(Params):
    width: int = Field(256, ge=1)


@ARCHS.register("wide_mlp", "one hidden layer, wide", WideMLPParams)
def wide_mlp(p: WideMLPParams, input_shape: tuple[int, ...], num_classes: int) -> Classifier:
    n = 1
    for d in input_shape:
        n *= d
    return Classifier(nn.Sequential(nn.Flatten(), nn.Linear(n, p.width), nn.ReLU()), p.width, num_classes)
