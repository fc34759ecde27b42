"""``taid``: Temporally Adaptive Interpolated Distillation (Shing et al. 2025, S60) for classifiers.

``TAIDSchedule`` (the adaptive interpolation parameter t) is its own module so that the
language-model form of TAID can reuse it.
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from distill.core.distiller import Distiller, Step, TaskInfo
from distill.core.registry import METHODS, Params
from distill.core.steps import StepRecords, mean_over_processes
from distill.logits.losses import taid_loss


class TAIDSchedule(nn.Module):
    """TAID's interpolation parameter t, updated once per optimizer step from the TAID loss.

    As the official ``TAID.update_t`` (SakanaAI/TAID ``src/distil_losses/taid.py``; S60 Algorithm 1)::

        first call: only remember the loss
        δ = (ℓ_prev − ℓ) / (ℓ_prev + 1e-15)           relative decrease of the loss
        m ← β·m + (1 − β)·δ                            momentum
        t_lin = t_start + (t_end − t_start)·k / K      linear lower bound at step k of K
        t ← min(t_end, max(t_lin, t + α·sigmoid(m)·(1 − t)))

    ``adaptive=False`` follows ``t_lin`` only (the official ``disable_adaptive``), also capped at
    ``t_end``. The state (t, m, ℓ_prev, k) lives in buffers, so it is checkpointed and restored.
    Every operation stays on the device (no host synchronisation).
    """

    t: Tensor
    momentum: Tensor
    prev_loss: Tensor
    steps: Tensor

    def __init__(
        self,
        total_steps: int,
        t_start: float = 0.4,
        t_end: float = 1.0,
        alpha: float = 5e-4,
        beta: float = 0.99,
        adaptive: bool = True,
    ) -> None:
        super().__init__()
        self.total_steps, self.t_start, self.t_end = total_steps, t_start, t_end
        self.alpha, self.beta, self.adaptive = alpha, beta, adaptive
        self.register_buffer("t", torch.tensor(t_start, dtype=torch.float32))
        self.register_buffer("momentum", torch.zeros((), dtype=torch.float32))
        self.register_buffer("prev_loss", torch.tensor(float("inf"), dtype=torch.float32))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, loss: Tensor) -> None:
        """One update from the (detached) loss of the optimizer step just taken."""
        loss = loss.detach().float().to(self.t.device)
        first = torch.isinf(self.prev_loss)
        rel = (self.prev_loss - loss) / (self.prev_loss + 1e-15)
        momentum = self.beta * self.momentum + (1 - self.beta) * rel
        t_lin = self.t_start + (self.t_end - self.t_start) * (self.steps.float() / self.total_steps)
        t_new = t_lin
        if self.adaptive:
            t_new = torch.maximum(t_lin, self.t + self.alpha * torch.sigmoid(momentum) * (1 - self.t))
        self.t.copy_(torch.where(first, self.t, t_new.clamp(max=self.t_end)))
        self.momentum.copy_(torch.where(first, self.momentum, momentum))
        self.prev_loss.copy_(loss)
        self.steps += 1


class TAIDParams(Params):
    total_steps: int | None = Field(
        None, ge=1, description="steps over which t's linear lower bound reaches t_end; default: the run's optimizer steps"
    )
    t_start: float = Field(0.4, ge=0, lt=1, description="initial t (official default)")
    t_end: float = Field(1.0, gt=0, le=1, description="final t (official default)")
    alpha: float = Field(5e-4, ge=0, le=1, description="the paper's α: step size of the adaptive increase of t")
    beta: float = Field(0.99, ge=0, lt=1, description="the paper's β: momentum of the relative loss decrease")
    adaptive: bool = Field(True, description="false: t follows the linear schedule only (official disable_adaptive)")

    @model_validator(mode="after")
    def _order(self) -> "TAIDParams":
        if self.t_start > self.t_end:
            raise ValueError(f"t_start ({self.t_start}) must not exceed t_end ({self.t_end})")
        return self


class WithTAIDSchedule:
    """Mixin for a ``Distiller`` whose params are ``TAIDParams``: ``init_schedule()`` (call it after
    ``Distiller.__init__``) builds the schedule and the step records; the schedule's length defaults to
    the run's optimizer steps, known at ``on_train_start``. Shared by the classifier and LM forms."""

    params: TAIDParams

    def init_schedule(self) -> None:
        p = self.params
        self.schedule = TAIDSchedule(p.total_steps or 1, p.t_start, p.t_end, p.alpha, p.beta, p.adaptive)
        self._records = StepRecords()

    def on_train_start(self, total_steps: int, total_epochs: int) -> None:
        super().on_train_start(total_steps, total_epochs)  # type: ignore[misc]
        self.schedule.total_steps = self.params.total_steps or total_steps


@METHODS.register(
    "taid", "TAID: CE to softmax((1−t)·sg(s) + t·teacher), t rising adaptively per step (S60)", TAIDParams
)
class TAID(WithTAIDSchedule, Distiller):
    """``−Σ p_t · log softmax(s)`` with ``p_t = softmax((1 − t)·sg(s) + t·z_teacher)`` on every sample
    (labeled and transfer; no CE term, as the official code), t from ``TAIDSchedule``.

    t is updated in ``on_optimizer_step`` from the mean TAID loss of the step's micro-batches, averaged
    over processes so t is the same everywhere. Deviations from the official code, which calls
    ``update_t`` on every forward with that process's loss: here it is once per optimizer step (equal
    without gradient accumulation), on the all-process mean, and SAM's replayed micro-batches are not
    counted. ``total_steps`` defaults to the run's number of optimizer steps (from the engine).
    """

    params: TAIDParams

    def __init__(self, student: nn.Module, teacher: nn.Module | None, params: TAIDParams, info: TaskInfo) -> None:
        super().__init__(student, teacher, params, info)
        self.init_schedule()

    def training_step(self, batch: dict[str, Tensor]) -> Step:
        s = self.student(batch["x"])
        z = self.teacher_logits(batch["x"], batch["index"])
        loss = taid_loss(s, z, self.schedule.t)
        if not self.replaying:
            self._records.add(batch["index"], loss.detach())
        return Step({"student": loss}, {"taid": loss.detach(), "t": self.schedule.t.detach().clone()})

    def on_optimizer_step(self) -> None:
        losses = [r[1] for r in self._records.take()]
        if losses:
            self.schedule.update(mean_over_processes(torch.stack(losses).mean()))
