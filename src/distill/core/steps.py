"""Helpers for methods whose state follows the data seen in an optimizer step (TAID's t, PS-KD's memory),
in any family: what one optimizer step's micro-batches produced, averaged over processes."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


class StepRecords:
    """What the micro-batches of one optimizer step produced; ``take()`` returns them and starts the
    next step. Callers skip ``add`` while ``Distiller.replaying`` (SAM's second pass over the same
    micro-batches), so each micro-batch is recorded once."""

    def __init__(self) -> None:
        self.items: list[tuple[Tensor, ...]] = []

    def add(self, index: Tensor, *values: Tensor) -> None:
        self.items.append((index, *values))

    def take(self) -> list[tuple[Tensor, ...]]:
        items, self.items = self.items, []
        return items


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def mean_over_processes(x: Tensor) -> Tensor:
    """The mean of a scalar over all processes (itself on one process), so state stays identical."""
    if world_size() == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / world_size()


def gather_rows(index: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """Every process's ``(index [n], rows [n, ...])`` concatenated; ``n`` may differ per process."""
    ws = world_size()
    if ws == 1:
        return index, rows
    n = torch.tensor([len(index)], device=index.device)
    sizes = [torch.zeros_like(n) for _ in range(ws)]
    dist.all_gather(sizes, n)
    counts = [int(s) for s in sizes]
    m = max(counts)

    def pad(x: Tensor) -> Tensor:
        return torch.cat([x, x.new_zeros((m - len(x), *x.shape[1:]))])

    out = []
    for x in (index, rows):
        parts = [torch.empty_like(pad(x)) for _ in range(ws)]
        dist.all_gather(parts, pad(x).contiguous())
        out.append(torch.cat([p[:c] for p, c in zip(parts, counts)]))
    return out[0], out[1]
