"""CLoCKDistill (S39) and the detr_kd baseline: the ground-truth location masks and the memory loss against
explicit loops, the target-aware-query loss against explicit KL / box sums, a whole training step against
a manual forward (teacher and student decoders fed the ground-truth boxes), detr_kd against brute-force
matching, and the recipes end to end."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import yaml

from distill.core.distiller import TaskInfo
from distill.core.recipe import load_recipe, recipe_from_dict, shipped_recipe
from distill.core.registry import load_plugins
from distill.core.runner import run_recipe
from distill.errors import MismatchError
from distill.features.data.detection import ShapesParams, build_shapes
from distill.features.detection import DETRParams, detr, paired_giou
from distill.features.methods.clock import CLoCK, CLoCKParams, location_masks, memory_distill_loss, target_query_loss
from distill.features.methods.detr_kd import DETRKD, DETRKDParams, matched_output_kd
from distill.logits.losses import kd_loss

load_plugins()


def _kl(t_row: list[float], s_row: list[float], temp: float) -> float:
    """T² · KL(softmax(t/T) ‖ softmax(s/T)), written out."""
    def sm(r):
        e = [math.exp(v / temp) for v in r]
        return [v / sum(e) for v in e]
    pt, ps = sm(t_row), sm(s_row)
    return temp ** 2 * sum(a * math.log(a / b) for a, b in zip(pt, ps))


def _box_terms(s: list[float], t: list[float]) -> float:
    l1 = sum(abs(a - b) for a, b in zip(s, t))
    return 5 * l1 + 2 * (1 - paired_giou(torch.tensor([s]), torch.tensor([t])).item())


# --- location masks and the memory loss ----------------------------------------------------------------------

def test_location_masks_by_hand():
    """A 4 × 4 grid (cells 0.25 wide). Box 1 spans x 0.1–0.6, y 0.1–0.3: columns 0–2, rows 0–1 (6 cells).
    Box 2 spans x 0.5–0.7, y 0.0–0.2: columns 2, rows 0 (1 cell), overlapping box 1 at (0, 2): the smaller
    box's 1/1 wins there, in either order. Background: 16 − 6 = 10 cells, weight 1/10."""
    small, big = [0.6, 0.1, 0.2, 0.2], [0.35, 0.2, 0.5, 0.2]
    boxes = torch.tensor([[small, big, [0, 0, 0, 0]], [big, small, [0, 0, 0, 0]]])
    labels = torch.tensor([[1, 0, -1], [0, 1, -1]])
    fg, scale = location_masks(boxes, labels, (4, 4))
    want_fg = [[1, 1, 1, 0], [1, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    want_s = [[1 / 6, 1 / 6, 1.0, 1 / 10], [1 / 6, 1 / 6, 1 / 6, 1 / 10], [1 / 10] * 4, [1 / 10] * 4]
    for b in range(2):
        assert fg[b].view(4, 4).tolist() == want_fg
        assert torch.allclose(scale[b].view(4, 4), torch.tensor(want_s))


def test_memory_loss_by_explicit_loops_and_its_mask_matters():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 16, 3, generator=g), torch.randn(2, 16, 3, generator=g)
    boxes = torch.tensor([[[0.35, 0.2, 0.5, 0.2], [0, 0, 0, 0]], [[0.75, 0.75, 0.5, 0.5], [0.1, 0.9, 0.1, 0.1]]])
    labels = torch.tensor([[1, -1], [2, 0]])
    fg, scale = location_masks(boxes, labels, (4, 4))
    alpha, beta = 2.0, 0.3
    total = 0.0
    for b in range(2):
        for ij in range(16):
            w = (alpha if fg[b, ij] else beta) * scale[b, ij].item()
            total += w * sum((t[b, ij, d].item() - s[b, ij, d].item()) ** 2 for d in range(3))
    got = memory_distill_loss(s, t, fg, scale, alpha, beta).item()
    assert got == pytest.approx(total / 2, rel=1e-5)
    plain = ((s - t) ** 2).sum(-1).mean().item()  # an unmasked feature MSE is a different objective
    assert abs(got - plain) > 0.1 * plain
    assert memory_distill_loss(s, t, torch.zeros_like(fg), scale, alpha, beta).item() != pytest.approx(got)


# --- target-aware queries --------------------------------------------------------------------------------------

def test_target_query_loss_pairs_slots_without_matching():
    g = torch.Generator().manual_seed(1)
    sl, tl = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g) * 2
    sb, tb = torch.rand(2, 3, 4, generator=g) * 0.3 + 0.3, torch.rand(2, 3, 4, generator=g) * 0.3 + 0.3
    valid = torch.tensor([[True, False, True], [True, True, False]])
    cls, box = target_query_loss(sl, sb, tl, tb, valid, temperature=2.0)
    slots = [(0, 0), (0, 2), (1, 0), (1, 1)]
    want_cls = sum(_kl(tl[b, k].tolist(), sl[b, k].tolist(), 2.0) for b, k in slots) / 4
    want_box = sum(_box_terms(sb[b, k].tolist(), tb[b, k].tolist()) for b, k in slots) / 4
    assert cls.item() == pytest.approx(want_cls, rel=1e-5)
    assert box.item() == pytest.approx(want_box, rel=1e-5)


def _pair(seed: int = 0):
    torch.manual_seed(seed)
    teacher = detr(DETRParams(width=16, backbone=8, enc_layers=1, dec_layers=2, queries=4), (3, 32, 32), 3)
    # two decoder layers: in the first, the zero content makes self-attention (and so padding) moot
    student = detr(DETRParams(width=8, backbone=4, enc_layers=1, dec_layers=2, heads=2, queries=4), (3, 32, 32), 3)
    with torch.no_grad():  # a non-trivial teacher box head (an untrained one returns its anchors)
        for p in teacher.box_head[-1].parameters():
            p.normal_(0, 0.3)
    data = build_shapes(ShapesParams(num_train=8, num_val=4, num_test=4))
    info = TaskInfo(3, 8, (3, 32, 32), 8, data.train, data.val, data)
    return student, teacher, data, info


def test_clock_step_matches_a_manual_forward_with_ground_truth_queries():
    student, teacher, data, info = _pair()
    params = CLoCKParams(det_weight=0.7, memory_weight=0.3, alpha=1.5, beta=0.2, query_weight=0.9, temperature=2.0)
    method = CLoCK(student, teacher, params, info)
    batch = data.train.__getitems__(list(range(6)))
    step = method.training_step(batch)

    x, boxes, labels = batch["x"], batch["boxes"], batch["labels"]
    with torch.no_grad():
        out = student(x)
        from distill.features.detection import detr_loss
        det = detr_loss(out["logits"], out["boxes"], labels, boxes)["loss"].item()
        mem_s, pos_s = student.encode(x)
        mem_t, pos_t = teacher.encode(x)
        proj = method.projector("memory")(mem_s)
        fg, scale = location_masks(boxes, labels, student.grid)
        mem = memory_distill_loss(proj, mem_t, fg, scale, 1.5, 0.2).item()
        cls = box = 0.0
        n = 0
        for b in range(len(x)):  # each object's ground-truth box alone as the query of both decoders
            for k in (labels[b] >= 0).nonzero().flatten().tolist():
                others = [j for j in range(3) if labels[b, j] >= 0]
                anchors = boxes[b:b + 1, others]
                tl, tb = teacher.decode(mem_t[b:b + 1], pos_t, anchors)
                sl, sb = student.decode(mem_s[b:b + 1], pos_s, anchors)
                i = others.index(k)
                cls += _kl(tl[0, i].tolist(), sl[0, i].tolist(), 2.0)
                box += _box_terms(sb[0, i].tolist(), tb[0, i].tolist())
                n += 1
    want = 0.7 * det + 0.3 * mem + 0.9 * (cls / n + box / n)
    assert step.losses["student"].item() == pytest.approx(want, rel=1e-4)
    assert step.metrics["query_cls"].item() == pytest.approx(cls / n, rel=1e-4)
    assert step.metrics["memory"].item() == pytest.approx(mem, rel=1e-4)


def test_clock_queries_are_the_ground_truth_not_the_learned_anchors():
    """The query term must change when the ground-truth boxes move (nothing else in the batch changes)."""
    student, teacher, data, info = _pair(1)
    method = CLoCK(student, teacher, CLoCKParams(det_weight=0.0, memory_weight=0.0), info)
    batch = data.train.__getitems__(list(range(4)))
    a = method.training_step(batch).metrics["query_box"].item()
    moved = dict(batch, boxes=(batch["boxes"] * 0.5 + 0.2))
    b = method.training_step(moved).metrics["query_box"].item()
    assert a != pytest.approx(b, rel=1e-3)


def test_clock_gradients_reach_student_and_projector_not_teacher():
    student, teacher, data, info = _pair()
    method = CLoCK(student, teacher, CLoCKParams(det_weight=0.0), info)
    method.training_step(data.train.__getitems__(list(range(4)))).losses["student"].backward()
    assert student.encoder[0].attn.in_proj_weight.grad.abs().sum() > 0
    assert student.decoder[0].cross_attn.in_proj_weight.grad.abs().sum() > 0
    assert method.projector("memory").net.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert set(method.param_groups()) == {"student", "projectors"}


def test_clock_needs_memories_on_one_grid():
    _, teacher, _, info = _pair()
    other = detr(DETRParams(width=8, backbone=4, heads=2), (3, 48, 48), 3)
    with pytest.raises(MismatchError, match="grid"):
        CLoCK(other, teacher, CLoCKParams(), info)


# --- detr_kd -----------------------------------------------------------------------------------------------------

def test_detr_kd_against_brute_force_matching_to_the_teacher():
    g = torch.Generator().manual_seed(3)
    sl, tl = torch.randn(1, 3, 4, generator=g), torch.randn(1, 3, 4, generator=g) * 2
    sb, tb = torch.rand(1, 3, 4, generator=g) * 0.4 + 0.3, torch.rand(1, 3, 4, generator=g) * 0.4 + 0.3
    cls, box = matched_output_kd(sl, sb, tl, tb, temperature=1.0)
    lab = tl[0].argmax(-1)

    def cost(q, o):
        p = torch.softmax(sl[0, q], -1)[lab[o]].item()
        return -p + 5 * sum(abs(sb[0, q, k].item() - tb[0, o, k].item()) for k in range(4)) \
            - 2 * paired_giou(sb[0, q:q + 1], tb[0, o:o + 1]).item()

    best = min(itertools.permutations(range(3)), key=lambda perm: sum(cost(q, o) for q, o in zip(perm, range(3))))
    pairs = list(zip(best, range(3)))
    want_cls = sum(_kl(tl[0, o].tolist(), sl[0, q].tolist(), 1.0) for q, o in pairs) / 3
    fg = [1 - torch.softmax(tl[0, o], -1)[-1].item() for _, o in pairs]
    want_box = sum(w * _box_terms(sb[0, q].tolist(), tb[0, o].tolist()) for w, (q, o) in zip(fg, pairs)) / sum(fg)
    assert cls.item() == pytest.approx(want_cls, rel=1e-5)
    assert box.item() == pytest.approx(want_box, rel=1e-5)
    assert cls.item() != pytest.approx(kd_loss(sl[0], tl[0], 1.0).item(), rel=1e-3) or best == (0, 1, 2)


def test_detr_kd_step_is_detr_loss_plus_matched_kd():
    student, teacher, data, info = _pair()
    method = DETRKD(student, teacher, DETRKDParams(det_weight=0.5, kd_weight=2.0), info)
    step = method.training_step(data.train.__getitems__(list(range(4))))
    m = step.metrics
    assert step.losses["student"].item() == pytest.approx(0.5 * m["det"].item() + 2.0 * (m["kd_cls"] + m["kd_box"]).item(), rel=1e-5)


# --- recipes --------------------------------------------------------------------------------------------------------

def test_shipped_recipes_share_the_budget():
    r = {n: load_recipe(f"shapes-{n}") for n in ("clock", "kd", "student")}
    assert r["clock"].method.name == "clock" and r["kd"].method.name == "detr_kd" and r["student"].method.name == "detr_train"
    assert r["clock"].train == r["kd"].train == r["student"].train
    assert r["clock"].student == r["kd"].student == r["student"].student


@pytest.mark.slow
@pytest.mark.parametrize("method", ["clock", "kd"])
def test_recipe_runs_end_to_end(tmp_runs, method):
    data = yaml.safe_load(shipped_recipe(f"shapes-{method}").read_text())  # the shipped recipe, shrunk
    data["task"] = {"name": "shapes-detection", "num_train": 64, "num_val": 16, "num_test": 16}
    data["student"] = {"arch": "detr", "width": 8, "backbone": 4, "heads": 2, "queries": 4}
    data["teacher"] = {"recipe": {"name": "t", "seed": 0, "task": data["task"],
                                  "student": {"arch": "detr", "width": 16, "backbone": 8, "queries": 4},
                                  "method": {"name": "detr_train"},
                                  "train": {"epochs": 1, "batch_size": 32, "progress": False, "trackers": "none"}}}
    data["train"] |= {"epochs": 1, "batch_size": 32, "progress": False, "trackers": "none"}
    res = run_recipe(recipe_from_dict(data), out=tmp_runs)
    assert 0 <= res.metrics["test/map50"] <= 1 and "teacher/map50" in res.metrics
    from safetensors.torch import load_file
    exported = load_file(str(res.run_dir / "student" / "model.safetensors"))
    assert not any("projectors" in k for k in exported)
