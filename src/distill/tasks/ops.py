"""The classifier family's ``TaskOps``: registered archs, ``distill-student-v1`` model folders, accuracy,
ECE and fidelity metrics. Registered for ``TaskData`` (``core/taskops.py``) and as a model-folder
format (``core/refs.py``), so the engine runs classifier tasks without knowing them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn

from distill.core import weights as weights_check
from distill.core.checkpoint import cpu_tensors
from distill.core.distiller import TaskInfo
from distill.core.metrics import classifier_metrics, predict
from distill.core.refs import ModelFormat, load_student
from distill.core.registry import FORMATS
from distill.core.taskops import register_ops
from distill.errors import MismatchError, MissingFileError, RecipeError
from distill.tasks.base import ArrayDataset, TaskData
from distill.tasks.models import build_arch, build_model

STUDENT_FORMAT = "distill-student-v1"


def save_student(folder: Path, model: nn.Module, spec: dict[str, Any] | None, input_shape, num_classes: int) -> None:
    """``model.safetensors`` + ``config.json``: loadable with safetensors alone, no pickles."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(cpu_tensors(model.state_dict()), str(folder / "model.safetensors"))
    config = {
        "format": STUDENT_FORMAT,
        "arch": spec["name"] if spec else None,
        "params": spec["params"] if spec else {},
        "class": type(model).__qualname__,
        "input_shape": list(input_shape),
        "num_classes": num_classes,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def load_classifier(folder: Path) -> nn.Module:
    """A classifier saved by ``save_student`` (``folder`` holds its ``config.json``)."""
    cfg, weights = json.loads((folder / "config.json").read_text()), folder / "model.safetensors"
    if not weights.is_file():
        raise MissingFileError(f"{weights} not found: a teacher run must be a finished run folder with student/")
    if not cfg.get("arch"):
        raise MissingFileError(
            f"{folder} holds a custom model ({cfg.get('class')}); build it yourself and load {weights} with safetensors"
        )
    args = (cfg["arch"], cfg["params"], tuple(cfg["input_shape"]), cfg["num_classes"])
    return weights_check.load_checked(lambda: build_arch(*args), weights)


FORMATS.register(STUDENT_FORMAT, "a classifier run's student/ (model.safetensors + config.json)")(
    ModelFormat(claims=lambda cfg: "model_type" not in cfg and cfg.get("format", STUDENT_FORMAT) == STUDENT_FORMAT,
                load=load_classifier))  # not HF, not another family's format


def saved_spec(folder: Path) -> dict[str, Any] | None:
    """The registered arch a classifier run folder was saved with (so its student saves again)."""
    cfg = (folder / "student" / "config.json") if (folder / "student").is_dir() else folder / "config.json"
    d = json.loads(cfg.read_text()) if cfg.is_file() else {}
    return {"name": d["arch"], "params": d["params"]} if d.get("arch") else None


def check_classes(model: nn.Module, num_classes: int, who: str) -> None:
    out = getattr(getattr(model, "head", None), "out_features", None)
    if out is not None and out != num_classes:
        raise MismatchError(f"the {who} predicts {out} classes but the task has {num_classes}")


def evaluator(data: ArrayDataset, teacher: nn.Module | None):
    # a frozen teacher's logits once; an online teacher (``teacher_trainable``, e.g. bdkd) changes: each time
    online = teacher is not None and any(p.requires_grad for p in teacher.parameters())
    t_logits = predict(teacher, data.x) if teacher is not None and not online else None

    def evaluate(model: nn.Module) -> dict[str, float]:
        return classifier_metrics(predict(model, data.x), data.y, predict(teacher, data.x) if online else t_logits)

    return evaluate


def final_metrics(student: nn.Module, teacher: nn.Module | None, data: TaskData) -> dict[str, float]:
    t_logits = predict(teacher, data.test.x) if teacher is not None else None
    metrics = {f"test/{k}": v for k, v in classifier_metrics(predict(student, data.test.x), data.test.y, t_logits).items()}
    if data.val is not None:
        metrics.update({f"val/{k}": v for k, v in evaluator(data.val, teacher)(student).items()})
    if data.extra_metrics is not None:
        metrics.update({f"test/{k}": v for k, v in data.extra_metrics(student).items()})
    if t_logits is not None:
        metrics.update({f"teacher/{k}": v for k, v in classifier_metrics(t_logits, data.test.y).items()})
        if data.extra_metrics is not None:
            metrics.update({f"teacher/{k}": v for k, v in data.extra_metrics(teacher).items()})
    metrics["params/student"] = sum(p.numel() for p in student.parameters())
    if teacher is not None:
        metrics["params/teacher"] = sum(p.numel() for p in teacher.parameters())
    return metrics


@register_ops(TaskData)
class ClassifierOps:
    """``TaskOps`` of a classifier ``TaskData``."""

    def __init__(self, data: TaskData) -> None:
        self.data = data

    def build_model(self, spec: dict[str, Any]) -> nn.Module:
        return build_model(spec["name"], spec["params"], self.data.input_shape, self.data.num_classes)

    def load_model(self, folder: Path) -> nn.Module:
        return load_student(folder)

    def saved_spec(self, folder: Path) -> dict[str, Any] | None:
        return saved_spec(folder)

    def save_model(self, folder: Path, model: nn.Module, spec: dict[str, Any] | None) -> None:
        save_student(folder, model, spec, self.data.input_shape, self.data.num_classes)

    def check_models(self, student: nn.Module, teacher: nn.Module | None) -> None:
        check_classes(student, self.data.num_classes, "student")
        if teacher is not None:
            check_classes(teacher, self.data.num_classes, "teacher")

    def task_info(self, uses_unlabeled: bool) -> TaskInfo:
        d = self.data
        train_set = d.training_set(uses_unlabeled)
        return TaskInfo(d.num_classes, len(train_set), d.input_shape, len(d.train), train_set, d.val, d)

    def open_teacher_cache(self, folder: Path) -> Any:
        raise RecipeError("teacher.cache is for language-model tasks; give a classifier teacher as recipe, run or model")

    def evaluator(self, teacher: nn.Module | None):
        d = self.data
        return evaluator(d.val if d.val is not None else d.test, teacher)  # no val split: last epoch anyway

    def final_metrics(self, student: nn.Module, teacher: nn.Module | None) -> dict[str, float]:
        return final_metrics(student, teacher, self.data)
