"""scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes): no download."""

from __future__ import annotations

import torch
from pydantic import Field

from distill.core.registry import TASKS, Params
from distill.tasks.base import ArrayDataset, TaskData, split_indices


class DigitsParams(Params):
    num_train: int = Field(1000, ge=10)
    num_val: int = Field(200, ge=0)
    num_test: int = Field(597, ge=10)
    data_seed: int = 0


DEFAULT_STUDENT = {"arch": "cnn2d", "width": 8, "depth": 3}  # when a recipe names no student


@TASKS.register("digits", "scikit-learn 8x8 digits, 10 classes, bundled with scikit-learn", DigitsParams)
def build_digits(p: DigitsParams) -> TaskData:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    tr, va, te = split_indices(len(y), [p.num_train, p.num_val, p.num_test], p.data_seed)
    return TaskData(
        train=ArrayDataset(x[tr], y[tr]),
        val=ArrayDataset(x[va], y[va]) if p.num_val else None,
        test=ArrayDataset(x[te], y[te]),
        num_classes=10,
    )
build_digits.default_student = DEFAULT_STUDENT  # type: ignore[attr-defined]
