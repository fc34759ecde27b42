"""Run reports: history CSV, learning-curve plots and a Markdown summary."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rows with possibly different keys -> one CSV with the union of columns (in first-seen order)."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols or ["step"])
        w.writeheader()
        w.writerows(rows)


def read_csv(path: Path) -> list[dict[str, Any]]:
    """Inverse of ``write_csv``: numbers back to numbers, empty cells dropped."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: float(v) if k != "step" else int(float(v)) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]


def series(history: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in history if key in r and r[key] is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


RATES = ("val/accuracy", "val/agreement", "val/exact_match")  # in [0, 1], one panel
LOSSES = ("val/token_kl", "val/perplexity")  # language models: each its own panel when present


def plot_curves(path: Path, history: list[dict[str, Any]]) -> None:
    """Training loss, validation accuracy / exact match / fidelity, and for language models the
    validation token KL to the teacher and perplexity, against optimizer steps."""
    plt = pyplot()
    extra = [k for k in LOSSES if series(history, k)[0]]
    fig, axes = plt.subplots(1, 2 + len(extra), figsize=(5 * (2 + len(extra)), 3.6))
    xs, ys = series(history, "train/loss")
    axes[0].plot(xs, ys, label="train loss")
    # policy objectives can be zero or negative: a log axis only where every loss is positive
    axes[0].set_xlabel("step"), axes[0].set_title("training loss")
    axes[0].set_yscale("log" if ys and min(ys) > 0 else "symlog")
    for key in RATES:
        xs, ys = series(history, key)
        if xs:
            axes[1].plot(xs, ys, marker=".", label=key)
    axes[1].set_xlabel("step"), axes[1].set_title("validation")
    if axes[1].lines:
        axes[1].legend()
    for ax, key in zip(axes[2:], extra):
        ax.plot(*series(history, key), marker=".")
        ax.set_xlabel("step"), ax.set_title(key), ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def write_run_report(folder: Path, recipe: dict[str, Any], metrics: dict[str, Any], history: list[dict[str, Any]]) -> None:
    plot_curves(folder / "curves.png", history)
    lines = [
        f"# Run `{recipe['name']}`",
        "",
        f"Method `{recipe['method']['name']}` on task `{recipe['task']['name']}`, seed {recipe['seed']}. "
        "Test metrics are of the model after the last epoch (or the best validation epoch when early "
        "stopping is on); never selected on test.",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {fmt(v)} |" for k, v in metrics.items()],
        "",
        "![learning curves](curves.png)",
        "",
    ]
    (folder / "report.md").write_text("\n".join(lines))
