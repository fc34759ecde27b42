from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

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
