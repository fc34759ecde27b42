"""``self_distill``: self-distillation with weighted ground-truth targets (S09, Borup & Andersen 2021)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from distill.core.distiller import Distiller, Step
from distill.core.metrics import predict
from distill.core.registry import METHODS, Params
from distill.logits import theory
from distill.logits.losses import self_distill_loss


class SelfDistillParams(Params):
    label_weight: float = Field(
        0.5, ge=0, le=1,
        description="ξ, the weight of the labels in the target (the paper's alpha); 1 = labels only, 0 = teacher only. "
        "Estimate it with distill.logits.methods.self_distill.estimate_label_weight",
    )
    loss: Literal["mse", "ce"] = Field(
        "mse", description="mse on probabilities (the paper and its code) or soft cross-entropy")


@METHODS.register(
    "self_distill",
    "Self-distillation with weighted ground truth: fit ξ·onehot(y) + (1−ξ)·softmax(previous generation) (S09)",
    SelfDistillParams,
)
class SelfDistill(Distiller):
    """One step of S09's iterative self-distillation: the teacher is the previous generation (the
    same architecture; generation 1 is a plain ``ce`` run), and the student fits
    ``q = ξ·onehot(y) + (1 − ξ)·softmax(teacher)`` (``self_distill_loss``; the network analogue of
    ``distill.logits.theory.iterative_self_distillation``). Chain runs (each run's student the next
    run's ``teacher: {run: ...}``) for more steps.

    Choosing ξ as the paper does, without a grid search:
      1. the teacher is the ξ = 1 fit (at any step, fitting the labels alone reproduces generation 1);
      2. run this method with ``label_weight: 0`` (the ξ = 0 fit);
      3. ``xi = estimate_label_weight(teacher, that_student, data.val)``;
      4. run it with ``label_weight: xi``.

    Deviations from the official ``self_distiller.py``: the loss sums over classes (theirs averages,
    a constant factor 1/C), and its explicit penalty ``reg_coef · Σ_tensors ‖θ‖₂`` (the sum of the
    parameter tensors' L2 norms, *not* squared: not weight decay, whose gradient is proportional to θ)
    is not implemented; ``train.weight_decay`` (a squared-norm penalty) is the nearest setting and is
    not the same regulariser. Only labeled samples are used (the target needs a label).
    """

    uses_unlabeled = False
    params: SelfDistillParams

    def training_step(self, batch: dict[str, Tensor]) -> Step:
        s = self.student(batch["x"])
        t = self.teacher_logits(batch["x"], batch["index"])
        loss = self_distill_loss(s, t, batch["y"], self.params.label_weight, self.params.loss)
        return Step({"student": loss}, {"label_weight": self.params.label_weight})


@torch.no_grad()
def estimate_label_weight(label_fit: nn.Module, distill_fit: nn.Module, data) -> float:
    """S09's estimate of the optimal ξ for networks from two trained models, on held-out ``data``
    (an ``ArrayDataset``; use the validation split, never the test split).

    ``label_fit``: the model trained with ξ = 1 (for the second generation: the teacher itself);
    ``distill_fit``: the model trained with ξ = 0. Returns ``theory.estimate_label_weight`` of
    their softmax predictions, in [0, 1].
    """
    p1 = F.softmax(predict(label_fit, data.x), dim=-1)
    p0 = F.softmax(predict(distill_fit, data.x), dim=-1)
    return float(theory.estimate_label_weight(p1, p0, data.y))
