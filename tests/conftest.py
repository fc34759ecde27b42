from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distill.core.recipe import recipe_from_dict
from distill.core.runner import RunResult, run_recipe
from distill.errors import Interrupted

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))  # 2 cores, as CI

TINY = {
    "task": {"name": "mnist1d", "num_train": 256, "num_val": 64, "num_test": 128, "num_transfer": 256},
    "train": {"epochs": 2, "batch_size": 64, "lr": 0.003, "progress": False, "trackers": "none", "log_every": 2},
}


def tiny_recipe(name: str, method: dict, teacher: dict | None = None, **train) -> dict:
    r = {"name": name, "seed": 0, "task": dict(TINY["task"]), "method": method,
         "student": {"arch": "cnn1d", "width": 4, "depth": 2}, "train": {**TINY["train"], **train}}
    if teacher is not None:
        r["teacher"] = teacher
    return r


def tiny_teacher() -> dict:
    return tiny_recipe("tiny-teacher", {"name": "ce"}) | {"student": {"arch": "cnn1d", "width": 16, "depth": 2}}


@pytest.fixture
def tmp_runs(tmp_path: Path) -> Path:
    return tmp_path / "runs"


def resume_round_trip(data: dict, runs: Path, stop_at_step: int, inspect=None) -> tuple[RunResult, RunResult]:
    """Run the recipe ``data`` straight, and again interrupted after ``stop_at_step`` steps then resumed.

    Asserts that the interrupted run left only a resumable ``.partial`` folder, and that the final
    student and the whole final checkpoint (method buffers included) are bitwise equal to the straight
    run's. ``inspect(checkpoint_dir)`` may check the interrupted checkpoint before resuming.
    """
    straight = run_recipe(recipe_from_dict(data), out=runs / "a")
    r = recipe_from_dict(data)
    with pytest.raises(Interrupted):
        run_recipe(r, out=runs / "b", stop_at_step=stop_at_step)
    ckpt = runs / "b" / f"{r.name}.partial" / "checkpoints" / "latest"
    assert ckpt.is_dir() and not (runs / "b" / r.name).exists()
    if inspect is not None:
        inspect(ckpt)
    resumed = run_recipe(r, out=runs / "b", resume=True)
    for name in ("student/model.safetensors", "checkpoints/latest/model.safetensors"):
        wa, wb = load_file(str(straight.run_dir / name)), load_file(str(resumed.run_dir / name))
        assert wa.keys() == wb.keys()
        for k in wa:  # bitwise; NaN placeholders (e.g. generations not reached) equal NaN
            torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0, equal_nan=True, msg=f"{name}: {k}")
    tests = {k: v for k, v in straight.metrics.items() if k.startswith("test/") and "sec" not in k and "per_s" not in k}
    assert tests and tests == {k: resumed.metrics[k] for k in tests}  # every test metric but timings
    return straight, resumed
