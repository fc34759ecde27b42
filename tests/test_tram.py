"""TRAM (S02): the trust-region radius and perturbation against an independent computation;
tiny end-to-end runs with train.sharpness: tram (and SAM, the baseline option)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_recipe, tiny_teacher
from torch import nn

from distill.core.distiller import TaskInfo
from distill.core.recipe import TrainConfig, recipe_from_dict
from distill.core.runner import run_recipe
from distill.core.sharpness import SAM, TRAM
from distill.core.trainer import make_sharpness
from distill.errors import RecipeError
from distill.logits.methods.kd import HintonKD, KDParams


def _distiller() -> HintonKD:
    torch.manual_seed(0)
    student, teacher = nn.Linear(4, 3), nn.Linear(4, 3)
    return HintonKD(student, teacher, KDParams(), TaskInfo(num_classes=3, num_train=8, input_shape=(4,)))


@pytest.mark.parametrize("noise_type,direction", [("normal", "gradient"), ("uniform", "gradient"), ("normal", "ones")])
def test_tram_perturbation_matches_an_independent_computation(noise_type, direction):
    d = _distiller()
    w0, b0 = d.student.weight.detach().clone(), d.student.bias.detach().clone()
    params = list(d.student.parameters())
    tram = TRAM(params, d, noise=0.5, noise_type=noise_type, scale=2.0, direction=direction)
    g = torch.Generator().manual_seed(3)
    batch = {"x": torch.randn(8, 4, generator=g), "y": torch.randint(0, 3, (8,), generator=g), "index": torch.arange(8)}
    loss = sum(d(batch).losses.values())  # recorded by TRAM's hook
    loss.backward()
    gw, gb = d.student.weight.grad.clone(), d.student.bias.grad.clone()

    torch.manual_seed(7)
    tram.perturb()

    # independently: the same noise draw, the linear model by hand, KL(f(x+z) ‖ f(x)) batch-mean
    torch.manual_seed(7)
    x = batch["x"]
    z = torch.randn_like(x) * 0.5 if noise_type == "normal" else (torch.rand_like(x) * 2 - 1) * 0.5
    p_noisy = F.softmax((x + z) @ w0.T + b0, -1)
    log_clean = F.log_softmax(x @ w0.T + b0, -1)
    kl = (p_noisy * (p_noisy.log() - log_clean)).sum(-1).mean()
    # the official radius: F.kl_div(mean over the B·C elements) / B
    official = F.kl_div(log_clean, p_noisy.log(), reduction="mean", log_target=True) / x.shape[0]
    assert official.item() == pytest.approx(kl.item() / (8 * 3), rel=1e-5)
    rho = 2.0 * official
    norm = torch.sqrt((gw**2).sum() + (gb**2).sum())
    assert tram.last_radius == pytest.approx(rho.item(), rel=1e-4)  # float32 KL of nearby distributions
    if direction == "ones":  # the official first_step: every weight moved by radius / ‖g‖
        gw, gb = torch.ones_like(gw), torch.ones_like(gb)
    assert torch.allclose(d.student.weight.detach(), w0 + rho * gw / norm, atol=1e-6)
    assert torch.allclose(d.student.bias.detach(), b0 + rho * gb / norm, atol=1e-6)

    # the second pass at w + ε (the engine flags it as replaying) is not recorded; restore returns to w
    d.replaying = True
    sum(d(batch).losses.values()).backward()
    d.replaying = False
    assert tram._inputs == []
    tram.restore()
    assert torch.equal(d.student.weight.detach(), w0) and torch.equal(d.student.bias.detach(), b0)


def test_tram_averages_the_divergence_over_micro_batches():
    d = _distiller()
    tram = TRAM(list(d.student.parameters()), d, noise=0.3, scale=1.0)
    g = torch.Generator().manual_seed(4)
    parts = [{"x": torch.randn(4, 4, generator=g), "y": torch.zeros(4, dtype=torch.long), "index": torch.arange(4)}
             for _ in range(2)]
    for b in parts:
        (sum(d(b).losses.values()) / 2).backward()
    torch.manual_seed(11)
    kls = []
    for b in parts:  # what radius() draws, in the same order
        x = b["x"]
        noisy = F.softmax(d.student(x + torch.randn_like(x) * 0.3), -1)
        kls.append((noisy * (noisy.log() - F.log_softmax(d.student(x), -1))).sum(-1).mean() / (4 * 3))  # / (B·C)
    expected = torch.stack(kls).mean().item()
    torch.manual_seed(11)
    assert tram.radius() == pytest.approx(expected, rel=1e-4)


def test_make_sharpness_options():
    d = _distiller()
    params = list(d.student.parameters())
    assert make_sharpness(TrainConfig(), params) is None
    sam = make_sharpness(TrainConfig(sharpness="sam", sam_rho=0.1), params)
    assert type(sam) is SAM and sam.radius() == 0.1
    tram = make_sharpness(TrainConfig(sharpness="tram", tram_noise=0.2, tram_scale=3.0), params, d)
    assert isinstance(tram, TRAM) and (tram.noise, tram.scale, tram.direction) == (0.2, 3.0, "gradient")
    assert make_sharpness(TrainConfig(sharpness="tram", tram_direction="ones"), params, d).direction == "ones"
    assert "tram_direction" not in TrainConfig().model_dump()  # absent unless set: run fingerprints unchanged
    with pytest.raises(RecipeError, match="tram"):
        make_sharpness(TrainConfig(sharpness="tram"), params)


@pytest.mark.parametrize("sharpness", ["tram", "sam"])
def test_tiny_run_with_sharpness(tmp_runs, sharpness):
    data = tiny_recipe(f"kd-{sharpness}", {"name": "kd"}, {"recipe": tiny_teacher()}, sharpness=sharpness,
                       grad_accum=2, epochs=6, lr=0.01)
    res = run_recipe(recipe_from_dict(data), out=tmp_runs)
    assert math.isfinite(res.metrics["test/accuracy"])
    assert res.metrics["test/accuracy"] > 0.15  # it learned something (chance is 0.1)
