"""MNIST-1D with planted canaries, for measuring what a model memorised of its training data.

A canary is a random input (standard normal, the scale of MNIST-1D signals) with a random label,
repeated ``canary_repeats`` times in the labeled training set (Carlini et al. 2019's secret
sharer, in classifier form). Validation, test and transfer splits are MNIST-1D's, untouched.
``canary_exposure`` scores a model on them (Carlini et al. 2019, "The Secret Sharer"): for a canary
(input x, secret label y) the candidates are all class labels, ranked by the model's loss
``−log softmax(f(x))_c``; ``exposure = log2(#candidates) − log2(rank of y)``. Runs on this task
report it as ``test/canary_exposure`` (and ``teacher/canary_exposure``).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from distill.core.metrics import exposure, predict
from distill.core.registry import TASKS
from distill.tasks.base import ArrayDataset, TaskData
from distill.tasks.mnist1d import DEFAULT_STUDENT, MNIST1DParams, build_mnist1d


class CanaryParams(MNIST1DParams):
    num_canaries: int = Field(8, ge=1, description="distinct canaries")
    canary_repeats: int = Field(10, ge=1, description="copies of each canary in the labeled training set")
    canary_seed: int = 1234


@TASKS.register("mnist1d-canary", "MNIST-1D plus repeated random-input, random-label canaries", CanaryParams)
def build_mnist1d_canary(p: CanaryParams) -> TaskData:
    base = build_mnist1d(MNIST1DParams(**{k: getattr(p, k) for k in MNIST1DParams.model_fields}))
    g = torch.Generator().manual_seed(p.canary_seed)
    x = torch.randn(p.num_canaries, *base.input_shape, generator=g)
    y = torch.randint(0, base.num_classes, (p.num_canaries,), generator=g)
    planted = ArrayDataset(x.repeat(p.canary_repeats, *[1] * (x.dim() - 1)), y.repeat(p.canary_repeats))
    base.train = ArrayDataset.concat(base.train, planted)
    base.meta.update(canary_x=x, canary_y=y)
    base.extra_metrics = lambda model: {"canary_exposure": canary_exposure(model, base)}
    return base


build_mnist1d_canary.default_student = DEFAULT_STUDENT  # type: ignore[attr-defined]


def canary_exposure(model: nn.Module, task_data: TaskData) -> float:
    """Mean exposure of the canaries planted by the ``mnist1d-canary`` task (``meta["canary_x"]``,
    ``meta["canary_y"]``); with C classes it lies in [0, log2 C]."""
    if "canary_x" not in task_data.meta:
        raise ValueError("task_data has no planted canaries; use the 'mnist1d-canary' task")
    logits = predict(model, task_data.meta["canary_x"])
    return exposure(-F.log_softmax(logits, dim=-1), task_data.meta["canary_y"]).mean().item()
