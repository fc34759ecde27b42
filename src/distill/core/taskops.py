"""What the runner needs from a task, whatever kind of model it trains.

A task's builder returns a data object. Either it implements this protocol itself (language models),
or its family registers an adapter for its type with ``register_ops`` (classifiers: ``TaskData`` ->
``distill.tasks.ops.ClassifierOps``), so the runner never imports a family.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

from torch import nn

from distill.core.distiller import TaskInfo
from distill.core.registry import load_plugins
from distill.errors import RecipeError


@runtime_checkable
class TaskOps(Protocol):
    default_student: dict[str, Any]

    def build_model(self, spec: dict[str, Any]) -> nn.Module:
        """A fresh model from a registered arch ``{"name", "params"}``."""

    def load_model(self, folder: Path) -> nn.Module:
        """A model from a run folder or a model folder."""

    def saved_spec(self, folder: Path) -> dict[str, Any] | None:
        """The registered arch ``{"name", "params"}`` a model folder was saved with, if any (so a
        student started from it saves again the same way)."""

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


_ADAPTERS: list[tuple[type, Callable[[Any], TaskOps]]] = []


def register_ops(data_type: type) -> Callable:
    """Decorator: ``factory(data) -> TaskOps`` for a family's task-data type that is not ``TaskOps`` itself."""

    def deco(factory: Callable[[Any], TaskOps]) -> Callable[[Any], TaskOps]:
        _ADAPTERS.append((data_type, factory))
        return factory

    return deco


def task_ops(data: Any) -> TaskOps:
    """The ``TaskOps`` of a task's data object."""
    if isinstance(data, TaskOps):
        return data
    load_plugins()
    for data_type, factory in _ADAPTERS:
        if isinstance(data, data_type):
            return factory(data)
    raise RecipeError(f"task data of type {type(data).__name__} has no TaskOps: implement the protocol in "
                      "distill.core.taskops or register an adapter with register_ops")
