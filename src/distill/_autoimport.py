"""Import every module of a package, so each method/task file registers itself without a list."""

from __future__ import annotations

import importlib
import pkgutil


def import_all(package: str, path: list[str]) -> None:
    for mod in pkgutil.iter_modules(path):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{package}.{mod.name}")
