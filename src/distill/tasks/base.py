"""Task data: labeled train, validation, test and an optional unlabeled transfer set.

Every split is an ``ArrayDataset`` of in-memory tensors; a batch is a dict with ``x``, ``y``
(-1 for unlabeled samples) and ``index`` (the position in the training set, which per-sample
memories such as PS-KD's are keyed by).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from distill.errors import DataError


def as_labels(y: Any) -> Tensor:
    """``y`` as 1-D ``long`` class indices. Integer (and bool) labels pass; float labels only when every
    value is a whole number (``2.0``), never truncated (``2.5`` is an error); one-hot or 2-D labels are an
    error. -1 marks an unlabeled sample."""
    try:
        t = torch.as_tensor(y)
    except (TypeError, ValueError, RuntimeError) as err:
        raise DataError(f"y must be integer class indices (a tensor or array), got {type(y).__name__}: "
                        f"{str(err).splitlines()[0]}") from None
    if t.dim() != 1:
        raise DataError(f"y must be 1-D class indices, got shape {list(t.shape)}"
                        + (" (one-hot or probabilities: pass y.argmax(1))" if t.dim() == 2 else ""))
    if t.is_complex():
        raise DataError("y must be integer class indices, got complex numbers")
    if t.is_floating_point():
        bad = ~torch.isfinite(t) | (t != t.round()) | (t.abs() > 2**31)
        if bad.any():
            i = int(bad.nonzero()[0])
            raise DataError(f"y must be integer class indices: y[{i}] = {t[i].item():g} is not a whole number "
                            "(float labels are accepted only when exactly integral)")
    return t.long()


class ArrayDataset(Dataset):
    """Tensors in memory, fetched a whole batch at a time (``__getitems__``).

    ``x`` becomes ``float32``; ``y`` holds class indices (see ``as_labels``: float labels only when whole
    numbers); without ``y`` every sample is unlabeled (-1)."""

    def __init__(self, x: Tensor, y: Tensor | None = None) -> None:
        try:
            self.x = torch.as_tensor(x, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as err:
            raise DataError(f"x must be a tensor or array of numbers, got {type(x).__name__}: "
                            f"{str(err).splitlines()[0]}") from None
        if self.x.dim() == 0:
            raise DataError("x must have one row per sample, got a scalar")
        n = len(self.x)
        self.y = torch.full((n,), -1, dtype=torch.long) if y is None else as_labels(y)
        if len(self.y) != n:
            raise DataError(f"x has {n} rows but y has {len(self.y)}")
        self.index = torch.arange(n)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"x": self.x[i], "y": self.y[i], "index": self.index[i]}

    def __getitems__(self, idx: list[int]) -> dict[str, Tensor]:
        t = torch.as_tensor(idx)
        return {"x": self.x[t], "y": self.y[t], "index": self.index[t]}

    @staticmethod
    def concat(*parts: ArrayDataset) -> ArrayDataset:
        return ArrayDataset(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]))


@dataclass
class TaskData:
    train: ArrayDataset
    test: ArrayDataset
    num_classes: int
    val: ArrayDataset | None = None
    transfer: ArrayDataset | None = None  # unlabeled; used by methods with uses_unlabeled
    meta: dict = field(default_factory=dict)
    # task-specific metrics of a model (canary exposure, attack success), reported as test/<name>
    extra_metrics: Callable[[torch.nn.Module], dict[str, float]] | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])

    def training_set(self, use_unlabeled: bool) -> ArrayDataset:
        if use_unlabeled and self.transfer is not None and len(self.transfer):
            return ArrayDataset.concat(self.train, self.transfer)
        return self.train


def split_indices(n: int, sizes: list[int], seed: int) -> list[Tensor]:
    """Disjoint random index sets of the given sizes (a fixed data seed, not the run seed)."""
    if sum(sizes) > n:
        raise ValueError(f"asked for {sum(sizes)} samples but only {n} exist")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    out, start = [], 0
    for s in sizes:
        out.append(perm[start : start + s])
        start += s
    return out
