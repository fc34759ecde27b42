"""Staged recipes: one recipe, a chain of ordinary runs (S24 AceReason-Nemotron: math-only RL, then
code-only RL, with the response length growing from stage to stage).

A recipe with ``stages:`` trains each stage as a run of its own. Stage ``i`` is the base recipe (less
``stages``) with the stage's changes, applied in this order: ``method`` replaces the base's method,
``train`` is merged into the base's train section key by key, then ``set`` applies ``--set``-style
overrides (``distill.core.recipe.apply_overrides``; keys as in a recipe file: ``task.max_digits=2``,
``method.max_new_tokens=32``, ``train.sampler.weights={'+': 1}``). Stage ``i > 0`` starts from stage
``i − 1``'s student: its ``student`` key is dropped and ``init: {run: <stage i − 1 folder>}`` set, the
existing ``init`` mechanism. A stage's task mix is its task (``task.ops=['+']``) or, on a task with
domains, ``train.sampler: {name: domains, weights: {...}}`` (``core/sampler.py``).

``recipe_from_dict`` builds every stage's recipe, so a bad key in any stage fails before anything
trains. The run folder::

    <out>/<name>/
      recipe.yaml     the staged recipe (resolved)
      student/        the last stage's student
      metrics.json    the last stage's metrics; every stage's also under stage/<stage name>/...;
                      time/train_s is the sum over the stages
      history.csv     the stages' histories one after another: ``step`` counts on across stages,
                      ``stage`` is the stage's index
      report.md, curves.png
      stages/<i>-<stage name>/   each stage's own run folder

It is written in ``<out>/<name>.partial`` and renamed when every stage is done, so a failure leaves no
``<out>/<name>``. With ``resume``, finished stage folders are reused (``run_recipe`` reuses a folder
whose recipe.yaml matches) and an interrupted stage resumes from its checkpoint. Teacher and init
recipes are trained once and cached in ``<out>/_teachers``, as for a plain run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from collections.abc import Callable
from typing import Any

import yaml
from torch import nn

from distill.core import checkpoint as ckpt
from distill.core import report
from distill.core.recipe import Recipe, stage_folder, stage_recipe, stage_recipes
from distill.core.refs import resolved_recipe
from distill.core.rundir import PARTIAL, RunResult, describe_diff, recipe_diff
from distill.errors import MissingFileError, RecipeError, RunExistsError

STAGES = "stages"


def _kept(folder: Path) -> bool:
    """Whether a stage folder holds work worth resuming: a finished stage or a checkpoint."""
    return (folder / "metrics.json").is_file() or ckpt.exists(folder / "checkpoints")


def _relocate(stage_dir: Path, old: str, new: str) -> None:
    """Point a stage's ``init.run`` from the ``.partial`` folder it trained in to the final folder."""
    path = stage_dir / "recipe.yaml"
    d = yaml.safe_load(path.read_text())
    run = (d.get("init") or {}).get("run")
    if isinstance(run, str) and run.startswith(old):
        d["init"]["run"] = new + run[len(old):]
        path.write_text(yaml.safe_dump(d, sort_keys=False))


def _last_step(history: list[dict[str, Any]]) -> int:
    return max((int(r["step"]) for r in history), default=0)


def run_stages(recipe: Recipe, out: Path, name: str, resume: bool, overwrite: bool, progress: bool | None,
               teacher: nn.Module | None, refs: Path, run_recipe: Callable[..., RunResult]) -> RunResult:
    """Train the stages of ``recipe`` one after another into ``<out>/<name>`` (see the module doc).
    Called by ``run_recipe`` (passed in, so each stage is an ordinary run) under the run's lock, which
    has already checked for (and reused) a finished folder."""
    assert recipe.stages is not None
    stage_recipes(recipe)  # again, for recipes built without recipe_from_dict
    final, partial = out / name, out / f"{name}.partial"
    resolved = resolved_recipe(recipe)
    folder = partial / STAGES
    kept = folder.is_dir() and any(_kept(f) for f in folder.iterdir())
    if resume:
        if not kept:
            raise MissingFileError(f"--resume: no interrupted run to resume (no stage to continue in {partial}); "
                                   "run without --resume to start")
        old = yaml.safe_load((partial / "recipe.yaml").read_text())
        diff = recipe_diff(old, resolved)
        if diff:
            raise RecipeError(f"--resume: the recipe differs from the interrupted run's ({describe_diff(old, resolved, diff)}); "
                              "resume with the same recipe, or start over with --overwrite")
    elif kept and not overwrite:
        raise RunExistsError(f"{partial} holds an interrupted staged run; continue it with --resume, or start over "
                             "with --overwrite")
    elif partial.exists():
        shutil.rmtree(partial)  # ours, with nothing to resume (or --overwrite)
    folder.mkdir(parents=True, exist_ok=True)
    (partial / "recipe.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    results = []
    start: str | None = None
    try:
        for i in range(len(recipe.stages)):
            stage = stage_folder(i, recipe)  # resume only the stage that was interrupted; finished ones are reused
            res = run_recipe(stage_recipe(recipe, i, start), out=folder, name=stage, progress=progress, teacher=teacher,
                             resume=resume and ckpt.exists(folder / f"{stage}{PARTIAL}" / "checkpoints"), refs_out=refs)
            results.append(res)
            start = str(res.run_dir.resolve())
    except BaseException:
        if not any(_kept(f) for f in folder.iterdir()):  # nothing to resume: leave no trace
            shutil.rmtree(partial, ignore_errors=True)
        raise

    last = results[-1]
    shutil.rmtree(partial / "student", ignore_errors=True)
    shutil.copytree(last.run_dir / "student", partial / "student")
    metrics = dict(last.metrics)
    metrics["time/train_s"] = sum(float(r.metrics.get("time/train_s", 0.0)) for r in results)
    for stage, res in zip(recipe.stages, results):
        metrics.update({f"stage/{stage.name}/{k}": v for k, v in res.metrics.items()})
    history: list[dict[str, Any]] = []
    offset = 0
    for i, res in enumerate(results):  # the stage column is numeric: history.csv reads back as numbers
        history += [{"step": int(r["step"]) + offset, "stage": i, **{k: v for k, v in r.items() if k != "step"}}
                    for r in res.history]
        offset += _last_step(res.history)
    (partial / "metrics.json").write_text(json.dumps(metrics, indent=2))
    report.write_csv(partial / "history.csv", history)
    report.write_run_report(partial, resolved, metrics, history)
    if final.exists():
        shutil.rmtree(final)
    old = str(partial.resolve())
    partial.rename(final)
    new = str(final.resolve())
    for i in range(len(recipe.stages)):
        _relocate(final / STAGES / stage_folder(i, recipe), old, new)
    return RunResult(final, metrics, history, last.student)
