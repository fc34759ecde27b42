"""A small DETR for the detection methods (S39 CLoCKDistill and its baselines): boxes, Hungarian matching,
the DETR set loss, mAP@0.5 and the model (arch ``detr``).

Conventions (DETR, Carion et al. 2020, official ``facebookresearch/detr``: ``models/matcher.py ::
HungarianMatcher``, ``models/detr.py :: SetCriterion``, ``util/box_ops.py``):

- boxes are ``(cx, cy, w, h)`` normalised to [0, 1]; a batch holds ``boxes [B, M, 4]`` and ``labels [B, M]``
  with ``-1`` on padding slots (at most ``M`` objects per image);
- logits are ``[B, Q, C + 1]``, the last class being "no object";
- matching cost ``cost_class · (−p[c]) + cost_bbox · L1 + cost_giou · (−GIoU)`` (1, 5, 2), solved with
  ``scipy.optimize.linear_sum_assignment`` per image;
- loss ``ce_weight · CE (no-object weight eos_coef 0.1) + bbox_weight · L1 + giou_weight · (1 − GIoU)`` with
  the box terms summed and divided by the batch's number of objects (DETR's ``num_boxes``).
  Ours: no auxiliary decoder-layer losses (our decoders have one or two layers).

The model is DAB-DETR-like (Liu et al. 2022, the single-scale DETR the paper's main tables distil): a
CNN backbone (stride 4), a transformer encoder whose output is the *memory* ``[B, H·W, D]``, and a
decoder whose queries are anchor boxes: a query's positional part is an MLP of the sine embedding of its
box, its content starts at zero, and each layer refines the box (``sigmoid(logit(anchor) + Δ)``). The
model's own queries are learned anchors; ``decode`` accepts any boxes, which is what CLoCKDistill's
target-aware queries (ground-truth boxes fed to both decoders) need.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from distill.core.registry import ARCHS, Params
from distill.errors import RecipeError
from distill.features.base import FeatureDistiller

# --- boxes ------------------------------------------------------------------------------------------


def box_xyxy(b: Tensor) -> Tensor:
    """``(cx, cy, w, h)`` -> ``(x0, y0, x1, y1)``."""
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def box_iou(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise IoU and union of ``xyxy`` boxes ``[..., N, 4]`` × ``[..., M, 4]`` -> ``[..., N, M]`` each."""
    area_a = (a[..., 2] - a[..., 0]).clamp(min=0) * (a[..., 3] - a[..., 1]).clamp(min=0)
    area_b = (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)
    lt = torch.max(a[..., :, None, :2], b[..., None, :, :2])
    rb = torch.min(a[..., :, None, 2:], b[..., None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = area_a[..., :, None] + area_b[..., None, :] - inter
    return inter / union.clamp(min=1e-9), union


def generalized_box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise GIoU of ``xyxy`` boxes, ``[..., N, 4]`` × ``[..., M, 4]`` -> ``[..., N, M]`` (official
    ``util/box_ops.py :: generalized_box_iou``)."""
    iou, union = box_iou(a, b)
    lt = torch.min(a[..., :, None, :2], b[..., None, :, :2])
    rb = torch.max(a[..., :, None, 2:], b[..., None, :, 2:])
    hull = (rb - lt).clamp(min=0).prod(-1)
    return iou - (hull - union) / hull.clamp(min=1e-9)


def paired_giou(a: Tensor, b: Tensor) -> Tensor:
    """GIoU of ``a[i]`` with ``b[i]`` (``cxcywh``, ``[N, 4]``) -> ``[N]``."""
    return generalized_box_iou(box_xyxy(a)[:, None], box_xyxy(b)[:, None])[:, 0, 0]


# --- matching and the set loss ------------------------------------------------------------------------


def hungarian_match(logits: Tensor, boxes: Tensor, labels: Tensor, gt_boxes: Tensor, cost_class: float = 1.0,
                    cost_bbox: float = 5.0, cost_giou: float = 2.0) -> list[tuple[Tensor, Tensor]]:
    """Per image, (query indices, object indices) of the minimum-cost one-to-one assignment (official
    ``HungarianMatcher``); ``labels`` -1 marks padding slots, which are not matched."""
    from scipy.optimize import linear_sum_assignment

    with torch.no_grad():
        prob = logits.float().softmax(-1)
        pb, tb = boxes.float(), gt_boxes.float()
        cls = prob.gather(-1, labels.clamp(min=0)[:, None, :].expand(-1, prob.shape[1], -1))  # [B, Q, M]
        cost = (-cost_class * cls + cost_bbox * (pb[:, :, None] - tb[:, None]).abs().sum(-1)
                - cost_giou * generalized_box_iou(box_xyxy(pb), box_xyxy(tb)))
        cost = cost.cpu().numpy()
    valid = (labels >= 0).cpu()
    out = []
    for b in range(len(logits)):
        keep = valid[b].nonzero().flatten()
        q, o = linear_sum_assignment(cost[b][:, keep.numpy()])
        out.append((torch.as_tensor(q, dtype=torch.long).to(logits.device),
                    keep[torch.as_tensor(o, dtype=torch.long)].to(logits.device)))
    return out


def detr_loss(logits: Tensor, boxes: Tensor, labels: Tensor, gt_boxes: Tensor,
              match: list[tuple[Tensor, Tensor]] | None = None, eos_coef: float = 0.1, ce_weight: float = 1.0,
              bbox_weight: float = 5.0, giou_weight: float = 2.0) -> dict[str, Tensor]:
    """DETR's ``SetCriterion`` (labels, boxes): ``{"loss", "ce", "l1", "giou"}`` (unweighted parts)."""
    if match is None:
        match = hungarian_match(logits, boxes, labels, gt_boxes)
    num_classes = logits.shape[-1] - 1
    bi = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(match)])
    qi = torch.cat([q for q, _ in match])
    oi = torch.cat([o for _, o in match])
    target = torch.full(logits.shape[:2], num_classes, dtype=torch.long, device=logits.device)
    target[bi, qi] = labels[bi, oi]
    weight = torch.ones(num_classes + 1, device=logits.device)
    weight[-1] = eos_coef
    ce = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), weight)
    n = max(len(qi), 1)
    sb, tb = boxes[bi, qi].float(), gt_boxes[bi, oi].float()
    l1 = (sb - tb).abs().sum() / n
    giou = (1 - paired_giou(sb, tb)).sum() / n
    loss = ce_weight * ce + bbox_weight * l1 + giou_weight * giou
    return {"loss": loss, "ce": ce, "l1": l1, "giou": giou}


# --- mAP@0.5 ---------------------------------------------------------------------------------------------


def average_precision(scores: Sequence[float], hits: Sequence[bool], num_gt: int) -> float:
    """Area under the precision–recall curve of detections ranked by ``scores`` (``hits``: true positive or
    not), precision made monotone from the right (all-point interpolation, PASCAL VOC 2010+)."""
    if num_gt == 0:
        return float("nan")
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    tp = np.asarray(hits, dtype=np.float64)[order]
    if len(tp) == 0:
        return 0.0
    ctp, cfp = np.cumsum(tp), np.cumsum(1 - tp)
    recall, precision = ctp / num_gt, ctp / (ctp + cfp)
    r = np.concatenate([[0.0], recall, [recall[-1]]])
    p = np.concatenate([[1.0], precision, [0.0]])
    for i in range(len(p) - 2, -1, -1):
        p[i] = max(p[i], p[i + 1])
    steps = np.nonzero(r[1:] != r[:-1])[0]
    return float(((r[steps + 1] - r[steps]) * p[steps + 1]).sum())


def mean_ap(pred_scores: Tensor, pred_labels: Tensor, pred_boxes: Tensor, gt_labels: Tensor, gt_boxes: Tensor,
            num_classes: int, iou_threshold: float = 0.5) -> float:
    """mAP at one IoU threshold: per class, every prediction (all queries, ``[B, Q]``) ranked by score,
    greedily matched, in its image and in score order, to the highest-IoU unmatched object of its class
    (IoU ≥ threshold: a true positive, else a false positive); AP by ``average_precision``; the mean over
    classes that have objects. Boxes ``cxcywh``; ``gt_labels`` -1 on padding."""
    iou_all = box_iou(box_xyxy(pred_boxes.float()), box_xyxy(gt_boxes.float()))[0].numpy()  # [B, Q, M]
    scores_all, plab, glab = pred_scores.float().numpy(), pred_labels.numpy(), gt_labels.numpy()
    aps = []
    for c in range(num_classes):
        scores: list[float] = []
        hits: list[bool] = []
        for b in range(len(scores_all)):
            sel = np.nonzero(plab[b] == c)[0]
            if len(sel) == 0:
                continue
            sel = sel[np.argsort(-scores_all[b, sel], kind="stable")]
            gsel = np.nonzero(glab[b] == c)[0]
            iou = iou_all[b][np.ix_(sel, gsel)]
            used = np.zeros(len(gsel), dtype=bool)
            for i in range(len(sel)):
                scores.append(float(scores_all[b, sel[i]]))
                hit = False
                if len(gsel):
                    cand = np.where(used, -1.0, iou[i])
                    j = int(cand.argmax())
                    if cand[j] >= iou_threshold:
                        used[j] = hit = True
                hits.append(hit)
        if (glab == c).any():
            aps.append(average_precision(scores, hits, int((glab == c).sum())))
    return float(np.mean(aps)) if aps else float("nan")


def detections(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Each query's score and class: the most probable real class (no-object excluded) and its probability."""
    prob = logits.float().softmax(-1)[..., :-1]
    return prob.max(-1)


# --- the model -------------------------------------------------------------------------------------------


def sine_embed(x: Tensor, dim: int, temperature: float = 10000.0) -> Tensor:
    """Sine/cosine embedding of values in [0, 1] (``[..., k] -> [..., k·dim]``, DETR's ``PositionEmbeddingSine``
    scaled by 2π)."""
    half = dim // 2
    freq = temperature ** (torch.arange(half, device=x.device, dtype=torch.float32) / half)
    ang = x.float()[..., None] * 2 * math.pi / freq
    return torch.cat([ang.sin(), ang.cos()], -1).flatten(-2)


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    x = x.clamp(eps, 1 - eps)
    return torch.log(x / (1 - x))


class MLP(nn.Sequential):
    def __init__(self, d_in: int, hidden: int, d_out: int, layers: int) -> None:
        dims = [d_in] + [hidden] * (layers - 1) + [d_out]
        mods: list[nn.Module] = []
        for i in range(layers):
            mods.append(nn.Linear(dims[i], dims[i + 1]))
            if i < layers - 1:
                mods.append(nn.ReLU())
        super().__init__(*mods)


class EncoderLayer(nn.Module):
    """DETR's post-norm encoder layer: positions added to queries and keys, not values."""

    def __init__(self, d: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(d, ffn), nn.ReLU(), nn.Linear(ffn, d))
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        q = x + pos
        x = self.norm1(x + self.attn(q, q, x, need_weights=False)[0])
        return self.norm2(x + self.ffn(x))


class DecoderLayer(nn.Module):
    """DETR's post-norm decoder layer: self-attention among queries, cross-attention to the memory."""

    def __init__(self, d: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(d, ffn), nn.ReLU(), nn.Linear(ffn, d))
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, tgt: Tensor, qpos: Tensor, memory: Tensor, pos: Tensor, pad: Tensor | None) -> Tensor:
        q = tgt + qpos
        tgt = self.norm1(tgt + self.self_attn(q, q, tgt, key_padding_mask=pad, need_weights=False)[0])
        tgt = self.norm2(tgt + self.cross_attn(tgt + qpos, memory + pos, memory, need_weights=False)[0])
        return self.norm3(tgt + self.ffn(tgt))


class DETR(nn.Module):
    """Backbone (stride 4) -> encoder (``memory [B, H·W, D]``) -> anchor-query decoder -> class and box heads.

    ``forward(x) -> {"logits": [B, Q, C+1], "boxes": [B, Q, 4]}``; ``encode(x) -> (memory, pos)``;
    ``decode(memory, pos, anchors, pad) -> (logits, boxes)`` for any anchors ``[B, Q, 4]`` (``cxcywh``).
    """

    def __init__(self, num_classes: int, in_channels: int, image_size: tuple[int, int], width: int = 32,
                 backbone: int = 32, enc_layers: int = 1, dec_layers: int = 1, heads: int = 4, queries: int = 8,
                 ffn: int | None = None) -> None:
        super().__init__()
        if width % 8:
            raise RecipeError(f"detr: width must be a multiple of 8 (sine embeddings of 4 box coordinates), got {width}")
        if width % heads:
            raise RecipeError(f"detr: width {width} is not divisible by heads {heads}")
        ffn = ffn or 2 * width
        self.num_classes, self.width = num_classes, width
        self.backbone = nn.Sequential(
            nn.Conv2d(in_channels, backbone // 2, 3, padding=1), nn.BatchNorm2d(backbone // 2), nn.ReLU(),
            nn.Conv2d(backbone // 2, backbone, 3, stride=2, padding=1), nn.BatchNorm2d(backbone), nn.ReLU(),
            nn.Conv2d(backbone, backbone, 3, stride=2, padding=1), nn.BatchNorm2d(backbone), nn.ReLU(),
            nn.Conv2d(backbone, width, 1))
        self.grid = (math.ceil(image_size[0] / 4), math.ceil(image_size[1] / 4))
        self.encoder = nn.ModuleList(EncoderLayer(width, heads, ffn) for _ in range(enc_layers))
        self.decoder = nn.ModuleList(DecoderLayer(width, heads, ffn) for _ in range(dec_layers))
        self.anchors = nn.Parameter(inverse_sigmoid(torch.rand(queries, 4) * torch.tensor([1, 1, 0.3, 0.3]) + torch.tensor([0, 0, 0.1, 0.1])))
        self.query_pos = MLP(width, width, width, 2)  # DAB-DETR's ref_point_head: sine(box) -> query position
        self.class_head = nn.Linear(width, num_classes + 1)
        self.box_head = MLP(width, width, 4, 3)
        nn.init.zeros_(self.box_head[-1].weight)
        nn.init.zeros_(self.box_head[-1].bias)
        h, w = self.grid
        ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
        self.register_buffer("pos", torch.cat([sine_embed(ys.reshape(-1, 1), width // 2),
                                               sine_embed(xs.reshape(-1, 1), width // 2)], -1), persistent=False)

    def feature_layers(self) -> list[str]:
        return [f"encoder.{i}" for i in range(len(self.encoder))]

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The memory ``[B, H·W, D]`` (row-major cells of the stride-4 grid) and its positions ``[H·W, D]``."""
        f = self.backbone(x).flatten(2).transpose(1, 2)
        for layer in self.encoder:
            f = layer(f, self.pos)
        return f, self.pos

    def decode(self, memory: Tensor, pos: Tensor, anchors: Tensor, pad: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Class logits and boxes of queries anchored at ``anchors`` (``[B, Q, 4]`` in [0, 1]); ``pad``
        ``[B, Q]`` True marks queries the others must not attend to."""
        ref = anchors.float()
        tgt = memory.new_zeros(*anchors.shape[:2], self.width)
        for layer in self.decoder:
            qpos = self.query_pos(sine_embed(ref, self.width // 4))
            tgt = layer(tgt, qpos, memory, pos, pad)
            box = torch.sigmoid(inverse_sigmoid(ref) + self.box_head(tgt))
            ref = box.detach()  # DAB-DETR: the next layer starts from the refined box, no gradient through it
        return self.class_head(tgt), box

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        memory, pos = self.encode(x)
        anchors = torch.sigmoid(self.anchors).expand(len(x), -1, -1)
        logits, boxes = self.decode(memory, pos, anchors)
        return {"logits": logits, "boxes": boxes}


class DETRParams(Params):
    width: int = Field(32, ge=8, description="transformer width D (memory channels); a multiple of 8")
    backbone: int = Field(32, ge=2, description="backbone channels")
    enc_layers: int = Field(1, ge=0)
    dec_layers: int = Field(1, ge=1)
    heads: int = Field(4, ge=1)
    queries: int = Field(8, ge=1, description="learned anchor queries (at least the most objects in an image)")
    ffn: int | None = Field(None, ge=1, description="feed-forward width (default 2·width)")


@ARCHS.register("detr", "small DAB-style DETR detector (CNN -> encoder memory -> anchor-query decoder); detection tasks only",
                DETRParams)
def detr(p: DETRParams, input_shape: tuple[int, ...], num_classes: int) -> DETR:
    if len(input_shape) != 3:
        raise RecipeError(f"detr takes (C, H, W) images, not inputs of shape {tuple(input_shape)}")
    return DETR(num_classes, input_shape[0], tuple(input_shape[1:]), p.width, p.backbone, p.enc_layers,
                p.dec_layers, p.heads, p.queries, p.ffn)


detr.family = "detection"  # type: ignore[attr-defined]


# --- the methods' base ---------------------------------------------------------------------------------


def box_distill_loss(student_boxes: Tensor, teacher_boxes: Tensor, weight: Tensor | None = None,
                     bbox_weight: float = 5.0, giou_weight: float = 2.0) -> Tensor:
    """``bbox_weight · L1 + giou_weight · (1 − GIoU)`` between paired boxes ``[N, 4]`` (``cxcywh``), each
    pair weighted by ``weight`` (default 1) and divided by the weights' sum: DETR's box terms with the
    teacher's boxes as targets."""
    if len(student_boxes) == 0:
        return student_boxes.sum() * 0.0
    w = torch.ones(len(student_boxes), device=student_boxes.device) if weight is None else weight.float()
    sb, tb = student_boxes.float(), teacher_boxes.float()
    per = bbox_weight * (sb - tb).abs().sum(-1) + giou_weight * (1 - paired_giou(sb, tb))
    return (w * per).sum() / w.sum().clamp(min=1e-9)


class DetectionDistiller(FeatureDistiller):
    """Base of the detection methods: a batch is ``{"x", "boxes", "labels", "index"}``
    (``features/data/detection.py``); the student is a ``DETR``."""

    uses_unlabeled = False

    def cache_teacher(self, x: Tensor, batch_size: int = 1024) -> None:
        """No precomputed teacher logits: a detector's outputs are not one logit row per sample."""

    def detection_loss(self, out: dict[str, Tensor], batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return detr_loss(out["logits"], out["boxes"], batch["labels"], batch["boxes"])

    def teacher_outputs(self, x: Tensor) -> dict[str, Tensor]:
        """The frozen teacher's predictions under inference mode, cloned so autograd may save them."""
        assert self.teacher is not None
        with torch.inference_mode():
            out = self.teacher(x)
        return {k: v.clone() for k, v in out.items()}
