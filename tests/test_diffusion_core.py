"""The diffusion family's machinery: schedules and parameterisations, CFG, samplers against an exact
Gaussian flow, metrics against independent computations, model folders, teacher training, ``naive``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from distill.core.recipe import recipe_from_dict
from distill.core.runner import run_recipe
from distill.diffusion import metrics as M
from distill.diffusion.base import DiffusionDistiller, DiffusionParams
from distill.diffusion.data.tasks import load_denoiser, save_denoiser
from distill.diffusion.models import build_denoiser
from distill.diffusion.sampling import cfg, nfe, predict, sample
from distill.diffusion.schedules import from_x0_eps, get_schedule, to_x0_eps
from distill.core.distiller import TaskInfo
from distill.errors import MismatchError


class GaussianFlow(nn.Module):
    """The exact velocity of the flow schedule for 1-D data N(m, s²): E[x₀|x_t] in closed form."""

    def __init__(self, m: float, s: float) -> None:
        super().__init__()
        self.m, self.s = m, s
        self.dummy = nn.Parameter(torch.zeros(1))
        self.diffusion = {"schedule": "flow", "prediction": "velocity", "sampler": "euler", "steps": 50, "guidance": 1.0}

    def forward(self, x, t, cond=None, w=None):
        t = t.reshape(-1, *([1] * (x.dim() - 1)))
        a, m, s2 = 1 - t, self.m, self.s**2
        x0 = m + a * s2 * (x - a * m) / (a**2 * s2 + t**2)
        eps = (x - a * x0) / t.clamp_min(1e-12)
        return eps - x0


@pytest.mark.parametrize("name", ["flow", "vp_cosine", "trigflow"])
@pytest.mark.parametrize("kind", ["eps", "x0", "v", "velocity"])
def test_parameterisations_round_trip(name, kind):
    if name == "flow" and kind == "v":
        pytest.skip("v needs a variance-preserving schedule")
    sched = get_schedule(name)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g)
    t = torch.tensor([0.05, 0.2, 0.4, 0.6, 0.8, 0.95])
    x_t = sched.add_noise(x0, eps, t)
    back = to_x0_eps(from_x0_eps(x0, eps, kind, t, sched), kind, x_t, t, sched)
    assert torch.allclose(back[0], x0, atol=1e-4) and torch.allclose(back[1], eps, atol=1e-4)


def test_schedules_closed_forms_and_derivatives():
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    a, s = get_schedule("flow").alpha_sigma(t)
    assert torch.allclose(a, 1 - t) and torch.allclose(s, t)
    a, s = get_schedule("trigflow").alpha_sigma(t)
    assert torch.allclose(a, torch.cos(math.pi * t / 2)) and torch.allclose(s, torch.sin(math.pi * t / 2))
    for name in ("vp_cosine", "trigflow"):  # variance preserving
        a, s = get_schedule(name).alpha_sigma(t)
        assert torch.allclose(a**2 + s**2, torch.ones_like(t))
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2 / math.cos(0.008 / 1.008 * math.pi / 2) ** 2  # noqa: E731
    a, _ = get_schedule("vp_cosine").alpha_sigma(torch.tensor([0.3], dtype=torch.float64))
    assert float(a) == pytest.approx(math.sqrt(f(0.3)), rel=1e-9)  # Nichol & Dhariwal Eq. 17
    h = 1e-6
    for name in ("flow", "vp_cosine", "trigflow"):
        sc = get_schedule(name)
        da, ds = sc.derivatives(t)
        (ap, sp), (am, sm) = sc.alpha_sigma(t + h), sc.alpha_sigma(t - h)
        assert torch.allclose(da, (ap - am) / (2 * h), atol=1e-5), name
        assert torch.allclose(ds, (sp - sm) / (2 * h), atol=1e-5), name


def test_cfg_formula_and_batched_guidance():
    u, c = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0])
    assert torch.equal(cfg(u, c, 1.0), c) and torch.equal(cfg(u, c, 0.0), u)
    assert torch.allclose(cfg(u, c, 2.5), u + 2.5 * (c - u))

    class ByLabel(nn.Module):  # x0-prediction = label value (null label 3 -> 0)
        diffusion = {"schedule": "flow", "prediction": "x0", "sampler": "euler", "steps": 1, "guidance": 1.0}

        def forward(self, x, t, cond=None, w=None):
            return torch.where(cond[:, None] == 3, torch.zeros_like(x), cond[:, None].float().expand_as(x))

    x0, _ = predict(ByLabel(), torch.zeros(2, 1), torch.full((2,), 0.5), torch.tensor([1, 2]), guidance=3.0, num_classes=3)
    assert torch.allclose(x0.flatten(), torch.tensor([3.0, 6.0]))  # 0 + 3·(c − 0)


def test_samplers_reach_the_exact_flow_solution():
    # data N(2, 0.5²), flow schedule: the probability-flow ODE maps x₁ to x₀ = m + s·x₁ exactly
    model = GaussianFlow(2.0, 0.5)
    z = torch.linspace(-2, 2, 9)[:, None]
    exact = 2.0 + 0.5 * z
    heun50 = sample(model, z, steps=50, sampler="heun")
    assert torch.allclose(heun50, exact, atol=1e-3)
    err = {s: (sample(model, z, steps=6, sampler=s) - exact).abs().max().item() for s in ("euler", "heun")}
    assert err["heun"] < err["euler"] / 3  # second order
    assert torch.allclose(sample(model, z, steps=6, sampler="ddim"), sample(model, z, steps=6, sampler="euler"))
    g = torch.Generator().manual_seed(0)
    sde = sample(model, torch.randn(4000, 1, generator=g), steps=100, sampler="sde", generator=g)
    assert float(sde.mean()) == pytest.approx(2.0, abs=0.05) and float(sde.std()) == pytest.approx(0.5, abs=0.03)
    assert nfe("heun", 6, 1.0, False) == 11 and nfe("euler", 4, 2.0, True) == 8


def test_mmd_against_an_explicit_double_loop():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 2, generator=g), torch.randn(5, 2, generator=g) + 0.5
    scale, bws = 1.3, (0.5, 2.0)

    def k(a, b):
        return sum(math.exp(-float(((a - b) ** 2).sum()) / (2 * (w * scale) ** 2)) for w in bws)

    sxx = sum(k(x[i], x[j]) for i in range(4) for j in range(4) if i != j) / 12
    syy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / 20
    sxy = sum(k(x[i], y[j]) for i in range(4) for j in range(5)) / 20
    assert M.mmd(x, y, scale, bws) == pytest.approx(sxx + syy - 2 * sxy, rel=1e-6)
    big = torch.randn(600, 2, generator=g)
    assert abs(M.mmd(big[:300], big[300:])) < 0.01 < M.mmd(big[:300] + 0.5, big[300:])


def test_mode_stats_and_frechet():
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    x = torch.tensor([[0.1, 0.0], [0.0, 0.2], [0.0, 5.0], [10.0, 0.1]])
    prec, cov = M.mode_stats(x, centers, std=0.1, k=3.0, min_share=0.25)
    assert prec == pytest.approx(3 / 4) and cov == 1.0  # [0, 0.2] is 2σ away: within 3σ
    prec, cov = M.mode_stats(x[:3], centers, std=0.1, min_share=0.25)
    assert cov == 0.5
    from scipy import linalg

    g = torch.Generator().manual_seed(2)
    f1, f2 = torch.randn(200, 4, generator=g), torch.randn(300, 4, generator=g) @ torch.randn(4, 4, generator=g) + 1
    a, b = f1.double().numpy(), f2.double().numpy()
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert M.frechet(f1, f2) == pytest.approx(ref, rel=1e-6)
    assert M.diversity(f1, f1) == pytest.approx(1.0)


def test_denoiser_folder_round_trip_and_refusals(tmp_path):
    model = build_denoiser("mlp_denoiser", {"hidden": 16, "depth": 2, "prediction": "eps", "schedule": "vp_cosine"}, (2,), 4)
    model.diffusion["steps"] = 7
    save_denoiser(tmp_path / "m", model, {"name": "mlp_denoiser", "params": {"hidden": 16, "depth": 2, "prediction": "eps",
                                                                               "schedule": "vp_cosine"}}, (2,), 4)
    back = load_denoiser(tmp_path / "m")
    x, t, c = torch.randn(3, 2), torch.rand(3), torch.tensor([0, 1, 4])
    assert torch.equal(back(x, t, c), model(x, t, c)) and back.diffusion["steps"] == 7
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"format": "distill-sr-v1"}))
    with pytest.raises(MismatchError, match="not a denoiser"):
        load_denoiser(tmp_path / "other")


def test_phase_cycles_with_the_update_counter_in_the_state():
    model = build_denoiser("mlp_denoiser", {"hidden": 8, "depth": 1}, (2,), 0)
    d = DiffusionDistiller(model, None, DiffusionParams(steps=2), TaskInfo(0, 10, (2,)))
    seen = []
    for _ in range(7):
        seen.append(d.phase(["critic", "critic", "student"]))
        d.on_optimizer_step()
    assert seen == ["critic", "critic", "student"] * 2 + ["critic"]
    assert int(d.state_dict()["updates"]) == 7 and model.diffusion["steps"] == 2 and model.diffusion["sampler"] == "consistency"


def _teacher(epochs: int = 30) -> dict:
    return {"name": "tiny-ring-teacher", "seed": 0, "task": {"name": "ring8", "num_train": 2000, "num_val": 200,
                                                             "num_test": 400, "num_eval": 400},
            "student": {"arch": "mlp_denoiser", "hidden": 64, "depth": 2},
            "method": {"name": "diffusion_train", "steps": 20},
            "train": {"epochs": epochs, "batch_size": 256, "optimizer": "adam", "lr": 0.003, "weight_decay": 0.0}}


def test_teacher_training_and_naive_sampling_end_to_end(tmp_path):
    t = run_recipe(recipe_from_dict(_teacher()), out=tmp_path)
    m = t.metrics
    assert m["test/nfe"] == 20 and m["test/steps"] == 20
    assert m["test/precision"] > 0.3 and m["test/coverage"] == 1.0  # 240 steps find every mode
    assert (t.run_dir / "student" / "samples.png").stat().st_size > 1000
    naive = {"name": "naive1", "seed": 0, "task": _teacher()["task"], "init": {"recipe": _teacher()},
             "method": {"name": "naive", "steps": 1},
             "train": {"epochs": 1, "max_steps": 1, "batch_size": 64, "optimizer": "adam", "lr": 0.1, "weight_decay": 0.0}}
    n = run_recipe(recipe_from_dict(naive), out=tmp_path)
    from safetensors.torch import load_file

    a, b = load_file(str(t.run_dir / "student/model.safetensors")), load_file(str(n.run_dir / "student/model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # untouched weights
    assert n.metrics["test/nfe"] == 1
    assert n.metrics["test/mmd"] > 5 * max(m["test/mmd"], 1e-3)  # one Euler step blurs the ring: the baseline to beat


def test_digits_task_measures_real_images_as_good_and_noise_as_bad():
    from distill.core.registry import TASKS

    entry = TASKS.get("digits-diffusion")
    task = entry.obj(entry.params())
    test, train = task.test, task.train
    real = task.sample_metrics(test.x, test.y, test.x, train.x[:400])
    assert real["class_acc"] > 0.9  # the measuring classifier reads real digits
    assert real["fd"] == pytest.approx(0.0, abs=1e-6) and real["mmd"] < 0.01  # a set against itself
    g = torch.Generator().manual_seed(0)
    blurred = test.x + 0.5 * torch.randn(test.x.shape, generator=g)
    bad = task.sample_metrics(blurred.clamp(-1, 1), test.y, test.x, train.x[:400])
    assert bad["fd"] > 3 * real["fd_floor"] and bad["class_acc"] < real["class_acc"] and bad["mmd"] > 10 * real["mmd_floor"]
