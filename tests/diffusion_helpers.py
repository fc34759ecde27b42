"""Tiny diffusion recipes shared by the diffusion tests: a ring teacher trained in 60 steps, and a
student recipe of any method started from it (``tiny``)."""

from __future__ import annotations

TASK = {"name": "ring8", "num_train": 512, "num_val": 100, "num_test": 200, "num_eval": 100}
TRAIN = {"epochs": 50, "batch_size": 64, "lr": 0.001, "optimizer": "adam", "schedule": "constant",
         "progress": False, "trackers": "none", "log_every": 1, "eval_every": 1000}


def tiny_teacher() -> dict:
    return {"name": "tiny-ring-teacher", "seed": 0, "task": TASK,
            "student": {"arch": "mlp_denoiser", "hidden": 32, "depth": 2, "prediction": "velocity", "schedule": "flow"},
            "method": {"name": "diffusion_train", "steps": 8},
            "train": {**TRAIN, "max_steps": 60, "lr": 0.003}}


def tiny(method: dict, max_steps: int, name: str | None = None) -> dict:
    """``method`` from the tiny teacher (its teacher and its init) for ``max_steps`` steps."""
    return {"name": name or f"tiny-{method['name']}", "seed": 0, "task": TASK, "teacher": {"recipe": tiny_teacher()},
            "init": {"recipe": tiny_teacher()}, "method": method, "train": {**TRAIN, "max_steps": max_steps}}
