"""DMAE (S05): masking, visible-token selection, the alignment and pixel losses against explicit loops;
a training step against a manual forward on the visible tokens with the teacher stopped at the aligned
block (its later blocks never run); the teacher FLOPs counted by hand; the recipe end to end."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from safetensors.torch import load_file

from distill.core.distiller import TaskInfo
from distill.core.recipe import load_recipe, recipe_from_dict, shipped_recipe
from distill.core.runner import run_recipe
from distill.errors import RecipeError
from distill.features.methods.dmae import (
    DMAE,
    DMAEParams,
    dmae_align_loss,
    masked_patch_loss,
    patchify,
    random_masking,
    visible_tokens,
)
from distill.tasks.models import build_model


def _keep_by_hand(noise: torch.Tensor, ratio: float) -> list[list[int]]:
    """Per row, the int(L (1 - ratio)) indices of the smallest noise, smallest first."""
    length = noise.shape[1]
    keep = int(length * (1 - ratio))
    return [sorted(range(length), key=lambda j: row[j].item())[:keep] for row in noise]


def test_random_masking_keeps_the_smallest_noise():
    torch.manual_seed(5)
    noise = torch.rand(3, 16)
    torch.manual_seed(5)
    ids_keep, mask, ids_restore = random_masking(3, 16, 0.75)
    want = _keep_by_hand(noise, 0.75)
    assert ids_keep.tolist() == want and ids_keep.shape == (3, 4)
    for n in range(3):
        assert [int(mask[n, j]) for j in range(16)] == [0 if j in want[n] else 1 for j in range(16)]
    assert torch.equal(torch.argsort(ids_restore, 1)[:, :4], ids_keep)  # restore inverts the shuffle
    assert random_masking(2, 16, 0.5)[0].shape == (2, 8)


def test_visible_tokens_keep_cls_and_the_kept_patches():
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float).reshape(2, 5, 3)
    ids = torch.tensor([[3, 0], [1, 2]])
    got = visible_tokens(tokens, ids)
    for n in range(2):
        assert got[n, 0].tolist() == tokens[n, 0].tolist()
        for k in range(2):
            assert got[n, 1 + k].tolist() == tokens[n, 1 + ids[n, k]].tolist()


def test_align_loss_by_explicit_loops():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g) * 5
    def unit(v):
        norm = math.sqrt(sum(x * x for x in v))
        return [x / norm for x in v]
    l1 = l2 = raw = 0.0
    for n in range(2):
        for k in range(3):
            us, ut = unit(s[n, k].tolist()), unit(t[n, k].tolist())
            l1 += sum(abs(a - b) for a, b in zip(us, ut))
            l2 += sum((a - b) ** 2 for a, b in zip(us, ut))
            raw += sum(abs(a - b) for a, b in zip(s[n, k].tolist(), t[n, k].tolist()))
    assert dmae_align_loss(s, t, "l1", True).item() == pytest.approx(l1 / 24, rel=1e-5)
    assert dmae_align_loss(s, t, "l2", True).item() == pytest.approx(l2 / 24, rel=1e-5)
    assert dmae_align_loss(s, t, "l1", False).item() == pytest.approx(raw / 24, rel=1e-5)
    t.requires_grad_(True)
    s.requires_grad_(True)
    dmae_align_loss(s, t).backward()
    assert t.grad is None and s.grad is not None  # the teacher side is detached


def test_patchify_and_masked_patch_loss_by_explicit_loops():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float).reshape(2, 1, 4, 4)
    p = patchify(x, (2, 2))
    assert p.shape == (2, 4, 4)
    for n in range(2):
        for gi in range(2):
            for gj in range(2):
                want = [x[n, 0, 2 * gi + a, 2 * gj + b].item() for a in range(2) for b in range(2)]
                assert p[n, gi * 2 + gj].tolist() == want
    pred = torch.zeros_like(p)
    mask = torch.tensor([[1.0, 0, 0, 1], [0, 0, 1, 0]])
    per = [[sum(v * v for v in p[n, j].tolist()) / 4 for j in range(4)] for n in range(2)]
    want = (per[0][0] + per[0][3] + per[1][2]) / 3
    assert masked_patch_loss(pred, p, mask).item() == pytest.approx(want, rel=1e-6)


def _pair(**kw) -> DMAE:
    torch.manual_seed(0)
    s = build_model("vit", {"hidden": 8, "depth": 2, "heads": 2, "patch": 2}, (8, 8), 4)
    t = build_model("vit", {"hidden": 16, "depth": 4, "heads": 2, "patch": 2}, (8, 8), 4)
    return DMAE(s, t, DMAEParams(**kw), TaskInfo(4, 16, (8, 8)))


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"x": torch.randn(3, 8, 8, generator=g), "y": torch.tensor([0, 1, -1]), "index": torch.arange(3)}


def _by_hand(d: DMAE, x: torch.Tensor, keep: list[list[int]], t_stop: int, s_block: int) -> tuple[float, torch.Tensor]:
    """Student and teacher on [CLS] + the kept patches, written out; returns (align, student latent)."""
    def visible(model):
        emb = model.vit.embeddings(x.reshape(3, 1, 8, 8))
        return torch.stack([emb[n, [0] + [1 + j for j in keep[n]]] for n in range(3)])
    with torch.no_grad():
        h = visible(d.teacher)
        for i in range(t_stop + 1):
            h = d.teacher.vit.layers[i](h)
        t_feat = h
        h, s_feat = visible(d.student), None
        for i, layer in enumerate(d.student.vit.layers):
            h = layer(h)
            if i == s_block:
                s_feat = h
        latent = d.student.vit.layernorm(h)
        proj = d.projector(f"vit.layers.{s_block}")(s_feat)
        tot, count = 0.0, 0
        for n in range(3):
            for k in range(proj.shape[1]):
                a, b = proj[n, k].tolist(), t_feat[n, k].tolist()
                na, nb = math.sqrt(sum(v * v for v in a)), math.sqrt(sum(v * v for v in b))
                tot += sum(abs(u / na - w / nb) for u, w in zip(a, b))
                count += len(a)
    return tot / count, latent


def test_training_step_on_the_visible_tokens_with_the_teacher_stopped():
    d, b = _pair(mask_ratio=0.75, student_layers=[0], teacher_layers=[1]), _batch()
    calls = [0] * 4
    for i, layer in enumerate(d.teacher.vit.layers):
        layer.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    torch.manual_seed(11)
    noise = torch.rand(3, 16)
    keep = _keep_by_hand(noise, 0.75)
    torch.manual_seed(11)
    step = d.training_step(b)
    assert calls[2] == calls[3] == 2  # in the FLOPs measurement's two full forwards only (visible, unmasked)
    calls[:] = [0] * 4
    torch.manual_seed(11)
    step = d.training_step(b)
    assert calls == [1, 1, 0, 0]  # the teacher stops after its aligned block 1
    align, latent = _by_hand(d, b["x"], keep, t_stop=1, s_block=0)
    assert step.metrics["align"].item() == pytest.approx(align, rel=1e-5)
    with torch.no_grad():
        mask = torch.ones(3, 16)
        for n in range(3):
            mask[n, keep[n]] = 0
        ids_restore = torch.argsort(torch.argsort(noise, 1), 1)
        pred = d.projectors["decoder"](latent, ids_restore)
        target = patchify(b["x"].reshape(3, 1, 8, 8), (2, 2))
        per = ((pred - target) ** 2).mean(-1)
        pixel = sum(per[n, j].item() for n in range(3) for j in range(16) if j not in keep[n]) / (3 * 12)
        ce = torch.nn.functional.cross_entropy(d.student(b["x"])[:2], b["y"][:2]).item()
    assert step.metrics["pixel"].item() == pytest.approx(pixel, rel=1e-5)
    assert step.losses["student"].item() == pytest.approx(align + pixel + ce, rel=1e-5)


def test_default_alignment_is_at_three_quarters_depth():
    d = _pair()
    assert d.student_layers == ["vit.layers.1"] and d.teacher_layers == ["vit.layers.2"]


def test_teacher_flops_counted_by_hand():
    d, b = _pair(mask_ratio=0.75, student_layers=[1], teacher_layers=[2]), _batch()
    torch.manual_seed(0)
    m = d.training_step(b).metrics
    dim, hidden, c, patch = 16, 32, 1, 4  # teacher width, MLP width (ratio 2), channels, pixels per patch

    def layer(tokens: int) -> int:  # q, k, v, o projections, QK^T and AV, the MLP (2 FLOPs per MAC)
        return 2 * tokens * 4 * dim * dim + 2 * 2 * tokens * tokens * dim + 2 * 2 * tokens * dim * hidden

    embed = 2 * 16 * c * patch * dim  # the patch embedding runs on every patch before masking
    full = embed + 4 * layer(17) + 2 * dim * 4  # + the head on [CLS]
    used = embed + 3 * layer(1 + 4)
    assert m["teacher_flops_full"] == pytest.approx(full, rel=1e-6)
    assert m["teacher_flops_used"] == pytest.approx(used, rel=1e-6)
    assert m["teacher_flops_saved"] == pytest.approx(1 - used / full, rel=1e-6)
    assert m["teacher_flops_saved_depth"] == pytest.approx(1 - used / (embed + 4 * layer(5)), rel=1e-6)


def test_errors_are_one_line():
    s = build_model("cnn2d", {"width": 4, "depth": 2}, (8, 8), 4)
    t = build_model("vit", {"hidden": 16, "depth": 2, "heads": 2, "patch": 2}, (8, 8), 4)
    with pytest.raises(RecipeError, match="must be the 'vit' arch"):
        DMAE(s, t, DMAEParams(), TaskInfo(4, 16, (8, 8)))
    with pytest.raises(RecipeError, match="out of range"):
        _pair(teacher_layers=[4], student_layers=[0])


@pytest.mark.slow
def test_recipe_runs_end_to_end(tmp_runs):
    r = load_recipe("digits-dmae")
    assert r.method.name == "dmae" and r.method.params["mask_ratio"] == 0.75
    data = yaml.safe_load(shipped_recipe("digits-dmae").read_text())  # the shipped recipe, shrunk
    data["task"] = {"name": "digits", "num_train": 200, "num_val": 50, "num_test": 100}
    data["student"] = {"arch": "vit", "hidden": 8, "depth": 2, "heads": 2, "patch": 2}
    teacher = yaml.safe_load(shipped_recipe("digits-vit-teacher").read_text())
    teacher |= {"task": data["task"], "student": {"arch": "vit", "hidden": 16, "depth": 3, "heads": 2, "patch": 2}}
    teacher["train"] |= {"epochs": 1, "progress": False, "trackers": "none"}
    data["teacher"] = {"recipe": teacher}
    data["train"] |= {"epochs": 1, "progress": False, "trackers": "none"}
    res = run_recipe(recipe_from_dict(data), out=tmp_runs)
    assert 0 <= res.metrics["test/accuracy"] <= 1
    exported = load_file(str(res.run_dir / "student" / "model.safetensors"))
    assert not any("projectors" in k or "decoder" in k for k in exported)
