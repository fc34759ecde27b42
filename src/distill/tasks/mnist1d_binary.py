"""MNIST-1D as a 2-class task (digits 0–4 vs 5–9), for few-class distillation (S49 LELP).

The same pool, splits and transfer set as ``mnist1d`` (built by ``build_mnist1d``); only the labels
change. Unlabeled transfer samples keep label -1.
"""

from __future__ import annotations

import torch

from distill.core.registry import TASKS
from distill.tasks.base import ArrayDataset, TaskData
from distill.tasks.mnist1d import DEFAULT_STUDENT, MNIST1DParams, build_mnist1d


class MNIST1DBinaryParams(MNIST1DParams):
    """The parameters of ``mnist1d`` (sizes of the splits, data seed)."""


def _binary(ds: ArrayDataset | None) -> ArrayDataset | None:
    if ds is None:
        return None
    return ArrayDataset(ds.x, torch.where(ds.y >= 0, (ds.y >= 5).long(), ds.y))


@TASKS.register("mnist1d-binary", "MNIST-1D as 2 classes: digits 0–4 vs 5–9, generated locally", MNIST1DBinaryParams)
def build_mnist1d_binary(p: MNIST1DBinaryParams) -> TaskData:
    d = build_mnist1d(p)
    return TaskData(
        train=_binary(d.train),
        val=_binary(d.val),
        test=_binary(d.test),
        transfer=d.transfer,
        num_classes=2,
        meta=dict(d.meta),
    )
build_mnist1d_binary.default_student = DEFAULT_STUDENT  # type: ignore[attr-defined]
