"""What the runner needs from a task, whatever kind of model it trains.

Classifier tasks return a ``TaskData`` and the runner wraps it in ``ClassifierOps``; a family whose
models are not classifiers (language models) returns a data object that implements this protocol
itself, so the runner never imports a family.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

from torch import nn

from distill.core.distiller import TaskInfo


@runtime_checkable
class TaskOps(Protocol):
    default_student: dict[str, Any]

    def build_model(self, spec: dict[str, Any]) -> nn.Module:
        """A fresh model from a registered arch ``{"name", "params"}``."""

    def load_model(self, folder: Path) -> nn.Module:
        """A model from a run folder or a model folder."""

    def save_model(self, folder: Path, model: nn.Module, spec: dict[str, Any] | None) -> None:
        """Write ``model`` so that ``load_model(folder)`` rebuilds it."""

    def check_models(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """Raise ``MismatchError`` when the models cannot serve this task together."""

    def task_info(self, uses_unlabeled: bool) -> TaskInfo:
        """What a method may know about the data; ``info.train`` is the set the engine iterates."""

    def open_teacher_cache(self, folder: Path) -> Any:
        """A verified offline teacher for this task's training set."""

    def evaluator(self, teacher: nn.Module | None) -> Callable[[nn.Module], dict[str, float]]:
        """Validation metrics of a model (used during training; never the test split when a val split exists)."""

    def final_metrics(self, student: nn.Module, teacher: nn.Module | None) -> dict[str, float]:
        """Flat metrics with split prefixes: ``test/...``, ``val/...``, ``teacher/...``."""
