"""From a recipe to a finished run folder.

Resolves the task, the student, the teacher (a finished run folder, a model folder, an offline teacher
cache, or a teacher recipe trained once and cached by its fingerprint), the method; trains in
``<out>/<name>.partial`` and renames it to ``<out>/<name>`` only when everything is written, so a
failed run never leaves a run folder.

What depends on the kind of task (building, saving and loading models, evaluation, metrics) goes
through the task's ``TaskOps`` (``core/taskops.py``): ``ClassifierOps`` here for classifier tasks;
a language-model task's data object implements the same interface itself.
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
from distill.core.taskops import TaskOps
from distill.core.trainer import Trainer
from distill.errors import MismatchError, MissingFileError, RecipeError, RunExistsError
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
    """Rebuild a model saved by a run (a run's ``student/`` folder, or the run folder): a classifier
    saved by ``save_student``, or a language model saved in HF's format."""
    folder = Path(folder)
    if (folder / "student").is_dir():
        folder = folder / "student"
    cfg_path, weights = folder / "config.json", folder / "model.safetensors"
    if not cfg_path.is_file():
        raise MissingFileError(f"{cfg_path} not found: a teacher run must be a finished run folder with student/")
    cfg = json.loads(cfg_path.read_text())
    if "model_type" in cfg:  # an HF model folder (language-model runs save these)
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(folder))
    if not weights.is_file():
        raise MissingFileError(f"{weights} not found: a teacher run must be a finished run folder with student/")
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

def build_task(recipe: Recipe) -> Any:
    """The task's data: a ``TaskData`` (classifiers) or a family's own data object with ``TaskOps``."""
    entry = TASKS.get(recipe.task.name)
    return entry.obj(params_of(recipe.task, TASKS))


def task_ops(data: Any) -> TaskOps:
    return data if isinstance(data, TaskOps) else ClassifierOps(data)


def student_spec(recipe: Recipe, data: Any = None) -> dict[str, Any]:
    if recipe.student is not None:
        return recipe.student.model_dump()
    obj = data if data is not None and hasattr(data, "default_student") else TASKS.get(recipe.task.name).obj
    default = dict(obj.default_student)
    return {"name": default.pop("arch"), "params": default}


def ref_recipe(recipe: Recipe, key: str = "teacher") -> Recipe | None:
    """The recipe a ``teacher``/``init`` reference names, if it names one."""
    ref = getattr(recipe, key)
    if ref is None or ref.recipe is None:
        return None
    if isinstance(ref.recipe, dict):
        return recipe_from_dict(ref.recipe, base_dir=recipe.base_dir)
    return load_recipe(ref.recipe, base_dir=recipe.base_dir)


def teacher_recipe(recipe: Recipe) -> Recipe | None:
    return ref_recipe(recipe, "teacher")


def resolved_recipe(recipe: Recipe) -> dict[str, Any]:
    """The recipe with defaults filled and the teacher and init made self-contained (inlined recipe or
    absolute path), so a run folder's recipe.yaml re-runs from anywhere."""
    d = recipe.resolved()
    for key in ("teacher", "init"):
        t = ref_recipe(recipe, key)
        if t is not None:
            d[key] = {**d[key], "recipe": t.resolved()}
        elif getattr(getattr(recipe, key), "merge", None) is not None:  # S33 BAI merge: resolve each input
            from distill.lm.merge import resolved_ref

            d[key] = resolved_ref(recipe, getattr(recipe, key), key)
        elif getattr(recipe, key) is not None:
            d[key] = {k: (str(recipe.path(v).resolve()) if v is not None else None) for k, v in d[key].items()}
    return d


def resolve_model(recipe: Recipe, out: Path, progress: bool, key: str = "teacher") -> Path | None:
    """The folder of the ``teacher`` (or ``init``) model: given (a run or model folder), or trained from
    its recipe once (cached in ``<out>/_teachers``). None when absent, and for an offline teacher cache
    (see ``teacher_cache_dir``)."""
    ref = getattr(recipe, key)
    if ref is None or getattr(ref, "cache", None) is not None:
        return None
    if getattr(ref, "merge", None) is not None:  # S33 BAI: merged once, cached in <out>/_teachers by fingerprint
        from distill.lm.merge import resolve_merge

        return resolve_merge(recipe, ref.merge, out, progress, key)
    if ref.run is not None or ref.model is not None:
        kind, value = ("run", ref.run) if ref.run is not None else ("model", ref.model)
        path = recipe.path(value)
        if not path.is_dir():
            what = "run folder" if kind == "run" else "model folder"
            raise MissingFileError(f"{key}.{kind}: {what} {path} does not exist")
        return path
    base = ref_recipe(recipe, key)
    cached = out / "_teachers" / f"{base.name}-{base.fingerprint()}"
    if not (cached / "metrics.json").is_file():
        run_recipe(base, out=cached.parent, name=cached.name, progress=progress)
    return cached


def resolve_teacher(recipe: Recipe, out: Path, progress: bool) -> Path | None:
    return resolve_model(recipe, out, progress, "teacher")


def teacher_cache_dir(recipe: Recipe) -> Path | None:
    ref = recipe.teacher
    if ref is None or ref.cache is None:
        return None
    path = recipe.path(ref.cache)
    if not path.is_dir():
        raise MissingFileError(f"teacher.cache: {path} does not exist; write it with `distill cache-teacher`")
    return path


def _saved_spec(folder: Path) -> dict[str, Any] | None:
    """The registered arch a classifier run folder was saved with (so its student saves again)."""
    cfg = (folder / "student" / "config.json") if (folder / "student").is_dir() else folder / "config.json"
    d = json.loads(cfg.read_text()) if cfg.is_file() else {}
    return {"name": d["arch"], "params": d["params"]} if d.get("arch") else None


def check_classes(model: nn.Module, num_classes: int, who: str) -> None:
    out = getattr(getattr(model, "head", None), "out_features", None)
    if out is not None and out != num_classes:
        raise MismatchError(f"the {who} predicts {out} classes but the task has {num_classes}")


def make_distiller(recipe: Recipe, student: nn.Module, teacher: nn.Module | None, info: TaskInfo) -> Distiller:
    entry = METHODS.get(recipe.method.name)
    if info.teacher_cache is not None and not entry.obj.supports_cache:
        raise RecipeError(f"method '{entry.name}' cannot train from a teacher cache; give a live teacher instead")
    if entry.obj.needs_teacher and teacher is None and info.teacher_cache is None:
        raise MissingFileError(
            f"method '{entry.name}' needs a teacher: add 'teacher: {{recipe: ...}}', 'teacher: {{run: ...}}' "
            "or 'teacher: {model: ...}'"
        )
    return entry.obj(student, teacher if entry.obj.needs_teacher else None, method_params(recipe), info)


def evaluator(data: ArrayDataset, teacher: nn.Module | None):
    t_logits = predict(teacher, data.x) if teacher is not None else None

    def evaluate(model: nn.Module) -> dict[str, float]:
        return classifier_metrics(predict(model, data.x), data.y, t_logits)

    return evaluate


class ClassifierOps:
    """``TaskOps`` of a classifier ``TaskData``: registered archs, ``save_student`` folders, accuracy,
    ECE and fidelity metrics."""

    def __init__(self, data: TaskData) -> None:
        self.data = data

    def build_model(self, spec: dict[str, Any]) -> nn.Module:
        return build_model(spec["name"], spec["params"], self.data.input_shape, self.data.num_classes)

    def load_model(self, folder: Path) -> nn.Module:
        return load_student(folder)

    def save_model(self, folder: Path, model: nn.Module, spec: dict[str, Any] | None) -> None:
        save_student(folder, model, spec, self.data.input_shape, self.data.num_classes)

    def check_models(self, student: nn.Module, teacher: nn.Module | None) -> None:
        check_classes(student, self.data.num_classes, "student")
        if teacher is not None:
            check_classes(teacher, self.data.num_classes, "teacher")

    def task_info(self, uses_unlabeled: bool) -> TaskInfo:
        d = self.data
        train_set = d.training_set(uses_unlabeled)
        return TaskInfo(d.num_classes, len(train_set), d.input_shape, len(d.train), train_set, d.val, d)

    def open_teacher_cache(self, folder: Path) -> Any:
        raise RecipeError("teacher.cache is for language-model tasks; give a classifier teacher as recipe, run or model")

    def evaluator(self, teacher: nn.Module | None):
        d = self.data
        return evaluator(d.val if d.val is not None else d.test, teacher)  # no val split: last epoch anyway

    def final_metrics(self, student: nn.Module, teacher: nn.Module | None) -> dict[str, float]:
        return final_metrics(student, teacher, self.data)


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
    refs_out: str | Path | None = None,
) -> RunResult:
    """Train ``recipe`` and write ``<out>/<name>``; returns its metrics.

    ``data``, ``student`` and ``teacher`` let Python users pass their own dataset and modules.
    ``refs_out``: where teacher and init recipes are trained once and cached (``<refs_out>/_teachers``;
    default ``out``). A recipe with ``stages`` runs as a chain of runs (``core/stages.py``).
    """
    out = Path(out)
    refs = Path(refs_out) if refs_out is not None else out
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
    if recipe.stages:
        from distill.core.stages import run_stages  # stages builds on run_recipe

        if data is not None or student is not None or stop_at_step is not None:
            raise RecipeError("a staged recipe builds each stage's task and student: pass no data, student or stop_at_step")
        return run_stages(recipe, out, name, resume, progress, teacher, refs)
    if progress is not None:
        recipe = recipe.model_copy(update={"train": recipe.train.model_copy(update={"progress": progress})})

    data = data if data is not None else build_task(recipe)
    ops = task_ops(data)
    teacher_dir = None if teacher is not None else resolve_teacher(recipe, refs, recipe.train.progress)
    if teacher_dir is not None:
        teacher = ops.load_model(teacher_dir)
    cache_dir = teacher_cache_dir(recipe)
    spec = None
    init_dir = resolve_model(recipe, refs, recipe.train.progress, "init") if student is None else None
    seed_everything(recipe.seed)
    if init_dir is not None:
        student = ops.load_model(init_dir)
        spec = _saved_spec(init_dir)
    elif student is None:
        spec = student_spec(recipe, data)
        student = ops.build_model(spec)
    ops.check_models(student, teacher)

    entry = METHODS.get(recipe.method.name)
    info = ops.task_info(entry.obj.uses_unlabeled)
    if cache_dir is not None:
        info.teacher_cache = ops.open_teacher_cache(cache_dir)
    train_set = info.train
    distiller = make_distiller(recipe, student, teacher, info)

    if partial.exists() and not resume:
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    (partial / "recipe.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    trainer = None
    try:
        # the clock includes what methods do before the first step (teacher logits, generated traces)
        started = time.perf_counter()
        trainer = Trainer(distiller, train_set, recipe.train, recipe.seed, partial, ops.evaluator(distiller.teacher))
        state = trainer.fit(resume=resume, stop_at_step=stop_at_step)
        train_s = time.perf_counter() - started
    except BaseException:
        # keep a resumable partial folder (interrupt, NaN after a checkpoint); nothing else
        if (partial / "checkpoints" / "latest").is_dir():
            report.write_csv(partial / "history.csv", trainer.state["history"] if trainer else [])
        else:
            shutil.rmtree(partial, ignore_errors=True)
        raise

    metrics = ops.final_metrics(distiller.student, distiller.teacher)
    metrics["time/train_s"] = train_s  # this session's share when resumed
    tokens = getattr(distiller, "tokens_trained", None)
    if tokens is not None and train_s > 0:
        metrics["time/train_tokens_per_s"] = float(tokens) / train_s
    (partial / "metrics.json").write_text(json.dumps(metrics, indent=2))
    report.write_csv(partial / "history.csv", state["history"])
    ops.save_model(partial / "student", distiller.student, distiller.export_spec(spec))
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

