"""MNIST-1D (Greydanus, 2020), generated locally: never downloaded.

The pool is made with ``mnist1d.data.make_dataset`` from a fixed data seed and cut into labeled
train, validation, test and an unlabeled transfer set (teachers label data nobody labeled).
"""

from __future__ import annotations

import random
from functools import lru_cache

import numpy as np
import torch
from pydantic import Field

from distill.core.registry import TASKS, Params
from distill.tasks.base import ArrayDataset, TaskData, split_indices


class MNIST1DParams(Params):
    num_train: int = Field(4000, ge=10, description="labeled training samples")
    num_val: int = Field(1000, ge=0)
    num_test: int = Field(4000, ge=10)
    num_transfer: int = Field(0, ge=0, description="unlabeled samples for distillation")
    data_seed: int = 42


@lru_cache(maxsize=4)
def _pool(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from mnist1d.data import get_dataset_args, make_dataset

    # make_dataset reseeds Python's and NumPy's global RNGs; keep the caller's streams intact
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        args = get_dataset_args()
        args.num_samples = n
        args.train_split = 1.0
        args.seed = seed
        d = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return d["x"].astype(np.float32), d["y"].astype(np.int64)


DEFAULT_STUDENT = {"arch": "cnn1d", "width": 8, "depth": 3}  # when a recipe names no student


@TASKS.register("mnist1d", "MNIST-1D, 10 classes, length-40 signals, generated locally", MNIST1DParams)
def build_mnist1d(p: MNIST1DParams) -> TaskData:
    sizes = [p.num_train, p.num_val, p.num_test, p.num_transfer]
    total = sum(sizes)
    n = -(-total // 10) * 10  # make_dataset draws num_samples // 10 per class
    x, y = _pool(n, p.data_seed)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    tr, va, te, tf = split_indices(len(y), sizes, p.data_seed)
    return TaskData(
        train=ArrayDataset(x[tr], y[tr]),
        val=ArrayDataset(x[va], y[va]) if p.num_val else None,
        test=ArrayDataset(x[te], y[te]),
        transfer=ArrayDataset(x[tf]) if p.num_transfer else None,
        num_classes=10,
    )
build_mnist1d.default_student = DEFAULT_STUDENT  # type: ignore[attr-defined]
