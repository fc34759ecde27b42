"""OFA-KD (S40): the OFA loss against explicit loops (not KD, not CE), a training step against a manual
forward through the student's stages and branches, the branches' shapes, and the recipe end to end
(CNN teacher -> ViT student)."""

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
from distill.features.methods.ofa import OFA, OFAParams, SepConv, ofa_loss, stage_branch
from distill.logits.losses import kd_loss
from distill.tasks.models import build_model


def _softmax(row: list[float], temp: float) -> list[float]:
    e = [math.exp(v / temp) for v in row]
    return [v / sum(e) for v in e]


def ref_ofa(s: torch.Tensor, t: torch.Tensor, y: list[int], eps: float, temp: float = 1.0) -> float:
    """Official ofa_loss written out: mean_n sum_c -[(p_t + 1_y)^eps - 1_y] log p_s."""
    total = 0.0
    for n in range(len(s)):
        ps, pt = _softmax(s[n].tolist(), temp), _softmax(t[n].tolist(), temp)
        for c in range(len(ps)):
            hot = 1.0 if c == y[n] else 0.0
            total += -((pt[c] + hot) ** eps - hot) * math.log(ps[c])
    return total / len(s)


def _logits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(5, 4, generator=g) * 2, torch.randn(5, 4, generator=g) * 3, torch.tensor([0, 3, 1, 1, 2])


@pytest.mark.parametrize("eps,temp", [(1.5, 1.0), (1.0, 1.0), (2.0, 3.0)])
def test_ofa_loss_by_explicit_loops(eps, temp):
    s, t, y = _logits()
    got = ofa_loss(s, t, y, eps, temp).item()
    assert got == pytest.approx(ref_ofa(s, t, y.tolist(), eps, temp), rel=1e-5)


def test_ofa_loss_is_neither_kd_nor_ce():
    s, t, y = _logits(1)
    got = ofa_loss(s, t, y, 1.5).item()
    assert abs(got - kd_loss(s, t, 1.0).item()) > 0.1
    assert abs(got - torch.nn.functional.cross_entropy(s, y).item()) > 0.1
    # eps = 1: (p_t + 1_y) - 1_y = p_t, the cross-entropy to the teacher (T = 1 KD plus its entropy)
    p_t = torch.softmax(t, -1)
    soft_ce = -(p_t * torch.log_softmax(s, -1)).sum(-1).mean()
    assert ofa_loss(s, t, y, 1.0).item() == pytest.approx(soft_ce.item(), rel=1e-5)
    assert abs(ofa_loss(s, t, y, 1.5).item() - soft_ce.item()) > 0.05
    # eps > 1 enhances the target against the others as the teacher grows sure: the target weight
    # (1 + p)^eps - 1 grows faster than p^eps
    sure, unsure = torch.tensor([[6.0, 0, 0, 0]]), torch.zeros(1, 4)
    zero = torch.zeros(1, 4)
    assert ofa_loss(zero, sure, torch.tensor([0]), 1.5) > ofa_loss(zero, unsure, torch.tensor([0]), 1.5)


def _pair(eps: float = 1.5, **kw) -> OFA:
    torch.manual_seed(0)
    s = build_model("vit", {"hidden": 8, "depth": 2, "heads": 2, "patch": 4}, (8, 8), 4)
    t = build_model("cnn2d", {"width": 4, "depth": 2}, (8, 8), 4)
    return OFA(s, t, OFAParams(eps=eps, **kw), TaskInfo(4, 16, (8, 8)))


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"x": torch.randn(6, 8, 8, generator=g), "y": torch.tensor([0, 1, 2, 3, -1, 1]), "index": torch.arange(6)}


def test_training_step_by_a_manual_forward_through_stages_and_branches():
    d, b = _pair(), _batch()
    step = d.training_step(b)
    s, x = d.student, b["x"]
    with torch.no_grad():
        h0 = s.vit.layers[0](s.vit.embeddings(x.reshape(6, 1, 8, 8)))
        h1 = s.vit.layers[1](h0)
        logits = s.head(s.vit.layernorm(h1)[:, 0])
        t = d.teacher(x)
        y = [0, 1, 2, 3, int(t[4].argmax()), 1]  # the unlabeled sample takes the teacher's top-1
        ce = torch.nn.functional.cross_entropy(logits[[0, 1, 2, 3, 5]], b["y"][[0, 1, 2, 3, 5]]).item()
        b0, b1 = d.projectors["vit__layers__0"](h0), d.projectors["vit__layers__1"](h1)
    want = ce + ref_ofa(logits, t, y, 1.5) + ref_ofa(b0, t, y, 1.5) + ref_ofa(b1, t, y, 1.5)
    assert step.losses["student"].item() == pytest.approx(want, rel=1e-5)
    assert step.metrics["ofa_stage0"].item() == pytest.approx(ref_ofa(b0, t, y, 1.5), rel=1e-5)


def test_stage_terms_train_the_early_stages_through_their_branches():
    d = _pair(ce_weight=0.0, kd_weight=0.0)  # only the stage branches' OFA terms
    d.training_step(_batch()).losses["student"].backward()
    assert d.student.head.weight.grad is None or d.student.head.weight.grad.abs().sum() == 0
    assert d.student.vit.layers[0].mlp.fc1.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in d.projectors.parameters())
    assert set(d.param_groups()) == {"student", "projectors"}


def test_branch_shapes_follow_the_official_projectors():
    cnn = stage_branch((4, 8, 8), 2, 16, 32, 10)  # 2 stages left: 2 SepConvs, the last to max(16, 32)
    seps = [m for m in cnn if isinstance(m, SepConv)]
    assert len(seps) == 2 and seps[-1][5].out_channels == 32
    assert cnn(torch.randn(3, 4, 8, 8)).shape == (3, 10)
    last = stage_branch((4, 2, 2), 0, 16, 32, 10)
    assert isinstance(last[0], torch.nn.Conv2d) and last[0].kernel_size == (1, 1)
    vit = stage_branch((5, 8), 1, 8, 32, 10)
    x = torch.randn(2, 5, 8)
    y = vit(x)
    blocks, head = vit[0], vit[2]
    assert len(blocks.blocks) == 1 and y.shape == (2, 10)
    torch.testing.assert_close(y, head(blocks(x)[:, 0]))  # the [CLS] state after the blocks is read out
    assert not torch.allclose(y, head(blocks(x).mean(1)))
    with pytest.raises(RecipeError, match="stages"):
        _pair(stages=[5])


@pytest.mark.slow
def test_recipe_runs_end_to_end_across_architectures(tmp_runs):
    r = load_recipe("digits-ofa")
    assert r.method.name == "ofa" and r.student.name == "vit"
    data = yaml.safe_load(shipped_recipe("digits-ofa").read_text())  # the shipped recipe, shrunk
    data["task"] = {"name": "digits", "num_train": 200, "num_val": 50, "num_test": 100}
    data["student"] = {"arch": "vit", "hidden": 8, "depth": 2, "heads": 2, "patch": 4}
    data["teacher"] = {"recipe": {"name": "t", "seed": 0, "task": data["task"], "student": {"arch": "cnn2d", "width": 4, "depth": 2},
                                  "method": {"name": "ce"}, "train": {"epochs": 1, "batch_size": 64, "progress": False, "trackers": "none"}}}
    data["train"] |= {"epochs": 1, "progress": False, "trackers": "none"}
    res = run_recipe(recipe_from_dict(data), out=tmp_runs)
    assert 0 <= res.metrics["test/accuracy"] <= 1
    exported = load_file(str(res.run_dir / "student" / "model.safetensors"))
    ckpt = load_file(str(res.run_dir / "checkpoints" / "latest" / "model.safetensors"))
    assert not any("projectors" in k for k in exported)  # branches are not part of the student
    assert any(k.startswith("projectors.vit__layers__0") for k in ckpt)
