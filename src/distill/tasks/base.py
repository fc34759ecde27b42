"""Task data: labeled train, validation, test and an optional unlabeled transfer set.

Every split is an ``ArrayDataset`` of in-memory tensors; a batch is a dict with ``x``, ``y``
(-1 for unlabeled samples) and ``index`` (the position in the training set, which per-sample
memories such as PS-KD's are keyed by).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils.data import Dataset


class ArrayDataset(Dataset):
    """Tensors in memory, fetched a whole batch at a time (``__getitems__``)."""

    def __init__(self, x: Tensor, y: Tensor | None = None) -> None:
        self.x = torch.as_tensor(x, dtype=torch.float32)
        n = len(self.x)
        self.y = torch.full((n,), -1, dtype=torch.long) if y is None else torch.as_tensor(y, dtype=torch.long)
        if len(self.y) != n:
            raise ValueError(f"x has {n} rows but y has {len(self.y)}")
        self.index = torch.arange(n)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"x": self.x[i], "y": self.y[i], "index": self.index[i]}

    def __getitems__(self, idx: list[int]) -> dict[str, Tensor]:
        t = torch.as_tensor(idx)
        return {"x": self.x[t], "y": self.y[t], "index": self.index[t]}

    @staticmethod
    def concat(*parts: "ArrayDataset") -> "ArrayDataset":
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
