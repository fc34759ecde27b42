"""Suites: recipes × seeds -> a leaderboard (mean ± std over seeds) in Markdown, CSV and plots.

A suite is YAML::

    name: demo
    seeds: 3
    steps: first                                     # optional: every entry trains the first entry's steps
    recipes:
      - mnist1d-ce                                   # a shipped recipe name or a path
      - {recipe: mnist1d-kd, label: kd+ls, set: [method.standardize=true]}

``steps`` (optional) gives every entry the same number of optimizer steps: ``first``, the first entry's
(after ``--set`` overrides: epochs × steps per epoch, or its ``train.max_steps``), or a number. An entry
with more steps than that gets ``train.max_steps``; one with fewer gets more epochs (and
``train.max_steps`` where the last epoch is cut); an entry that already has it is left as it is.
Without ``steps`` each entry trains as its recipe says; the leaderboard states the steps either way.

``tune`` (optional, per entry) chooses hyper-parameters on the validation split, never on test::

      - {recipe: arithmetic-grpo, label: grpo, tune: {train.lr: [3.0e-5, 1.0e-4, 3.0e-4]}}

Every combination of the listed values trains on seed 0 (runs ``<label>-tune-<key>_<value>-s0``); the one with the
best validation score at the end of training (``val/exact_match`` for language models,
``val/accuracy`` for classifiers; the first listed wins a tie) is then run for seeds 1, 2, ... (its
tuning run is seed 0), and the leaderboard lists what was tried, the scores and the choice.

Seeds: seed ``s`` sets the student recipe's ``seed`` (initialisation, data order, the method's own
randomness). A teacher (or init) recipe keeps its own seed, unless the reference says ``seed: same``
(then seed ``s`` starts from the init trained with seed ``s``): it is trained once, into
``<teachers>/_teachers/<name>-<fingerprint>``, and shared by every seed and entry that names it. An entry
whose recipe and seed were already trained there (the start of the others) reuses that run. ``teachers`` defaults to ``runs`` (the teachers ``distill run`` trains) when
no ``out`` is given, else to ``out``. Finished runs with an identical resolved recipe are reused.

``metrics`` (optional) names the test metrics of a task that is neither a classifier nor a language
model, the first the main one (bars, paired Δ, ``tune`` on its ``val/`` form)::

    metrics: [{key: test/psnr, title: PSNR}, {key: test/loss, higher: false}]

``parts`` (instead of ``recipes``) makes a suite of suites: each part (a shipped suite or one beside this
file) runs into ``<out>/<part>`` with its own leaderboard, and ``<out>/leaderboard.md`` indexes their
main metrics (``distill bench features``: each method on its own task).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from distill.bench.leaderboard import Metric, Row, write_index, write_leaderboard
from distill.core.recipe import Recipe, Strict, apply_overrides, load_recipe, recipe_from_dict
from distill.core.registry import METHODS
from distill.core.rundir import check_run_name
from distill.core.refs import trained_folder
from distill.core.runner import RunResult, build_task, finished_run, run_recipe, task_ops
from distill.core.trainer import EpochBatches
from distill.errors import MissingFileError, RecipeError, did_you_mean

class Entry(Strict):
    recipe: str
    label: str | None = None
    set: list[str] = Field(default_factory=list)
    tune: dict[str, list[Any]] = Field(
        default_factory=dict, description="recipe key -> values to try on seed 0; the best on validation is run")

    @field_validator("tune")
    @classmethod
    def _tune(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in v.items():
            if not values:
                raise ValueError(f"'{key}': give at least one value")
        return v


class Suite(Strict):
    name: str
    description: str = ""
    seeds: int = Field(3, ge=1)
    steps: int | Literal["first"] | None = Field(
        None, description="optimizer steps of every entry: a number, or 'first' (the first entry's); "
        "absent: each entry's recipe decides")
    baseline: str | None = Field(
        None, description="label of the control entry: the leaderboard adds each entry's difference to it "
        "on the same seed (paired), mean ± std over seeds")
    metrics: list[Metric] | None = Field(
        None, description="test metrics the leaderboard shows, the first the main one (bars, Δ, what tune "
        "selects on as val/...); absent: the classifier or language-model columns")
    recipes: list[Entry | str] = Field(default_factory=list)
    parts: list[str] = Field(
        default_factory=list, description="other suites (names or paths) run in turn into <out>/<part>, with "
        "an index leaderboard; a suite has recipes or parts")

    @model_validator(mode="after")
    def _recipes_or_parts(self) -> "Suite":
        if bool(self.recipes) == bool(self.parts):
            raise ValueError("give either recipes or parts (a suite of suites)")
        return self

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: int | str | None) -> int | str | None:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be >= 1, or 'first'")
        return v

    def entries(self) -> list[Entry]:
        return [Entry(recipe=e) if isinstance(e, str) else e for e in self.recipes]


def shipped_suites() -> list[str]:
    folder = resources.files("distill") / "suites"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_suite(ref: str) -> tuple[Suite, Path]:
    path = Path(ref)
    if not path.is_file():
        shipped = resources.files("distill") / "suites" / f"{ref}.yaml"
        if not shipped.is_file():
            raise MissingFileError(f"suite '{ref}' not found{did_you_mean(ref, shipped_suites())}; shipped: {shipped_suites()}")
        path = Path(str(shipped))
    try:
        return Suite.model_validate(yaml.safe_load(path.read_text())), path.parent
    except ValidationError as err:
        e = err.errors()[0]
        raise RecipeError(f"suite {path}: key '{'.'.join(map(str, e['loc']))}': {e['msg']}") from None


VAL_KEYS = ("val/exact_match", "val/accuracy")  # what `tune` selects on: the task kind's validation score


def val_score(res: RunResult, main: Metric | None = None) -> float:
    """A run's validation score at the end of training (the last evaluation in its history), higher
    better: ``val/<main>`` (negated when lower is better) for a suite with ``metrics``, else the task
    kind's."""
    keys = ("val/" + main.name,) if main else VAL_KEYS
    for key in keys:
        vals = [h[key] for h in res.history if key in h]
        if key in res.metrics or vals:
            v = float(res.metrics.get(key, vals[-1] if vals else 0.0))
            return v if main is None or main.higher else -v
    raise RecipeError(f"run {res.run_dir}: no validation score ({' or '.join(keys)}) to tune on; "
                      "set train.eval_every")


def tune_grid(tune: dict[str, list[Any]]) -> list[list[str]]:
    """Every combination of ``tune``'s values as ``--set`` overrides, in the order listed."""
    if not tune:
        return []
    keys = list(tune)
    return [[f"{k}={json.dumps(v)}" for k, v in zip(keys, combo)] for combo in itertools.product(*tune.values())]


def tune_run_name(label: str, sets: list[str]) -> str:
    """A tuning run's folder, named by its values (``grpo-tune-train.lr_0.0001-s0``), so a grid that
    grows later reuses the runs it already has."""
    return run_folder_name(f"{label}-tune-{'-'.join(sets)}-s0")


def with_overrides(recipe: Recipe, overrides: list[str]) -> Recipe:
    return recipe_from_dict(apply_overrides(recipe.model_dump(mode="json", exclude={"base_dir"}), overrides),
                            base_dir=recipe.base_dir)


def run_folder_name(label: str) -> str:
    """A label as a run folder name: characters a run name may not hold (e.g. '+') become '_'."""
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", label)


def steps_per_epoch(recipe: Recipe, tasks: dict[str, Any]) -> int:
    """Optimizer steps per epoch of ``recipe``, as the trainer counts them (its method's training set:
    labeled samples, plus the transfer set for methods that use it). ``tasks`` caches built tasks."""
    key = json.dumps(recipe.task.model_dump(mode="json"), sort_keys=True)
    if key not in tasks:
        tasks[key] = task_ops(build_task(recipe))
    n = len(tasks[key].task_info(METHODS.get(recipe.method.name).obj.uses_unlabeled).train)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return math.ceil(EpochBatches(n, recipe.train.batch_size, 0, 0, world).per_epoch / recipe.train.grad_accum)


def planned_steps(recipe: Recipe, spe: int) -> int:
    total = recipe.train.epochs * spe
    return min(total, recipe.train.max_steps) if recipe.train.max_steps else total


def equal_steps(suite: Suite, entries: list[Entry], recipes: list[tuple[str, Recipe]], base: Path,
                overrides: list[str]) -> tuple[list[tuple[str, Recipe]], int]:
    """Every entry's recipe set to train exactly the suite's ``steps`` (see the module's docstring)."""
    tasks: dict[str, Any] = {}
    for label, r in recipes:
        if r.stages:
            raise RecipeError(f"suite {suite.name}: 'steps' cannot budget entry '{label}': a staged recipe's "
                              "stages set their own steps")
    spes = [steps_per_epoch(r, tasks) for _, r in recipes]
    budget = planned_steps(recipes[0][1], spes[0]) if suite.steps == "first" else int(suite.steps)
    out = []
    for e, (label, r), spe in zip(entries, recipes, spes):
        have = planned_steps(r, spe)
        if have != budget:
            epochs = r.train.epochs if have > budget else max(r.train.epochs, math.ceil(budget / spe))
            extra = [f"train.epochs={epochs}", f"train.max_steps={'null' if epochs * spe == budget else budget}"]
            r = load_recipe(e.recipe, e.set + overrides + extra, base_dir=base)
            assert planned_steps(r, spe) == budget
        out.append((label, r))
    return out, budget


def run_suite(
    ref: str,
    out: str | Path | None = None,
    seeds: int | None = None,
    overrides: list[str] | None = None,
    on_run: Callable[[str, int, RunResult], None] | None = None,
    progress: bool = True,
    teachers: str | Path | None = None,
    jobs: int = 1,
) -> tuple[list[Row], Path]:
    """Run every entry of a suite over ``seeds`` seeds into ``out`` and write the leaderboard there.

    ``teachers``: where teacher (and init) recipes are trained once and cached (``<teachers>/_teachers``);
    default ``runs`` (shared with ``distill run`` and every other bench) when ``out`` is not given,
    else ``out``. ``jobs`` > 1: that many runs at once, each in its own process (``run_many``)."""
    suite, base = load_suite(ref)
    if suite.parts:
        raise RecipeError(f"suite {suite.name} is a suite of suites ({', '.join(suite.parts)}): run it with run_suites")
    default_out = out is None
    out = Path(out) if out else Path("runs") / "bench" / suite.name
    teachers = Path(teachers) if teachers is not None else (Path("runs") if default_out else out)
    n_seeds = seeds or suite.seeds
    entries = suite.entries()
    overrides = list(overrides or [])
    # validate every recipe before training anything
    recipes = []
    for e in entries:
        r = load_recipe(e.recipe, e.set + overrides, base_dir=base)
        recipes.append((e.label or r.name, r))
    folders: dict[str, str] = {}
    for label, _ in recipes:
        folder = run_folder_name(label)
        if folder in folders:
            raise RecipeError(f"suite {suite.name}: labels '{folders[folder]}' and '{label}' name the same run folders "
                              f"('{folder}-s0', ...); give the entries distinct labels")
        check_run_name(f"{folder}-s0", f"suite {suite.name}: label '{label}' gives the run name")
        folders[folder] = label
    if suite.baseline is not None and suite.baseline not in [label for label, _ in recipes]:
        raise RecipeError(f"suite {suite.name}: baseline '{suite.baseline}' is not an entry's label"
                          f"{did_you_mean(suite.baseline, [label for label, _ in recipes])}")
    if suite.steps is not None:
        recipes, _ = equal_steps(suite, entries, recipes, base, overrides)
    grids = [tune_grid(e.tune) for e in entries]
    for grid, (label, r) in zip(grids, recipes):
        for sets in grid:
            with_overrides(r, sets)  # every tried value is valid before anything trains
    shown = (lambda sc: f"{100 * sc:.1f}") if not suite.metrics else (lambda sc: f"{abs(sc):.4g}")  # noqa: E731
    # wave 1: every tuning run (seed 0 of each grid point); wave 2: the seeds, the tuned entries with their choice
    tune_jobs = [(r_i, with_overrides(r, sets).model_copy(update={"seed": 0}), tune_run_name(label, sets))
                 for r_i, (grid, (label, r)) in enumerate(zip(grids, recipes)) for sets in grid]
    tuned_results = run_many([(rec, out, name, teachers) for _, rec, name in tune_jobs], jobs, progress)
    chosen: dict[int, tuple[Recipe, RunResult, str]] = {}
    for r_i, (grid, (label, r)) in enumerate(zip(grids, recipes)):
        if not grid:
            continue
        results = [res for (j, _, _), res in zip(tune_jobs, tuned_results) if j == r_i]
        scores = [val_score(res, suite.metrics[0] if suite.metrics else None) for res in results]
        best = max(range(len(grid)), key=lambda i: (scores[i], -i))
        tuned = f"{label}: " + ", ".join(f"{' '.join(sets)} → {shown(sc)}" + (" (chosen)" if i == best else "")
                                         for i, (sets, sc) in enumerate(zip(grid, scores)))
        chosen[r_i] = (with_overrides(r, grid[best]), results[best], tuned)
    planned: list[tuple[int, int, Recipe]] = []  # (entry, seed, recipe) still to run
    done: dict[tuple[int, int], RunResult] = {}
    for r_i, (label, r) in enumerate(recipes):
        r = chosen[r_i][0] if r_i in chosen else r
        for seed in range(n_seeds):
            rs = r.model_copy(update={"seed": seed})
            if r_i in chosen and seed == 0:
                done[(r_i, seed)] = chosen[r_i][1]  # the chosen value's tuning run is seed 0
                if on_run:
                    on_run(label, seed, done[(r_i, seed)])
            else:  # _run_spec reuses this very recipe and seed where it was trained as an init
                planned.append((r_i, seed, rs))

    def finished(i: int, res: RunResult) -> None:
        r_i, seed, _ = planned[i]
        done[(r_i, seed)] = res
        if on_run:
            on_run(recipes[r_i][0], seed, res)

    specs = [(rs, out, f"{run_folder_name(recipes[r_i][0])}-s{seed}", teachers) for r_i, seed, rs in planned]
    run_many(specs, jobs, progress, finished)
    rows = []
    for r_i, (label, r) in enumerate(recipes):
        runs = [done[(r_i, seed)] for seed in range(n_seeds)]
        rows.append(Row(label, r.method.name, runs, chosen[r_i][2] if r_i in chosen else ""))
    write_leaderboard(out, suite, rows, n_seeds)
    return rows, out



def _run_spec(spec: tuple[Recipe, Path, str, Path], progress: bool) -> RunResult:
    """One planned run, unless an earlier run trained this very recipe and seed as an init meanwhile (an
    entry started from another entry's runs, ``seed: same``): then that run."""
    recipe, out, name, teachers = spec
    if (done := finished_run(trained_folder(teachers, recipe), recipe)) is not None:
        return done
    return run_recipe(recipe, out=out, name=name, progress=progress, refs_out=teachers)


def _run_one(spec: tuple[Recipe, Path, str, Path]) -> RunResult:
    res = _run_spec(spec, False)
    res.student = None  # results travel back between processes without the model
    return res


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def run_many(specs: list[tuple[Recipe, Path, str, Path]], jobs: int, progress: bool,
             on_done: Callable[[int, RunResult], None] | None = None) -> list[RunResult]:
    """``run_recipe`` over ``(recipe, out, name, teachers)`` specs, in order; ``jobs`` > 1: in a pool of
    that many processes (spawned, each with its share of the CPU threads; on a GPU they share it). A
    teacher several runs need is trained by the first and waited for by the others (its lock); a run
    that another entry trains as its init is reused when that init is finished first (in a pool the two
    may also run at once: trained twice, same result).
    ``on_done(i, result)`` as each run finishes."""
    results: list[RunResult | None] = [None] * len(specs)
    if jobs <= 1 or len(specs) <= 1:
        for i, spec in enumerate(specs):
            results[i] = _run_spec(spec, progress)
            if on_done:
                on_done(i, results[i])
        return results  # type: ignore[return-value]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(min(jobs, len(specs)), mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_init, initargs=(threads,)) as pool:
        futures = {pool.submit(_run_one, spec): i for i, spec in enumerate(specs)}
        for k, fut in enumerate(as_completed(futures), 1):
            i = futures[fut]
            results[i] = fut.result()
            if on_done:
                on_done(i, results[i])
            if progress:
                print(f"[{k}/{len(specs)}] {specs[i][2]} finished", file=sys.stderr, flush=True)
    return results  # type: ignore[return-value]


def run_suites(
    ref: str,
    out: str | Path | None = None,
    seeds: int | None = None,
    overrides: list[str] | None = None,
    on_run: Callable[[str, int, RunResult], None] | None = None,
    progress: bool = True,
    teachers: str | Path | None = None,
    jobs: int = 1,
) -> tuple[list[tuple[Suite, list[Row], Path]], Path]:
    """``run_suite`` for a plain suite; for a suite of suites (``parts``), each part into
    ``<out>/<part>`` and an index leaderboard in ``out``, every part's teachers trained once into
    ``<teachers>/_teachers`` (default ``out``)."""
    suite, base = load_suite(ref)
    if not suite.parts:
        rows, folder = run_suite(ref, out=out, seeds=seeds, overrides=overrides, on_run=on_run, progress=progress,
                                 teachers=teachers, jobs=jobs)
        return [(suite, rows, folder)], folder
    out = Path(out) if out else Path("runs") / "bench" / suite.name
    parts = []
    for part in suite.parts:  # a part beside the suite's file first, then a shipped one; all checked first
        ref_i = str(base / f"{part}.yaml") if (base / f"{part}.yaml").is_file() else part
        parts.append((ref_i, load_suite(ref_i)[0]))
    results = []
    for ref_i, part in parts:
        rows, folder = run_suite(ref_i, out=out / part.name, seeds=seeds or suite.seeds, overrides=overrides,
                                 on_run=on_run, progress=progress, teachers=teachers or out, jobs=jobs)
        results.append((part, rows, folder))
        write_index(out, suite, results)  # the index grows as parts finish
    return results, out
