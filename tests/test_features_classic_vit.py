"""The classic feature methods on a heterogeneous pair (issue 15): a CNN teacher and a small ViT student.

A ViT layer gives tokens ``[B, 1 + N, D]``; the map methods (fitnet's conv regressor, at, vid, reviewkd)
compare maps, so ``classic.tokens_to_map`` drops [CLS] and lays the N patches out on their grid. Each map
method's step is checked against an independent computation: the ViT's hidden states from transformers'
``output_hidden_states`` turned into maps by explicit loops, the teacher's maps by a hand forward.
"""

from __future__ import annotations

import math

import pytest
import torch

from distill.core.distiller import TaskInfo
from distill.core.recipe import load_recipe
from distill.core.registry import METHODS
from distill.errors import RecipeError
from distill.features.classic import token_grid, tokens_to_map
from distill.features.losses import hcl_loss
from distill.tasks.models import build_model
from test_features_classic import at_by_hand, batch, ce_by_hand, feats, kd_by_hand, pool_by_hand, rkd_by_hand

VIT = {"hidden": 8, "depth": 2, "heads": 2, "patch": 2}


def map_by_hand(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[CLS] dropped, token 1 + i·w + j to pixel (i, j) of every channel, by explicit loops."""
    out = torch.zeros(tokens.shape[0], tokens.shape[2], h, w)
    for n in range(tokens.shape[0]):
        for c in range(tokens.shape[2]):
            for i in range(h):
                for j in range(w):
                    out[n, c, i, j] = tokens[n, 1 + i * w + j, c]
    return out


def vit_pair(method: str, **kw):
    torch.manual_seed(0)
    s = build_model("vit", VIT, (8, 8), 4)
    t = build_model("cnn2d", {"width": 6, "depth": 3}, (8, 8), 4)
    for p in t.parameters():
        p.data.add_(0.3 * torch.randn_like(p))
    entry = METHODS.get(method)
    return entry.obj(s, t, entry.params(**kw), TaskInfo(4, 6, (8, 8)))


def student_maps(d, x: torch.Tensor) -> list[torch.Tensor]:
    """The ViT student's two layers as 4x4 maps, from transformers' hidden states (not our tap)."""
    with torch.no_grad():
        hs = d.student.vit(pixel_values=x.reshape(-1, 1, 8, 8), output_hidden_states=True).hidden_states
    return [map_by_hand(hs[i + 1], 4, 4) for i in range(2)]


def logit_terms(d, b) -> float:
    with torch.no_grad():
        return ce_by_hand(d.student(b["x"]), b["y"])


# --- the conversion ---------------------------------------------------------------------------------
def test_tokens_to_map_by_hand():
    tok = torch.tensor([[[9.0, 9.0], [1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, 40.0]]])  # [CLS] + 2x2 patches, D = 2
    want = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[10.0, 20.0], [30.0, 40.0]]]])
    torch.testing.assert_close(tokens_to_map(tok, (2, 2)), want)
    torch.testing.assert_close(tokens_to_map(tok, (4,)), want.reshape(1, 2, 4))  # a 1-D grid
    with pytest.raises(RecipeError, match="not \\[CLS\\] \\+ a 3x3"):
        tokens_to_map(tok, (3, 3))
    g = torch.Generator().manual_seed(0)
    tok = torch.randn(2, 1 + 6, 3, generator=g)
    torch.testing.assert_close(tokens_to_map(tok, (2, 3)), map_by_hand(tok, 2, 3))


def test_token_grid_follows_the_vit_patch_order():
    s = build_model("vit", VIT, (8, 8), 4)
    assert token_grid(s) == (4, 4) and token_grid(build_model("cnn2d", {"width": 4, "depth": 3}, (8, 8), 4)) is None
    assert token_grid(build_model("vit", {"hidden": 8, "depth": 1, "heads": 2, "patch": 4}, (40,), 4)) == (10,)
    # the patch embedding lays patch (i, j) at token i·4 + j: a lone lit patch shows where
    pe = s.vit.embeddings.patch_embeddings
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 2:4, 6:8] = 1.0  # patch row 1, column 3
    with torch.no_grad():
        emb = pe(x) - pe(torch.zeros(1, 1, 8, 8))
    lit = emb.abs().sum(-1)[0].nonzero().flatten().tolist()
    assert lit == [1 * 4 + 3]
    m = tokens_to_map(torch.cat([torch.zeros(1, 1, emb.shape[-1]), emb], 1), (4, 4))
    assert m.abs().sum(1)[0].nonzero().tolist() == [[1, 3]]


# --- the map methods' steps on a CNN teacher / ViT student ---------------------------------------------
def test_fitnet_vit_student_conv_regressor_on_the_map():
    d, b = vit_pair("fitnet", teacher_layers=["body.4"]), batch()
    assert d.student_layers == ["vit.layers.1"] or d.student_layers == ["vit.encoder.layer.1"]
    assert d.shapes == [((8, 4, 4), (6, 4, 4))]
    step = d.training_step(b)
    with torch.no_grad():
        hint = float(((d.projectors["hint"](student_maps(d, b["x"])[1]) - feats(d.teacher, b["x"], 4)) ** 2).mean())
    assert step.metrics["hint"].item() == pytest.approx(hint, rel=1e-5)
    assert step.losses["student"].item() == pytest.approx(logit_terms(d, b) + 100 * hint, rel=1e-5)
    step.losses["student"].backward()
    assert d.student.vit.embeddings.patch_embeddings.projection.weight.grad.abs().sum() > 0
    # stage 1 (hint) on the same pair: the map too
    h = vit_pair("fitnet", teacher_layers=["body.4"], stage="hint", hint_weight=1.0)
    with torch.no_grad():
        want = float(((h.projectors["hint"](student_maps(h, b["x"])[1]) - feats(h.teacher, b["x"], 4)) ** 2).mean())
    assert h.training_step(b).losses["student"].item() == pytest.approx(want, rel=1e-5)
    # the linear projector kind reads the tokens as they are
    assert vit_pair("fitnet", teacher_layers=["body.4"], regressor="linear").shapes == [((17, 8), (6, 4, 4))]


def test_at_vit_student_attention_of_the_patch_maps():
    d, b = vit_pair("at", teacher_layers=["body.4", "body.6"]), batch()
    step = d.training_step(b)
    fs = student_maps(d, b["x"])
    with torch.no_grad():
        ft = [feats(d.teacher, b["x"], 4), feats(d.teacher, b["x"], 6)]
    at = at_by_hand(fs[0], ft[0]) + at_by_hand(fs[1], ft[1])  # 4x4 vs 4x4, then 4x4 pooled to 2x2
    assert step.metrics["at"].item() == pytest.approx(at, rel=1e-5)
    assert step.losses["student"].item() == pytest.approx(logit_terms(d, b) + 1000 * at, rel=1e-5)


def test_vid_vit_student_gaussian_nll_on_the_maps():
    d, b = vit_pair("vid", teacher_layers=["body.4", "body.6"]), batch()
    step = d.training_step(b)
    fs = student_maps(d, b["x"])
    want = 0.0
    with torch.no_grad():
        for name, f, upto in zip(d.student_layers, fs, (4, 6)):
            tgt = feats(d.teacher, b["x"], upto)
            r = d.projector(name)
            mu = r(pool_by_hand(f, tgt.shape[-1]).float())
            var = [math.log(1 + math.exp(a)) + 1e-5 for a in r.log_scale.tolist()]
            terms = [0.5 * ((tgt[n, c, i, j] - mu[n, c, i, j]).item() ** 2 / var[c] + math.log(var[c]))
                     for n in range(mu.shape[0]) for c in range(mu.shape[1]) for i in range(mu.shape[2]) for j in range(mu.shape[3])]
            want += sum(terms) / len(terms)
    assert step.metrics["vid"].item() == pytest.approx(want, rel=1e-5)
    assert step.losses["student"].item() == pytest.approx(logit_terms(d, b) + want, rel=1e-5)


def test_reviewkd_vit_student_reviews_the_patch_maps():
    d, b = vit_pair("reviewkd", teacher_layers=["body.4", "body.6"], warmup_epochs=0), batch()
    step = d.training_step(b)
    fs = student_maps(d, b["x"])
    with torch.no_grad():
        ft = [feats(d.teacher, b["x"], 4), feats(d.teacher, b["x"], 6)]
        ft.append(ft[-1].mean((2, 3), keepdim=True))
        out = d.review(fs + [fs[-1].mean((2, 3), keepdim=True)])  # the pooled level: patches only, no [CLS]
    assert [o.shape[1:] for o in out] == [(6, 4, 4), (6, 2, 2), (6, 1, 1)]
    hcl = float(sum(hcl_loss(o, f) for o, f in zip(out, ft)))
    assert step.metrics["review"].item() == pytest.approx(hcl, rel=1e-5)
    assert step.losses["student"].item() == pytest.approx(logit_terms(d, b) + hcl, rel=1e-5)


def test_embedding_methods_read_the_vit_cls_state():
    d, b = vit_pair("rkd", kd_weight=1.0), batch()
    step = d.training_step(b)
    with torch.no_grad():
        es = d.student.vit(pixel_values=b["x"].reshape(-1, 1, 8, 8)).last_hidden_state[:, 0]
        et = d.teacher.embed(b["x"])
        s_logits, t_logits = d.student(b["x"]), d.teacher(b["x"])
    ld, la = rkd_by_hand(es, et)
    want = ce_by_hand(s_logits, b["y"]) + kd_by_hand(s_logits, t_logits) + 25 * ld + 50 * la
    # rel 5e-4: rkd_distance_loss's float32 ‖a‖² + ‖b‖² − 2ab distances vs the hand float64 norms
    assert step.losses["student"].item() == pytest.approx(want, rel=5e-4)
    assert abs(want - (ce_by_hand(s_logits, b["y"]) + kd_by_hand(s_logits, t_logits))) > 1.0


def test_a_vector_paired_with_a_map_is_a_one_line_error():
    with pytest.raises(RecipeError, match="at: student head gives \\(4,\\)") as e:
        vit_pair("at", student_layers=["head"], teacher_layers=["body.4"])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("method", ["fitnet", "at", "pkt", "rkd", "sp", "vid", "crd", "reviewkd"])
def test_shipped_vit_recipes_build_and_step(method):
    from distill.tasks.base import ArrayDataset
    r = load_recipe(f"digits-vit-{method}")
    t_recipe = load_recipe(r.teacher.recipe)
    assert r.student.name == "vit" and t_recipe.student.name == "cnn2d"
    torch.manual_seed(0)
    s = build_model(r.student.name, r.student.params, (8, 8), 10)
    t = build_model(t_recipe.student.name, t_recipe.student.params, (8, 8), 10)
    x, y = torch.rand(16, 8, 8), torch.arange(16) % 10
    entry = METHODS.get(method)
    d = entry.obj(s, t, entry.params(**r.method.params), TaskInfo(10, 16, (8, 8), 16, train=ArrayDataset(x, y)))
    step = d.training_step({"x": x, "y": y, "index": torch.arange(16)})
    step.losses["student"].backward()
    assert torch.isfinite(step.losses["student"]) and s.head.weight.grad is not None
