"""Trainable maps from a student's feature shape to a teacher's (FitNets' regressor and its kin).

Shapes are per sample (no batch dimension): vectors ``(D,)``, tokens ``(T, D)``, maps ``(C, *spatial)``.
A distiller keeps its projectors in ``self.projectors`` (``FeatureDistiller``): they train in their own
parameter group ``projectors``, are saved in the run's checkpoint, and are not part of the exported
student.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.errors import RecipeError, did_you_mean

KINDS = ("linear", "conv1x1", "mlp", "attnpool", "identity")


class LinearProjector(nn.Module):
    """``Linear`` on the last dimension (``(..., D) -> (..., D')``, leading dims kept), or, with
    ``flatten=True``, on the flattened sample, reshaped to ``out_shape``."""

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...], hidden: int | None = None) -> None:
        super().__init__()
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.flatten = self.in_shape[:-1] != self.out_shape[:-1]
        d_in = math.prod(self.in_shape) if self.flatten else self.in_shape[-1]
        d_out = math.prod(self.out_shape) if self.flatten else self.out_shape[-1]
        self.net = nn.Linear(d_in, d_out) if hidden is None else nn.Sequential(
            nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))

    def forward(self, x: Tensor) -> Tensor:
        if self.flatten:
            return self.net(x.flatten(1)).view(x.shape[0], *self.out_shape)
        return self.net(x)


class MLPProjector(LinearProjector):
    """Linear → GELU → Linear (hidden width: the larger side by default)."""

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...], hidden: int | None = None) -> None:
        flat = tuple(in_shape)[:-1] != tuple(out_shape)[:-1]
        side = (math.prod(in_shape), math.prod(out_shape)) if flat else (in_shape[-1], out_shape[-1])
        super().__init__(in_shape, out_shape, hidden or max(side))


class Conv1x1Projector(nn.Module):
    """1×1 convolution on channels (``(C, *S) -> (C', *S')``, 1-D or 2-D maps); when the spatial size
    differs, adaptive average pooling (down) or linear interpolation (up) to ``S'`` afterwards."""

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> None:
        super().__init__()
        if len(in_shape) != len(out_shape) or len(in_shape) not in (2, 3):
            raise RecipeError(f"conv1x1 projector maps (C, L) or (C, H, W) features, not {in_shape} -> {out_shape}")
        conv = nn.Conv1d if len(in_shape) == 2 else nn.Conv2d
        self.conv = conv(in_shape[0], out_shape[0], kernel_size=1)
        self.size = tuple(out_shape[1:]) if tuple(in_shape[1:]) != tuple(out_shape[1:]) else None

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        if self.size is None:
            return y
        if all(o <= i for o, i in zip(self.size, y.shape[2:])):
            return (F.adaptive_avg_pool1d if y.dim() == 3 else F.adaptive_avg_pool2d)(y, self.size)
        return F.interpolate(y, size=self.size, mode="linear" if y.dim() == 3 else "bilinear", align_corners=False)


class AttentionPool(nn.Module):
    """Tokens → one vector: a learned query attends over the tokens (``nn.MultiheadAttention``), then a
    linear map to ``D'``. ``(T, D) -> (D',)``; a map ``(C, *S)`` is read as ``prod(S)`` tokens of width C."""

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...], heads: int = 1) -> None:
        super().__init__()
        if len(in_shape) < 2 or len(out_shape) != 1:
            raise RecipeError(f"attnpool projector maps tokens (T, D) or maps (C, ...) to a vector (D',), not {in_shape} -> {out_shape}")
        self.channels_first = len(in_shape) > 2
        d = in_shape[0] if self.channels_first else in_shape[-1]
        heads = heads if d % heads == 0 else 1
        # a small random query: a zero one would attend uniformly and get the same gradient for every token
        self.query = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.out = nn.Linear(d, out_shape[0])

    def forward(self, x: Tensor) -> Tensor:
        tokens = x.flatten(2).transpose(1, 2) if self.channels_first else x
        q = self.query.expand(x.shape[0], -1, -1)
        pooled, _ = self.attn(q, tokens, tokens, need_weights=False)
        return self.out(pooled[:, 0])


def make_projector(kind: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> nn.Module:
    """A projector of ``kind`` (``linear``, ``conv1x1``, ``mlp``, ``attnpool``, ``identity``) from the
    student's per-sample feature shape to the teacher's."""
    in_shape, out_shape = tuple(int(v) for v in in_shape), tuple(int(v) for v in out_shape)
    if kind == "identity":
        if in_shape != out_shape:
            raise RecipeError(f"identity projector: student features {in_shape} differ from the teacher's {out_shape}")
        return nn.Identity()
    if kind == "linear":
        return LinearProjector(in_shape, out_shape)
    if kind == "mlp":
        return MLPProjector(in_shape, out_shape)
    if kind == "conv1x1":
        return Conv1x1Projector(in_shape, out_shape)
    if kind == "attnpool":
        return AttentionPool(in_shape, out_shape)
    raise RecipeError(f"unknown projector kind '{kind}'{did_you_mean(kind, KINDS)}; choose one of {', '.join(KINDS)}")
