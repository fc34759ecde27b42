"""The continuous-time consistency group: ``scm``, ``sana_sprint``, ``rcm`` (``distill.diffusion.scm``).

TrigFlow <-> flow conversion, the JVP tangent against finite differences, the tangent normalisation,
sCM on a 1-D Gaussian with an exact teacher and a student family that holds the exact consistency
function, the official rCM / LADD pieces against explicit formulas, the multi-rate cycles, and short
runs end to end with exact resume."""

from __future__ import annotations

import math

import pytest
from conftest import resume_round_trip
import torch
from safetensors.torch import load_file
from torch import nn

from distill.core.distiller import TaskInfo
from distill.core.recipe import recipe_from_dict
from distill.core.runner import run_recipe
from distill.diffusion import scm as S
from distill.diffusion.dmd import dmd_grad
from distill.diffusion.methods.rcm import RCM, RCMParams
from distill.diffusion.methods.sana_sprint import SanaSprint, SanaSprintParams
from distill.diffusion.methods.scm import SCM, SCMParams
from distill.diffusion.models import build_denoiser
from distill.diffusion.schedules import get_schedule, to_x0_eps

M, SD = 1.0, 0.5  # the data N(M, SD²)
SPEC = {"schedule": "flow", "prediction": "velocity", "sampler": "euler", "steps": 50, "guidance": 1.0}


class Gaussian(nn.Module):
    """Flow-schedule velocity models for 1-D data N(m, s²) with (m, s) as parameters.

    ``kind="denoiser"``: the exact teacher, x̂₀ = E[x₀|x_t]. ``kind="ode"``: x̂₀ = the exact PF-ODE
    solution m + s(x_t − (1 − t)m)/√((1 − t)²s² + t²) (the ODE maps standardised quantiles), i.e. a
    consistency function; at (m, s) = (M, SD) it is the teacher's ODE solution."""

    def __init__(self, m: float, s: float, kind: str, learn: bool = False) -> None:
        super().__init__()
        self.m = nn.Parameter(torch.tensor(float(m)), requires_grad=learn)
        self.s = nn.Parameter(torch.tensor(float(s)), requires_grad=learn)
        self.kind = kind
        self.diffusion = dict(SPEC)

    def forward(self, x, t, cond=None, w=None):
        t = t.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        a = 1 - t
        if self.kind == "denoiser":
            x0 = self.m + a * self.s**2 * (x - a * self.m) / (a**2 * self.s**2 + t**2)
        else:
            x0 = self.m + self.s * (x - a * self.m) / torch.sqrt(a**2 * self.s**2 + t**2)
        return (x - x0) / t.clamp_min(1e-9)  # velocity ε̂ − x̂₀ with x_t = (1 − t)x̂₀ + tε̂


def _info(dim: int = 1, classes: int = 0) -> TaskInfo:
    return TaskInfo(num_classes=classes, num_train=100, input_shape=(dim,))


def _batch(n: int, gen: torch.Generator) -> dict:
    return {"x": M + SD * torch.randn(n, 1, generator=gen), "y": -torch.ones(n, dtype=torch.long),
            "index": torch.arange(n)}


# --- (1) TrigFlow <-> flow ----------------------------------------------------------------------------
def test_trigflow_flow_conversion_identity():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(64, 3, generator=g), torch.randn(64, 3, generator=g)
    s = torch.rand(64, generator=g) * 1.56 + 0.005
    x_u = torch.cos(s)[:, None] * x0 + torch.sin(s)[:, None] * eps
    x_m, t = S.model_point("flow", x_u, s)
    # the same (x₀, ε) at flow time t = sin/(sin + cos), x scaled by 1/(sin + cos)
    torch.testing.assert_close(t, torch.sin(s) / (torch.sin(s) + torch.cos(s)))
    torch.testing.assert_close(x_m, (1 - t)[:, None] * x0 + t[:, None] * eps, atol=1e-6, rtol=0)
    torch.testing.assert_close(S.angle_of_flow_time(t), s, atol=1e-6, rtol=0)
    for name in ("trigflow", "vp_cosine"):
        xm, tm = S.model_point(name, x_u, s)
        torch.testing.assert_close(get_schedule(name).add_noise(x0, eps, tm), xm, atol=2e-5, rtol=0)
    # a flow model's (x̂₀, ε̂) read at the TrigFlow point: F = d/ds (cos s x₀ + sin s ε), f = x₀
    teacher = Gaussian(M, SD, "denoiser")
    xu = torch.randn(32, 1, generator=g, dtype=torch.float64)
    ss = torch.rand(32, generator=g, dtype=torch.float64) * 1.5 + 0.03
    x0h, epsh = S.trig_x0_eps(teacher, xu, ss, None)
    xm, tm = S.model_point("flow", xu, ss)
    ref = to_x0_eps(teacher(xm, tm), "velocity", xm, tm, get_schedule("flow"))
    torch.testing.assert_close(x0h, ref[0])
    torch.testing.assert_close(torch.cos(ss)[:, None] * x0h + torch.sin(ss)[:, None] * epsh, xu)
    F_ = S.velocity_F(x0h, epsh, ss)
    torch.testing.assert_close(F_, torch.cos(ss)[:, None] * epsh - torch.sin(ss)[:, None] * x0h)
    torch.testing.assert_close(S.consistency_f(0.5 * xu, ss, F_, 0.5), 0.5 * x0h)  # σ_d-scaled coordinates


# --- (1) the tangent: JVP against finite differences, the official formulas ---------------------------
def test_tangent_matches_finite_difference_of_f():
    g = torch.Generator().manual_seed(1)
    sd = 0.5
    student = Gaussian(0.3, 1.4, "denoiser").double()  # any smooth model; not consistent
    teacher = Gaussian(M, SD, "denoiser").double()
    x = sd * torch.randn(16, 1, generator=g, dtype=torch.float64)
    s = torch.rand(16, generator=g, dtype=torch.float64) * 1.4 + 0.1
    v = sd * S.trig_F(teacher, x / sd, s, None)  # dx/ds from the teacher

    def Fn(xu, ss):
        return S.trig_F(student, xu, ss, None)

    def f(xx, ss):
        return S.consistency_f(xx, ss, Fn(xx / sd, ss), sd)

    F_, dF = S.jvp_F(Fn, x / sd, s, v / sd)
    h = 1e-5
    fd_F = (Fn((x + h * v) / sd, s + h) - Fn((x - h * v) / sd, s - h)) / (2 * h)
    torch.testing.assert_close(dF, fd_F, atol=1e-6, rtol=1e-6)
    fd_f = (f(x + h * v, s + h) - f(x - h * v, s - h)) / (2 * h)
    gt = S.tangent(x, s, F_, v, dF, 1.0, sd)
    torch.testing.assert_close(gt, torch.cos(s)[:, None] * fd_f, atol=1e-6, rtol=1e-6)  # g = cos s·df⁻/ds at r = 1
    # warm-up r: the official expressions written out (SANA; rCM)
    c, sn = torch.cos(s)[:, None], torch.sin(s)[:, None]
    r = 0.3
    sana = -c * c * (sd * F_ - v) - r * (c * sn * x + sd * c * sn * dF)
    torch.testing.assert_close(S.tangent(x, s, F_, v, dF, r, sd, "sana"), sana)
    rcm = -c * torch.sqrt(1 - r**2 * sn**2) * (sd * F_ - v) - r * (c * sn * x + sd * c * sn * dF)
    torch.testing.assert_close(S.tangent(x, s, F_, v, dF, r, sd, "rcm"), rcm)


def test_tangent_normalisation_and_losses_against_explicit_loops():
    g = torch.Generator().manual_seed(2)
    gg = torch.randn(5, 2, 3, generator=g) * torch.tensor([0.01, 1.0, 10.0, 100.0, 0.0])[:, None, None]
    out = S.normalise_tangent(gg, 0.1)
    for i in range(5):
        torch.testing.assert_close(out[i], gg[i] / (math.sqrt(float((gg[i] ** 2).sum())) + 0.1))
    assert S.normalise_tangent(gg, 0.1, double=True).dtype == torch.float64
    F_, Fm, s = torch.randn(5, 2, 3, generator=g), torch.randn(5, 2, 3, generator=g), torch.rand(5, generator=g) + 0.1
    lv = torch.randn(5, generator=g)
    want = sum(((1 / (0.5 * math.tan(float(s[i])))) / math.exp(float(lv[i])) * (F_[i] - Fm[i] - out[i]) ** 2
                + float(lv[i])).sum() for i in range(5)) / F_.numel()
    torch.testing.assert_close(S.scm_loss(F_, Fm, out, s, 0.5, lv), want)
    torch.testing.assert_close(S.rcm_scm_loss(F_, Fm, out).float(), ((F_ - Fm - out) ** 2).sum((1, 2)))
    a, b = torch.randn(4, 2), torch.randn(4, 2)
    a[1, 0] = float("nan")
    ma, mb = S.mask_nan_rows(a, b)
    assert (ma[1] == 0).all() and (mb[1] == 0).all() and torch.equal(ma[0], a[0])
    # LADD losses (official hinge and BCE)
    real, fake = torch.tensor([[2.0, 0.5]]), torch.tensor([[-2.0, 0.5]])
    assert float(S.d_loss(real, fake, "hinge")) == pytest.approx(0.5 * ((0 + 0.5) / 2 + (0 + 1.5) / 2))
    assert float(S.g_loss(fake, "hinge")) == pytest.approx(0.75)
    sp = torch.nn.functional.softplus
    assert float(S.d_loss(real, fake, "bce")) == pytest.approx(float(sp(fake).mean() + sp(-real).mean()), rel=1e-6)


# --- (2) sCM on a 1-D Gaussian ------------------------------------------------------------------------
def _scm(student: nn.Module, **kw) -> SCM:
    p = SCMParams(steps=1, tangent_warmup=0, adaptive_weight=False, **kw)
    return SCM(student, Gaussian(M, SD, "denoiser"), p, _info())


def test_scm_moves_an_ill_initialised_student_to_the_teacher_ode_solution():
    torch.manual_seed(0)
    d = _scm(Gaussian(0.3, 1.5, "ode", learn=True))
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(d.param_groups()["student"], lr=0.05)
    for _ in range(150):
        loss, _ = d.scm_loss(d.data(_batch(256, gen)), None)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(d.student.m.detach()) == pytest.approx(M, abs=0.02) and float(d.student.s.detach()) == pytest.approx(SD, abs=0.02)
    # the one-step sample x̂₀(noise) now follows the teacher's ODE: N(M, SD²)
    z = torch.randn(4000, 1, generator=torch.Generator().manual_seed(3))
    x0 = S.trig_x0_eps(d.student, z, torch.full((4000,), S.HALF_PI - 1e-4), None)[0]
    assert float(x0.mean()) == pytest.approx(M, abs=0.05) and float(x0.std()) == pytest.approx(SD, abs=0.05)


def test_scm_gradient_vanishes_at_the_ode_solution_and_not_at_the_teacher():
    """The distinguishing piece: at the exact consistency function the sCM gradient is 0, while a
    student equal to the teacher's denoiser (what plain regression on the teacher converges to) still
    gets a gradient; regression on the teacher would do the opposite."""
    gen = torch.Generator().manual_seed(4)
    for kind, zero in (("ode", True), ("denoiser", False)):
        torch.manual_seed(0)
        d = _scm(Gaussian(M, SD, kind, learn=True))
        loss, _ = d.scm_loss(d.data(_batch(512, gen)), None)
        grads = torch.autograd.grad(loss, d.param_groups()["student"])
        norm = float(torch.stack([gr.abs() for gr in grads]).max())
        assert (norm < 1e-5) if zero else (norm > 1e-2), (kind, norm)


def test_tangent_normalisation_bounds_the_update():
    """The gradient of the sCM loss is bounded by the normalisation whatever the student's error:
    without g/(‖g‖ + 0.1) it grows with the mismatch."""
    gen = torch.Generator().manual_seed(5)
    norms = []
    for m in (20.0, 2000.0):
        torch.manual_seed(0)
        d = _scm(Gaussian(m, SD, "ode", learn=True))
        loss, _ = d.scm_loss(d.data(_batch(256, gen)), None)
        norms.append(float(torch.autograd.grad(loss, [d.student.m])[0].abs()))
    assert norms[1] < 2 * norms[0], norms


# --- (3) the multi-rate cycles ------------------------------------------------------------------------
def _tiny(dim: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_denoiser("mlp_denoiser", {"hidden": 16, "depth": 2}, (dim,), 0)


def _cycle(d, n: int):
    groups = d.param_groups()
    opts = {k: torch.optim.Adam(v, lr=1e-3) for k, v in groups.items()}
    gen = torch.Generator().manual_seed(0)
    seen = []
    for _ in range(n):
        before = {k: [p.detach().clone() for p in v] for k, v in groups.items()}
        out = d.training_step({"x": torch.randn(32, 2, generator=gen), "y": -torch.ones(32, dtype=torch.long),
                               "index": torch.arange(32)})
        sum(out.losses.values()).backward()
        for o in opts.values():
            o.step()
            o.zero_grad(set_to_none=True)
        d.on_optimizer_step()
        (name,) = out.losses
        moved = {k for k, v in groups.items() if any(not torch.equal(a, b) for a, b in zip(before[k], v))}
        assert moved == {name}, (name, moved)  # only the phase's group moves
        seen.append(name)
    return seen


def test_sana_sprint_alternates_student_and_disc():
    teacher = _tiny()
    d = SanaSprint(_tiny(seed=1), teacher, SanaSprintParams(steps=1, tangent_warmup=2), _info(2))
    seen = _cycle(d, 6)
    assert seen == ["student", "disc"] * 3
    assert not any(p.requires_grad for p in teacher.parameters())  # the teacher under the heads stays frozen


def test_rcm_student_every_fifth_step_after_the_warmup():
    teacher = _tiny()
    d = RCM(_tiny(seed=1), teacher, RCMParams(steps=1, tangent_warmup=2, student_every=5, max_sim=2), _info(2))
    seen = _cycle(d, 12)
    assert [i for i, n in enumerate(seen) if n == "student"] == [0, 1, 5, 10]  # official is_student_phase
    assert seen.count("critic") == 8


def test_rcm_dmd_term_equals_the_official_sum():
    g = torch.Generator().manual_seed(6)
    G = torch.randn(4, 3, 2, generator=g, requires_grad=True)
    real, fake = torch.randn(4, 3, 2, generator=g), torch.randn(4, 3, 2, generator=g)
    from distill.diffusion.dmd import dmd_loss

    ours = 2 * G[0].numel() * dmd_loss(G, real, fake)
    w = (G.detach().double() - real.double()).abs().mean((1, 2), keepdim=True).clip(min=1e-5)
    grad = (fake.double() - real.double()) / w
    official = ((G.double() - (G.double() - grad).detach()) ** 2).sum((1, 2)).mean()
    torch.testing.assert_close(ours.double(), official, rtol=1e-5, atol=1e-6)
    ga = torch.autograd.grad(ours, G)[0]
    torch.testing.assert_close(ga.double(), 2 * dmd_grad(G.detach(), real, fake) / 4, rtol=1e-5, atol=1e-6)


# --- (4) end to end, with exact resume -----------------------------------------------------------------
TASK = {"name": "ring8", "num_train": 1000, "num_val": 200, "num_test": 400, "num_eval": 400}


def _teacher() -> dict:
    return {"name": "tiny-ring-teacher", "seed": 0, "task": TASK,
            "student": {"arch": "mlp_denoiser", "hidden": 32, "depth": 2},
            "method": {"name": "diffusion_train", "steps": 10},
            "train": {"epochs": 2, "batch_size": 256, "optimizer": "adam", "lr": 0.003, "weight_decay": 0.0}}


def _recipe(method: dict) -> dict:
    return {"name": f"tiny-{method['name']}", "seed": 0, "task": TASK, "teacher": {"recipe": _teacher()},
            "init": {"recipe": _teacher()}, "method": method,
            "train": {"epochs": 5, "max_steps": 8, "batch_size": 128, "optimizer": "adam", "lr": 1e-3,
                      "weight_decay": 0.0, "schedule": "constant", "eval_every": 4, "grad_clip": 0.1}}


@pytest.mark.parametrize("method", [
    {"name": "scm", "steps": 2, "tangent_warmup": 3},
    {"name": "sana_sprint", "steps": 2, "tangent_warmup": 3},
    {"name": "rcm", "steps": 2, "tangent_warmup": 2, "student_every": 3, "max_sim": 2},
])
def test_end_to_end_and_exact_resume(tmp_path, method):
    data = _recipe(method)
    straight = run_recipe(recipe_from_dict(data), out=tmp_path / "a")
    assert straight.metrics["test/nfe"] == 2 and straight.metrics["test/steps"] == 2
    assert math.isfinite(straight.metrics["test/mmd"])
    _, resumed = resume_round_trip(data, tmp_path / "r", 5)
    ck = load_file(str(straight.run_dir / "checkpoints/latest/model.safetensors"))
    extra = {"scm": "logvar.", "sana_sprint": "disc.", "rcm": "critic."}[method["name"]]
    assert any(k.startswith(extra) for k in ck) and int(ck["updates"]) == 8  # the extra module is checkpointed
    assert straight.metrics["test/mmd"] == resumed.metrics["test/mmd"]
    # the student changed (the teacher's weights are the init)
    init = load_file(str(next((tmp_path / "a" / "_teachers").iterdir()) / "student/model.safetensors"))
    final = load_file(str(straight.run_dir / "student/model.safetensors"))
    assert any(not torch.equal(init[k], final[k]) for k in init)
