"""``pointdistiller``: PointDistiller, local kNN-graph feature distillation with point re-weighting (S20,
"PointDistiller: Structured Knowledge Distillation Towards Efficient and Compact 3D Detection").

Official code: RunpeiDong/PointDistiller, ``mmdet3d/models/detectors/voxelnet.py :: get_voxel_knn``
(PointPillars) and ``point_rcnn.py :: get_knn_point_backbone`` (raw points), helpers in
``mmdet3d/utils/kd_utils.py :: knn_feature, index_feature`` (ours: ``distill.features.points``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from distill.core.distiller import Step, TaskInfo
from distill.core.registry import METHODS, Params
from distill.errors import RecipeError
from distill.features.base import FeatureDistiller
from distill.features.points import index_points, knn, square_distance
from distill.features.tap import FeatureTap, default_layers, feature_shapes
from distill.logits.methods.kd import labeled_ce


# --- pure pieces ---------------------------------------------------------------------------------
def point_saliency(teacher: Tensor, points: Tensor, kind: str, radius: float = 0.2) -> Tensor:
    """Importance ``[B, N]`` of each point, which picks the graphs' centres and weighs them.

    - ``max``: the official raw-point saliency (``point_rcnn.py``: ``pool_features1d`` of the teacher's
      per-point features ``[B, N, C]``), the max over channels;
    - ``density`` (ours, the analogue of the official voxel path's points-per-voxel ``num_points``):
      how many input points lie within ``radius`` of the point (itself included).
    """
    if kind == "max":
        return teacher.amax(-1)
    if kind == "density":
        return (square_distance(points, points) <= radius**2).sum(-1).float()
    raise RecipeError(f"pointdistiller: importance must be max or density, not {kind!r}")


def local_graphs(features: Tensor, query_idx: Tensor, knn_idx: Tensor) -> Tensor:
    """The official ``fuse_mode='idendity'`` graph of each centre: its ``k`` neighbours' features with
    the centre's concatenated, ``[B, N, C]`` -> ``[B, 2C, S, k]`` (channels first, for a 1×1 Conv2d)."""
    neigh = index_points(features, knn_idx)  # B S k C
    centre = index_points(features, query_idx).unsqueeze(2).expand_as(neigh)
    return torch.cat([neigh, centre], dim=-1).permute(0, 3, 1, 2)


def reweight(saliency: Tensor, temperature: float) -> Tensor:
    """The official re-weighting ``softmax(saliency / T) · S`` over a sample's ``S`` centres (``[B, S]``):
    weights average 1, and the most important centres weigh most (T → 0: all weight on the top one)."""
    return F.softmax(saliency.float() / temperature, dim=-1) * saliency.shape[-1]


def weighted_graph_mse(teacher: Tensor, student: Tensor, weight: Tensor | None) -> Tensor:
    """The official loss ``2 · mean(w · (g_t − g_s)²)`` over adapted graphs ``[B, S, C', ...]`` (``k``
    neighbours or pooled away); ``weight`` ``[B, S]``, None = the unweighted ablation (all ones)."""
    d = (teacher.float() - student.float()).pow(2)
    if weight is not None:
        d = d * weight.view(*weight.shape, *[1] * (d.dim() - 2))
    return 2 * d.mean()


class GraphAdapter(nn.Sequential):
    """The official ``teacher_gcn_adapt`` / ``student_gcn_adapt``: mmcv ``ConvModule`` 1×1 Conv2d, BN2d,
    ReLU, ``[B, 2C, S, k] -> [B, C', S, k]``."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


# --- the method ----------------------------------------------------------------------------------
class PointDistillerParams(Params):
    student_layer: str | None = Field(None, description="student per-point layer [B, C, N]; default its last feature layer")
    teacher_layer: str | None = Field(None, description="teacher per-point layer [B, C, N]; default its last feature layer")
    num_points: int = Field(32, ge=1, description="graph centres per sample: the top points by importance (official num_voxels 6000)")
    k: int = Field(16, ge=1, description="neighbours per graph, kNN in the teacher's feature space (official kneighbours 128)")
    importance: str = Field("max", pattern="^(max|density)$", description="max: official raw-point saliency; density: ours")
    radius: float = Field(0.2, gt=0, description="density importance: neighbourhood radius (unit-radius clouds)")
    temperature: float = Field(1.0, gt=0, description="re-weighting softmax temperature (official 1e-2 voxels / 1e-3 points)")
    reweight: bool = Field(True, description="official reweight=True; false: the plain mean")
    pool: str = Field("max", pattern="^(max|none)$", description="after the adapters: max over the k neighbours (official raw points) or none (voxels)")
    ce_weight: float = Field(1.0, ge=0, description="CE on the labels (the detector's task losses in the paper)")
    kd_weight: float = Field(1.0, ge=0, description="weight of the local-distillation loss (official: 1)")


@METHODS.register("pointdistiller", "PointDistiller: kNN-graph local feature distillation on the teacher's top "
                  "points, trainable graph adapters, softmax point re-weighting (S20)", PointDistillerParams)
class PointDistiller(FeatureDistiller):
    """S20 local distillation, the official ``get_voxel_knn`` / ``get_knn_point_backbone``::

        s_i   = importance of point i (teacher)              centres Q = top-S points by s
        N(q)  = kNN of q in the TEACHER's feature space      (the same indices index the student)
        G(q)  = adapter([f_j, f_q] for j in N(q))            (1×1 conv + BN + ReLU, [max over j])
        w_q   = S · softmax_q(s_q / T)
        loss  = ce_weight · CE + kd_weight · 2 · mean_{q, c, (j)} w_q (G_T(q) − G_S(q))²

    Both adapters are trainable projectors (the teacher's too, as in the official code, where they sit
    in the student detector); the teacher's features are frozen. Student and teacher layers must give
    per-point features ``[B, C, N]`` over the input's N points (our ``pointnet``, any width), so the
    indices found on the teacher apply to the student's points.

    Ours: the detection losses become CE on the shape labels; the centres, the softmax and the kNN are
    per sample (the official PointPillars run ranks the voxels of the whole batch together); the
    sizes ``num_points`` / ``k`` scaled to 128-point clouds; ``importance: density`` (points within
    ``radius``, the analogue of points per voxel) as an option. Deviation: the official raw-point path
    computes the weight but leaves it out of the loss (``_dist`` is not multiplied), and its
    temperature 1e-3 on raw feature values makes the softmax one-hot; we apply the weight, as the
    paper and the voxel path do, at ``temperature`` (a recipe value chosen on the validation split).
    """

    params: PointDistillerParams

    def __init__(self, student: nn.Module, teacher: nn.Module | None, params: PointDistillerParams, info: TaskInfo) -> None:
        super().__init__(student, teacher, params, info)
        assert teacher is not None
        if len(info.input_shape) != 2 or info.input_shape[-1] != 3:
            raise RecipeError(f"pointdistiller needs point-set inputs (N, 3), not {tuple(info.input_shape)}")
        n = info.input_shape[0]
        self.student_layer = params.student_layer or default_layers(student)[-1]
        self.teacher_layer = params.teacher_layer or default_layers(teacher)[-1]
        x = self.example_input()
        (cs, ns), (ct, nt) = (feature_shapes(m, [layer], x)[layer]
                              for m, layer in ((student, self.student_layer), (teacher, self.teacher_layer)))
        if ns != n or nt != n:
            raise RecipeError(f"pointdistiller: layers {self.student_layer} / {self.teacher_layer} must give per-point "
                              f"features [C, {n}], got [{cs}, {ns}] / [{ct}, {nt}]")
        if params.num_points > n or params.k > n:
            raise RecipeError(f"pointdistiller: num_points {params.num_points} and k {params.k} must be at most the {n} points")
        # the official adapters map both sides to the student's width
        self.projectors["student"] = GraphAdapter(2 * cs, cs)
        self.projectors["teacher"] = GraphAdapter(2 * ct, cs)

    def distill_loss(self, points: Tensor, t_feat: Tensor, s_feat: Tensor) -> tuple[Tensor, Tensor]:
        """The weighted local-graph loss of per-point features ``[B, N, C]``, and the centres' weights."""
        p = self.params
        saliency = point_saliency(t_feat, points, p.importance, p.radius)
        query = saliency.topk(p.num_points, dim=-1).indices  # B S
        neighbours = knn(index_points(t_feat, query), t_feat, p.k)  # B S k, on the teacher's features
        g_t = self.projectors["teacher"](local_graphs(t_feat, query, neighbours))
        g_s = self.projectors["student"](local_graphs(s_feat, query, neighbours))
        if p.pool == "max":
            g_t, g_s = g_t.amax(-1), g_s.amax(-1)
        g_t, g_s = g_t.transpose(1, 2), g_s.transpose(1, 2)  # B S C' (k)
        w = reweight(torch.gather(saliency, 1, query), p.temperature) if p.reweight else torch.ones_like(query, dtype=torch.float)
        return weighted_graph_mse(g_t, g_s, w), w

    def training_step(self, batch: dict[str, Tensor]) -> Step:
        p, x = self.params, batch["x"]
        t_tap = FeatureTap(self.teacher, [self.teacher_layer], stop_after=True)
        t_feat = self.teacher_features(t_tap, x)[self.teacher_layer].transpose(1, 2)
        with FeatureTap(self.student, [self.student_layer]) as tap:
            logits = self.student(x)
            s_feat = tap[self.student_layer].transpose(1, 2)
        kd, w = self.distill_loss(x, t_feat, s_feat)
        ce = labeled_ce(logits, batch)
        loss = p.ce_weight * ce + p.kd_weight * kd
        return Step({"student": loss}, {"ce": ce.detach(), "local_kd": kd.detach(), "weight_max": w.max().detach()})
