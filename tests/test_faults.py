"""Fault injection: kill -9 at random points then resume (bitwise equal to an uninterrupted run),
concurrent writers, unsafe run names, strict weight loads, resume checks and crash-safe checkpoints.

The teacher-cache manifest mutations are in ``test_faults_cache.py``, the bad Python-API inputs in
``test_faults_api.py``; the README's Reliability section counts all three.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_recipe, tiny_teacher
from safetensors.torch import load_file, save_file

import distill
from distill.core import checkpoint as ckpt
from distill.core.recipe import recipe_from_dict
from distill.core.runner import run_recipe
from distill.errors import DistillError, RecipeError, RunExistsError, RunLockedError, WeightsError


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distill.cli", *args], cwd=cwd, capture_output=True, text=True)


def start(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "distill.cli", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def one_line_error(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr
    return p.stderr


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def tree(folder: Path) -> dict[str, int]:
    """Every file below ``folder`` with its size: what a refused command must leave as it was."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0, msg=k)


def step_of(partial: Path) -> int:
    found = ckpt.find(partial / "checkpoints")
    try:
        return json.loads((found / "state.json").read_text())["trainer"]["step"] if found else 0
    except (OSError, ValueError):
        return 0


# --- run names -----------------------------------------------------------------------------------

BAD_NAMES = [".", "..", "../x", "a/b", "/tmp/x", "x.partial", "_teachers", ".hidden", ""]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A folder with a finished run (and its cached teacher), to check nothing is touched."""
    d = tmp_path_factory.mktemp("names")
    write(d / "teacher.yaml", tiny_teacher())
    write(d / "kd.yaml", tiny_recipe("kd", {"name": "kd"}, {"recipe": "teacher.yaml"}, epochs=1))
    assert cli("run", "kd.yaml", "--out", "runs", cwd=d).returncode == 0
    return d


@pytest.mark.parametrize("name", BAD_NAMES)
def test_unsafe_run_names_are_refused_before_anything_is_touched(finished, name):
    before = tree(finished)
    err = one_line_error(cli("run", "kd.yaml", "--out", "runs", "--name", name, "--overwrite", cwd=finished))
    assert "not allowed" in err or "leaves the output folder" in err
    assert tree(finished) == before


@pytest.mark.parametrize("name", ["..", "../x", "."])
def test_unsafe_names_in_a_recipe_and_in_python(tmp_path, name):
    with pytest.raises(RecipeError, match="not allowed"):
        recipe_from_dict(tiny_recipe(name, {"name": "ce"}))
    r = recipe_from_dict(tiny_recipe("ok", {"name": "ce"}))
    with pytest.raises(RecipeError, match="not allowed"):
        run_recipe(r, out=tmp_path / "runs", name=name, overwrite=True)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_overwrite_never_deletes_a_folder_that_is_not_a_run(finished):
    (finished / "runs" / "mine").mkdir()
    (finished / "runs" / "mine" / "notes.txt").write_text("precious")
    err = one_line_error(cli("run", "kd.yaml", "--out", "runs", "--name", "mine", "--overwrite", cwd=finished))
    assert "not a run folder" in err
    assert (finished / "runs" / "mine" / "notes.txt").read_text() == "precious"


def test_out_that_is_a_file_or_read_only(tmp_path):
    write(tmp_path / "ce.yaml", tiny_recipe("ce", {"name": "ce"}, epochs=1))
    (tmp_path / "afile").write_text("x")
    assert "is a file" in one_line_error(cli("run", "ce.yaml", "--out", "afile", cwd=tmp_path))
    if os.geteuid() != 0:  # root may write anywhere
        (tmp_path / "ro").mkdir(mode=0o555)
        assert "writable" in one_line_error(cli("run", "ce.yaml", "--out", "ro", cwd=tmp_path))


# --- locks ---------------------------------------------------------------------------------------

def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < end, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.slow
def test_a_second_writer_of_one_run_is_refused(tmp_path):
    write(tmp_path / "long.yaml", tiny_recipe("long", {"name": "ce"}, epochs=20000))  # still running when checked
    first = start("run", "long.yaml", "--out", "runs", cwd=tmp_path)
    try:
        wait_for(tmp_path / "runs" / "long.partial" / "recipe.yaml", first)
        for extra in ([], ["--overwrite"], ["--resume"]):
            err = one_line_error(cli("run", "long.yaml", "--out", "runs", *extra, cwd=tmp_path))
            assert "being written by process" in err, err
        assert (tmp_path / "runs" / "long.partial" / "recipe.yaml").is_file()  # the first run's folder is intact
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=120)
    assert first.returncode == 130  # interrupted by us, with a checkpoint, not crashed by the second writer


@pytest.mark.slow
def test_a_teacher_being_trained_elsewhere_is_waited_for_then_reused(tmp_path):
    """Deterministic: this process holds the teacher's lock (as the process training it would), the student
    run waits; the teacher then appears (the other process finished) and the lock is released: the
    student reuses it, never trains or deletes it."""
    import threading

    from distill.core.refs import trained_folder
    from distill.core.rundir import run_lock

    teacher = tiny_teacher()
    write(tmp_path / "teacher.yaml", teacher)
    write(tmp_path / "b.yaml", tiny_recipe("b", {"name": "kd"}, {"recipe": "teacher.yaml"}, epochs=1))
    folder = trained_folder(tmp_path / "runs", recipe_from_dict(teacher, base_dir=tmp_path))
    trained = run_recipe(recipe_from_dict(teacher), out=tmp_path / "elsewhere", name=folder.name).run_dir
    lines: list[str] = []
    with run_lock(folder.parent, folder.name):
        b = start("run", "b.yaml", "--out", "runs", cwd=tmp_path)
        reader = threading.Thread(target=lambda: lines.extend(b.stderr), daemon=True)
        reader.start()
        end = time.time() + 120
        while not any("waiting for" in line for line in lines):
            assert b.poll() is None and time.time() < end, lines
            time.sleep(0.05)
        shutil.copytree(trained, folder)  # the other process finishes the teacher
        stamp = (folder / "metrics.json").stat().st_mtime_ns
    assert b.wait(timeout=300) == 0, lines
    reader.join(timeout=10)
    assert any("reusing it" in line for line in lines), lines
    assert (folder / "metrics.json").stat().st_mtime_ns == stamp  # reused, not trained again
    assert [p.name for p in folder.parent.iterdir() if not p.name.startswith(".")] == [folder.name]


def test_lock_is_released_by_a_killed_process(tmp_path):
    """flock is dropped by the kernel when its holder dies: no stale lock ever blocks."""
    code = ("import sys, time; from pathlib import Path; from distill.core.rundir import run_lock\n"
            "with run_lock(Path(sys.argv[1]), 'x'):\n    print('held', flush=True); time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    from distill.core.rundir import run_lock

    with pytest.raises(RunLockedError, match="being written by process"):
        with run_lock(tmp_path, "x"):
            pass
    p.kill()
    p.wait()
    assert (tmp_path / ".x.lock").exists()  # left behind by kill -9 ...
    with run_lock(tmp_path, "x"):  # ... and not in the way
        pass
    assert not (tmp_path / ".x.lock").exists()


# --- strict loads ---------------------------------------------------------------------------------

def _damaged(src: Path, dst: Path, how: str) -> Path:
    shutil.copytree(src, dst)
    w = dst / "student" / "model.safetensors"
    if how == "empty":
        w.write_bytes(b"")
    elif how == "truncated":
        w.write_bytes(w.read_bytes()[:-64])
    elif how == "partial":
        sd = load_file(str(w))
        save_file({k: sd[k] for k in sorted(sd)[:1]}, str(w))
    elif how == "misshaped":
        sd = load_file(str(w))
        k = sorted(sd)[0]
        save_file({**sd, k: torch.zeros(*sd[k].shape[:-1], sd[k].shape[-1] + 1)}, str(w))
    elif how == "extra":
        save_file({**load_file(str(w)), "stray.weight": torch.zeros(2)}, str(w))
    elif how == "pickled":
        w.write_bytes(b"\x80\x04\x95")  # a pickle's first bytes
    return dst


@pytest.mark.parametrize("how", ["empty", "truncated", "partial", "misshaped", "extra", "pickled"])
def test_damaged_teacher_weights_are_refused(finished, tmp_path, how):
    teacher = next((finished / "runs" / "_teachers").glob("tiny-teacher-*"))
    bad = _damaged(teacher, tmp_path / "bad", how)
    with pytest.raises(WeightsError, match=str(bad / "student" / "model.safetensors")):
        distill.load_student(bad)
    write(tmp_path / "kd.yaml", tiny_recipe("kd", {"name": "kd"}, {"run": "bad"}, epochs=1))
    err = one_line_error(cli("run", "kd.yaml", "--out", "runs", cwd=tmp_path))
    assert "model.safetensors" in err
    assert not (tmp_path / "runs" / "kd").exists() and not (tmp_path / "runs" / "kd.partial").exists()


def test_eval_of_a_copied_run_never_trains_its_teacher(finished, tmp_path):
    shutil.copytree(finished / "runs" / "kd", tmp_path / "elsewhere" / "kd")
    p = cli("eval", "elsewhere/kd", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "teacher metrics left out" in p.stderr
    assert not (tmp_path / "elsewhere" / "_teachers").exists()


# --- resume checks -------------------------------------------------------------------------------

@pytest.fixture
def interrupted(tmp_path):
    data = tiny_recipe("r", {"name": "ce"}, epochs=2, eval_every=2)
    write(tmp_path / "r.yaml", data)
    with pytest.raises(distill.errors.Interrupted):
        run_recipe(recipe_from_dict(data), out=tmp_path / "runs", stop_at_step=3)
    return tmp_path


@pytest.mark.parametrize("change,key", [("train.lr=0.05", "train.lr"), ("student.width=8", "student.params.width"),
                                        ("train.optimizer=sgd", "train.optimizer")])
def test_resume_refuses_a_changed_recipe(interrupted, change, key):
    err = one_line_error(cli("run", "r.yaml", "--out", "runs", "--resume", "--set", change, cwd=interrupted))
    assert key in err and "differs from the interrupted run" in err


def test_resume_allows_keys_that_cannot_change_the_result(interrupted):
    p = cli("run", "r.yaml", "--out", "runs", "--resume", "--set", "train.log_every=1", cwd=interrupted)
    assert p.returncode == 0, p.stderr


def test_resume_without_a_checkpoint_and_rerun_without_resume(interrupted):
    err = one_line_error(cli("run", "r.yaml", "--out", "runs", "--name", "other", "--resume", cwd=interrupted))
    assert "no interrupted run to resume" in err
    err = one_line_error(cli("run", "r.yaml", "--out", "runs", cwd=interrupted))
    assert "--resume" in err and "--overwrite" in err
    assert ckpt.exists(interrupted / "runs" / "r.partial" / "checkpoints")  # the work is kept


def test_a_crash_between_the_checkpoint_renames_resumes(tmp_path):
    """Only ``.latest.old`` left (a crash between ``save``'s two renames): resume finds it, and the run
    ends bitwise equal to an uninterrupted one."""
    data = tiny_recipe("r", {"name": "ce"}, epochs=2, eval_every=2)
    straight = run_recipe(recipe_from_dict(data), out=tmp_path / "a")
    with pytest.raises(distill.errors.Interrupted):
        run_recipe(recipe_from_dict(data), out=tmp_path / "b", stop_at_step=4)
    folder = tmp_path / "b" / "r.partial" / "checkpoints"
    (folder / "latest").rename(folder / ".latest.old")
    resumed = run_recipe(recipe_from_dict(data), out=tmp_path / "b", resume=True)
    same_weights(straight.run_dir / "student" / "model.safetensors", resumed.run_dir / "student" / "model.safetensors")


def test_a_half_written_checkpoint_is_never_used(tmp_path):
    data = tiny_recipe("r", {"name": "ce"}, epochs=2, eval_every=2)
    with pytest.raises(distill.errors.Interrupted):
        run_recipe(recipe_from_dict(data), out=tmp_path, stop_at_step=4)
    folder = tmp_path / "r.partial" / "checkpoints"
    shutil.copytree(folder / "latest", folder / ".latest.tmp")
    (folder / ".latest.tmp" / "state.json").unlink()  # a write that died before its last file
    (folder / "latest" / "state.json").unlink()  # and a latest without its marker
    assert ckpt.find(folder) is None
    with pytest.raises(DistillError, match="no interrupted run to resume"):
        run_recipe(recipe_from_dict(data), out=tmp_path, resume=True)


# --- kill -9 at random points, then resume -------------------------------------------------------

def kill_and_resume(cwd: Path, args: list[str], partial: Path, total_steps: int, kills: int, seed: int) -> int:
    """Run ``distill run ARGS`` and SIGKILL it at ``kills`` random points (a random step, plus a random
    delay of up to 50 ms so kills also land inside checkpoint writes); after each, continue it the way a
    user would (``--resume`` when a checkpoint exists, else start again). Returns the kills survived."""
    rng = random.Random(seed)
    survived = 0
    targets = sorted(rng.sample(range(1, total_steps), kills))
    for target in targets:
        extra = ["--resume"] if ckpt.exists(partial / "checkpoints") else []
        p = start("run", *args, *extra, cwd=cwd)
        while p.poll() is None and step_of(partial) < target:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.05))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait()
            survived += 1
        else:
            p.communicate()
            assert p.returncode == 0
    extra = ["--resume"] if ckpt.exists(partial / "checkpoints") else []
    p = cli("run", *args, *extra, cwd=cwd)
    assert p.returncode == 0, p.stderr
    return survived


@pytest.mark.slow
def test_kill_9_at_random_points_of_a_classifier_run(tmp_path):
    write(tmp_path / "teacher.yaml", tiny_teacher())
    write(tmp_path / "kd.yaml", tiny_recipe("kd", {"name": "kd"}, {"recipe": "teacher.yaml"}, epochs=6,
                                            eval_every=2))
    assert cli("run", "kd.yaml", "--out", "a", cwd=tmp_path).returncode == 0
    shutil.copytree(tmp_path / "a" / "_teachers", tmp_path / "b" / "_teachers")  # the student's run is killed
    n = kill_and_resume(tmp_path, ["kd.yaml", "--out", "b"], tmp_path / "b" / "kd.partial", 6 * 4, 5, seed=0)
    print(f"classifier run: {n} kill -9 points survived, bitwise equal")
    assert n >= 3
    same_weights(tmp_path / "a" / "kd" / "student" / "model.safetensors",
                 tmp_path / "b" / "kd" / "student" / "model.safetensors")
    assert json.loads((tmp_path / "a/kd/metrics.json").read_text())["test/accuracy"] == \
        json.loads((tmp_path / "b/kd/metrics.json").read_text())["test/accuracy"]


LM_RECIPE = {"name": "lm", "seed": 0,
             "task": {"name": "arithmetic", "num_train": 96, "num_val": 8, "num_test": 8, "max_digits": 2,
                      "eval_size": 4},
             "student": {"arch": "llama", "hidden": 16, "layers": 1, "heads": 2}, "method": "sft",
             "train": {"epochs": 4, "batch_size": 16, "lr": 0.01, "progress": False, "trackers": "none",
                       "eval_every": 2}}


@pytest.mark.slow
def test_kill_9_at_random_points_of_a_language_model_run(tmp_path):
    write(tmp_path / "lm.yaml", LM_RECIPE)
    assert cli("run", "lm.yaml", "--out", "a", cwd=tmp_path).returncode == 0
    n = kill_and_resume(tmp_path, ["lm.yaml", "--out", "b"], tmp_path / "b" / "lm.partial", 4 * 6, 4, seed=1)
    print(f"language-model run: {n} kill -9 points survived, bitwise equal")
    assert n >= 2
    same_weights(tmp_path / "a" / "lm" / "student" / "model.safetensors",
                 tmp_path / "b" / "lm" / "student" / "model.safetensors")


def test_stale_or_damaged_run_exists_errors_say_what_differs(finished):
    err = one_line_error(cli("run", "kd.yaml", "--out", "runs", "--set", "method.temperature=2", cwd=finished))
    assert "method.params.temperature" in err and "--overwrite" in err
    with pytest.raises(RunExistsError):
        run_recipe(recipe_from_dict(tiny_recipe("kd", {"name": "ce"}, epochs=1)), out=finished / "runs")
