"""``lm_taid``: TAID for language models (S60, Shing et al. 2025, "TAID: Temporally Adaptive
Interpolated Distillation"), token-level on the dataset's sequences.

Per supervised token, the cross-entropy to ``p_t = softmax((1 − t)·sg(s) + t·z_teacher)``
(``distill.lm.losses.token_taid_loss``), with t rising from ``t_start`` to ``t_end`` by the adaptive
rule of S60 Algorithm 1 (``distill.logits.methods.taid.TAIDSchedule``, shared with the classifier ``taid``).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from distill.core.distiller import Step, TaskInfo
from distill.core.registry import METHODS
from distill.lm.base import LMDistiller
from distill.lm.losses import token_taid_loss
from distill.core.steps import mean_over_processes
from distill.logits.methods.taid import TAIDParams, WithTAIDSchedule


class LMTAIDParams(TAIDParams):
    temperature: float = Field(1.0, gt=0, description="divides student and teacher logits (1 = official code); no T²")


@METHODS.register("lm_taid", "TAID for language models (S60)", LMTAIDParams)
class LMTAID(WithTAIDSchedule, LMDistiller):
    """``Σ_tokens −Σ_v p_t,v · log q_v / num_items`` against a live teacher (no CE term, as the official
    ``distil_ratio = 1``), t from ``TAIDSchedule``.

    t is updated in ``on_optimizer_step`` from the loss of the whole optimizer step: the token-weighted
    mean over all its micro-batches and processes (each micro-batch records its token sum and count;
    one all-reduce), i.e. the official per-batch masked-mean loss of the one big batch. Deviations
    from the official code (SakanaAI/TAID ``TAID.forward`` calls ``update_t`` on every forward with
    that process's micro-batch loss): once per optimizer step (equal without gradient accumulation on
    one process), on the all-process token mean so t is the same everywhere, and SAM's replayed
    micro-batches are not recorded. ``total_steps`` defaults to the run's optimizer steps (the
    official ``estimated_stepping_batches``). A top-k teacher cache is not supported: the
    interpolation needs the teacher's full logits.
    """

    params: LMTAIDParams

    def __init__(self, student: nn.Module, teacher: nn.Module | None, params: LMTAIDParams, info: TaskInfo) -> None:
        super().__init__(student, teacher, params, info)
        self.init_schedule()

    def training_step(self, batch: dict[str, Tensor]) -> Step:
        self.seen(batch)
        labels, num_items = batch["labels"], batch.get("num_items")
        t = self.schedule.t.detach().clone()  # the t of this step, also for the metric
        loss = token_taid_loss(self.student_logits(batch), self.teacher_token_logits(batch), labels, t,
                               num_items, self.params.temperature)
        if not self.replaying:
            n = self.count_items(batch)
            # the token sum of this micro-batch, whatever the loss was divided by
            divisor = num_items if num_items is not None else max(n, 1)
            total = loss.detach() * divisor
            self._records.add(batch["index"], total, torch.tensor(float(n), device=total.device, dtype=total.dtype))
        return Step({"student": loss}, {"taid": loss.detach(), "t": t}, summed=("taid",))

    def on_optimizer_step(self) -> None:
        items = self._records.take()
        if not items:
            return
        sums = torch.stack([torch.stack([r[1], r[2]]) for r in items]).sum(0)
        sums = mean_over_processes(sums)  # the ratio of the two means is the all-process token mean
        self.schedule.update(sums[0] / sums[1].clamp(min=1e-12))  # no token at all: 0, not 0/0
