"""Leaderboards: a suite's rows (mean ± std over seeds) as Markdown, CSV and plots.

What a leaderboard shows depends on the task kind (``Profile``): classifiers (accuracy, ECE, ...),
language models (exact match, perplexity, ...), or the metrics a suite names itself (``metrics:``,
e.g. ``test/map50`` for detection, ``test/psnr`` for super-resolution), the first of which is the
main one (bars, paired differences, what ``tune`` selects on as ``val/...``).
"""

from __future__ import annotations

import csv
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from distill.core import report
from distill.core.recipe import Strict
from distill.core.runner import RunResult

if TYPE_CHECKING:
    from distill.bench.suite import Suite

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


class Metric(Strict):
    """A test metric a suite shows: ``test/<name>`` in every run's metrics.json; ``val/<name>`` is what
    ``tune`` selects on when it is the suite's first (main) metric."""

    key: str = Field(pattern=r"^test/.+")
    title: str | None = None
    higher: bool = Field(True, description="higher is better")

    @property
    def name(self) -> str:
        return self.key.removeprefix("test/")


def teacher_line(metrics: list[Metric]) -> Callable[[dict[str, float]], str]:
    def line(t: dict[str, float]) -> str:
        shown = [f"{m.title or m.name} {t[m.name]:.4f}" for m in metrics if m.name in t]
        return "Teacher: " + ", ".join(shown) + "." if shown else ""
    return line


def profile(rows: list["Row"], metrics: list[Metric] | None = None) -> Profile:
    """The suite's own ``metrics`` (any task kind), else the classifier or language-model profile."""
    if metrics:
        cols = [(m.key, m.title or m.name, m.higher) for m in metrics] + [("time/train_s", "time (s)", False)]
        second = cols[1] if len(metrics) > 1 else cols[-1]
        better = lambda c: c[1] + ("" if c[2] else " (lower is better)")  # noqa: E731
        return Profile(cols, ((cols[0][0], "test " + better(cols[0])), (second[0], "test " + better(second))),
                       ("val/" + metrics[0].name, "val/" + (metrics[1].name if len(metrics) > 1 else metrics[0].name)),
                       teacher_line(metrics))
    lm = any("test/perplexity" in r.metrics for row in rows for r in row.runs)
    return LANGUAGE_MODEL if lm else CLASSIFIER


def columns(rows: list["Row"], prof: Profile) -> list[tuple[str, str, bool]]:
    """The profile's columns plus task-specific metrics that some run reports."""
    return prof.columns + [c for c in EXTRA if any(c[0] in r.metrics for row in rows for r in row.runs)]


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
    prof = profile(rows, suite.metrics)
    cols = columns(rows, prof)
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
        lines += ["", prof.teacher_line(t)]
    tuned = [row.tuned for row in rows if row.tuned]
    if tuned:
        lines += ["", "Chosen on the validation split (seed 0, the validation score at the end of training, %):", ""]
        lines += [f"- {t}" for t in tuned]
    lines += ["", "![test metrics](leaderboard.png)", "", "![validation curves](curves.png)", ""]
    return "\n".join(lines)


def write_leaderboard(out: Path, suite: Suite, rows: list[Row], n_seeds: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    prof = profile(rows, suite.metrics)
    (out / "leaderboard.md").write_text(leaderboard_markdown(suite, rows, n_seeds))
    with open(out / "leaderboard.csv", "w", newline="") as f:
        w = csv.writer(f)
        cols = columns(rows, prof)
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
    plot_leaderboard(out / "leaderboard.png", rows, prof, teacher_metrics(rows), base_row(suite, rows))
    plot_curves(out / "curves.png", rows, prof)


def plot_leaderboard(path: Path, rows: list[Row], prof: Profile, teacher: dict[str, float], base: Row | None = None) -> None:
    plt = report.pyplot()
    n = 3 if base else 2
    fig, axes = plt.subplots(1, n, figsize=(max(5.5 * n, 0.8 * len(rows) * n / 2 + 3), 4.2))
    labels = [r.label for r in rows]
    if base:  # the paired differences to the control, the figure people compare methods by
        key = prof.bars[0][0]
        ds = [paired(r, base, key) for r in rows]
        scale = 100 if key in PERCENT else 1
        axes[2].bar(labels, [scale * d[0] if d else float("nan") for d in ds],
                    yerr=[scale * (d[1] or 0.0) if d else 0.0 for d in ds], capsize=4, color="tab:green")
        axes[2].axhline(0, color="black", lw=0.8)
        axes[2].set_title(f"{prof.bars[0][1]}: paired Δ vs {base.label}" + (" (points)" if scale == 100 else ""))
        axes[2].tick_params(axis="x", rotation=35)
        for t in axes[2].get_xticklabels():
            t.set_horizontalalignment("right")
    for ax, (key, title) in zip(axes[:2], prof.bars):
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


def plot_curves(path: Path, rows: list[Row], prof: Profile) -> None:
    """Validation accuracy (exact match for language models) and fidelity to the teacher (top-1
    agreement, S42; token KL for language models) against training progress (fraction of the run),
    mean over seeds."""
    plt = report.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, prof.curves):
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


def write_index(out: Path, suite: Suite, results: list[tuple[Suite, list[Row], Path]]) -> None:
    """A suite of suites' index: per part its main metric (mean ± std, paired Δ to its control) and a
    link to its own leaderboard; ``index.csv`` the same numbers."""
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Leaderboard: {suite.name}", "", suite.description.strip(), ""]
    table = []
    for part, rows, folder in results:
        prof = profile(rows, part.metrics)
        key, title, higher = prof.columns[0]
        base = base_row(part, rows)
        rel = folder.relative_to(out) if folder.is_relative_to(out) else folder
        lines += [f"## {part.name}", "", part.description.strip().split("\n\n")[0], "",
                  f"| method | {title}{'' if higher else ' (lower is better)'} |"
                  + (f" Δ vs {base.label} (paired) |" if base else ""), "|---|---|" + ("---|" if base else "")]
        for row in rows:
            d = paired(row, base, key) if base else None
            lines.append(f"| {row.label} | {cell(row, key)} |" + (f" {fmt(key, d, sign=True)} |" if base else ""))
            st = row.stat(key)
            table.append([part.name, row.label, key, *(st if st else ("", "")), *(d if d else ("", ""))])
        lines += ["", f"{steps_line(part, rows)} [Full leaderboard]({rel}/leaderboard.md)", "",
                  f"![{part.name}]({rel}/leaderboard.png)", ""]
    (out / "leaderboard.md").write_text("\n".join(lines))
    with open(out / "index.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["suite", "method", "metric", "mean", "std", "delta_mean", "delta_std"])
        w.writerows([["" if v is None else v for v in r] for r in table])
