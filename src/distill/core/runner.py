"""From a recipe to a finished run folder.

Resolves the task, the student, the teacher (a teacher recipe trained once and cached by its
fingerprint, a finished run folder, a model folder, or a kind a family registers: ``core/refs.py``),
the method; trains in ``<out>/<name>.partial`` and renames it to ``<out>/<name>`` only when everything
is written, so a failed run never leaves a run folder.

What depends on the kind of task (building, saving and loading models, evaluation, metrics) goes
through the task's ``TaskOps`` (``core/taskops.py``), which its family provides: the runner knows no
family.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from distill.core import checkpoint as ckpt
from distill.core import refs, report
from distill.core.distiller import Distiller, TaskInfo
from distill.core.recipe import Recipe, method_params, params_of
from distill.core.refs import load_student, ref_recipe, resolved_recipe
from distill.core.registry import METHODS, TASKS
from distill.core.rundir import (INPUTS, PARTIAL, RunResult, changed_inputs, describe_diff, fsync_path, fsync_tree,
                                 input_stamps, recipe_diff, run_folder, run_lock)
from distill.core.stages import run_stages
from distill.core.taskops import task_ops
from distill.core.trainer import Trainer
from distill.errors import MissingFileError, RecipeError, RunExistsError

__all__ = ["RunResult", "build_task", "load_student", "ref_recipe", "resolve_model", "resolve_teacher",
           "resolved_recipe", "run_recipe", "task_ops", "teacher_recipe"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --- pieces of a run -----------------------------------------------------------------------------

def build_task(recipe: Recipe) -> Any:
    """The task's data: a ``TaskData`` (classifiers) or a family's own data object with ``TaskOps``."""
    entry = TASKS.get(recipe.task.name)
    return entry.obj(params_of(recipe.task, TASKS))


def teacher_recipe(recipe: Recipe) -> Recipe | None:
    return ref_recipe(recipe, "teacher")


def student_spec(recipe: Recipe, data: Any = None) -> dict[str, Any]:
    if recipe.student is not None:
        return recipe.student.model_dump()
    obj = data if data is not None and hasattr(data, "default_student") else TASKS.get(recipe.task.name).obj
    default = dict(obj.default_student)
    return {"name": default.pop("arch"), "params": default}


def resolve_model(recipe: Recipe, out: Path, progress: bool, key: str = "teacher", train: bool = True,
                  resume: bool = False) -> Path | None:
    """The folder of the ``teacher`` (or ``init``) model (``core/refs.py``); teacher recipes are trained
    here, once, into ``<out>/_teachers`` (``train=False``: an error instead, e.g. for ``distill eval``).
    ``resume``: a teacher whose training was interrupted continues from its checkpoint."""

    def run(base: Recipe, folder: Path, name: str) -> RunResult:
        if not train:
            raise MissingFileError(f"{key} recipe '{base.name}' is not trained in {folder} (not trained again here)")
        again = resume and ckpt.exists(folder / f"{name}{PARTIAL}" / "checkpoints")
        if again:
            _say(f"resuming the interrupted {key} {folder / name}")
        return run_recipe(base, out=folder, name=name, progress=progress, resume=again, wait=True)  # shared

    return refs.resolve_model(recipe, out, progress, key, run)


def resolve_teacher(recipe: Recipe, out: Path, progress: bool, train: bool = True, resume: bool = False) -> Path | None:
    """The teacher's model folder; None when absent or offline (``teacher_cache_dir``)."""
    if refs.is_offline(recipe.teacher):
        return None
    return resolve_model(recipe, out, progress, "teacher", train, resume)


def _interrupted_refs(recipe: Recipe, out: Path) -> bool:
    """Whether a teacher or init recipe of ``recipe`` has an interrupted run waiting in ``<out>/_teachers``."""
    for key in ("teacher", "init"):
        base = ref_recipe(recipe, key)
        if base is not None:
            folder = refs.trained_folder(out, base)
            if ckpt.exists(folder.with_name(folder.name + PARTIAL) / "checkpoints"):
                return True
    return False


def teacher_cache_dir(recipe: Recipe, out: Path, progress: bool) -> Path | None:
    """The folder of an offline teacher (``teacher: {cache: DIR}``), if the recipe gives one."""
    return resolve_model(recipe, out, progress, "teacher") if refs.is_offline(recipe.teacher) else None


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


# --- the run -------------------------------------------------------------------------------------

def run_recipe(
    recipe: Recipe,
    out: str | Path = "runs",
    name: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool | None = None,
    data: Any = None,
    student: nn.Module | None = None,
    teacher: nn.Module | None = None,
    stop_at_step: int | None = None,
    refs_out: str | Path | None = None,
    wait: bool = False,
) -> RunResult:
    """Train ``recipe`` and write ``<out>/<name>``; returns its metrics.

    ``data``, ``student`` and ``teacher`` let Python users pass their own dataset and modules.
    ``refs_out``: where teacher and init recipes are trained once and cached (``<refs_out>/_teachers``;
    default ``out``). A recipe with ``stages`` runs as a chain of runs (``core/stages.py``).
    The run folder is locked while it is written (``core/rundir.py``): a second writer is refused, or,
    with ``wait`` (shared teachers), waits and then reuses what the first one wrote.
    """
    out = Path(out)
    refs_dir = Path(refs_out) if refs_out is not None else out
    name = recipe.name if name is None else name
    final = run_folder(out, name)
    resolved = resolved_recipe(recipe)
    _check_out(out)
    with run_lock(out, name, wait=wait, on_wait=lambda who: _say(f"waiting for {final}, being written by {who}")):
        return _run_locked(recipe, out, name, resolved, resume, overwrite, progress, data, student, teacher,
                           stop_at_step, refs_dir)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise MissingFileError(f"output folder {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise MissingFileError(f"cannot create the output folder {out}: {err.strerror}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise MissingFileError(f"output folder {out} is not writable")


def _finished(final: Path, resolved: dict[str, Any], overwrite: bool) -> RunResult | None:
    """A finished run folder with the same recipe (reused), or None when there is none or ``overwrite``."""
    if not final.exists():
        return None
    done = final / "recipe.yaml"
    if not done.is_file():
        raise RunExistsError(f"{final} exists and is not a run folder (no recipe.yaml); it is not touched: "
                             "choose another name or --out")
    if overwrite:
        return None
    old = yaml.safe_load(done.read_text())
    diff = recipe_diff(old, resolved)
    if diff:
        raise RunExistsError(f"run folder {final} exists with another recipe ({describe_diff(old, resolved, diff)}); "
                             "choose another name, --out, or --overwrite")
    changed = changed_inputs(final)
    if changed:
        raise RunExistsError(f"run folder {final} was trained from inputs that changed since: {', '.join(changed[:3])}; "
                             "choose another name, --out, or --overwrite")
    metrics = json.loads((final / "metrics.json").read_text())
    _say(f"{final} is already trained with this recipe: reusing it (--overwrite trains again)")
    return RunResult(final, metrics, report.read_csv(final / "history.csv"))


def finished_run(folder: Path, recipe: Recipe) -> RunResult | None:
    """``folder`` as a result if it is a finished run of exactly ``recipe`` (same resolved recipe and
    inputs), else None; a folder that exists with another recipe is an error, as for ``run_recipe``."""
    return _finished(folder, resolved_recipe(recipe), False) if (folder / "metrics.json").is_file() else None


def _prepare_partial(partial: Path, resolved: dict[str, Any], resume: bool, overwrite: bool,
                     fresh_ok: bool = False) -> bool:
    """The ``.partial`` folder to train in: resumed (same recipe, a checkpoint; returns True), or started
    afresh. An interrupted run's checkpoint is only dropped with ``overwrite``. ``fresh_ok``: ``resume``
    without a checkpoint starts afresh (it resumed this run's interrupted teacher instead)."""
    has_ckpt = ckpt.exists(partial / "checkpoints")
    if resume and not has_ckpt and fresh_ok:
        resume = False
    if resume:
        if not has_ckpt:
            raise MissingFileError(f"--resume: no interrupted run to resume (no checkpoint in {partial}); "
                                   "run without --resume to start")
        old = yaml.safe_load((partial / "recipe.yaml").read_text()) if (partial / "recipe.yaml").is_file() else {}
        diff = recipe_diff(old, resolved)
        if diff:
            raise RecipeError(f"--resume: the recipe differs from the interrupted run's ({describe_diff(old, resolved, diff)}); "
                              "resume with the same recipe, or start over with --overwrite")
        return True
    if has_ckpt and not overwrite:
        raise RunExistsError(f"{partial} holds an interrupted run; continue it with --resume, or start over with "
                             "--overwrite")
    if partial.exists():
        shutil.rmtree(partial)  # ours, and with no checkpoint (or --overwrite): nothing to keep
    partial.mkdir(parents=True)
    (partial / "recipe.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    return False


def _run_locked(recipe: Recipe, out: Path, name: str, resolved: dict[str, Any], resume: bool, overwrite: bool,
                progress: bool | None, data: Any, student: nn.Module | None, teacher: nn.Module | None,
                stop_at_step: int | None, refs_dir: Path) -> RunResult:
    final, partial = out / name, out / f"{name}{PARTIAL}"
    reused = _finished(final, resolved, overwrite)
    if reused is not None:
        return reused
    if recipe.stages:
        if data is not None or student is not None or stop_at_step is not None:
            raise RecipeError("a staged recipe builds each stage's task and student: pass no data, student or stop_at_step")
        return run_stages(recipe, out, name, resume, overwrite, progress, teacher, refs_dir, run_recipe)
    if progress is not None:
        recipe = recipe.model_copy(update={"train": recipe.train.model_copy(update={"progress": progress})})

    data = data if data is not None else build_task(recipe)
    ops = task_ops(data)
    refs_resumed = resume and _interrupted_refs(recipe, refs_dir)
    teacher_dir = None if teacher is not None else resolve_teacher(recipe, refs_dir, recipe.train.progress,
                                                                   resume=resume)
    if teacher_dir is not None:
        teacher = ops.load_model(teacher_dir)
    cache_dir = teacher_cache_dir(recipe, refs_dir, recipe.train.progress)
    spec = None
    init_dir = (resolve_model(recipe, refs_dir, recipe.train.progress, "init", resume=resume)
                if student is None else None)
    seed_everything(recipe.seed)
    if init_dir is not None:
        student = ops.load_model(init_dir)
        spec = ops.saved_spec(init_dir)
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

    resume = _prepare_partial(partial, resolved, resume, overwrite, fresh_ok=refs_resumed)
    trainer = None
    try:
        # the clock includes what methods do before the first step (teacher logits, generated traces)
        started = time.perf_counter()
        trainer = Trainer(distiller, train_set, recipe.train, recipe.seed, partial, ops.evaluator(distiller.teacher))
        state = trainer.fit(resume=resume, stop_at_step=stop_at_step)
        train_s = time.perf_counter() - started
    except BaseException:
        # keep a resumable partial folder (interrupt, NaN after a checkpoint); nothing else
        if ckpt.exists(partial / "checkpoints"):
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
    (partial / INPUTS).write_text(json.dumps(input_stamps(resolved), indent=2))
    fsync_tree(partial)
    if final.exists():  # --overwrite of a run folder (checked above)
        shutil.rmtree(final)
    partial.rename(final)
    fsync_path(out)
    return RunResult(final, metrics, state["history"], distiller.student)
