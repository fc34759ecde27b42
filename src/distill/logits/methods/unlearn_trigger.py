"""``unlearn_trigger``: self-knowledge distillation that unlearns a backdoor trigger (S37).

"Sealing The Backdoor" (SKD, the base of SKD-CAG; official Mystic-Slice/Sealing-The-Backdoor
``self_kd.py``), in classifier form: the backdoored model is its own teacher (frozen copy), and the
student, starting from the same weights, learns to answer a triggered input as the teacher answers
the clean one. The cross-attention guidance of SKD-CAG is specific to text-to-image models and is
not part of this method.
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor, nn

from distill.core.distiller import Distiller, Step, TaskInfo
from distill.core.registry import METHODS, Params
from distill.errors import MismatchError
from distill.logits.losses import kd_loss
from distill.tasks.mnist1d_backdoor import Trigger, apply_trigger


class UnlearnTriggerParams(Params):
    trigger: Trigger = Field(default_factory=Trigger, description="the known trigger (must match the task's)")
    temperature: float = Field(1.0, gt=0)
    clean_weight: float = Field(0.0, ge=0, description="also match teacher(x) on clean inputs (0 in the official code)")
    init_from_teacher: bool = Field(True, description="copy the teacher's weights into the student at construction")


@METHODS.register(
    "unlearn_trigger", "Backdoor unlearning: s(trigger(x)) distils the backdoored t(x) (S37)", UnlearnTriggerParams
)
class UnlearnTrigger(Distiller):
    """``T² · KL(softmax(t(x)/T) ‖ softmax(s(trigger(x))/T)) + clean_weight · T² · KL(t(x) ‖ s(x))``.

    The official code matches the student's output on the triggered prompt to the frozen
    backdoored teacher's output on the clean prompt with an MSE (diffusion noise predictions);
    for class logits the analogue is KD's KL, used here. The teacher is the backdoored model
    itself; the runner builds the student from the recipe, so with ``init_from_teacher`` the
    distiller copies the teacher's weights into it at construction (the student arch must equal
    the teacher's). Only unlabeled transfer samples (label −1) are used: they are the defender's
    clean data, while the labeled set may hold poisoned samples (already triggered, relabelled),
    whose "clean" teacher output would be the backdoor's target. The trigger is the one the
    defender knows, as in the paper.
    """

    params: UnlearnTriggerParams
    uses_unlabeled = True

    def __init__(
        self, student: nn.Module, teacher: nn.Module | None, params: UnlearnTriggerParams, info: TaskInfo
    ) -> None:
        super().__init__(student, teacher, params, info)
        if params.init_from_teacher:
            try:
                student.load_state_dict(teacher.state_dict())
            except RuntimeError as err:
                raise MismatchError(
                    "unlearn_trigger starts the student from the teacher's weights, but their architectures differ "
                    f"({str(err).splitlines()[0]}); give the student the teacher's arch or set "
                    "method.init_from_teacher: false"
                ) from None

    def training_step(self, batch: dict[str, Tensor]) -> Step:
        p = self.params
        clean = batch["y"] < 0
        x = batch["x"][clean]
        t = self.teacher_logits(x, batch["index"][clean])  # clean, un-augmented inputs: the cache applies
        unlearn = kd_loss(self.student(apply_trigger(x, p.trigger)), t, p.temperature)
        keep = kd_loss(self.student(x), t, p.temperature) if p.clean_weight else unlearn.detach() * 0
        loss = unlearn + p.clean_weight * keep
        return Step({"student": loss}, {"unlearn": unlearn.detach(), "clean_kd": keep.detach()})
