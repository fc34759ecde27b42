"""``points``: synthetic point-cloud shape classification (ours), the task of ``pointdistiller`` (S20).

Six classes of surfaces, each sampled as ``num_points`` points: sphere, cube, cylinder, cone, torus and
a square plane patch. Each cloud is stretched per axis by a random factor in ``1 ± anisotropy`` (a
sphere becomes an ellipsoid, a cube a box), rotated by a random 3-D rotation, jittered with Gaussian
noise, then centred and scaled to unit radius; a fraction ``outliers`` of the points is replaced by
uniform clutter. ``x`` is ``[N, 3]`` per sample, so any point arch (``pointnet``) reads it.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import Tensor

from distill.core.registry import TASKS, Params
from distill.tasks.base import ArrayDataset, TaskData

SHAPES = ("sphere", "cube", "cylinder", "cone", "torus", "plane")


def _sphere(n: int, m: int, g: torch.Generator) -> Tensor:
    v = torch.randn(n, m, 3, generator=g)
    return v / v.norm(dim=-1, keepdim=True)


def _cube(n: int, m: int, g: torch.Generator) -> Tensor:
    p = torch.rand(n, m, 3, generator=g) * 2 - 1
    axis = torch.randint(0, 3, (n, m), generator=g)
    side = torch.randint(0, 2, (n, m), generator=g).float() * 2 - 1
    return p.scatter(-1, axis.unsqueeze(-1), side.unsqueeze(-1))  # one coordinate pinned to a face


def _cylinder(n: int, m: int, g: torch.Generator) -> Tensor:
    theta = torch.rand(n, m, generator=g) * 2 * math.pi
    z = torch.rand(n, m, generator=g) * 2 - 1
    r = torch.ones(n, m)
    cap = torch.rand(n, m, generator=g) < 0.25  # a quarter of the points on the two caps
    r = torch.where(cap, torch.rand(n, m, generator=g).sqrt(), r)
    z = torch.where(cap, torch.sign(z), z)
    return torch.stack([r * theta.cos(), r * theta.sin(), z], -1)


def _cone(n: int, m: int, g: torch.Generator) -> Tensor:
    theta = torch.rand(n, m, generator=g) * 2 * math.pi
    h = torch.rand(n, m, generator=g).sqrt()  # uniform over the lateral surface: radius grows with h
    base = torch.rand(n, m, generator=g) < 0.25
    r = torch.where(base, torch.rand(n, m, generator=g).sqrt(), h)
    z = torch.where(base, torch.ones(n, m), h) * 2 - 1
    return torch.stack([r * theta.cos(), r * theta.sin(), z], -1)


def _torus(n: int, m: int, g: torch.Generator) -> Tensor:
    u, v = (torch.rand(n, m, generator=g) * 2 * math.pi for _ in range(2))
    big, small = 0.7, 0.3
    return torch.stack([(big + small * v.cos()) * u.cos(), (big + small * v.cos()) * u.sin(), small * v.sin()], -1)


def _plane(n: int, m: int, g: torch.Generator) -> Tensor:
    p = torch.rand(n, m, 3, generator=g) * 2 - 1
    return p * torch.tensor([1.0, 1.0, 0.0])


_MAKERS = (_sphere, _cube, _cylinder, _cone, _torus, _plane)


def random_rotations(n: int, g: torch.Generator) -> Tensor:
    """``[n, 3, 3]`` rotations from the QR decomposition of Gaussian matrices, sign-fixed (uniform on SO(3))."""
    q, r = torch.linalg.qr(torch.randn(n, 3, 3, generator=g))
    q = q * torch.sign(torch.diagonal(r, dim1=1, dim2=2)).unsqueeze(1)
    flip = torch.ones(n, 1, 3)
    flip[:, 0, 0] = torch.sign(torch.linalg.det(q))  # a reflection (det −1) becomes a rotation
    return q * flip


def make_shapes(labels: Tensor, num_points: int, noise: float, anisotropy: float, outliers: float,
                g: torch.Generator) -> Tensor:
    """Point clouds ``[len(labels), num_points, 3]`` of the shapes ``labels`` (indices into ``SHAPES``)."""
    n = len(labels)
    pts = torch.zeros(n, num_points, 3)
    for c, make in enumerate(_MAKERS):  # every maker draws for all samples: the stream is label-independent
        pts = torch.where((labels == c).view(n, 1, 1), make(n, num_points, g), pts)
    pts = pts * (1 + anisotropy * (torch.rand(n, 1, 3, generator=g) * 2 - 1))
    pts = pts @ random_rotations(n, g).transpose(1, 2)
    pts = pts + noise * torch.randn(pts.shape, generator=g)
    pts = pts - pts.mean(1, keepdim=True)
    pts = pts / pts.norm(dim=-1).amax(1).view(n, 1, 1)
    clutter = torch.rand(n, num_points, generator=g) < outliers
    pts = torch.where(clutter.unsqueeze(-1), torch.rand(pts.shape, generator=g) * 2 - 1, pts)
    return pts


class PointsParams(Params):
    num_train: int = Field(600, ge=6, description="labeled training clouds")
    num_val: int = Field(300, ge=0)
    num_test: int = Field(600, ge=6)
    num_transfer: int = Field(0, ge=0, description="unlabeled clouds for distillation")
    num_points: int = Field(128, ge=4, description="points per cloud")
    noise: float = Field(0.02, ge=0, description="Gaussian jitter (before the unit-radius scaling)")
    anisotropy: float = Field(0.2, ge=0, lt=1, description="per-axis stretch in 1 ± anisotropy")
    outliers: float = Field(0.0, ge=0, le=1, description="fraction of points replaced by uniform clutter")
    data_seed: int = 0


DEFAULT_STUDENT = {"arch": "pointnet", "width": 16, "depth": 3}


@TASKS.register("points", "synthetic point-cloud shapes (sphere, cube, cylinder, cone, torus, plane), x [N, 3]", PointsParams)
def build_points(p: PointsParams) -> TaskData:
    g = torch.Generator().manual_seed(p.data_seed)
    sizes = [p.num_train, p.num_val, p.num_test, p.num_transfer]
    y = torch.arange(sum(sizes)) % len(SHAPES)  # balanced classes, shuffled
    y = y[torch.randperm(len(y), generator=g)]
    x = make_shapes(y, p.num_points, p.noise, p.anisotropy, p.outliers, g)
    parts, start = [], 0
    for s in sizes:
        parts.append(slice(start, start + s))
        start += s
    tr, va, te, tf = parts
    return TaskData(
        train=ArrayDataset(x[tr], y[tr]),
        val=ArrayDataset(x[va], y[va]) if p.num_val else None,
        test=ArrayDataset(x[te], y[te]),
        transfer=ArrayDataset(x[tf]) if p.num_transfer else None,
        num_classes=len(SHAPES),
    )
build_points.default_student = DEFAULT_STUDENT  # type: ignore[attr-defined]
