"""Model references (``teacher:``, ``init:`` and the inputs of a family's own kinds) and model folders.

Core owns three kinds: ``recipe`` (trained once by the runner, cached in ``<out>/_teachers`` by its
fingerprint), ``run`` (a finished run folder) and ``model`` (a model folder). A family adds its own
kinds to ``REFS`` with a ``RefKind`` (the LM family: ``merge`` and the teacher-only ``cache``), and the
folder formats it saves models in to ``FORMATS`` with a ``ModelFormat``, so ``load_student`` reads
them without core knowing the family.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from distill.core.recipe import ModelRef, Recipe, load_recipe, recipe_from_dict
from distill.core.registry import FORMATS, REFS
from distill.errors import MissingFileError


@dataclass(frozen=True)
class RefContext:
    """Where a reference is resolved: the recipe that holds it, under which key (``teacher``/``init``),
    the folder that trained references are cached in (``<out>/_teachers``), and how to train a recipe."""

    recipe: Recipe
    key: str
    out: Path
    progress: bool
    train: Callable[[Recipe, Path, str], Any]  # run_recipe(recipe, out=..., name=...)

    def folder(self, ref: ModelRef) -> Path | None:
        """The folder of another reference (a kind whose value holds references resolves them here)."""
        return resolve_model(self.recipe.model_copy(update={self.key: ref}), self.out, self.progress, self.key,
                             self.train)


@dataclass(frozen=True)
class RefKind:
    """A family's kind of model reference.

    ``schema``: the type its value validates as (a pydantic model or a plain type); ``resolve``: the
    folder it stands for (trained, merged or checked here); ``record``: the value as a run's
    recipe.yaml records it, self-contained (default: the path made absolute); ``offline``: the folder
    is an offline teacher, opened with ``TaskOps.open_teacher_cache`` instead of loaded as a model;
    ``teacher_only``: allowed under ``teacher`` only."""

    resolve: Callable[[RefContext, Any], Path]
    schema: Any = str
    record: Callable[[Recipe, Any, str], Any] | None = None
    offline: bool = False
    teacher_only: bool = False


@dataclass(frozen=True)
class ModelFormat:
    """A model folder a family writes: ``claims(config)`` says whether a ``config.json`` is this
    format's, ``load(folder)`` rebuilds the model from the folder."""

    claims: Callable[[dict[str, Any]], bool]
    load: Callable[[Path], nn.Module]


def ref_recipe(recipe: Recipe, key: str = "teacher") -> Recipe | None:
    """The recipe a ``teacher``/``init`` reference names, if it names one."""
    ref = getattr(recipe, key)
    if ref is None or ref.recipe is None:
        return None
    if isinstance(ref.recipe, dict):
        r = recipe_from_dict(ref.recipe, base_dir=recipe.base_dir)
    else:
        r = load_recipe(ref.recipe, base_dir=recipe.base_dir)
    if ref.seed is not None:
        r = r.model_copy(update={"seed": recipe.seed if ref.seed == "same" else ref.seed})
    return r


def record_ref(recipe: Recipe, ref: ModelRef, key: str) -> dict[str, Any]:
    """A model reference as a run's recipe.yaml records it: recipes inlined, paths absolute, a family's
    kind as its ``RefKind.record`` says (so the recipe re-runs from anywhere)."""
    d = ref.model_dump(mode="json")
    kind = ref.kind
    if kind == "recipe":
        d["recipe"] = ref_recipe(recipe.model_copy(update={key: ref}), key).resolved()
    elif kind in ("run", "model") or REFS.get(kind).obj.record is None:
        d[kind] = str(recipe.path(ref.value).resolve())
    else:
        d[kind] = REFS.get(kind).obj.record(recipe, ref.value, key)
    return d


def resolved_recipe(recipe: Recipe) -> dict[str, Any]:
    """The recipe with defaults filled and the teacher and init made self-contained (inlined recipe or
    absolute path), so a run folder's recipe.yaml re-runs from anywhere."""
    d = recipe.resolved()
    for key in ("teacher", "init"):
        ref = getattr(recipe, key)
        if ref is not None:
            d[key] = record_ref(recipe, ref, key)
    return d


def trained_folder(out: Path, base: Recipe) -> Path:
    """Where a teacher (or init) recipe is trained once and kept: ``<out>/_teachers/<name>-<fingerprint>``."""
    return out / "_teachers" / f"{base.name}-{base.fingerprint()}"


def is_offline(ref: ModelRef | None) -> bool:
    return ref is not None and ref.kind in REFS and REFS.get(ref.kind).obj.offline


def resolve_model(recipe: Recipe, out: Path, progress: bool, key: str,
                  train: Callable[[Recipe, Path, str], Any]) -> Path | None:
    """The folder of the ``teacher`` (or ``init``) model: given (a run or model folder), trained from its
    recipe once (cached in ``<out>/_teachers``), or resolved by the family that owns its kind. None when
    absent. An offline teacher's folder (``RefKind.offline``) is resolved too: see ``is_offline``."""
    ref = getattr(recipe, key)
    if ref is None:
        return None
    kind = ref.kind
    if kind in ("run", "model"):
        path = recipe.path(ref.value)
        if not path.is_dir():
            what = "run folder" if kind == "run" else "model folder"
            raise MissingFileError(f"{key}.{kind}: {what} {path} does not exist")
        return path
    if kind == "recipe":
        base = ref_recipe(recipe, key)
        cached = trained_folder(out, base)
        if not (cached / "metrics.json").is_file():
            train(base, cached.parent, cached.name)
        return cached
    return REFS.get(kind).obj.resolve(RefContext(recipe, key, out, progress, train), ref.value)


def load_student(folder: str | Path) -> nn.Module:
    """Rebuild a model saved by a run (a run's ``student/`` folder, or the run folder), in any format a
    family registered (classifiers: ``distill-student-v1``; language models: HF's layout)."""
    folder = Path(folder)
    if (folder / "student").is_dir():
        folder = folder / "student"
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise MissingFileError(f"{cfg_path} not found: a teacher run must be a finished run folder with student/")
    cfg = json.loads(cfg_path.read_text())
    for entry in FORMATS.entries():
        if entry.obj.claims(cfg):
            return entry.obj.load(folder)
    raise MissingFileError(f"{cfg_path}: no installed family reads this model folder "
                           f"(formats: {', '.join(e.name for e in FORMATS.entries())})")
