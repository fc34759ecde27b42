"""The `Distiller` base: one method = one module that owns student, teacher and helpers.

It computes named losses for one batch and nothing else: the engine places devices, steps the
optimizers, logs and checkpoints. State that must survive a resume (schedules, memories) lives in
buffers, so it travels with ``state_dict()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from distill.core.registry import Params


@dataclass
class TaskInfo:
    """What a method may need to know about the data.

    ``train`` is the dataset the engine iterates (labeled first, then the unlabeled transfer set,
    whose labels are -1); batch ``index`` values point into it. ``val`` is the validation split,
    for methods that learn from held-out data (bilevel weights, calibration); never the test split.
    """

    num_classes: int
    num_train: int
    input_shape: tuple[int, ...]
    num_labeled: int = 0
    train: Any = None  # ArrayDataset
    val: Any = None  # ArrayDataset | None
    data: Any = None  # the task's data object (tokenizer, prompts, verifier for language-model tasks)
    teacher_cache: Any = None  # a verified offline teacher (distill.lm.cache.TeacherCache), if the recipe gives one


@dataclass
class Step:
    """The result of one training step.

    ``losses`` has one entry per parameter group the distiller declares; the engine sums them for
    one backward pass, so each loss must detach what it does not mean to train (e.g. the peer
    model's outputs in online distillation). ``metrics`` are logged as ``train/<name>``.
    """

    losses: dict[str, Tensor]
    metrics: dict[str, Tensor | float] = field(default_factory=dict)
    # metrics that are this micro-batch's share of a step total (divided by the step's num_items):
    # the engine sums them over micro-batches, as it does the losses, instead of averaging
    summed: tuple[str, ...] = ()


class Distiller(nn.Module):
    """Base class of every method.

    Subclasses set ``needs_teacher`` and ``uses_unlabeled`` (whether the unlabeled transfer set is
    part of its training data; such samples have label -1), and implement ``training_step``.
    """

    needs_teacher: ClassVar[bool] = True
    uses_unlabeled: ClassVar[bool] = True
    teacher_trainable: ClassVar[bool] = False
    supports_cache: ClassVar[bool] = False  # can train from an offline teacher cache instead of a live teacher

    def __init__(self, student: nn.Module, teacher: nn.Module | None, params: Params, info: TaskInfo) -> None:
        super().__init__()
        self.student = student
        self.teacher = teacher
        self.params = params
        self.info = info
        self.epoch = 0  # set by the engine before each epoch (also on resume)
        self._teacher_cache: Tensor | None = None
        self.total_steps = self.total_epochs = 0  # set by on_train_start
        self.replaying = False  # True while the engine re-runs a step's batches (SAM's second pass)
        if teacher is not None and not self.teacher_trainable:
            teacher.eval().requires_grad_(False)

    # --- what the engine calls -------------------------------------------------------------------
    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """One optimizer per group; the keys match the keys of ``Step.losses``."""
        return {"student": [p for p in self.student.parameters() if p.requires_grad]}

    def training_step(self, batch: dict[str, Tensor]) -> Step:
        raise NotImplementedError

    def forward(self, batch: dict[str, Tensor]) -> Step:  # so DDP wrappers see the computation
        return self.training_step(batch)

    def prepare_batches(self, batches: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        """The micro-batches of one optimizer step before any forward pass; a method may replace them
        (on-policy samples). Not called again for SAM's second pass."""
        return batches

    def count_items(self, batch: dict[str, Tensor]) -> int | None:
        """Items the loss of ``batch`` sums over (e.g. valid tokens), or None for per-batch means. When
        not None, the engine adds ``batch["num_items"]``: the count over the whole optimizer step."""
        return None

    def on_train_start(self, total_steps: int, total_epochs: int) -> None:
        """Called by the engine before training (and on resume) with the run's length."""
        self.total_steps, self.total_epochs = total_steps, total_epochs

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch

    def on_optimizer_step(self) -> None:
        """Called once per optimizer step (not per micro-batch, not in evaluation)."""

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        if self.teacher is not None and not self.teacher_trainable:
            self.teacher.eval()  # a frozen teacher never uses batch statistics or dropout
        return self

    # --- helpers for subclasses ------------------------------------------------------------------
    def teacher_logits(self, x: Tensor, index: Tensor | None = None) -> Tensor:
        """Frozen teacher forward under inference mode; cloned so autograd may save it.

        Pass ``index`` (the batch's dataset indices) only when ``x`` is the un-augmented batch: then
        the engine's precomputed teacher logits are used when available (``train.cache_teacher``).
        """
        assert self.teacher is not None
        if self.teacher_trainable:
            return self.teacher(x)
        if index is not None and self._teacher_cache is not None:
            return self._teacher_cache[index.to(self._teacher_cache.device)]
        with torch.inference_mode():
            out = self.teacher(x)
        return out.clone()

    def cache_teacher(self, x: Tensor, batch_size: int = 1024) -> None:
        """Precompute a frozen teacher's logits for every training input ``x`` (``[n, ...]``).

        The teacher is deterministic (eval mode, frozen), so this equals calling it per batch and
        removes its forward pass from every step. Not checkpointed: recomputed on resume.
        """
        if self.teacher is None or self.teacher_trainable:
            return
        device = next(self.teacher.parameters()).device
        with torch.inference_mode():
            out = torch.cat([self.teacher(x[i : i + batch_size].to(device)) for i in range(0, len(x), batch_size)])
        self._teacher_cache = out.clone()

    @staticmethod
    def labeled(batch: dict[str, Tensor]) -> Tensor:
        """Boolean mask of samples that carry a label (transfer-set samples have label -1)."""
        return batch["y"] >= 0

    def export_spec(self, spec: dict[str, Any] | None) -> dict[str, Any] | None:
        """The registered arch (``{"name", "params"}``) that rebuilds ``self.student`` for saving;
        methods that reshape the student (e.g. a wider head) return their own."""
        return spec

    def state_extra(self) -> dict[str, Any]:
        """JSON-serialisable state that is not a tensor (checkpointed beside the weights)."""
        return {}

    def load_state_extra(self, state: dict[str, Any]) -> None:
        pass
