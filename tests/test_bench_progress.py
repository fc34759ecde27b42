"""Issue 11, items 10, 12 and 15: a suite's equal step budget, teachers shared by seeds and benches, no
spread with one seed; progress lines when stdout is not a terminal, the teacher's bar named; trackers
by Accelerate's names, refused before training when unknown or not installed."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import tiny_recipe, tiny_teacher

from distill.bench.leaderboard import cell
from distill.bench.suite import run_suite
from distill.core.recipe import TrainConfig, recipe_from_dict
from distill.core.runner import run_recipe
from distill.core.trainer import _Bar, run_label
from distill.errors import RecipeError


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def suite_dir(tmp_path: Path) -> Path:
    """ce on the 256 labeled samples (2 steps an epoch), kd on labeled + 256 transfer samples (4 an epoch)."""
    write(tmp_path / "teacher.yaml", tiny_teacher())
    write(tmp_path / "ce.yaml", tiny_recipe("ce", {"name": "ce"}, batch_size=128))
    write(tmp_path / "kd.yaml", tiny_recipe("kd", {"name": "kd"}, {"recipe": "teacher.yaml"}, batch_size=128))
    return tmp_path


def last_steps(rows) -> dict[str, list[int]]:
    return {row.label: [max(h["step"] for h in r.history) for r in row.runs] for row in rows}


def test_suite_steps_first_gives_every_entry_the_first_entrys_steps(suite_dir):
    write(suite_dir / "s.yaml", {"name": "s", "seeds": 1, "recipes": ["ce.yaml", {"recipe": "kd.yaml", "label": "kd+T2",
                                                                                  "set": ["method.temperature=2"]}]})
    t = suite_dir / "t"  # one teacher for the four benches
    rows, _ = run_suite(str(suite_dir / "s.yaml"), out=suite_dir / "own", progress=False, teachers=t)
    assert last_steps(rows) == {"ce": [4], "kd+T2": [8]}  # as the recipes say: 2 epochs each, kd's are longer
    md = (suite_dir / "own" / "leaderboard.md").read_text()
    assert "ce 4; kd+T2 8" in md and "not equal" in md

    # the same suite with a step budget, also after --set train.epochs=3 (ce: 6 steps; kd would do 12)
    write(suite_dir / "eq.yaml", yaml.safe_load((suite_dir / "s.yaml").read_text()) | {"name": "eq", "steps": "first"})
    rows, out = run_suite(str(suite_dir / "eq.yaml"), out=suite_dir / "eq", overrides=["train.epochs=3"], progress=False,
                           teachers=t)
    assert last_steps(rows) == {"ce": [6], "kd+T2": [6]}
    assert (out / "kd_T2-s0").is_dir()  # a label with '+' gets a valid run folder
    assert "Every run: 6 optimizer steps (the suite's `steps: first`" in (out / "leaderboard.md").read_text()

    # the first entry has fewer steps per epoch than the budget needs: more epochs for the others
    write(suite_dir / "kd_first.yaml", {"name": "kf", "seeds": 1, "steps": "first", "recipes": ["kd.yaml", "ce.yaml"]})
    rows, out = run_suite(str(suite_dir / "kd_first.yaml"), out=suite_dir / "kf", progress=False, teachers=t)
    assert last_steps(rows) == {"kd": [8], "ce": [8]}
    assert yaml.safe_load((out / "ce-s0" / "recipe.yaml").read_text())["train"]["epochs"] == 4

    write(suite_dir / "n.yaml", {"name": "n", "seeds": 1, "steps": 5, "recipes": ["ce.yaml", "kd.yaml"]})
    rows, _ = run_suite(str(suite_dir / "n.yaml"), out=suite_dir / "n", progress=False, teachers=t)
    assert last_steps(rows) == {"ce": [5], "kd": [5]}


def test_teacher_is_trained_once_for_every_seed_and_bench(suite_dir, monkeypatch):
    monkeypatch.chdir(suite_dir)
    run_recipe(recipe_from_dict(tiny_recipe("kd", {"name": "kd"}, {"recipe": "teacher.yaml"}), base_dir=suite_dir),
               out="runs")  # `distill run kd.yaml`: the teacher goes to runs/_teachers
    write(suite_dir / "a.yaml", {"name": "a", "seeds": 2, "recipes": ["kd.yaml"]})
    write(suite_dir / "b.yaml", {"name": "b", "seeds": 1, "recipes": [{"recipe": "kd.yaml", "label": "kd-T2",
                                                                      "set": ["method.temperature=2"]}]})
    for suite in ("a.yaml", "b.yaml", "a.yaml"):  # default out: runs/bench/<suite>
        run_suite(suite, progress=False)
    runs = suite_dir / "runs"
    assert {p.name for p in (runs / "bench" / "a").iterdir() if p.is_dir()} == {"kd-s0", "kd-s1"}
    teachers = [p for p in runs.rglob("_teachers/*") if p.is_dir()]
    assert len(teachers) == 1 and teachers[0].parent == runs / "_teachers", teachers
    # an explicit --out keeps its teachers inside it (self-contained), trained once for its seeds
    run_suite("a.yaml", out="elsewhere", seeds=1, progress=False)
    assert len([p for p in (suite_dir / "elsewhere" / "_teachers").iterdir() if p.is_dir()]) == 1


def test_one_seed_shows_no_spread(suite_dir):
    write(suite_dir / "one.yaml", {"name": "one", "seeds": 1, "recipes": ["ce.yaml"]})
    rows, out = run_suite(str(suite_dir / "one.yaml"), out=suite_dir / "one", progress=False)
    assert "±" not in cell(rows[0], "test/accuracy") and "±" not in cell(rows[0], "test/nll")
    md = (out / "leaderboard.md").read_text()
    assert "±" not in md and "One seed (no spread)" in md
    with open(out / "leaderboard.csv") as f:
        row = next(csv.DictReader(f))
    assert row["seeds"] == "1" and row["steps"] == "4" and row["test/accuracy_std"] == "" and row["test/accuracy_mean"]
    p = subprocess.run([sys.executable, "-m", "distill.cli", "bench", "one.yaml", "--out", "one"], cwd=suite_dir,
                       capture_output=True, text=True)  # reuses the run; the console table's cells
    assert p.returncode == 0, p.stderr
    assert "│ ce " in p.stdout and not [line for line in p.stdout.splitlines() if line.startswith("│ ce") and "±" in line]


# --- progress --------------------------------------------------------------------------------------

def test_progress_lines_on_stderr_when_stdout_is_not_a_terminal(tmp_path):
    write(tmp_path / "teacher.yaml", tiny_teacher() | {"train": tiny_teacher()["train"] | {"progress": True, "progress_every": 0.001}})
    write(tmp_path / "kd.yaml", tiny_recipe("kd", {"name": "kd"}, {"recipe": "teacher.yaml"}, progress=True,
                                            progress_every=0.001, epochs=3))
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")}
    p = subprocess.run([sys.executable, "-m", "distill.cli", "run", "kd.yaml", "--out", "runs"], cwd=tmp_path,
                       capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    kd = [line for line in p.stderr.splitlines() if line.startswith("kd: step ")]
    teacher = [line for line in p.stderr.splitlines() if line.startswith("teacher tiny-teacher: step ")]
    assert len(kd) >= 5 and kd[-1].startswith("kd: step 24/24 (epoch 3/3), loss "), p.stderr
    assert "steps/s, ETA " in kd[0] and teacher and teacher[-1].startswith("teacher tiny-teacher: step 8/8")
    assert "kd: 24 optimizer steps, 3 epoch(s) of 8" in p.stderr
    assert "━" not in p.stderr  # no bar


def test_progress_lines_come_every_interval(capsys):
    from rich.console import Console

    def lines(every: float) -> list[str]:
        with _Bar("kd-s0", 40, 0, 8, True, every, console=Console(file=io.StringIO())) as bar:
            for step in range(1, 41):
                bar.update(step, 0.5, 0.0) if step % 10 == 0 else bar.tick(step)
        return capsys.readouterr().err.splitlines()

    slow = lines(3600)  # the start and where it ended
    assert len(slow) == 2 and slow[1].startswith("kd-s0: step 40/40 (epoch 5/5), loss 0.5000")
    assert len(lines(0.0)) == 41  # every step
    with _Bar("kd-s0", 40, 0, 8, False, 0.0, console=Console(file=io.StringIO())) as bar:  # progress: false
        bar.tick(1)
    assert capsys.readouterr().err == ""


def test_the_terminal_bar_is_named_after_the_run_and_says_teacher():
    from rich.console import Console

    assert run_label(Path("runs/_teachers/tiny-teacher-0123456789ab.partial")) == "teacher tiny-teacher"
    assert run_label(Path("runs/bench/demo/kd-s0.partial")) == "kd-s0"
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, force_interactive=True, width=120)
    with _Bar("teacher tiny-teacher", 40, 0, 8, True, console=console) as bar:
        bar.update(20, 0.5, 10.0)
    assert "teacher tiny-teacher" in buf.getvalue() and "20/40" in buf.getvalue()


# --- trackers --------------------------------------------------------------------------------------

def test_trackers_default_serialises_as_before():
    d = TrainConfig().model_dump(mode="json")
    assert d["trackers"] == "auto" and "progress_every" not in d  # fingerprints of existing recipes unchanged
    assert TrainConfig(trackers="none").tracker_names() == []


def test_unknown_tracker_is_refused_before_training(tmp_path):
    with pytest.raises(RecipeError, match=r"unknown tracker 'wandbb' \(did you mean 'wandb'\?\)") as err:
        recipe_from_dict(tiny_recipe("x", {"name": "ce"}, trackers="wandbb"))
    assert "\n" not in str(err.value)
    for bad in ([], ["auto", "tensorboard"], ["tensorboard", "tensorboard"]):
        with pytest.raises(RecipeError, match="train.trackers"):
            recipe_from_dict(tiny_recipe("x", {"name": "ce"}, trackers=bad))
    write(tmp_path / "teacher.yaml", tiny_teacher())
    write(tmp_path / "kd.yaml", tiny_recipe("kd", {"name": "kd"}, {"recipe": "teacher.yaml"}))
    p = subprocess.run([sys.executable, "-m", "distill.cli", "run", "kd.yaml", "--out", "runs", "--set",
                        "train.trackers=[tensorbord]"], cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "did you mean 'tensorboard'" in p.stderr
    assert not (tmp_path / "runs").exists()  # not even the teacher trained


def test_tracker_not_installed_is_one_line(tmp_path):
    known, available = TrainConfig.accelerate_trackers()
    missing = [n for n in ("wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive") if n not in available]
    if not missing:
        pytest.skip("every tracker is installed here")
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(tiny_recipe("x", {"name": "ce"}, trackers=["tensorboard", missing[0]]))
    msg = str(err.value)
    assert "\n" not in msg and f"tracker '{missing[0]}' is not installed (pip install {missing[0]})" in msg


def test_a_list_of_trackers_logs_to_each(tmp_path):
    r = recipe_from_dict(tiny_recipe("tb", {"name": "ce"}, trackers=["tensorboard"], epochs=1))
    assert r.resolved()["train"]["trackers"] == ["tensorboard"]
    res = run_recipe(r, out=tmp_path)
    assert any((res.run_dir / "tensorboard").rglob("events.out.tfevents*"))


def test_tune_chooses_on_validation_and_runs_the_choice_for_every_seed(suite_dir):
    """``tune``: each value on seed 0, the best last validation accuracy (read here from the tuning runs'
    history.csv) is run for every seed; the leaderboard lists the scores and the choice."""
    from distill.core import report

    lrs = [1.0e-9, 0.05]
    write(suite_dir / "s.yaml", {"name": "t", "seeds": 2, "recipes": [
        {"recipe": "ce.yaml", "label": "ce", "tune": {"train.lr": lrs}}]})
    rows, out = run_suite(str(suite_dir / "s.yaml"), out=suite_dir / "t", progress=False)
    names = ["ce-tune-train.lr_1e-09-s0", "ce-tune-train.lr_0.05-s0"]  # named by value: a grid can grow
    val = [[h["val/accuracy"] for h in report.read_csv(out / n / "history.csv") if "val/accuracy" in h][-1] for n in names]
    assert val[0] != val[1]  # the two learning rates must be told apart for the check to mean anything
    chosen = lrs[max(range(2), key=lambda i: (val[i], -i))]
    best = [1.0e-9, 0.05].index(chosen)
    assert rows[0].runs[0].run_dir.name == names[best]  # seed 0 is the chosen value's tuning run
    assert not (out / "ce-s0").exists()
    assert yaml.safe_load((out / "ce-s1" / "recipe.yaml").read_text())["train"]["lr"] == chosen
    assert f"train.lr={chosen} → {100 * max(val):.1f} (chosen)" in (out / "leaderboard.md").read_text()


def test_tune_values_are_validated_before_training(suite_dir):
    write(suite_dir / "s.yaml", {"name": "t", "seeds": 1, "recipes": [
        {"recipe": "ce.yaml", "tune": {"train.lr": [0.01, "fast"]}}]})
    with pytest.raises(RecipeError, match="train.lr"):
        run_suite(str(suite_dir / "s.yaml"), out=suite_dir / "t", progress=False)
    assert not (suite_dir / "t").exists()


def test_tune_grid():
    from distill.bench.suite import tune_grid

    assert tune_grid({}) == []  # an entry without tune runs as it is
    assert tune_grid({"train.lr": [0.1, 0.2], "method.temperature": [2]}) == [
        ["train.lr=0.1", "method.temperature=2"], ["train.lr=0.2", "method.temperature=2"]]


def test_an_entry_already_trained_as_a_per_seed_init_reuses_it(suite_dir):
    """kd starts from ce of the same seed (``seed: same``); the suite's ce row is then the very runs the
    inits are: reused from ``_teachers``, not trained twice."""
    write(suite_dir / "kd2.yaml", tiny_recipe("kd2", {"name": "kd"}, {"recipe": "teacher.yaml"}) | {
        "student": None, "init": {"recipe": "ce.yaml", "seed": "same"}})
    write(suite_dir / "s.yaml", {"name": "r", "seeds": 2, "recipes": ["kd2.yaml", "ce.yaml"]})
    rows, out = run_suite(str(suite_dir / "s.yaml"), out=suite_dir / "r", progress=False)
    inits = sorted(p.name for p in (out / "_teachers").iterdir() if p.name.startswith("ce-"))
    assert len(inits) == 2  # one init per seed
    assert sorted(r.run_dir.name for r in rows[1].runs) == inits and not (out / "ce-s0").exists()
    for seed, r in enumerate(rows[1].runs):
        assert yaml.safe_load((r.run_dir / "recipe.yaml").read_text())["seed"] == seed


def test_baseline_gives_paired_differences(suite_dir):
    """``baseline``: each entry minus the control on the same seed, mean ± std over seeds (computed here
    from the runs' own metrics), in the table, the CSV and a third plot."""
    import statistics

    write(suite_dir / "s.yaml", {"name": "p", "seeds": 2, "baseline": "ce", "recipes": [
        "ce.yaml", {"recipe": "ce.yaml", "label": "ce-lr", "set": ["train.lr=1.0e-9"]}]})
    rows, out = run_suite(str(suite_dir / "s.yaml"), out=suite_dir / "p", progress=False)
    d = [b.metrics["test/accuracy"] - a.metrics["test/accuracy"] for a, b in zip(rows[0].runs, rows[1].runs)]
    assert d[0] != d[1]
    md = (out / "leaderboard.md").read_text()
    assert "Δ accuracy vs ce (paired)" in md
    assert f"| ce-lr | {cell(rows[1], 'test/accuracy')} | {100 * statistics.fmean(d):+.2f} ± {100 * statistics.stdev(d):.2f} |" in md
    assert "| ce | " + cell(rows[0], "test/accuracy") + " | +0.00 ± 0.00 |" in md
    row = next(r for r in csv.DictReader(io.StringIO((out / "leaderboard.csv").read_text())) if r["method"] == "ce-lr")
    assert abs(float(row["delta_test/accuracy_mean"]) - statistics.fmean(d)) < 1e-12


def test_unknown_baseline_is_refused_before_training(suite_dir):
    write(suite_dir / "s.yaml", {"name": "p", "seeds": 1, "baseline": "cee", "recipes": ["ce.yaml"]})
    with pytest.raises(RecipeError, match=r"baseline 'cee' is not an entry's label \(did you mean 'ce'\?\)"):
        run_suite(str(suite_dir / "s.yaml"), out=suite_dir / "p", progress=False)
    assert not (suite_dir / "p").exists()


def test_suite_metrics_and_a_suite_of_suites(suite_dir):
    """A suite's own ``metrics`` (the first is the main: table, Δ, tune on its val/ form, lower-is-better
    respected) and ``parts``: each part's leaderboard in <out>/<part>, one shared teacher, an index."""
    nll = {"key": "test/nll", "title": "NLL", "higher": False}
    write(suite_dir / "p1.yaml", {"name": "p1", "seeds": 1, "metrics": [nll, {"key": "test/accuracy"}], "baseline": "ce",
                                  "recipes": ["ce.yaml", {"recipe": "kd.yaml", "tune": {"train.lr": [1e-9, 0.01]}}]})
    write(suite_dir / "p2.yaml", {"name": "p2", "seeds": 1, "recipes": ["kd.yaml"]})
    write(suite_dir / "all.yaml", {"name": "all", "description": "both parts", "parts": ["p1", "p2"]})
    from distill.bench.suite import run_suites

    results, out = run_suites(str(suite_dir / "all.yaml"), out=suite_dir / "all", progress=False)
    assert [p.name for p, _, _ in results] == ["p1", "p2"]
    assert len(list((out / "_teachers").iterdir())) == 1  # one teacher for both parts
    rows = results[0][1]
    kd = rows[1]
    # tune chose on val/nll, lower is better: the chosen value is the one with the lower NLL
    tried = {part.split(" → ")[0].removeprefix("kd: "): part for part in kd.tuned.split(", ")}
    nlls = {k: float(v.split(" → ")[1].split()[0]) for k, v in tried.items()}
    assert len(nlls) == 2 and len(set(nlls.values())) == 2
    best = min(nlls, key=nlls.get)
    assert "(chosen)" in tried[best]
    assert yaml.safe_load((kd.runs[0].run_dir / "recipe.yaml").read_text())["train"]["lr"] == float(best.split("=")[1])
    md = (out / "p1" / "leaderboard.md").read_text()
    assert "| method | NLL | Δ NLL vs ce (paired) | accuracy | time (s) |" in md
    index = (out / "leaderboard.md").read_text()
    assert "## p1" in index and "## p2" in index and "[Full leaderboard](p1/leaderboard.md)" in index
    assert f"| kd | {cell(kd, 'test/nll')} |" in index
    with open(out / "index.csv") as f:
        got = list(csv.DictReader(f))
    assert [(r["suite"], r["method"], r["metric"]) for r in got] == [
        ("p1", "ce", "test/nll"), ("p1", "kd", "test/nll"), ("p2", "kd", "test/accuracy")]
    with pytest.raises(RecipeError, match="either recipes or parts"):
        write(suite_dir / "bad.yaml", {"name": "bad", "parts": ["p1"], "recipes": ["ce.yaml"]})
        run_suites(str(suite_dir / "bad.yaml"), out=suite_dir / "bad", progress=False)


def test_jobs_run_in_processes_and_give_the_same_runs(suite_dir):
    # 2 entries × 2 seeds in a pool of 2 processes (the teacher trained by one, waited for by the others):
    # the same metrics as one after another, and the same leaderboard rows
    write(suite_dir / "j.yaml", {"name": "j", "seeds": 2, "recipes": ["ce.yaml", "kd.yaml"]})
    seq, _ = run_suite(str(suite_dir / "j.yaml"), out=suite_dir / "seq", progress=False, teachers=suite_dir / "t1")
    par, out = run_suite(str(suite_dir / "j.yaml"), out=suite_dir / "par", progress=False, teachers=suite_dir / "t2",
                         jobs=2)
    assert [r.label for r in par] == ["ce", "kd"] and (out / "leaderboard.md").is_file()
    for a, b in zip(seq, par):
        assert [r.metrics["test/accuracy"] for r in a.runs] == [r.metrics["test/accuracy"] for r in b.runs]
    assert len(list((suite_dir / "t2" / "_teachers").iterdir())) == 1
