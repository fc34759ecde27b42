"""``first``: FIRST, efficient trustworthy distillation (Shum et al. 2024, S03)."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from distill.core.distiller import Distiller, Step, TaskInfo
from distill.core.metrics import CALIBRATION_GRID, ece, predict
from distill.core.registry import METHODS, Params
from distill.errors import RecipeError
from distill.logits.methods.kd import labeled_ce
from distill.logits.losses import StudentNorm, first_loss, first_targets


class FIRSTParams(Params):
    top_k: int = Field(5, ge=1, description="teacher classes kept (the paper's concentrated knowledge: top-5)")
    ce_weight: float = Field(0.0, ge=0, description="CE on labeled samples (the paper has none)")
    kd_weight: float = Field(1.0, ge=0)
    student_norm: StudentNorm = Field(
        "topk", description="topk: the student renormalised over the teacher's top-k (official); "
                            "full: its full softmax at those classes (mass outside them penalised)")


def topk_ece(teacher_logits: Tensor, y: Tensor, top_k: int, calibration_temperature: float) -> float:
    """ECE (15 bins, ``distill.core.metrics.ece``) of the calibrated top-k teacher distribution."""
    target, idx = first_targets(teacher_logits, top_k, calibration_temperature)
    full = torch.full(teacher_logits.shape, float("-inf")).scatter(-1, idx, target.log())
    return ece(full, y)


def fit_calibration_temperature(
    teacher_logits: Tensor, y: Tensor, top_k: int, grid: Tensor = CALIBRATION_GRID
) -> float:
    """Trustworthy maximization (S03): the calibration temperature of ``first_targets`` that
    minimises the ECE on held-out data, by a 1-D grid search (ECE is piecewise constant in the
    temperature, so no gradient method). The official code takes the temperature as an argument
    (``--teacher_temp``) and publishes no fitting code; the ECE criterion is issue 3's reading."""
    scores = torch.tensor([topk_ece(teacher_logits, y, top_k, float(t)) for t in grid])
    return float(grid[int(scores.argmin())])


@METHODS.register("first", "FIRST: top-k teacher targets at a temperature fitted for min ECE on val (S03)", FIRSTParams)
class FIRST(Distiller):
    """``ce_weight · CE(s, y) + kd_weight · KL(q_T ‖ p_S)`` over the teacher's top-k classes (S03).

    ``q_T = softmax(topk(softmax(t)) / τ*)`` (``first_targets``), where τ* is fitted once, at
    construction, on the validation split (``self.info.val``) to minimise the ECE of ``q_T``
    (``fit_calibration_temperature``); it lives in the buffer ``calibration_temperature``, so it
    is checkpointed with the student. The student is normalised over the same k classes
    (``student_norm="topk"``, the official ``distill.py``: a softmax of its top-k probabilities at
    ``--student_temp`` 1); ``student_norm="full"`` keeps its full-class log-softmax there instead
    (ours), which also pushes down its mass outside the top k. The two differ in scale (on random
    logits the ``full`` loss is 50-100x the official one): Adam's step hardly notices, but SGD
    learning rates and the balance against ``ce_weight`` do not carry over. Under ``topk`` the
    student's k entries are a softmax of probabilities, so they stay within a factor e of each other
    and the loss does not reach 0 for a sharp target (as in the official code). ``topk`` sees the
    student only through its top-k probabilities, so mass it moves outside the teacher's top k is not
    penalised and, once there, the gradient (∝ those probabilities) vanishes: on a small MNIST-1D run
    (1,000 labels, 10 epochs, from scratch) ``topk`` reached 19-38 % test accuracy and NLL 5-11 where
    ``full`` reached 43-44 % and NLL 1.4; the official setting fine-tunes a pretrained LM that starts
    near its teacher. Prefer ``full`` for a student trained from scratch. Deviations: the
    paper distills LLM tokens from stored top-5 log-probs; here the teacher runs on each batch and
    the top k are taken on the fly. The official repository's inconsistencies are listed in
    ``distill.lm.methods.lm_first``.
    """

    params: FIRSTParams

    def __init__(self, student: nn.Module, teacher: nn.Module | None, params: FIRSTParams, info: TaskInfo) -> None:
        super().__init__(student, teacher, params, info)
        if params.top_k > info.num_classes:
            raise RecipeError(f"method.top_k {params.top_k} exceeds the task's {info.num_classes} classes")
        if info.val is None or len(info.val) == 0:
            raise RecipeError(
                "method 'first' fits the teacher's temperature on the validation split: set task.num_val > 0"
            )
        tau = fit_calibration_temperature(predict(teacher, info.val.x), info.val.y, params.top_k)
        self.register_buffer("calibration_temperature", torch.tensor(tau))

    def training_step(self, batch: dict[str, Tensor]) -> Step:
        p = self.params
        s = self.student(batch["x"])
        t = self.teacher_logits(batch["x"], batch["index"])
        ce = labeled_ce(s, batch)
        kd = first_loss(s, t, p.top_k, float(self.calibration_temperature), p.student_norm)
        loss = p.ce_weight * ce + p.kd_weight * kd
        metrics = {"ce": ce.detach(), "kd": kd.detach(), "calibration_temperature": self.calibration_temperature}
        return Step({"student": loss}, metrics)
