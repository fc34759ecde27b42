"""The detection machinery of the feature family: boxes and GIoU, Hungarian matching (against brute force),
the DETR set loss, mAP@0.5 (against hand-computed cases), the shapes-detection task, its TaskOps (save,
load, checks) and the DETR's decode with given anchors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from distill.core.refs import load_student
from distill.core.registry import load_plugins
from distill.errors import MismatchError, RecipeError
from distill.features.data.detection import ShapesParams, build_shapes, detection_metrics, predict
from distill.features.detection import (
    DETRParams,
    average_precision,
    detr,
    detr_loss,
    generalized_box_iou,
    hungarian_match,
    mean_ap,
    paired_giou,
)

load_plugins()


def small_task():
    return build_shapes(ShapesParams(num_train=32, num_val=16, num_test=16))


def tiny_detr(width: int = 16, queries: int = 5, **kw):
    return detr(DETRParams(width=width, backbone=8, queries=queries, **kw), (3, 32, 32), 3)


# --- boxes ---------------------------------------------------------------------------------------------------

def test_giou_by_hand():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0]])
    # intersection 1, union 7, hull 9: GIoU = 1/7 − (9 − 7)/9
    assert generalized_box_iou(a, b).item() == pytest.approx(1 / 7 - 2 / 9, rel=1e-6)
    far = torch.tensor([[4.0, 0.0, 5.0, 1.0]])  # disjoint: IoU 0, hull 5 × 2 = 10, union 5
    assert generalized_box_iou(a, far).item() == pytest.approx(0 - (10 - 5) / 10, rel=1e-6)
    c = torch.tensor([[0.5, 0.5, 1.0, 1.0]])  # cxcywh of a unit box at the origin
    assert paired_giou(c, c).item() == pytest.approx(1.0)


# --- matching and the set loss -----------------------------------------------------------------------------

def _cost(logits, boxes, labels, gt, q, o):
    p = torch.softmax(logits, -1)[q, labels[o]].item()
    l1 = sum(abs(boxes[q, k].item() - gt[o, k].item()) for k in range(4))
    g = paired_giou(boxes[q:q + 1], gt[o:o + 1]).item()
    return -p + 5 * l1 - 2 * g


def test_hungarian_match_is_the_brute_force_optimum():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 4, generator=g)
    boxes = torch.rand(2, 4, 4, generator=g) * 0.5 + 0.2
    gt = torch.rand(2, 3, 4, generator=g) * 0.5 + 0.2
    labels = torch.tensor([[2, 0, -1], [1, 1, 0]])
    match = hungarian_match(logits, boxes, labels, gt)
    for b in range(2):
        objs = [o for o in range(3) if labels[b, o] >= 0]
        best = min(sum(_cost(logits[b], boxes[b], labels[b], gt[b], q, o) for q, o in zip(perm, objs))
                   for perm in itertools.permutations(range(4), len(objs)))
        q, o = match[b]
        assert sorted(o.tolist()) == objs
        got = sum(_cost(logits[b], boxes[b], labels[b], gt[b], qq, oo) for qq, oo in zip(q.tolist(), o.tolist()))
        assert got == pytest.approx(best, abs=1e-5)


def test_detr_loss_by_hand_with_a_given_match():
    logits = torch.tensor([[[2.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 3.0], [0.0, 1.0, 0.0, 0.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1], [0.3, 0.3, 0.2, 0.2]]])
    gt = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.0, 0.0, 0.0, 0.0]]])
    labels = torch.tensor([[0, -1]])
    match = [(torch.tensor([0]), torch.tensor([0]))]
    got = detr_loss(logits, boxes, labels, gt, match)
    # CE with the no-object class weighted 0.1: a weighted mean over the three queries
    lsm = torch.log_softmax(logits[0], -1)
    ce = (-(1.0 * lsm[0, 0] + 0.1 * lsm[1, 3] + 0.1 * lsm[2, 3]) / (1.0 + 0.1 + 0.1)).item()
    l1 = 0.2  # |0.2 − 0.4|
    # predicted xyxy (0.4, 0.4, 0.6, 0.6), target (0.4, 0.3, 0.6, 0.7): IoU 0.04/0.08, hull = target
    giou = 1 - 0.5
    assert got["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert got["l1"].item() == pytest.approx(l1, rel=1e-5)
    assert got["giou"].item() == pytest.approx(giou, rel=1e-5)
    assert got["loss"].item() == pytest.approx(ce + 5 * l1 + 2 * giou, rel=1e-5)


# --- mAP ----------------------------------------------------------------------------------------------------

def test_average_precision_by_hand():
    # ranked hits T F T F with 3 objects: precision 1 at recall 1/3, 2/3 at recall 2/3, recall 1 never reached
    assert average_precision([0.9, 0.8, 0.7, 0.6], [True, False, True, False], 3) == pytest.approx(1 / 3 + 1 / 3 * 2 / 3)
    # the envelope: F T T with 2 objects -> precision 1/2 then 2/3 at recall 1/2, 1: both use 2/3
    assert average_precision([0.9, 0.8, 0.7], [False, True, True], 2) == pytest.approx(2 / 3)
    assert average_precision([], [], 2) == 0.0
    assert math.isnan(average_precision([0.5], [False], 0))


def test_mean_ap_by_hand():
    """Two images, classes 0 and 1 (class 2 has no object: left out of the mean).

    Image 0: objects A (class 0) and B (class 1). Predictions: class 0 on A (0.9, exact), class 0 again on A
    (0.8, a duplicate: false positive), class 1 on B but shifted (IoU 1/3 < 0.5: false positive, 0.7).
    Image 1: object C (class 0). Predictions: class 0 on C (0.6, IoU 0.5 exactly counts), class 2 (0.95) anywhere.
    Class 0 ranked: 0.9 T, 0.8 F, 0.6 T over 2 objects -> AP = 1/2 · 1 + 1/2 · 2/3. Class 1: one F -> AP 0.
    mAP = (5/6 + 0) / 2.
    """
    A, B, C = [0.25, 0.25, 0.2, 0.2], [0.75, 0.75, 0.2, 0.2], [0.5, 0.5, 0.25, 0.25]
    B_shift = [0.85, 0.75, 0.2, 0.2]  # overlaps B by half its width: IoU = 0.02 / 0.06
    C_wide = [0.5, 0.5, 0.25, 0.5]  # contains C, twice its area: IoU 0.5 (exact in binary)
    gt_boxes = torch.tensor([[A, B], [C, [0, 0, 0, 0]]])
    gt_labels = torch.tensor([[0, 1], [0, -1]])
    pred_boxes = torch.tensor([[A, A, B_shift], [C_wide, A, A]])
    pred_labels = torch.tensor([[0, 0, 1], [0, 2, 2]])
    pred_scores = torch.tensor([[0.9, 0.8, 0.7], [0.6, 0.95, 0.1]])
    got = mean_ap(pred_scores, pred_labels, pred_boxes, gt_labels, gt_boxes, num_classes=3)
    assert got == pytest.approx((0.5 + 0.5 * 2 / 3 + 0.0) / 2, rel=1e-6)
    perfect = mean_ap(torch.ones(2, 2), torch.tensor([[0, 1], [0, 2]]), gt_boxes, gt_labels, gt_boxes, num_classes=3)
    assert perfect == pytest.approx(1.0)


# --- the task -----------------------------------------------------------------------------------------------

def test_shapes_task_is_seeded_and_well_formed():
    a, b = small_task(), small_task()
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.boxes, b.test.boxes)
    c = build_shapes(ShapesParams(num_train=32, num_val=16, num_test=16, data_seed=1))
    assert not torch.equal(a.train.x, c.train.x)
    n = (a.train.labels >= 0).sum(1)
    assert n.min() >= 1 and n.max() <= 3 and set(a.train.labels[a.train.labels >= 0].tolist()) <= {0, 1, 2}
    for i in range(8):  # the box is tight: painted pixels inside, background outside
        for k in (a.train.labels[i] >= 0).nonzero().flatten().tolist():
            cx, cy, w, h = (a.train.boxes[i, k] * 32).tolist()
            x0, y0, x1, y1 = round(cx - w / 2), round(cy - h / 2), round(cx + w / 2), round(cy + h / 2)
            patch = a.train.x[i, :, y0:y1, x0:x1].max(0).values
            assert patch.max() > 0.3  # a shape (colour ≥ 0.2 per channel, max ≥ 0.4 for gray)
            assert patch[0].max() > 0.3 and patch[:, 0].max() > 0.3  # it reaches the box's top row and left column
    batch = a.train.__getitems__([0, 3])
    assert batch["x"].shape == (2, 3, 32, 32) and batch["boxes"].shape == (2, 3, 4) and batch["labels"].shape == (2, 3)


def test_taskops_build_save_load_and_checks(tmp_path):
    data = small_task()
    model = data.build_model({"name": "detr", "params": {"width": 16, "backbone": 8, "queries": 4}})
    data.save_model(tmp_path / "m", model, {"name": "detr", "params": {"width": 16, "backbone": 8, "queries": 4}})
    again = load_student(tmp_path / "m")
    x = data.test.x[:4]
    model.eval(), again.eval()
    assert torch.equal(model(x)["boxes"], again(x)["boxes"])
    assert data.saved_spec(tmp_path / "m")["name"] == "detr"
    data.check_models(model, again)
    with pytest.raises(MismatchError, match="3 classes|detects"):
        data.check_models(detr(DETRParams(width=16), (3, 32, 32), 5), None)
    with pytest.raises(RecipeError, match="not a detector"):
        data.build_model({"name": "cnn2d", "params": {}})
    m = detection_metrics(predict(model, data.val), data.val, 3)
    assert 0 <= m["map50"] <= 1 and m["loss"] > 0
    metrics = data.final_metrics(model, again)
    assert {"test/map50", "test/loss", "val/map50", "teacher/map50", "params/student", "params/teacher"} <= set(metrics)


def test_decode_with_given_anchors_ignores_padding_queries():
    torch.manual_seed(0)
    model = tiny_detr(dec_layers=2).eval()
    x = torch.rand(2, 3, 32, 32)
    mem, pos = model.encode(x)
    assert mem.shape == (2, 64, 16)  # the 8 × 8 grid of a stride-4 backbone
    anchors = torch.tensor([[[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.2]]] * 2)
    pad = torch.tensor([[False, True], [False, False]])
    logits, boxes = model.decode(mem, pos, anchors, pad)
    moved = anchors.clone()
    moved[0, 1] = torch.tensor([0.9, 0.1, 0.1, 0.1])
    logits2, _ = model.decode(mem, pos, moved, pad)
    assert torch.allclose(logits[0, 0], logits2[0, 0], atol=1e-6)  # a padding query is not attended to
    # an untrained box head predicts no offset: the boxes are the anchors
    assert torch.allclose(boxes, anchors, atol=1e-4)
