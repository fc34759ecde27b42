"""From a recipe to a finished run folder.

Resolves the task, the student, the teacher (a finished run folder, or a teacher recipe trained once
and cached by its fingerprint), the method; trains in ``<out>/<name>.partial`` and renames it to
``<out>/<name>`` only when everything is written, so a failed run never leaves a run folder.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from distill.core import checkpoint as ckpt
from distill.core import report
from distill.core.distiller import Distiller, TaskInfo
from distill.core.metrics import classifier_metrics, predict
from distill.core.recipe import Recipe, load_recipe, method_params, params_of, recipe_from_dict
from distill.core.registry import METHODS, TASKS
from distill.core.trainer import Trainer
from distill.errors import MismatchError, MissingFileError, RunExistsError
from distill.tasks.base import ArrayDataset, TaskData
from distill.tasks.models import build_model

STUDENT_FORMAT = "distill-student-v1"


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    student: nn.Module | None = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --- models on disk ------------------------------------------------------------------------------

def save_student(folder: Path, model: nn.Module, spec: dict[str, Any] | None, input_shape, num_classes: int) -> None:
    """``model.safetensors`` + ``config.json``: loadable with safetensors alone, no pickles."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(ckpt.cpu_tensors(model.state_dict()), str(folder / "model.safetensors"))
    config = {
        "format": STUDENT_FORMAT,
        "arch": spec["name"] if spec else None,
        "params": spec["params"] if spec else {},
        "class": type(model).__qualname__,
        "input_shape": list(input_shape),
        "num_classes": num_classes,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def load_student(folder: str | Path) -> nn.Module:
    """Rebuild a model saved by ``save_student`` (a run's ``student/`` folder, or the run folder)."""
    folder = Path(folder)
    if (folder / "student").is_dir():
        folder = folder / "student"
    cfg_path, weights = folder / "config.json", folder / "model.safetensors"
    for p in (cfg_path, weights):
        if not p.is_file():
            raise MissingFileError(f"{p} not found: a teacher run must be a finished run folder with student/")
    cfg = json.loads(cfg_path.read_text())
    if not cfg.get("arch"):
        raise MissingFileError(
            f"{folder} holds a custom model ({cfg.get('class')}); build it yourself and load {weights} with safetensors"
        )
    model = build_model(cfg["arch"], cfg["params"], tuple(cfg["input_shape"]), cfg["num_classes"])
    try:
        model.load_state_dict(load_file(str(weights)))
    except RuntimeError as err:
        raise MissingFileError(f"{weights} does not match its config.json: {str(err).splitlines()[0]}") from None
    return model


# --- pieces of a run -----------------------------------------------------------------------------

def build_task(recipe: Recipe) -> TaskData:
    entry = TASKS.get(recipe.task.name)
    return entry.obj(params_of(recipe.task, TASKS))


def student_spec(recipe: Recipe) -> dict[str, Any]:
    if recipe.student is not None:
        return recipe.student.model_dump()
    default = dict(TASKS.get(recipe.task.name).obj.default_student)
    return {"name": default.pop("arch"), "params": default}


def teacher_recipe(recipe: Recipe) -> Recipe | None:
    ref = recipe.teacher
    if ref is None or ref.recipe is None:
        return None
    if isinstance(ref.recipe, dict):
        return recipe_from_dict(ref.recipe, base_dir=recipe.base_dir)
    return load_recipe(ref.recipe, base_dir=recipe.base_dir)


def resolved_recipe(recipe: Recipe) -> dict[str, Any]:
    """The recipe with defaults filled and the teacher made self-contained (inlined recipe or
    absolute run path), so a run folder's recipe.yaml re-runs from anywhere."""
    d = recipe.resolved()
    t = teacher_recipe(recipe)
    if t is not None:
        d["teacher"] = {"recipe": t.resolved(), "run": None}
    elif recipe.teacher is not None:
        d["teacher"] = {"recipe": None, "run": str(recipe.path(recipe.teacher.run).resolve())}
    return d


def resolve_teacher(recipe: Recipe, out: Path, progress: bool) -> Path | None:
    """The run folder of the teacher: given, or trained from its recipe once (cached)."""
    ref = recipe.teacher
    if ref is None:
        return None
    if ref.run is not None:
        path = recipe.path(ref.run)
        if not path.is_dir():
            raise MissingFileError(f"teacher.run: run folder {path} does not exist; train the teacher first")
        return path
    teacher = teacher_recipe(recipe)
    cached = out / "_teachers" / f"{teacher.name}-{teacher.fingerprint()}"
    if not (cached / "metrics.json").is_file():
        run_recipe(teacher, out=cached.parent, name=cached.name, progress=progress)
    return cached


def check_classes(model: nn.Module, num_classes: int, who: str) -> None:
    out = getattr(getattr(model, "head", None), "out_features", None)
    if out is not None and out != num_classes:
        raise MismatchError(f"the {who} predicts {out} classes but the task has {num_classes}")


def make_distiller(recipe: Recipe, student: nn.Module, teacher: nn.Module | None, info: TaskInfo) -> Distiller:
    entry = METHODS.get(recipe.method.name)
    if entry.obj.needs_teacher and teacher is None:
        raise MissingFileError(f"method '{entry.name}' needs a teacher: add 'teacher: {{recipe: ...}}' or 'teacher: {{run: ...}}'")
    return entry.obj(student, teacher if entry.obj.needs_teacher else None, method_params(recipe), info)


def evaluator(data: ArrayDataset, teacher: nn.Module | None):
    t_logits = predict(teacher, data.x) if teacher is not None else None

    def evaluate(model: nn.Module) -> dict[str, float]:
        return classifier_metrics(predict(model, data.x), data.y, t_logits)

    return evaluate


# --- the run -------------------------------------------------------------------------------------

def run_recipe(
    recipe: Recipe,
    out: str | Path = "runs",
    name: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool | None = None,
    data: TaskData | None = None,
    student: nn.Module | None = None,
    teacher: nn.Module | None = None,
    stop_at_step: int | None = None,
) -> RunResult:
    """Train ``recipe`` and write ``<out>/<name>``; returns its metrics.

    ``data``, ``student`` and ``teacher`` let Python users pass their own dataset and modules.
    """
    out = Path(out)
    name = name or recipe.name
    final, partial = out / name, out / f"{name}.partial"
    resolved = resolved_recipe(recipe)
    if final.exists():
        done = final / "recipe.yaml"
        if not overwrite and done.is_file() and yaml.safe_load(done.read_text()) == resolved:
            metrics = json.loads((final / "metrics.json").read_text())
            return RunResult(final, metrics, report.read_csv(final / "history.csv"))  # same recipe: reuse
        if not overwrite:
            raise RunExistsError(f"run folder {final} exists with another recipe; choose another name, --out, or --overwrite")
    if progress is not None:
        recipe = recipe.model_copy(update={"train": recipe.train.model_copy(update={"progress": progress})})

    teacher_dir = None if teacher is not None else resolve_teacher(recipe, out, recipe.train.progress)
    if teacher_dir is not None:
        teacher = load_student(teacher_dir)
    data = data if data is not None else build_task(recipe)
    seed_everything(recipe.seed)
    spec = None
    if student is None:
        spec = student_spec(recipe)
        student = build_model(spec["name"], spec["params"], data.input_shape, data.num_classes)
    check_classes(student, data.num_classes, "student")
    if teacher is not None:
        check_classes(teacher, data.num_classes, "teacher")

    entry = METHODS.get(recipe.method.name)
    train_set = data.training_set(entry.obj.uses_unlabeled)
    info = TaskInfo(data.num_classes, len(train_set), data.input_shape, len(data.train), train_set, data.val)
    distiller = make_distiller(recipe, student, teacher, info)

    if partial.exists() and not resume:
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    (partial / "recipe.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    trainer = None
    try:
        val = data.val if data.val is not None else data.test  # no val split: last-epoch model anyway
        trainer = Trainer(distiller, train_set, recipe.train, recipe.seed, partial, evaluator(val, distiller.teacher))
        started = time.perf_counter()
        state = trainer.fit(resume=resume, stop_at_step=stop_at_step)
        train_s = time.perf_counter() - started
    except BaseException:
        # keep a resumable partial folder (interrupt, NaN after a checkpoint); nothing else
        if (partial / "checkpoints" / "latest").is_dir():
            report.write_csv(partial / "history.csv", trainer.state["history"] if trainer else [])
        else:
            shutil.rmtree(partial, ignore_errors=True)
        raise

    metrics = final_metrics(distiller.student, distiller.teacher, data)
    metrics["time/train_s"] = train_s  # this session's share when resumed
    (partial / "metrics.json").write_text(json.dumps(metrics, indent=2))
    report.write_csv(partial / "history.csv", state["history"])
    save_student(partial / "student", distiller.student, distiller.export_spec(spec), data.input_shape, data.num_classes)
    report.write_run_report(partial, resolved, metrics, state["history"])
    if final.exists():
        shutil.rmtree(final)
    partial.rename(final)
    return RunResult(final, metrics, state["history"], distiller.student)


def final_metrics(student: nn.Module, teacher: nn.Module | None, data: TaskData) -> dict[str, float]:
    t_logits = predict(teacher, data.test.x) if teacher is not None else None
    metrics = {f"test/{k}": v for k, v in classifier_metrics(predict(student, data.test.x), data.test.y, t_logits).items()}
    if data.val is not None:
        metrics.update({f"val/{k}": v for k, v in evaluator(data.val, teacher)(student).items()})
    if data.extra_metrics is not None:
        metrics.update({f"test/{k}": v for k, v in data.extra_metrics(student).items()})
    if t_logits is not None:
        metrics.update({f"teacher/{k}": v for k, v in classifier_metrics(t_logits, data.test.y).items()})
        if data.extra_metrics is not None:
            metrics.update({f"teacher/{k}": v for k, v in data.extra_metrics(teacher).items()})
    metrics["params/student"] = sum(p.numel() for p in student.parameters())
    if teacher is not None:
        metrics["params/teacher"] = sum(p.numel() for p in teacher.parameters())
    return metrics

