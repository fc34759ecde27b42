"""G2SD (S45): the generic (LayerNorm target, smooth-L1 β 2) and specific ((CE + hard-label CE) / 2)
losses against hand computations; a generic step against a manual masked forward and a full-image
teacher target; a specific step against its two heads; the staged recipe; the recipe end to end."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from distill.core.distiller import TaskInfo
from distill.core.recipe import load_recipe, recipe_from_dict, shipped_recipe, stage_recipes
from distill.core.runner import run_recipe
from distill.errors import RecipeError
from distill.features.methods.g2sd import G2SD, G2SDParams, g2sd_feature_loss, g2sd_specific_loss
from distill.tasks.models import build_model


def _ln(v: list[float]) -> list[float]:
    mu = sum(v) / len(v)
    var = sum((a - mu) ** 2 for a in v) / len(v)
    return [(a - mu) / math.sqrt(var + 1e-6) for a in v]


def _smooth_l1(d: float, beta: float) -> float:
    return 0.5 * d * d / beta if abs(d) < beta else abs(d) - 0.5 * beta


def _feature_loss_by_hand(pred: torch.Tensor, teacher: torch.Tensor, beta: float = 2.0) -> float:
    p, t = pred.reshape(-1, pred.shape[-1]).tolist(), teacher.reshape(-1, teacher.shape[-1]).tolist()
    tot = sum(_smooth_l1(a - b, beta) for row_p, row_t in zip(p, t) for a, b in zip(row_p, _ln(row_t)))
    return tot / (len(p) * len(p[0]))


def test_feature_loss_layer_norms_the_teacher_and_uses_smooth_l1_beta_2():
    g = torch.Generator().manual_seed(0)
    pred, t = torch.randn(2, 3, 5, generator=g) * 2, torch.randn(2, 3, 5, generator=g) * 7 + 3
    assert g2sd_feature_loss(pred, t).item() == pytest.approx(_feature_loss_by_hand(pred, t), rel=1e-5)
    assert g2sd_feature_loss(pred, t, beta=0.5).item() == pytest.approx(_feature_loss_by_hand(pred, t, 0.5), rel=1e-5)
    # the scale and offset of the teacher do not matter (LayerNorm without affine)
    assert g2sd_feature_loss(pred, 10 * t - 4).item() == pytest.approx(g2sd_feature_loss(pred, t).item(), rel=1e-4)
    t.requires_grad_(True)
    pred.requires_grad_(True)
    g2sd_feature_loss(pred, t).backward()
    assert t.grad is None and pred.grad is not None


def _ce(logits: list[float], k: int) -> float:
    return -(logits[k] - math.log(sum(math.exp(v) for v in logits)))


def test_specific_loss_averages_label_ce_and_teacher_top1_ce():
    s = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 1.0], [0.0, 3.0, 0.0]])
    dist = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.2, 0.1, 0.0]])
    t = torch.tensor([[0.0, 5.0, 0.0], [0.0, 0.0, 2.0], [4.0, 0.0, 0.0]])  # top-1: 1, 2, 0
    batch = {"y": torch.tensor([0, 2, -1])}  # the last sample is unlabeled: no label CE
    label = (_ce(s[0].tolist(), 0) + _ce(s[1].tolist(), 2)) / 2
    hard = (_ce(dist[0].tolist(), 1) + _ce(dist[1].tolist(), 2) + _ce(dist[2].tolist(), 0)) / 3
    assert g2sd_specific_loss(s, dist, t, batch).item() == pytest.approx((label + hard) / 2, rel=1e-5)


def _pair(**kw) -> G2SD:
    torch.manual_seed(0)
    s = build_model("vit", {"hidden": 8, "depth": 2, "heads": 2, "patch": 2}, (8, 8), 4)
    t = build_model("vit", {"hidden": 16, "depth": 3, "heads": 2, "patch": 2}, (8, 8), 4)
    return G2SD(s, t, G2SDParams(decoder_dim=8, decoder_depth=1, decoder_heads=2, **kw), TaskInfo(4, 16, (8, 8)))


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"x": torch.randn(3, 8, 8, generator=g), "y": torch.tensor([0, 1, -1]), "index": torch.arange(3)}


def _run(layer, h):
    out = layer(h)
    return out[0] if isinstance(out, tuple) else out


def _generic_by_hand(d: G2SD, x: torch.Tensor, noise: torch.Tensor, t_block: int, masked_only: bool) -> float:
    """Teacher on the whole image up to block ``t_block``; student on [CLS] + the kept patches; its
    decoder at every patch; the loss written out."""
    n, length = noise.shape
    keep_n = int(length * (1 - d.params.mask_ratio))
    order = [sorted(range(length), key=lambda j: row[j].item()) for row in noise]
    keep = [o[:keep_n] for o in order]
    with torch.no_grad():
        h = d.teacher.vit.embeddings(x.reshape(n, 1, 8, 8))
        for i in range(t_block + 1):
            h = _run(d.teacher.vit.layers[i], h)
        target = h[:, 1:]
        emb = d.student.vit.embeddings(x.reshape(n, 1, 8, 8))
        h = torch.stack([emb[b, [0] + [1 + j for j in keep[b]]] for b in range(n)])
        for layer in d.student.vit.layers:
            h = _run(layer, h)
        latent = d.student.vit.layernorm(h)
        ids_restore = torch.tensor([[order[b].index(j) for j in range(length)] for b in range(n)])
        pred = d.projectors["decoder"](latent, ids_restore)
    if masked_only:
        rows = [(b, j) for b in range(n) for j in range(length) if j not in keep[b]]
        pred = torch.stack([pred[b, j] for b, j in rows])
        target = torch.stack([target[b, j] for b, j in rows])
    return _feature_loss_by_hand(pred, target)


@pytest.mark.parametrize(("supervise", "layer"), [("all", -1), ("masked", 1)])
def test_generic_step_predicts_the_teacher_features_from_the_visible_patches(supervise, layer):
    d, b = _pair(supervise=supervise, teacher_layer=layer), _batch()
    torch.manual_seed(11)
    noise = torch.rand(3, 16)
    torch.manual_seed(11)
    step = d.training_step(b)
    want = _generic_by_hand(d, b["x"], noise, layer % 3, supervise == "masked")
    assert step.losses["student"].item() == pytest.approx(want, rel=1e-4)
    assert "ce" not in step.metrics  # no labels in the generic stage
    step.losses["student"].backward()
    assert any(p.grad is not None for p in d.student.vit.parameters())
    assert all(p.grad is None for p in d.teacher.parameters())
    assert d.student.head.weight.grad is None  # the class head is not trained by the generic stage


def test_generic_teacher_stops_at_its_target_block():
    d, b = _pair(teacher_layer=0), _batch()
    calls = [0] * 3
    for i, layer in enumerate(d.teacher.vit.layers):
        layer.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    d.training_step(b)
    assert calls == [1, 0, 0]


def test_encoder_term_official_weight_zero_and_optional():
    assert G2SDParams().encoder_weight == 0.0
    d, b = _pair(encoder_weight=0.5), _batch()
    torch.manual_seed(1)
    step = d.training_step(b)
    assert step.losses["student"].item() == pytest.approx(
        step.metrics["feature"].item() + 0.5 * step.metrics["encoder"].item(), rel=1e-5)


def test_specific_step_label_ce_on_head_and_teacher_top1_on_the_distillation_head():
    d, b = _pair(stage="specific"), _batch()
    assert set(d.projectors) == {"head_dist"}
    step = d.training_step(b)
    with torch.no_grad():
        emb = d.student.embed(b["x"])
        s, dist, t = d.student.head(emb), d.projectors["head_dist"](emb), d.teacher(b["x"])
    label = (_ce(s[0].tolist(), 0) + _ce(s[1].tolist(), 1)) / 2
    hard = sum(_ce(dist[i].tolist(), int(t[i].argmax())) for i in range(3)) / 3
    assert step.losses["student"].item() == pytest.approx((label + hard) / 2, rel=1e-5)
    kd = F.kl_div(F.log_softmax(s, -1), F.softmax(t, -1), reduction="batchmean").item()
    assert step.losses["student"].item() != pytest.approx(kd, rel=1e-3)
    single = _pair(stage="specific", dist_head=False)
    assert len(single.projectors) == 0


def test_errors_are_one_line():
    s = build_model("cnn2d", {"width": 4, "depth": 2}, (8, 8), 4)
    t = build_model("vit", {"hidden": 16, "depth": 2, "heads": 2, "patch": 2}, (8, 8), 4)
    with pytest.raises(RecipeError, match="generic stage.*must be the 'vit' arch"):
        G2SD(s, t, G2SDParams(), TaskInfo(4, 16, (8, 8)))
    with pytest.raises(RecipeError, match="out of range"):
        _pair(teacher_layer=3)
    G2SD(s, t, G2SDParams(stage="specific"), TaskInfo(4, 16, (8, 8)))  # any classifier in the specific stage


def test_staged_recipe_generic_then_specific():
    r = load_recipe("digits-g2sd")
    assert [s.name for s in r.stages] == ["generic", "specific"]
    generic, specific = stage_recipes(r)
    assert generic.method.name == specific.method.name == "g2sd"
    assert generic.method.params["stage"] == "generic" and specific.method.params["stage"] == "specific"
    assert specific.init is not None and specific.student is None  # starts from the generic stage's student
    budget = generic.train.epochs + specific.train.epochs
    for name in ("digits-g2sd-kd", "digits-g2sd-student"):
        base = load_recipe(name)
        assert base.train.epochs == budget and base.student.params == r.student.params


@pytest.mark.slow
def test_recipe_runs_end_to_end(tmp_runs):
    data = yaml.safe_load(shipped_recipe("digits-g2sd").read_text())  # the shipped recipe, shrunk
    data["task"] = {"name": "digits", "num_train": 200, "num_val": 50, "num_test": 100}
    data["student"] = {"arch": "vit", "hidden": 8, "depth": 2, "heads": 2, "patch": 2}
    teacher = yaml.safe_load(shipped_recipe("digits-vit-teacher").read_text())
    teacher |= {"task": data["task"], "student": {"arch": "vit", "hidden": 16, "depth": 2, "heads": 2, "patch": 2}}
    teacher["train"] |= {"epochs": 1, "progress": False, "trackers": "none"}
    data["teacher"] = {"recipe": teacher}
    data["train"] |= {"epochs": 1, "progress": False, "trackers": "none"}
    data["stages"][1]["train"] = {"epochs": 1}
    res = run_recipe(recipe_from_dict(data), out=tmp_runs)
    assert 0 <= res.metrics["test/accuracy"] <= 1 and "stage/generic/test/accuracy" in res.metrics
    exported = load_file(str(res.run_dir / "student" / "model.safetensors"))
    assert not any("projectors" in k or "decoder" in k or "head_dist" in k for k in exported)
