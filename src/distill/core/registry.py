"""Registries of methods, tasks and architectures: a name, a one-line description, a parameter model.

Each entry's parameter model (pydantic, ``extra="forbid"``) is what a recipe's section is validated
against, so an unknown key or a bad value is rejected before any work starts.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict

from distill.errors import RecipeError, did_you_mean


class Params(BaseModel):
    """Base of every parameter model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


@dataclass(frozen=True)
class Entry:
    name: str
    description: str
    params: type[Params]
    obj: Any  # the Distiller class, task builder or model factory


class Registry:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, description: str, params: type[Params] = Params) -> Callable:
        def deco(obj: Any) -> Any:
            if name in self._entries and self._entries[name].obj is not obj:
                raise ValueError(f"{self.kind} '{name}' registered twice")
            self._entries[name] = Entry(name, description, params, obj)
            return obj

        return deco

    def get(self, name: str) -> Entry:
        _load_builtins()
        if name not in self._entries:
            raise RecipeError(
                f"unknown {self.kind} '{name}'{did_you_mean(name, self._entries)}; "
                f"`distill list` shows the {self.kind}s"
            )
        return self._entries[name]

    def entries(self) -> list[Entry]:
        _load_builtins()
        return sorted(self._entries.values(), key=lambda e: e.name)


METHODS = Registry("method")
TASKS = Registry("task")
ARCHS = Registry("arch")

_BUILTIN_MODULES = ("distill.tasks", "distill.logits", "distill.lm")


def _load_builtins() -> None:
    for mod in _BUILTIN_MODULES:
        importlib.import_module(mod)
