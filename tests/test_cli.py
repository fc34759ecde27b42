"""The command line end to end, and every user error: one line on stderr, exit code 2, no run folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import tiny_recipe, tiny_teacher

RUN_FILES = ["recipe.yaml", "metrics.json", "history.csv", "student/model.safetensors", "student/config.json",
             "checkpoints/latest/model.safetensors", "report.md", "curves.png"]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distill.cli", *args], cwd=cwd, capture_output=True, text=True)


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def kd_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    write(d / "teacher.yaml", tiny_teacher())
    write(d / "kd.yaml", tiny_recipe("kd", {"name": "kd", "standardize": True}, {"recipe": "teacher.yaml"}, trackers="auto"))
    p = cli("run", "kd.yaml", "--set", "method.temperature=2", "--out", "runs", cwd=d)
    return d, p


def test_run_writes_every_file(kd_run):
    d, p = kd_run
    assert p.returncode == 0, p.stderr
    run = d / "runs" / "kd"
    for f in RUN_FILES:
        assert (run / f).is_file(), f
    assert any((run / "tensorboard").rglob("events.out.tfevents*"))  # tensorboard is a test dependency
    metrics = json.loads((run / "metrics.json").read_text())
    for k in ("test/accuracy", "test/nll", "test/ece", "test/agreement", "test/kl_to_teacher", "teacher/accuracy"):
        assert k in metrics
    resolved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert resolved["method"]["params"] == {"temperature": 2, "ce_weight": 0.1, "kd_weight": 0.9, "standardize": True}


def test_eval_reproduces_metrics(kd_run):
    d, _ = kd_run
    p = cli("eval", "runs/kd", cwd=d)
    assert p.returncode == 0, p.stderr
    acc = json.loads((d / "runs" / "kd" / "metrics.json").read_text())["test/accuracy"]
    assert f"{acc:.4f}" in p.stdout


def test_list_shows_methods_and_tasks(tmp_path):
    p = cli("list", cwd=tmp_path)
    assert p.returncode == 0
    for name in ("ce", "kd", "dkd", "mnist1d", "digits", "cnn1d", "demo"):
        assert name in p.stdout


def _error(tmp_path: Path, recipe: dict, *extra: str) -> str:
    write(tmp_path / "r.yaml", recipe)
    p = cli("run", "r.yaml", "--out", "runs", *extra, cwd=tmp_path)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    runs = tmp_path / "runs"
    assert not runs.exists() or not [x for x in runs.iterdir() if x.name != "_teachers"]
    return p.stderr


def test_unknown_key_says_did_you_mean(tmp_path):
    err = _error(tmp_path, tiny_recipe("x", {"name": "kd", "temprature": 2}, {"recipe": tiny_teacher()}))
    assert "method.temprature" in err and "did you mean 'temperature'" in err


def test_unknown_method_says_did_you_mean(tmp_path):
    err = _error(tmp_path, tiny_recipe("x", {"name": "dkdd"}))
    assert "unknown method 'dkdd'" in err and "did you mean 'dkd'" in err


def test_bad_value_names_the_key(tmp_path):
    err = _error(tmp_path, tiny_recipe("x", {"name": "ce"}, lr=-1))
    assert "train.lr" in err
    err = _error(tmp_path, tiny_recipe("x", {"name": "ce"}), "--set", "train.batch_sise=3")
    assert "train.batch_sise" in err and "batch_size" in err


def test_missing_teacher_run(tmp_path):
    err = _error(tmp_path, tiny_recipe("x", {"name": "kd"}, {"run": "nowhere"}))
    assert "nowhere" in err and "does not exist" in err


def test_missing_weights_file(tmp_path):
    (tmp_path / "broken" / "student").mkdir(parents=True)
    (tmp_path / "broken" / "student" / "config.json").write_text("{}")
    err = _error(tmp_path, tiny_recipe("x", {"name": "kd"}, {"run": "broken"}))
    assert "model.safetensors" in err


def test_teacher_without_teacher_needed(tmp_path):
    err = _error(tmp_path, tiny_recipe("x", {"name": "kd"}))
    assert "needs a teacher" in err


def test_class_count_mismatch(tmp_path):
    # a 10-class teacher for a 2-class task: build one with a different head by hand
    from distill.tasks.ops import save_student
    from distill.tasks.models import build_model

    save_student(tmp_path / "t2" / "student", build_model("mlp", {"width": 8}, (40,), 3), {"name": "mlp", "params": {"width": 8, "depth": 2}}, (40,), 3)
    err = _error(tmp_path, tiny_recipe("x", {"name": "kd"}, {"run": "t2"}))
    assert "3 classes" in err and "10" in err


def test_nan_loss_is_a_clean_error(tmp_path):
    err = _error(tmp_path, tiny_recipe("x", {"name": "ce"}, lr=1e30, optimizer="sgd"))
    assert "NaN" in err


def test_missing_recipe_file(tmp_path):
    p = cli("run", "nope.yaml", cwd=tmp_path)
    assert p.returncode == 2 and "not found" in p.stderr and "Traceback" not in p.stderr


def test_bench_tiny_suite(tmp_path):
    write(tmp_path / "teacher.yaml", tiny_teacher())
    write(tmp_path / "ce.yaml", tiny_recipe("ce", {"name": "ce"}))
    write(tmp_path / "kd.yaml", tiny_recipe("kd", {"name": "kd"}, {"recipe": "teacher.yaml"}))
    write(tmp_path / "suite.yaml", {"name": "tiny", "seeds": 2, "recipes": ["ce.yaml", {"recipe": "kd.yaml", "label": "kd-T2", "set": ["method.temperature=2"]}]})
    p = cli("bench", "suite.yaml", "--out", "b", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    for f in ("leaderboard.md", "leaderboard.csv", "leaderboard.png", "curves.png"):
        assert (tmp_path / "b" / f).is_file()
    md = (tmp_path / "b" / "leaderboard.md").read_text()
    assert "| kd-T2 |" in md and "±" in md
    assert len(list((tmp_path / "b" / "_teachers").iterdir())) == 1
    assert {p.name for p in (tmp_path / "b").iterdir()} >= {"ce-s0", "ce-s1", "kd-T2-s0", "kd-T2-s1"}


def test_sigint_checkpoints_then_resume_finishes(tmp_path):
    import signal
    import time

    write(tmp_path / "long.yaml", tiny_recipe("long", {"name": "ce"}, epochs=400, progress=True))
    proc = subprocess.Popen([sys.executable, "-m", "distill.cli", "run", "long.yaml", "--out", "runs"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpt = tmp_path / "runs" / "long.partial" / "checkpoints" / "latest"
    for _ in range(600):
        if ckpt.is_dir():
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted at step" in err and "--resume" in err and "Traceback" not in err
    assert ckpt.is_dir() and not (tmp_path / "runs" / "long").exists()
    state = json.loads((ckpt / "state.json").read_text())["trainer"]
    assert 0 < state["step"] < 400 * 4
    p = cli("run", "long.yaml", "--out", "runs", "--resume", "--set", "train.epochs=400", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "runs" / "long" / "metrics.json").is_file()
