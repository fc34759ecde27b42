"""``recursive``: recursive meta-distillation with anchoring to the base teacher (S38, Flouro & Chadwick 2026)."""

from __future__ import annotations

import copy

import torch
from pydantic import Field
from torch import Tensor, nn

from distill.core.distiller import Distiller, Step, TaskInfo
from distill.core.metrics import kl_to_teacher, predict
from distill.core.registry import METHODS, Params
from distill.errors import RecipeError
from distill.logits.methods.kd import labeled_ce
from distill.logits.losses import anchored_kd_loss


class RecursiveParams(Params):
    generations: int = Field(3, ge=1, description="number of generations in the run")
    epochs_per_generation: int | None = Field(
        None, ge=1, description="epochs per generation (the last runs to the end); null: train.epochs // generations")
    anchor_weight: float = Field(
        0.5, gt=0, le=1, description="λ, the base teacher's weight in the meta-teacher λ·p_T + (1 − λ)·p_previous")
    temperature: float = Field(4.0, gt=0)
    ce_weight: float = Field(0.1, ge=0)
    kd_weight: float = Field(0.9, ge=0)


@METHODS.register(
    "recursive",
    "Recursive meta-distillation: generations distill from λ·teacher + (1−λ)·previous student (S38)",
    RecursiveParams,
)
class RecursiveDistillation(Distiller):
    """``ce_weight · CE + kd_weight · T² · KL(q_k ‖ softmax(s/T))`` with the anchored meta-teacher
    ``q_k = λ·softmax(t/T) + (1 − λ)·softmax(s_{k−1}/T)`` of generation k (``anchored_kd_loss``);
    generation 0 has no previous student and distills from the base teacher alone (plain KD).

    S38 is an axiomatic framework with no prescribed algorithm or loss; this is its simplest
    instance: the probability-domain mixture anchored to the base teacher, for which, when each
    generation realises its target, ``KL(p_T ‖ p_{S_k}) ≤ (1 − λ)·KL(p_T ‖ p_{S_{k−1}})`` (convexity
    of KL), the geometric contraction the paper proves. λ is a parameter (the paper fixes none).

    A generation lasts ``epochs_per_generation`` epochs (by default the run's epochs split evenly;
    the last generation runs to the end of training); at the switch (``on_epoch_start``) the
    student is copied into the frozen ``previous`` module and training continues from it (a warm
    start: the run has one optimizer and one learning-rate schedule, so a re-initialised student
    would restart with stale Adam moments and a decayed rate). Before the copy, KL(teacher ‖
    student) at T = 1 on the validation split is stored in the buffer ``generation_kl`` (it
    survives resume) and logged as ``train/kl_to_teacher_gen{k}``; the last generation's value is
    the run's ``val/kl_to_teacher``.
    """

    params: RecursiveParams

    def __init__(self, student: nn.Module, teacher: nn.Module | None, params: RecursiveParams, info: TaskInfo) -> None:
        super().__init__(student, teacher, params, info)
        if params.generations > 1 and info.val is None:
            raise RecipeError("method 'recursive' reports KL to the teacher per generation on the validation split; "
                              "give the task a validation split (e.g. task.num_val > 0)")
        self.previous = copy.deepcopy(student).requires_grad_(False).eval()
        self.register_buffer("generation", torch.zeros((), dtype=torch.long))
        self.register_buffer("generation_kl", torch.full((params.generations,), float("nan"), dtype=torch.float64))

    def train(self, mode: bool = True) -> RecursiveDistillation:
        super().train(mode)
        self.previous.eval()  # a frozen meta-teacher component
        return self

    def on_epoch_start(self, epoch: int) -> None:
        super().on_epoch_start(epoch)
        p = self.params
        per_generation = p.epochs_per_generation or max(1, self.total_epochs // p.generations)
        target = min(epoch // per_generation, p.generations - 1)
        while int(self.generation) < target:  # idempotent: a resume mid-generation switches nothing
            k = int(self.generation)
            val = self.info.val
            self.generation_kl[k] = kl_to_teacher(predict(self.student, val.x), predict(self.teacher, val.x))
            self.previous.load_state_dict(self.student.state_dict())
            self.generation += 1

    def training_step(self, batch: dict[str, Tensor]) -> Step:
        p = self.params
        s = self.student(batch["x"])
        t = self.teacher_logits(batch["x"], batch["index"])
        gen = int(self.generation)
        prev = None
        if gen > 0:
            with torch.inference_mode():
                prev = self.previous(batch["x"])
            prev = prev.clone()
        ce = labeled_ce(s, batch)
        kd = anchored_kd_loss(s, t, prev, p.anchor_weight, p.temperature)
        metrics: dict[str, Tensor | float] = {"ce": ce.detach(), "kd": kd.detach(), "generation": float(gen)}
        for k in range(gen):
            metrics[f"kl_to_teacher_gen{k}"] = float(self.generation_kl[k])
        return Step({"student": p.ce_weight * ce + p.kd_weight * kd}, metrics)
