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
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator

from distill.core import report
from distill.core.recipe import Recipe, Strict, apply_overrides, load_recipe, recipe_from_dict
from distill.core.registry import METHODS
from distill.core.rundir import check_run_name
from distill.core.refs import trained_folder
from distill.core.runner import RunResult, build_task, finished_run, run_recipe, task_ops
from distill.core.trainer import EpochBatches
from distill.errors import MissingFileError, RecipeError, did_you_mean

COLUMNS = [
    ("test/accuracy", "accuracy", True),
    ("test/ece", "ECE", False),
    ("test/nll", "NLL", False),
    ("test/agreement", "agreement", True),
    ("test/kl_to_teacher", "KL(T‖S)", False),
    ("time/train_s", "time (s)", False),
]
EXTRA = [("test/canary_exposure", "canary exposure", False), ("test/attack_success_rate", "attack success", False)]
LM_COLUMNS = [
    ("test/exact_match", "exact match", True),
    ("test/token_kl", "token KL(T‖S)", False),
    ("test/perplexity", "perplexity", False),
    ("time/train_s", "time (s)", False),
    ("time/train_tokens_per_s", "train tokens/s", True),
]
PERCENT = ("test/accuracy", "test/exact_match")


@dataclass(frozen=True)
class Profile:
    """What a leaderboard shows for a kind of task: table columns, the two bar charts, the two curves."""

    columns: list[tuple[str, str, bool]]
    bars: tuple[tuple[str, str], tuple[str, str]]
    curves: tuple[str, str]
    teacher_line: Callable[[dict[str, float]], str]


CLASSIFIER = Profile(
    COLUMNS, (("test/accuracy", "test accuracy"), ("test/ece", "test ECE (lower is better)")),
    ("val/accuracy", "val/agreement"),
    lambda t: f"Teacher: accuracy {100 * t['accuracy']:.2f} %, ECE {t['ece']:.4f}, NLL {t['nll']:.4f}.",
)
LANGUAGE_MODEL = Profile(
    LM_COLUMNS, (("test/exact_match", "test exact match (greedy)"), ("test/token_kl", "test token KL to teacher (lower is better)")),
    ("val/exact_match", "val/token_kl"),
    lambda t: f"Teacher: exact match {100 * t.get('exact_match', float('nan')):.2f} %, perplexity {t['perplexity']:.4f}.",
)


def profile(rows: list["Row"]) -> Profile:
    lm = any("test/perplexity" in r.metrics for row in rows for r in row.runs)
    return LANGUAGE_MODEL if lm else CLASSIFIER


def columns(rows: list["Row"]) -> list[tuple[str, str, bool]]:
    """The standard columns of the task kind plus task-specific metrics that some run reports."""
    return profile(rows).columns + [c for c in EXTRA if any(c[0] in r.metrics for row in rows for r in row.runs)]


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
    recipes: list[Entry | str]

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


def val_score(res: RunResult) -> float:
    """A run's validation score at the end of training (the last evaluation in its history)."""
    for key in VAL_KEYS:
        vals = [h[key] for h in res.history if key in h]
        if key in res.metrics or vals:
            return float(res.metrics.get(key, vals[-1] if vals else 0.0))
    raise RecipeError(f"run {res.run_dir}: no validation score ({' or '.join(VAL_KEYS)}) to tune on; "
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


@dataclass
class Row:
    label: str
    method: str
    runs: list[RunResult]
    tuned: str = ""  # what `tune` tried and chose (validation scores), for the leaderboard

    def stat(self, key: str) -> tuple[float, float | None] | None:
        """Mean and standard deviation over seeds; the deviation is None with one seed (no spread)."""
        vals = [r.metrics[key] for r in self.runs if key in r.metrics]
        if not vals:
            return None
        return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)

    def steps(self) -> list[int]:
        """The optimizer steps each run trained (the last step of its history)."""
        return [max((int(h["step"]) for h in r.history if "step" in h), default=0) for r in self.runs]


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
) -> tuple[list[Row], Path]:
    """Run every entry of a suite over ``seeds`` seeds into ``out`` and write the leaderboard there.

    ``teachers``: where teacher (and init) recipes are trained once and cached (``<teachers>/_teachers``);
    default ``runs`` (shared with ``distill run`` and every other bench) when ``out`` is not given,
    else ``out``."""
    suite, base = load_suite(ref)
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
    rows = []
    for grid, (label, r) in zip(grids, recipes):
        tuned = ""
        if grid:
            scores, results = [], []
            for i, sets in enumerate(grid):
                res = run_recipe(with_overrides(r, sets).model_copy(update={"seed": 0}), out=out,
                                 name=tune_run_name(label, sets), progress=progress, refs_out=teachers)
                scores.append(val_score(res))
                results.append(res)
            best = max(range(len(grid)), key=lambda i: (scores[i], -i))
            chosen = results[best]
            r = with_overrides(r, grid[best])
            tuned = f"{label}: " + ", ".join(f"{' '.join(sets)} → {100 * sc:.1f}" + (" (chosen)" if i == best else "")
                                             for i, (sets, sc) in enumerate(zip(grid, scores)))
        runs = []
        for seed in range(n_seeds):
            rs = r.model_copy(update={"seed": seed})
            if grid and seed == 0:
                res = chosen  # the chosen value's tuning run is seed 0
            elif (done := finished_run(trained_folder(teachers, rs), rs)) is not None:
                res = done  # this very recipe and seed was trained as an init (e.g. the start of the others)
            else:
                res = run_recipe(rs, out=out, name=f"{run_folder_name(label)}-s{seed}", progress=progress,
                                 refs_out=teachers)
            runs.append(res)
            if on_run:
                on_run(label, seed, res)
        rows.append(Row(label, r.method.name, runs, tuned))
    write_leaderboard(out, suite, rows, n_seeds)
    return rows, out


def paired(row: Row, base: Row, key: str) -> tuple[float, float | None] | None:
    """``row`` minus ``base`` on the same seed, mean and standard deviation over seeds: the seed's own
    start (data order, init) cancels, so a small effect shows where the raw spreads overlap."""
    diffs = [r.metrics[key] - b.metrics[key] for r, b in zip(row.runs, base.runs) if key in r.metrics and key in b.metrics]
    if not diffs:
        return None
    return statistics.fmean(diffs), (statistics.stdev(diffs) if len(diffs) > 1 else None)


def fmt(key: str, s: tuple[float, float | None] | None, sign: bool = False) -> str:
    if s is None:
        return "–"
    digits = 1 if key.startswith("time/") else 4
    scale = 100 if key in PERCENT else 1
    digits = 2 if key in PERCENT else digits
    mean = f"{scale * s[0]:{'+' if sign else ''}.{digits}f}"
    return mean if s[1] is None else f"{mean} ± {scale * s[1]:.{digits}f}"


def base_row(suite: Suite, rows: list[Row]) -> Row | None:
    return next((row for row in rows if row.label == suite.baseline), None)


def cell(row: Row, key: str) -> str:
    """``mean ± std`` over seeds; the mean alone with one seed."""
    return fmt(key, row.stat(key))


def steps_line(suite: Suite, rows: list[Row]) -> str:
    """What the leaderboard says about training length: the optimizer steps each entry's runs took."""
    per_row = {row.label: sorted(set(row.steps())) for row in rows}
    values = {v for vs in per_row.values() for v in vs}
    how = {None: "", "first": " (the suite's `steps: first`: the first entry's budget)"}.get(
        suite.steps, f" (the suite's `steps: {suite.steps}`)")
    if len(values) == 1:
        return f"Every run: {values.pop():,} optimizer steps{how}."
    shown = "; ".join(f"{label} {vs[0]:,}" + (f"–{vs[-1]:,}" if len(vs) > 1 else "") for label, vs in per_row.items() if vs)
    return f"Optimizer steps per run: {shown}{how} (not equal: compare with care)."


def teacher_metrics(rows: list[Row]) -> dict[str, float]:
    for row in rows:
        for r in row.runs:
            if any(k.startswith("teacher/") for k in r.metrics):
                return {k.removeprefix("teacher/"): v for k, v in r.metrics.items() if k.startswith("teacher/")}
    return {}


def leaderboard_markdown(suite: Suite, rows: list[Row], n_seeds: int) -> str:
    cols = columns(rows)
    base = base_row(suite, rows)
    key = cols[0][0]
    delta = [f"Δ {cols[0][1]} vs {base.label} (paired)"] if base else []
    head = "| method | " + " | ".join([cols[0][1], *delta, *(c[1] for c in cols[1:])]) + " |"
    spread = "One seed (no spread)" if n_seeds == 1 else f"Mean ± std over {n_seeds} seeds"
    lines = [
        f"# Leaderboard: {suite.name}",
        "",
        suite.description.strip(),
        "",
        f"{spread}; test metrics of the last-epoch model (never selected on test). "
        "Accuracy and exact match in %. " + steps_line(suite, rows) +
        " Each teacher is trained once and shared by every seed: the seed varies the student only.",
        "",
        head,
        "|" + "---|" * (len(cols) + 1 + len(delta)),
    ]
    for row in rows:
        d = [fmt(key, paired(row, base, key), sign=True)] if base else []
        lines.append(f"| {row.label} | " + " | ".join([cell(row, key), *d, *(cell(row, c[0]) for c in cols[1:])]) + " |")
    if base:
        lines += ["", f"Δ: the entry minus `{base.label}` on the same seed (same start and data order), mean ± std "
                  "over seeds; a difference whose spread does not cover 0 is one the seeds agree on."]
    t = teacher_metrics(rows)
    if t:
        lines += ["", profile(rows).teacher_line(t)]
    tuned = [row.tuned for row in rows if row.tuned]
    if tuned:
        lines += ["", "Chosen on the validation split (seed 0, the validation score at the end of training, %):", ""]
        lines += [f"- {t}" for t in tuned]
    lines += ["", "![test metrics](leaderboard.png)", "", "![validation curves](curves.png)", ""]
    return "\n".join(lines)


def write_leaderboard(out: Path, suite: Suite, rows: list[Row], n_seeds: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "leaderboard.md").write_text(leaderboard_markdown(suite, rows, n_seeds))
    with open(out / "leaderboard.csv", "w", newline="") as f:
        w = csv.writer(f)
        cols = columns(rows)
        base = base_row(suite, rows)
        w.writerow(["method", "seeds", "steps"] + [f"{c[0]}_{s}" for c in cols for s in ("mean", "std")]
                   + ([f"delta_{cols[0][0]}_{s}" for s in ("mean", "std")] if base else []))
        for row in rows:
            steps = sorted(set(row.steps()))
            cells: list[Any] = [row.label, len(row.runs), steps[0] if len(steps) == 1 else statistics.fmean(row.steps())]
            for c in cols:
                s = row.stat(c[0])
                cells += [s[0], "" if s[1] is None else s[1]] if s else ["", ""]  # one seed: no std
            if base:
                d = paired(row, base, cols[0][0])
                cells += [d[0], "" if d[1] is None else d[1]] if d else ["", ""]
            w.writerow(cells)
    plot_leaderboard(out / "leaderboard.png", rows, teacher_metrics(rows), base_row(suite, rows))
    plot_curves(out / "curves.png", rows)


def plot_leaderboard(path: Path, rows: list[Row], teacher: dict[str, float], base: Row | None = None) -> None:
    plt = report.pyplot()
    n = 3 if base else 2
    fig, axes = plt.subplots(1, n, figsize=(max(5.5 * n, 0.8 * len(rows) * n / 2 + 3), 4.2))
    labels = [r.label for r in rows]
    if base:  # the paired differences to the control, the figure people compare methods by
        key = profile(rows).bars[0][0]
        ds = [paired(r, base, key) for r in rows]
        scale = 100 if key in PERCENT else 1
        axes[2].bar(labels, [scale * d[0] if d else float("nan") for d in ds],
                    yerr=[scale * (d[1] or 0.0) if d else 0.0 for d in ds], capsize=4, color="tab:green")
        axes[2].axhline(0, color="black", lw=0.8)
        axes[2].set_title(f"{profile(rows).bars[0][1]}: paired Δ vs {base.label}" + (" (points)" if scale == 100 else ""))
        axes[2].tick_params(axis="x", rotation=35)
        for t in axes[2].get_xticklabels():
            t.set_horizontalalignment("right")
    for ax, (key, title) in zip(axes[:2], profile(rows).bars):
        stats = [r.stat(key) for r in rows]
        have = [st for st in stats if st is not None]
        # a method without the metric (e.g. no teacher, so no KL to it) gets no bar, not a zero
        ax.bar(labels, [st[0] if st else float("nan") for st in stats],
               yerr=[(st[1] or 0.0) if st else 0.0 for st in stats], capsize=4, color="tab:blue")
        tk = key.removeprefix("test/")
        if tk in teacher:
            ax.axhline(teacher[tk], color="tab:red", ls="--", label="teacher")
            ax.legend()
        if key in PERCENT and have:
            lo = min(st[0] - (st[1] or 0.0) for st in have)
            hi = max(st[0] + (st[1] or 0.0) for st in have)
            ax.set_ylim(max(0.0, lo - 0.05), min(1.0, max(hi, teacher.get(tk, 0)) + 0.03))
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=35)
        for t in ax.get_xticklabels():
            t.set_horizontalalignment("right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(path: Path, rows: list[Row]) -> None:
    """Validation accuracy (exact match for language models) and fidelity to the teacher (top-1
    agreement, S42; token KL for language models) against training progress (fraction of the run),
    mean over seeds."""
    plt = report.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, profile(rows).curves):
        for i, row in enumerate(rows):
            curves = [report.series(r.history, key) for r in row.runs if r.history]
            curves = [c for c in curves if c[0]]
            if not curves:
                continue
            n = min(len(c[1]) for c in curves)
            xs = [x / curves[0][0][n - 1] for x in curves[0][0][:n]]
            ys = [statistics.fmean(c[1][j] for c in curves) for j in range(n)]
            colour = plt.cm.tab20(i % 20) if len(rows) > 10 else f"C{i}"  # one colour per method in both panels
            ax.plot(xs, ys, label=row.label, color=colour, marker="o" if n == 1 else None)
        ax.set_xlabel("fraction of training"), ax.set_title(key.replace("val/", "validation "))
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
