"""Registries that families fill: methods, tasks, architectures, model references, model-folder formats.

Each entry's parameter model (pydantic, ``extra="forbid"``) is what a recipe's section is validated
against, so an unknown key or a bad value is rejected before any work starts.

The engine knows no family. Families (ours and a user's) are plug-ins found through the Python
entry-point group ``distill.plugins``: each entry point names a module (importing it registers what
it provides) or a callable (called once, with no arguments). The registries load them on first use.
"""

from __future__ import annotations

import importlib.metadata as md
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from distill.errors import DistillError, RecipeError, did_you_mean

PLUGIN_GROUP = "distill.plugins"


class Params(BaseModel):
    """Base of every parameter model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


def PathField(default: Any = ..., description: str = "", **kw: Any) -> Any:  # noqa: N802 (a Field)
    """A parameter that is a file or folder: relative to the recipe file's folder (to the working directory
    when given with ``--set`` or from Python), stored absolute in the resolved recipe."""
    return Field(default, description=description, json_schema_extra={"path": True}, **kw)


def path_fields(params: type[BaseModel]) -> list[str]:
    return [n for n, f in params.model_fields.items() if isinstance(f.json_schema_extra, dict)
            and f.json_schema_extra.get("path")]


@dataclass(frozen=True)
class Entry:
    name: str
    description: str
    params: type[Params]
    obj: Any  # the Distiller class, task builder, model factory, reference kind or folder format


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
        load_plugins()
        if name not in self._entries:
            raise RecipeError(
                f"unknown {self.kind} '{name}'{did_you_mean(name, self._entries)}; "
                f"`distill list` shows the {self.kind}s"
            )
        return self._entries[name]

    def __contains__(self, name: str) -> bool:
        load_plugins()
        return name in self._entries

    def entries(self) -> list[Entry]:
        load_plugins()
        return sorted(self._entries.values(), key=lambda e: e.name)


METHODS = Registry("method")
TASKS = Registry("task")
ARCHS = Registry("arch")
REFS = Registry("model reference")  # teacher/init kinds beyond core's recipe/run/model (core/refs.py)
FORMATS = Registry("model format")  # model folders that ``distill.load_student`` reads (core/refs.py)

_loaded: list[str] = []  # the plug-ins loaded, in order (``distill list`` shows them)


def load_plugins() -> list[str]:
    """Load every ``distill.plugins`` entry point once: ``distill``'s own first, then the others by name."""
    if _loaded:
        return _loaded
    eps = sorted(md.entry_points(group=PLUGIN_GROUP),
                 key=lambda ep: (getattr(ep.dist, "name", "") != "distill", ep.name))
    if not eps:
        raise DistillError(f"no '{PLUGIN_GROUP}' entry points found: install distill (pip install -e .) "
                           "so that its families register")
    _loaded.append("<loading>")  # re-entrant calls (a plug-in that looks a name up at import) see them loading
    try:
        for ep in eps:
            try:
                obj = ep.load()
            except Exception as err:
                raise DistillError(f"plug-in '{ep.name}' ({ep.value}) failed to load: "
                                   f"{type(err).__name__}: {err}") from err
            if callable(obj) and not isinstance(obj, type):
                obj()
            who = getattr(ep.dist, "name", None) or "?"
            _loaded.append(f"{ep.name} ({who}: {ep.value})")
    except BaseException:
        _loaded.clear()
        raise
    _loaded.remove("<loading>")
    return _loaded
