"""``shapes-detection``: a synthetic object-detection task and its ``TaskOps`` (the detection methods' task).

Each image is a ``size × size`` RGB canvas (dark noisy background) holding 1 to ``max_objects`` shapes
that do not overlap: squares, discs and crosses (the 3 classes), 5 to 12 pixels across, each in a random
colour or, one time in three, a random gray. Targets are the tight pixel box ``(cx, cy, w, h)``
normalised by the canvas size, and the class. Everything follows from ``data_seed``.

A batch is ``{"x": [B, 3, H, W], "boxes": [B, M, 4], "labels": [B, M], "index": [B]}`` with ``M =
max_objects`` and label -1 on empty slots. Models are saved as classifiers are (``model.safetensors``
+ ``config.json`` with the registered arch, ``distill.tasks.ops.save_student``), so ``distill.load_student``
rebuilds them. Metrics: ``map50`` (mAP at IoU 0.5, ``features.detection.mean_ap``) and ``loss`` (the
DETR set loss, ``features.detection.detr_loss``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field
from torch import Tensor, nn
from torch.utils.data import Dataset

from distill.core.distiller import TaskInfo
from distill.core.refs import load_student
from distill.core.registry import ARCHS, TASKS, Params
from distill.errors import MismatchError, RecipeError
from distill.features.detection import DETR, detections, detr_loss, mean_ap
from distill.tasks import ops as classifier_ops

CLASSES = ("square", "disc", "cross")


def draw_shape(canvas: np.ndarray, kind: int, x0: int, y0: int, s: int, colour: np.ndarray) -> None:
    """Paint shape ``kind`` with its top-left corner at ``(x0, y0)`` and side ``s`` (its tight box)."""
    yy, xx = np.mgrid[0:s, 0:s]
    if kind == 0:
        mask = np.ones((s, s), dtype=bool)
    elif kind == 1:  # a disc touching all four sides of its box
        c = (s - 1) / 2
        mask = (yy - c) ** 2 + (xx - c) ** 2 <= (s / 2) ** 2
    else:  # a plus sign, bars a third of the side wide
        t = max(1, round(s / 3))
        lo = (s - t) // 2
        mask = ((yy >= lo) & (yy < lo + t)) | ((xx >= lo) & (xx < lo + t))
    canvas[:, y0:y0 + s, x0:x0 + s][:, mask] = colour[:, None]


def make_shapes(n: int, size: int, max_objects: int, rng: np.random.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """``n`` images with their boxes ``[n, max_objects, 4]`` and labels ``[n, max_objects]`` (-1 padded)."""
    x = np.empty((n, 3, size, size), dtype=np.float32)
    boxes = np.zeros((n, max_objects, 4), dtype=np.float32)
    labels = np.full((n, max_objects), -1, dtype=np.int64)
    lo, hi = 5, min(12, size // 2)
    for i in range(n):
        x[i] = 0.1 + 0.05 * rng.standard_normal((3, size, size))
        placed: list[tuple[int, int, int]] = []
        for _ in range(int(rng.integers(1, max_objects + 1))):
            for _try in range(50):  # rejection sampling: no overlap, one pixel of clearance
                s = int(rng.integers(lo, hi + 1))
                x0, y0 = int(rng.integers(0, size - s + 1)), int(rng.integers(0, size - s + 1))
                if all(x0 + s + 1 <= a or a + b + 1 <= x0 or y0 + s + 1 <= c or c + b + 1 <= y0 for a, c, b in placed):
                    break
            else:
                continue
            kind = int(rng.integers(0, 3))
            colour = (np.full(3, rng.uniform(0.4, 1.0)) if rng.random() < 1 / 3 else rng.uniform(0.2, 1.0, 3)).astype(np.float32)
            draw_shape(x[i], kind, x0, y0, s, colour)
            k = len(placed)
            boxes[i, k] = [(x0 + s / 2) / size, (y0 + s / 2) / size, s / size, s / size]
            labels[i, k] = kind
            placed.append((x0, y0, s))
    return torch.from_numpy(x), torch.from_numpy(boxes), torch.from_numpy(labels)


class DetectionDataset(Dataset):
    """Images with their padded boxes and labels, fetched a batch at a time."""

    def __init__(self, x: Tensor, boxes: Tensor, labels: Tensor) -> None:
        self.x, self.boxes, self.labels = x.float(), boxes.float(), labels.long()
        self.index = torch.arange(len(x))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"x": self.x[i], "boxes": self.boxes[i], "labels": self.labels[i], "index": self.index[i]}

    def __getitems__(self, idx: Any) -> dict[str, Tensor]:
        t = torch.as_tensor(idx)
        return {"x": self.x[t], "boxes": self.boxes[t], "labels": self.labels[t], "index": self.index[t]}


def predict(model: nn.Module, data: DetectionDataset, batch_size: int = 256) -> dict[str, Tensor]:
    """A model's logits and boxes on a whole split (eval mode, no gradients, mode restored)."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            outs = [model(data.x[i:i + batch_size].to(device)) for i in range(0, len(data), batch_size)]
    finally:
        model.train(was)
    return {k: torch.cat([o[k] for o in outs]).float().cpu() for k in ("logits", "boxes")}


def detection_metrics(out: dict[str, Tensor], data: DetectionDataset, num_classes: int) -> dict[str, float]:
    """``map50`` and the DETR set ``loss`` of a model's outputs on a split."""
    scores, labels = detections(out["logits"])
    return {"map50": mean_ap(scores, labels, out["boxes"], data.labels, data.boxes, num_classes),
            "loss": float(detr_loss(out["logits"], out["boxes"], data.labels, data.boxes)["loss"])}


@dataclass
class DetectionTaskData:
    """A detection task's splits, implementing ``TaskOps`` (``core/taskops.py``)."""

    name: str
    train: DetectionDataset
    val: DetectionDataset
    test: DetectionDataset
    num_classes: int
    default_student: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)

    family = "detection"

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])

    # --- TaskOps --------------------------------------------------------------------------------
    def build_model(self, spec: dict[str, Any]) -> nn.Module:
        entry = ARCHS.get(spec["name"])
        if getattr(entry.obj, "family", None) != "detection":
            raise RecipeError(f"student.arch '{spec['name']}' is not a detector; task '{self.name}' needs arch detr")
        return entry.obj(entry.params.model_validate(spec["params"]), self.input_shape, self.num_classes)

    def load_model(self, folder: Path) -> nn.Module:
        return load_student(folder)

    def saved_spec(self, folder: Path) -> dict[str, Any] | None:
        return classifier_ops.saved_spec(folder)

    def save_model(self, folder: Path, model: nn.Module, spec: dict[str, Any] | None) -> None:
        classifier_ops.save_student(folder, model, spec, self.input_shape, self.num_classes)

    def check_models(self, student: nn.Module, teacher: nn.Module | None) -> None:
        for who, model in (("student", student), ("teacher", teacher)):
            if model is None:
                continue
            if not isinstance(model, DETR):
                raise MismatchError(f"the {who} is a {type(model).__name__}; task '{self.name}' needs a detr detector")
            if model.num_classes != self.num_classes:
                raise MismatchError(f"the {who} detects {model.num_classes} classes but the task has {self.num_classes}")

    def task_info(self, uses_unlabeled: bool) -> TaskInfo:
        return TaskInfo(self.num_classes, len(self.train), self.input_shape, len(self.train), self.train, self.val, self)

    def open_teacher_cache(self, folder: Path) -> Any:
        raise RecipeError("teacher.cache is for language-model tasks; give a detection teacher as recipe, run or model")

    def evaluator(self, teacher: nn.Module | None) -> Callable[[nn.Module], dict[str, float]]:
        def evaluate(model: nn.Module) -> dict[str, float]:
            return detection_metrics(predict(model, self.val), self.val, self.num_classes)

        return evaluate

    def final_metrics(self, student: nn.Module, teacher: nn.Module | None) -> dict[str, float]:
        out: dict[str, float] = {}
        for split, data in (("test", self.test), ("val", self.val)):
            out |= {f"{split}/{k}": v for k, v in detection_metrics(predict(student, data), data, self.num_classes).items()}
        out["params/student"] = sum(p.numel() for p in student.parameters())
        if teacher is not None:
            t = detection_metrics(predict(teacher, self.test), self.test, self.num_classes)
            out |= {f"teacher/{k}": v for k, v in t.items()}
            out["params/teacher"] = sum(p.numel() for p in teacher.parameters())
        return out


class ShapesParams(Params):
    num_train: int = Field(2000, ge=1)
    num_val: int = Field(300, ge=1)
    num_test: int = Field(500, ge=1)
    size: int = Field(32, ge=16, description="canvas side in pixels")
    max_objects: int = Field(3, ge=1, le=6)
    data_seed: int = 0


DEFAULT_STUDENT = {"arch": "detr", "width": 32, "backbone": 32, "enc_layers": 1, "dec_layers": 1, "queries": 8}


@TASKS.register("shapes-detection", "synthetic detection: 1-3 squares, discs, crosses on a 32x32 canvas (boxes + class)",
                ShapesParams)
def build_shapes(p: ShapesParams) -> DetectionTaskData:
    rng = np.random.default_rng(p.data_seed)
    splits = [DetectionDataset(*make_shapes(n, p.size, p.max_objects, rng)) for n in (p.num_train, p.num_val, p.num_test)]
    return DetectionTaskData("shapes-detection", *splits, num_classes=len(CLASSES), default_student=dict(DEFAULT_STUDENT),
                             meta={"classes": list(CLASSES)})


build_shapes.default_student = DEFAULT_STUDENT  # type: ignore[attr-defined]
