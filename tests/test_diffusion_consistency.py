"""Consistency / progressive group of the diffusion family: ``progressive`` (B6), ``cd``, ``scott`` (S36), ``tscd`` (S25).

Pure pieces against hand values; the CD objective on a 1-D Gaussian whose teacher is exact (its target is the
teacher's ODE solution, its gradient points to it); the distinguishing pieces (EMA target, SDE step, segment
schedule, progressive rounds) each with a test that fails when the piece is replaced; short runs end to end with
bitwise resume.
"""

from __future__ import annotations

import math

import pytest
from conftest import resume_round_trip
from diffusion_helpers import tiny
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

import distill.diffusion  # noqa: F401  (registers the family)
from distill.core.distiller import TaskInfo
from distill.core.recipe import recipe_from_dict
from distill.core.runner import run_recipe
from distill.diffusion import consistency as C
from distill.diffusion.methods.cd import CD, CDParams
from distill.diffusion.methods.progressive import Progressive, ProgressiveParams
from distill.diffusion.methods.scott import Scott, ScottParams
from distill.diffusion.methods.tscd import TSCD, TSCDParams
from distill.diffusion.sampling import step as sampler_step
from distill.diffusion.schedules import get_schedule

FLOW = get_schedule("flow")
SPEC = {"schedule": "flow", "prediction": "velocity", "sampler": "euler", "steps": 50, "guidance": 1.0}
M, S = 0.7, 0.5  # the 1-D data N(M, S²)


def std_t(t: Tensor) -> Tensor:
    return torch.sqrt((1 - t) ** 2 * S**2 + t**2)


def ode_map(x: Tensor, t: Tensor, u: Tensor | float) -> Tensor:
    """The exact flow-ODE solution from (x, t) to time u for Gaussian data (the monotone Gaussian transport)."""
    u = torch.as_tensor(u, dtype=x.dtype).expand_as(t)
    return (1 - u)[:, None] * M + (std_t(u) / std_t(t))[:, None] * (x - (1 - t)[:, None] * M)


class GaussFlow(nn.Module):
    """The exact velocity of flow matching on N(M, S²): E[x₀|x_t] = M + (1−t)S²(x_t − (1−t)M)/((1−t)²S² + t²)."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))
        self.diffusion = dict(SPEC)

    def forward(self, x, t, cond=None, w=None):
        t = t.reshape(-1, 1)
        a = 1 - t
        x0 = M + a * S**2 * (x - a * M) / (a**2 * S**2 + t**2)
        eps = (x - a * x0) / t.clamp_min(1e-8)
        return eps - x0 + 0 * self.dummy


class ExactConsistency(nn.Module):
    """An x₀-predicting student whose LCM consistency function c_skip·x + c_out·x̂₀ is the exact ODE map to 0,
    shifted by a learnable ``b`` in x̂₀ (b = 0: the optimum)."""

    def __init__(self, b: float = 0.0) -> None:
        super().__init__()
        self.b = nn.Parameter(torch.tensor(b))
        self.diffusion = {**SPEC, "prediction": "x0"}

    def forward(self, x, t, cond=None, w=None):
        c_skip, c_out = C.boundary_scalings(t.reshape(-1, 1))
        exact = ode_map(x, t, 0.0)
        x0 = torch.where(c_out > 1e-12, (exact - c_skip * x) / c_out.clamp_min(1e-12), x)
        return x0 + self.b


INFO = TaskInfo(num_classes=0, num_train=1, input_shape=(1,))


def method(cls, params_cls, student=None, **kw):
    student = student if student is not None else GaussFlow()
    return cls(student, GaussFlow(), params_cls(**kw), INFO)


# --- pure pieces against hand values -------------------------------------------------------------------------
def test_boundary_scalings_and_pseudo_huber_by_hand():
    cs, co = C.boundary_scalings(torch.tensor([0.0, 0.001, 0.5]))
    assert cs[0] == 1 and co[0] == 0  # f(x, 0) = x
    assert cs[1].item() == pytest.approx(0.25 / (100 + 0.25)) and co[1].item() == pytest.approx(10 / math.sqrt(100.25))
    assert cs[2].item() == pytest.approx(0.25 / (5000**2 + 0.25)) and co[2].item() == pytest.approx(5000 / math.sqrt(5000**2 + 0.25))
    a, b = torch.tensor([[0.0, 3.0]]), torch.tensor([[4.0, 3.0]])
    assert C.pseudo_huber(a, b, 1.0).item() == pytest.approx(((math.sqrt(17) - 1) + 0) / 2)
    # the segment-wise map equals x_t at its own start, and is the DDIM jump far from it
    x, x0, eps = torch.tensor([[0.3]]), torch.tensor([[1.0]]), torch.tensor([[-2.0]])
    assert C.consistency_fn(x, x0, eps, torch.tensor([0.25]), 0.25, FLOW).item() == pytest.approx(0.3)
    far = C.consistency_fn(x, x0, eps, torch.tensor([0.75]), 0.25, FLOW).item()
    assert far == pytest.approx(0.75 * 1.0 + 0.25 * -2.0, abs=1e-6)


def test_progressive_target_equals_two_hand_ddim_steps():
    """A linear toy teacher x̂₀ = 0.5·x + 0.1; two DDIM steps by hand with scalars; the student's one DDIM step
    from z_t with the target (x̃, ε̃) must land on the teacher's z_s."""

    def fn(x, t):
        x0 = 0.5 * x + 0.1
        return x0, (x - (1 - t)[:, None] * x0) / t[:, None]

    z = torch.tensor([[0.8], [-1.3]])
    t, s = torch.tensor([0.75, 0.5]), torch.tensor([0.5, 0.0])
    x_t, e_t = C.progressive_target(fn, z, t, s, FLOW)
    for k in range(2):
        zt, tt, ss = z[k, 0].item(), t[k].item(), s[k].item()
        mid = (tt + ss) / 2
        x0 = 0.5 * zt + 0.1
        e = (zt - (1 - tt) * x0) / tt
        zm = (1 - mid) * x0 + mid * e
        x0 = 0.5 * zm + 0.1
        e = (zm - (1 - mid) * x0) / mid
        zs = (1 - ss) * x0 + ss * e
        want = zs if ss == 0 else (zs - (ss / tt) * zt) / ((1 - ss) - (ss / tt) * (1 - tt))
        assert x_t[k, 0].item() == pytest.approx(want, rel=1e-5)
        assert e_t[k, 0].item() == pytest.approx((zt - (1 - tt) * want) / tt, rel=1e-5)
        one_step = (1 - ss) * x_t[k, 0].item() + ss * e_t[k, 0].item()  # the student's DDIM step with the targets
        assert one_step == pytest.approx(zs, rel=1e-5)
    x0, eps = torch.tensor([[1.0, 1.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [3.0, 1.0]])
    assert C.snr_trunc_loss(x0, eps, torch.zeros(2, 2), torch.zeros(2, 2)).item() == pytest.approx((1.0 + 5.0) / 2)


def test_progressive_rounds_and_round_teacher_handover():
    assert C.progressive_rounds(32, 1) == [16, 8, 4, 2, 1]
    assert C.progressive_rounds(32, 4) == [16, 8, 4]
    with pytest.raises(ValueError):
        C.progressive_rounds(24, 4)
    d = method(Progressive, ProgressiveParams, steps=1, start_steps=8)  # rounds 4, 2, 1
    d.on_train_start(9, 1)
    seen = []
    for k in range(9):
        with torch.no_grad():
            d.student.dummy.fill_(float(k + 1))  # the "optimizer step"
        d.on_optimizer_step()
        seen.append((int(d.round), d.round_teacher.dummy.item()))
    # rounds of 3 steps: at the 3rd and 6th step the student (then at 3 and 6) becomes the next teacher
    assert seen == [(0, 0.0), (0, 0.0), (1, 3.0), (1, 3.0), (1, 3.0), (2, 6.0), (2, 6.0), (2, 6.0), (2, 6.0)]
    assert d.student.diffusion["sampler"] == "ddim" and d.student.diffusion["steps"] == 1


def test_progressive_on_gaussian_targets_two_exact_teacher_steps():
    """Round 0 with the exact teacher: the target lands a student DDIM step on the teacher's two-step z_s, and the
    exact teacher (as student) has a small but non-zero loss (two DDIM steps ≠ one)."""
    d = method(Progressive, ProgressiveParams, steps=1, start_steps=4)
    d.on_train_start(10, 1)
    torch.manual_seed(0)
    step = d.training_step({"x": M + S * torch.randn(512, 1), "y": torch.full((512,), -1)})
    assert 0 < step.losses["student"].item() < 0.5


# --- CD on a Gaussian with an exact teacher --------------------------------------------------------------------
@pytest.mark.parametrize("solver", ["heun", "ddim"])
def test_cd_target_is_the_teachers_ode_solution(solver):
    """With the exact teacher and a target network equal to the exact consistency map, the CD target
    f_θ⁻(x̂_s, s) equals the ODE solution φ(x_t, t → 0) (to the solver's error); the teacher's step moved x_t."""
    d = method(CD, CDParams, student=ExactConsistency(), solver=solver, skip=20, loss="l2")
    torch.manual_seed(0)
    x0 = M + S * torch.randn(256, 1)
    t = torch.linspace(0.05, 0.999, 256)
    pred, target, x_s, _ = d.cd_pair(x0, None, t)
    x_t = (pred - 0)  # pred = f_θ(x_t, t) = φ(x_t, t → 0) exactly at b = 0
    tol = 2e-4 if solver == "heun" else 5e-3
    assert (target - pred).abs().max().item() < tol
    assert (x_s - target).abs().max().item() > 0.05  # the target is not just the teacher's point
    # an explicit check against φ from the noised input (rebuilt: same seed, same draws)
    torch.manual_seed(0)
    x0b = M + S * torch.randn(256, 1)
    xt = (1 - t)[:, None] * x0b + t[:, None] * torch.randn_like(x0b)
    assert (target - ode_map(xt, t, 0.0)).abs().max().item() < tol
    assert (x_t - ode_map(xt, t, 0.0)).abs().max().item() < 1e-4


def test_cd_gradient_points_to_the_ode_solution():
    """The student's offset b in x̂₀: the CD loss's gradient has the sign of b (descent moves it to 0), and a few
    steps of gradient descent bring it close to the optimum."""
    torch.manual_seed(0)
    x0 = M + S * torch.randn(256, 1)
    for b in (0.3, -0.3):
        d = method(CD, CDParams, student=ExactConsistency(b), loss="l2")
        with torch.no_grad():
            d.target.b.zero_()  # θ⁻ at the optimum
        loss = d.training_step({"x": x0, "y": torch.full((256,), -1)}).losses["student"]
        (g,) = torch.autograd.grad(loss, d.student.b)
        assert g.item() * b > 0
    # the boundary f(x, 0) = x anchors b through the first solver interval only: 4 intervals (skip 250) so that a
    # quarter of the draws carry it, and the EMA target propagates it to the other times
    d = method(CD, CDParams, student=ExactConsistency(0.3), loss="l2", ema_decay=0.5, skip=250)
    opt = torch.optim.SGD(d.student.parameters(), lr=0.5)
    for _ in range(60):
        loss = d.training_step({"x": x0, "y": torch.full((256,), -1)}).losses["student"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        d.on_optimizer_step()
    assert abs(d.student.b.item()) < 0.03


def test_cd_ema_target_follows_the_exact_recursion():
    """θ⁻_k = μθ⁻_{k−1} + (1 − μ)θ_k after every optimizer step (fails if the target is the online network)."""
    d = method(CD, CDParams, student=ExactConsistency(0.0), ema_decay=0.9)
    want = 0.0
    for k, b in enumerate([1.0, 2.0, -1.0, 0.5]):
        with torch.no_grad():
            d.student.b.fill_(b)
        d.on_optimizer_step()
        want = 0.9 * want + 0.1 * b
        assert d.target.b.item() == pytest.approx(want, abs=1e-6), k
    assert int(d.updates) == 4
    assert d.target is not d.student and not any(p.requires_grad for p in d.target.parameters())
    assert d.student.diffusion["sampler"] == "consistency"


def test_cd_guidance_sampled_and_embedded():
    """LCM: w ~ U[w_min, w_max] per example, the teacher at CFG w, the w-embedding student gets w."""
    from distill.diffusion.models import build_denoiser

    torch.manual_seed(0)
    st = build_denoiser("mlp_denoiser", {"hidden": 16, "depth": 1, "guidance_embed": True}, (2,), 4)
    te = build_denoiser("mlp_denoiser", {"hidden": 16, "depth": 1}, (2,), 4)
    d = CD(st, te, CDParams(w_min=1.0, w_max=3.0), TaskInfo(num_classes=4, num_train=1, input_shape=(2,)))
    assert d.embeds_w
    seen = {}
    real = st.forward

    def spy(x, t, cond=None, w=None):
        seen["w"] = w
        return real(x, t, cond, w)

    st.forward = spy
    loss = d.training_step({"x": torch.randn(64, 2), "y": torch.randint(0, 4, (64,))}).losses["student"]
    assert torch.isfinite(loss) and seen["w"] is not None and seen["w"].shape == (64,)
    assert 1.0 <= seen["w"].min() and seen["w"].max() <= 3.0 and seen["w"].std() > 0.3
    # per-sample CFG equals the scalar CFG sample by sample
    x, t, c = torch.randn(3, 2), torch.full((3,), 0.5), torch.tensor([0, 1, 2])
    w = torch.tensor([1.0, 2.0, 3.0])
    per = C.cfg_x0_eps(te, x, t, c, w, 4)[0]
    for k in range(3):
        one = C.cfg_x0_eps(te, x[k : k + 1], t[k : k + 1], c[k : k + 1], float(w[k]), 4)[0]
        assert torch.allclose(per[k], one[0], atol=1e-6)


# --- SCott: the SDE step -------------------------------------------------------------------------------------
def test_sde_step_between_ddim_and_the_ddpm_posterior():
    """η = 0 is the DDIM step; η = 1 is the ancestral sampler's DDPM-posterior step (same noise)."""
    model = GaussFlow()
    x = torch.randn(5, 1)
    t, s = torch.tensor(0.7), torch.tensor(0.4)

    def fn(xx, tt):
        from distill.diffusion.sampling import predict

        return predict(model, xx, tt)

    tb, sb = t.expand(5), s.expand(5)
    z = torch.randn(5, 1, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(C.sde_step(fn, x, tb, sb, FLOW, 0.0, z), sampler_step(model, FLOW, "ddim", x, t, s, None, 1.0, 0))
    anc = sampler_step(model, FLOW, "sde", x, t, s, None, 1.0, 0, torch.Generator().manual_seed(3))
    assert torch.allclose(C.sde_step(fn, x, tb, sb, FLOW, 1.0, z), anc, atol=1e-6)


def test_scott_teacher_step_is_stochastic_with_the_set_noise():
    """Scott's teacher step from one x_t: spread c = η·(posterior std), mean the DDIM-like mean; a break to the ODE
    step (no noise) fails here."""
    d = method(Scott, ScottParams, eta=0.5)
    x = torch.full((4000, 1), 0.3)
    t, s = torch.full((4000,), 0.6), torch.full((4000,), 0.3)
    torch.manual_seed(0)

    def fn(xx, tt):
        return C.cfg_x0_eps(d.teacher, xx, tt, None, 1.0, 0)

    out = d.teacher_step(fn, x, t, s)
    c = C.sde_noise_scale(t[:1], s[:1], FLOW, 0.5, x[:1]).item()
    assert c > 0.05
    assert out.std().item() == pytest.approx(c, rel=0.08)
    x0, eps = fn(x[:1], t[:1])
    mean = (1 - 0.3) * x0 + math.sqrt(0.3**2 - c**2) * eps
    assert out.mean().item() == pytest.approx(mean.item(), abs=4 * c / math.sqrt(4000))


# --- TSCD: segments and their schedule -----------------------------------------------------------------------
def test_tscd_segment_boundaries_and_stage_schedule():
    assert torch.allclose(C.segment_boundaries(4), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    t = torch.tensor([0.0, 0.1, 0.25, 0.26, 0.5, 0.74, 0.75, 0.76, 1.0])
    assert torch.allclose(C.segment_start(t, 4), torch.tensor([0.0, 0.0, 0.0, 0.25, 0.25, 0.5, 0.5, 0.75, 0.75]))
    assert torch.allclose(C.segment_start(t, 1), torch.zeros(9))
    sched = [C.tscd_segments(k, 100) for k in range(100)]
    assert sched == [8] * 25 + [4] * 25 + [2] * 25 + [1] * 25
    assert [C.tscd_segments(k, 10) for k in range(12)] == [8, 8, 4, 4, 2, 2, 1, 1, 1, 1, 1, 1]
    d = method(TSCD, TSCDParams)
    d.on_train_start(8, 1)
    got = []
    for _ in range(8):
        got.append(d.segments())
        d.on_optimizer_step()
    assert got == [8, 8, 4, 4, 2, 2, 1, 1]


def test_tscd_target_maps_to_the_segment_start():
    """8 segments: for t one solver step above a boundary the target is the teacher's point itself (f(x, b → b) = x);
    the target lies at the segment start, on the ODE path; at one segment it is CD's target (the ODE solution at 0)."""
    d = method(TSCD, TSCDParams, student=ExactConsistency(), skip=25)  # 40 solver steps: boundaries on the grid
    d.on_train_start(100, 1)
    b = d.t_max * 3 / 8
    t = torch.full((64,), b + d.t_max * 25 / 1000)

    def pair():
        torch.manual_seed(0)
        return d.cd_pair(M + S * torch.randn(64, 1), None, t)

    _, target, x_s, nseg = pair()
    assert nseg == 8
    assert torch.allclose(target, x_s, atol=1e-6)
    torch.manual_seed(0)
    xt = (1 - t)[:, None] * (M + S * torch.randn(64, 1)) + t[:, None] * torch.randn(64, 1)
    assert (target - ode_map(xt, t, b)).abs().max().item() < 1e-4  # Heun onto the segment start
    d.updates.fill_(99)  # the last stage: one segment, plain CD
    _, target1, _, nseg1 = pair()
    assert nseg1 == 1
    assert (target1 - ode_map(xt, t, 0.0)).abs().max().item() < 2e-4
    assert (target1 - target).abs().max().item() > 0.05


# --- end to end: tiny runs, bitwise resume ---------------------------------------------------------------------
def resume_bitwise(data: dict, runs, stop: int):
    straight, _ = resume_round_trip(data, runs, stop)
    return straight, load_file(str(straight.run_dir / "checkpoints/latest/model.safetensors"))


def test_cd_end_to_end_resumes_bitwise_with_its_ema_target(tmp_path):
    straight, ck = resume_bitwise(tiny({"name": "cd", "steps": 2, "ema_decay": 0.9}, 6, "cd"), tmp_path, 3)
    assert any(k.startswith("target.") for k in ck) and int(ck["updates"]) == 6
    assert straight.metrics["test/steps"] == 2 and straight.metrics["test/nfe"] == 2
    diff = max((ck[k] - ck["student." + k[len("target."):]]).abs().max().item() for k in ck if k.startswith("target."))
    assert diff > 0  # the target lags the online student


def test_progressive_end_to_end_resumes_across_a_round(tmp_path):
    # rounds 2 -> 1 steps, 3 optimizer steps each; interrupted after the hand-over, resumed
    straight, ck = resume_bitwise(tiny({"name": "progressive", "steps": 1, "start_steps": 4}, 6, "pd"), tmp_path, 4)
    assert int(ck["round"]) == 1 and any(k.startswith("round_teacher.") for k in ck)
    rows = [r for r in straight.history if "train/round_steps" in r]
    assert [r["train/round_steps"] for r in rows] == [2, 2, 2, 1, 1, 1]


@pytest.mark.parametrize("name,extra", [("scott", {"eta": 0.5}), ("tscd", {"stages": [2, 1]})])
def test_scott_and_tscd_end_to_end(tmp_path, name, extra):
    res = run_recipe(recipe_from_dict(tiny({"name": name, "steps": 4, **extra}, 4, name)), out=tmp_path)
    assert res.metrics["test/steps"] == 4 and 0 <= res.metrics["test/precision"] <= 1
    if name == "tscd":
        assert [r["train/segments"] for r in res.history if "train/segments" in r] == [2, 2, 1, 1]
