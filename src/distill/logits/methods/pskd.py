"""``pskd``: Progressive Self-Knowledge Distillation (Kim et al. 2021, S41). No teacher."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from distill.core.distiller import Distiller, Step, TaskInfo
from distill.core.registry import METHODS, Params
from distill.core.steps import StepRecords, gather_rows
from distill.logits.losses import soft_cross_entropy


class PSKDParams(Params):
    alpha_T: float = Field(
        0.8, ge=0, le=1, description="the paper's α_T: weight of the past prediction in the last epoch"
    )
    epochs: int | None = Field(
        None, ge=1, description="epochs over which α_t rises linearly to α_T (official end_epoch); default: the run's"
    )

@METHODS.register(
    "pskd", "PS-KD self-distillation: targets mix the label with the model's last-epoch prediction (S41)", PSKDParams
)
class ProgressiveSelfKD(Distiller):
    """``CE(s, (1 − α_t)·onehot(y) + α_t·p_prev(x))`` (S41, §3: the progressive target and linear α_t;
    official lgcnsai/PS-KD-Pytorch ``main.py`` and ``loss/pskd_loss.py``): ``p_prev(x)`` is the model's own
    softmax for that sample from the previous epoch, held in a per-sample memory ``[num_train, classes]``
    indexed by the batch's dataset ``index``; ``α_t = α_T · (epoch + 1) / epochs`` with the 0-based epoch
    (so α reaches α_T in the last epoch), held at α_T if training runs longer. In the first epoch the
    target is the one-hot label (the official code fills the memory with one-hot labels then).

    As the official code, a sample's prediction is the one made in its training forward pass (train mode,
    before that step's update). It is written to the memory after the optimizer step, gathered from all
    processes (each sees a different shard every epoch), and a SAM replay (``train.sharpness: sam``) is not
    recorded. The memory is a buffer, so it is checkpointed. Labeled data only; no teacher.
    """

    needs_teacher = False
    uses_unlabeled = False
    params: PSKDParams
    memory: Tensor

    def __init__(self, student: nn.Module, teacher: nn.Module | None, params: PSKDParams, info: TaskInfo) -> None:
        super().__init__(student, teacher, params, info)
        self.register_buffer("memory", torch.zeros(info.num_train, info.num_classes, dtype=torch.float32))
        self._records = StepRecords()

    def alpha_t(self) -> float:
        epochs = self.params.epochs or self.total_epochs
        return min(self.params.alpha_T * (self.epoch + 1) / epochs, self.params.alpha_T)

    def training_step(self, batch: dict[str, Tensor]) -> Step:
        s = self.student(batch["x"])
        onehot = F.one_hot(batch["y"], self.info.num_classes).float()
        prev = onehot if self.epoch == 0 else self.memory[batch["index"]]
        alpha = self.alpha_t()
        loss = soft_cross_entropy(s, (1 - alpha) * onehot + alpha * prev)
        if not self.replaying:
            self._records.add(batch["index"], F.softmax(s.detach().float(), dim=-1))
        return Step({"student": loss}, {"pskd": loss.detach(), "alpha_t": alpha})

    def on_optimizer_step(self) -> None:
        records = self._records.take()
        if records:
            index, probs = gather_rows(torch.cat([r[0] for r in records]), torch.cat([r[1] for r in records]))
            self.memory[index.to(self.memory.device)] = probs.to(self.memory.device)
