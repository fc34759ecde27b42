"""Point-cloud classifiers and kNN-graph helpers (PointNet / DGCNN style), for ``pointdistiller`` (S20).

Inputs are point sets ``[batch, N, 3]``. ``pointnet`` is a ``StagedClassifier`` (``features/models.py``):
its stages map per-point features ``[batch, C, N]`` (stage 0 takes ``[batch, N, 3]``), tapped as
``stages.i``; a global max over the points and a Linear head follow. With ``edge: true`` each stage is
an EdgeConv (DGCNN, Wang et al. 2019): a kNN graph in the current feature space, edge features
``[x_j − x_i, x_i]``, a shared 1×1 conv, max over the neighbours.

The kNN helpers are the official PointDistiller ``utils/kd_utils.py`` ones (``square_distance``,
``knn_feature``, ``index_feature``), batched the same way.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from distill.core.registry import ARCHS, Params
from distill.errors import RecipeError
from distill.features.models import StagedClassifier


# --- kNN graph helpers ---------------------------------------------------------------------------
def square_distance(src: Tensor, dst: Tensor) -> Tensor:
    """``[B, S, C]`` × ``[B, M, C]`` -> ``[B, S, M]`` squared Euclidean distances (official ``square_distance``)."""
    d = -2 * src @ dst.transpose(1, 2)
    return d + src.pow(2).sum(-1, keepdim=True) + dst.pow(2).sum(-1).unsqueeze(1)


def knn(query: Tensor, keys: Tensor, k: int) -> Tensor:
    """Indices ``[B, S, k]`` of the ``k`` rows of ``keys [B, M, C]`` nearest each row of ``query
    [B, S, C]`` (official ``knn_feature``; a query present in ``keys`` is its own first neighbour)."""
    if k > keys.shape[1]:
        raise RecipeError(f"knn: k = {k} neighbours asked of {keys.shape[1]} points")
    return square_distance(query, keys).topk(k, dim=-1, largest=False).indices


def index_points(features: Tensor, idx: Tensor) -> Tensor:
    """``features [B, N, C]`` gathered at ``idx [B, ...]`` -> ``[B, ..., C]`` (official ``index_feature``)."""
    batch = torch.arange(features.shape[0], device=features.device).view(-1, *[1] * (idx.dim() - 1))
    return features[batch, idx]


def edge_features(x: Tensor, idx: Tensor) -> Tensor:
    """DGCNN edge features ``[B, 2C, N, k]`` = ``[x_j − x_i, x_i]`` of ``x [B, N, C]`` over ``idx [B, N, k]``."""
    neigh = index_points(x, idx)  # B N k C
    centre = x.unsqueeze(2).expand_as(neigh)
    return torch.cat([neigh - centre, centre], dim=-1).permute(0, 3, 1, 2)


# --- archs ---------------------------------------------------------------------------------------
class PointMLP(nn.Module):
    """Shared per-point MLP layer: 1×1 Conv1d, batch norm, ReLU; ``[B, C, N]`` (or ``[B, N, 3]`` when
    ``first``) -> ``[B, C', N]``."""

    def __init__(self, c_in: int, c_out: int, first: bool = False) -> None:
        super().__init__()
        self.first = first
        self.net = nn.Sequential(nn.Conv1d(c_in, c_out, 1, bias=False), nn.BatchNorm1d(c_out), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.transpose(1, 2) if self.first else x)


class EdgeConv(nn.Module):
    """DGCNN EdgeConv: kNN in the input feature space, ``[x_j − x_i, x_i]``, 1×1 Conv2d, BN,
    LeakyReLU(0.2), max over the ``k`` neighbours. ``[B, C, N]`` (or ``[B, N, 3]``) -> ``[B, C', N]``."""

    def __init__(self, c_in: int, c_out: int, k: int, first: bool = False) -> None:
        super().__init__()
        self.k, self.first = k, first
        self.net = nn.Sequential(nn.Conv2d(2 * c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2))

    def forward(self, x: Tensor) -> Tensor:
        pts = x if self.first else x.transpose(1, 2)  # B N C
        idx = knn(pts, pts, min(self.k, pts.shape[1]))
        return self.net(edge_features(pts, idx)).amax(-1)


class MaxOverPoints(nn.Module):
    """``[B, C, N] -> [B, C]``: PointNet's symmetric global max pool."""

    def forward(self, x: Tensor) -> Tensor:
        return x.amax(-1)


class PointNetParams(Params):
    width: int = Field(32, ge=1, description="channels of the first stage")
    depth: int = Field(3, ge=1, description="stages (per-point MLP or EdgeConv)")
    growth: float = Field(2.0, ge=1.0, description="channel multiplier per stage")
    edge: bool = Field(False, description="EdgeConv stages (DGCNN, dynamic kNN graph) instead of per-point MLPs")
    k: int = Field(16, ge=1, description="EdgeConv neighbours")


@ARCHS.register("pointnet", "PointNet (per-point MLP) or, with edge: true, DGCNN (EdgeConv) on [N, 3] point sets; "
                "per-point stages tapped as stages.i", PointNetParams)
def pointnet(p: PointNetParams, input_shape: tuple[int, ...], num_classes: int) -> StagedClassifier:
    if len(input_shape) != 2 or input_shape[1] != 3:
        raise RecipeError(f"pointnet takes point sets of shape (N, 3), not {tuple(input_shape)}")
    stages: list[nn.Module] = []
    c = 3
    for i in range(p.depth):
        out = max(1, round(p.width * p.growth**i))
        stages.append(EdgeConv(c, out, p.k, first=i == 0) if p.edge else PointMLP(c, out, first=i == 0))
        c = out
    return StagedClassifier(stages, MaxOverPoints(), c, num_classes)
