"""The distribution-matching group: ``dmd`` (DMD2), ``decoupled_dmd`` (S16), ``phased_dmd`` (S17),
``flash_dmd`` (S54), and their pure pieces (``diffusion/dmd.py``, ``diffusion/dmd_parts.py``)."""

from __future__ import annotations

import copy
import math

import pytest
from conftest import resume_round_trip
from diffusion_helpers import tiny
import torch
from safetensors.torch import load_file
from torch import nn

from distill.core.distiller import TaskInfo
from distill.core.recipe import recipe_from_dict
from distill.core.runner import run_recipe
from distill.diffusion import dmd_parts as P
from distill.diffusion.dmd import dmd_grad, dmd_loss
from distill.diffusion.methods.decoupled_dmd import DecoupledDMD, DecoupledParams
from distill.diffusion.methods.dmd import DMD, DMDParams
from distill.diffusion.methods.flash_dmd import FlashDMD, FlashParams
from distill.diffusion.methods.phased_dmd import PhasedDMD, PhasedParams
from distill.diffusion.models import build_denoiser
from distill.diffusion.sampling import default_t_max, time_grid
from distill.diffusion.schedules import get_schedule
from distill.tasks.base import ArrayDataset

SPEC = {"schedule": "flow", "prediction": "velocity", "sampler": "euler", "steps": 8, "guidance": 1.0}


# --- exact 1-D Gaussian models (flow schedule, velocity) -------------------------------------------------------
class GaussDenoiser(nn.Module):
    """The exact denoiser of data N(m, s²): E[x₀|x_t] = m + (1−t)s²(x_t − (1−t)m)/((1−t)²s² + t²)."""

    def __init__(self, m: float, s: float) -> None:
        super().__init__()
        self.m = nn.Parameter(torch.tensor(float(m)))
        self.log_s = nn.Parameter(torch.tensor(math.log(s)))
        self.diffusion = dict(SPEC)

    def forward(self, x, t, cond=None, w=None):
        t = t.reshape(-1, 1)
        s2 = self.log_s.exp() ** 2
        x0 = self.m + (1 - t) * s2 * (x - (1 - t) * self.m) / ((1 - t) ** 2 * s2 + t**2)
        eps = (x - (1 - t) * x0) / t
        return eps - x0


class GaussGenerator(nn.Module):
    """A one-step generator x₀ = μ + s·x_t/t (at t ≈ 1, x_t/t is the noise): velocity (x_t − x₀)/t."""

    def __init__(self, mu: float, s: float) -> None:
        super().__init__()
        self.mu, self.s = nn.Parameter(torch.tensor(float(mu))), nn.Parameter(torch.tensor(float(s)))
        self.diffusion = dict(SPEC)

    def forward(self, x, t, cond=None, w=None):
        t = t.reshape(-1, 1)
        return (x - (self.mu + self.s * x / t)) / t


def info_for(x: torch.Tensor, num_classes: int = 0, y=None, data=None) -> TaskInfo:
    ds = ArrayDataset(x, y)
    return TaskInfo(num_classes, len(x), tuple(x.shape[1:]), len(x), ds, ds, data)


def batch_of(x, y=None):
    return {"x": x, "y": torch.full((len(x),), -1) if y is None else y, "index": torch.arange(len(x))}


# --- (1) the shared DMD gradient and loss against hand values --------------------------------------------------
def test_dmd_grad_and_loss_hand_values_and_gradient():
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    real = torch.tensor([[0.0, -1.0, 0.5], [1.0, 1.0, -1.0]])
    fake = torch.tensor([[2.0, -2.0, 1.5], [0.0, 0.0, 0.0]])
    # sample 0: p_real = (1, −1, 0), mean|.| = 2/3; p_fake = (−1, 0, −1); (p_real − p_fake) = (2, −1, 1)
    # sample 1: p_real = (−1, 2, 0), mean|.| = 1;   p_fake = (0, 3, −1);  (p_real − p_fake) = (−1, −1, 1)
    want = torch.tensor([[3.0, -1.5, 1.5], [-1.0, -1.0, 1.0]], dtype=torch.float64)
    g = dmd_grad(x, real, fake)
    assert g.dtype == torch.float64
    torch.testing.assert_close(g, want)
    xr = x.clone().requires_grad_(True)
    loss = dmd_loss(xr, real, fake)
    torch.testing.assert_close(loss.double(), 0.5 * (want**2).sum() / 6)
    loss.backward()
    torch.testing.assert_close(xr.grad.double(), want / 6)


# --- (2) the DMD update moves a Gaussian generator toward the teacher ------------------------------------------
def gauss_dmd(mu=0.0, s=1.0, m=2.0, s_t=0.5, n=512):
    gen, teacher = GaussGenerator(mu, s), GaussDenoiser(m, s_t)
    x = torch.randn(n, 1)
    method = DMD(gen, teacher, DMDParams(steps=1, critic_steps=1), info_for(x))
    return method, x


def exact_fake_step(method, x):
    """One generator step with the fake score set to the current generator's exact Gaussian."""
    with torch.no_grad():
        method.critic.m.copy_(method.student.mu)
        method.critic.log_s.copy_(method.student.s.abs().log())
    method.updates.fill_(1)  # the cycle [critic, student]: odd steps train the student
    out = method.training_step(batch_of(x))
    assert set(out.losses) == {"student"}
    method.student.zero_grad()
    out.losses["student"].backward()
    return method.student.mu.grad.item(), method.student.s.grad.item()


def test_dmd_moves_a_gaussian_generator_toward_the_teacher():
    torch.manual_seed(0)
    g_mu, _ = exact_fake_step(*gauss_dmd(mu=0.0, s=0.5, n=4096))
    assert g_mu < 0  # the right spread, the mean too low: descent raises μ toward m = 2
    g_mu, g_s = exact_fake_step(*gauss_dmd(mu=2.0, s=1.0, n=4096))
    assert g_s > 0 and abs(g_mu) < g_s  # the right mean, too wide: descent shrinks s toward 0.5
    method, x = gauss_dmd()
    opt = torch.optim.SGD(method.student.parameters(), lr=0.1)
    for _ in range(100):
        exact_fake_step(method, x)
        opt.step()
    mu, s = method.student.mu.item(), method.student.s.item()
    assert abs(mu - 2.0) < 0.15 and abs(s - 0.5) < 0.15, (mu, s)


def test_critic_loss_learns_the_generators_gaussian():
    torch.manual_seed(0)
    method, x = gauss_dmd(mu=1.0, s=0.7)
    with torch.no_grad():  # a critic off the generator's distribution
        method.critic.m.fill_(-1.0)
        method.critic.log_s.fill_(0.0)
    opt = torch.optim.Adam(method.critic.parameters(), lr=0.05)
    for _ in range(300):
        method.updates.fill_(0)
        out = method.critic_step(batch_of(x))
        opt.zero_grad()
        out.losses["critic"].backward()
        opt.step()
    assert abs(method.critic.m.item() - 1.0) < 0.1 and abs(method.critic.log_s.exp().item() - 0.7) < 0.1


# --- (3) the critic/generator cycle, GAN head included ----------------------------------------------------------
def tiny_models(num_classes=0, shape=(2,)):
    torch.manual_seed(0)
    teacher = build_denoiser("mlp_denoiser", {"hidden": 16, "depth": 1}, shape, num_classes)
    return copy.deepcopy(teacher), teacher


def run_cycle(method, batch, n):
    groups = method.param_groups()
    opts = {k: torch.optim.Adam(v, lr=1e-2) for k, v in groups.items()}
    changed = {k: 0 for k in groups}
    trained = []
    for _ in range(n):
        before = {k: [p.detach().clone() for p in v] for k, v in groups.items()}
        out = method.training_step(batch)
        (name,) = out.losses
        trained.append(name)
        sum(out.losses.values()).backward()
        for other, ps in groups.items():
            if other != name:  # no gradient reaches the group this step does not train
                assert all(p.grad is None for p in ps), (name, other)
        for o in opts.values():
            o.step()
            o.zero_grad(set_to_none=True)
        method.on_optimizer_step()
        for k, ps in groups.items():
            moved = any(not torch.equal(a, p) for a, p in zip(before[k], ps))
            assert moved == (k == name), (k, name)
            changed[k] += moved
    return changed, trained


@pytest.mark.parametrize("gan", [0.0, 0.1])
def test_critic_steps_cycle_and_the_generator_step_leaves_the_critic(gan):
    student, teacher = tiny_models()
    x = torch.randn(64, 2)
    method = DMD(student, teacher, DMDParams(steps=2, critic_steps=3, gan_weight=gan), info_for(x))
    assert (method.gan is not None) == (gan > 0)
    if method.gan is not None:
        assert {id(p) for p in method.gan.parameters()} <= {id(p) for p in method.param_groups()["critic"]}
    changed, trained = run_cycle(method, batch_of(x), 9)
    assert trained == ["critic"] * 3 + ["student"] + ["critic"] * 3 + ["student"] + ["critic"]
    assert changed == {"student": 2, "critic": 7}
    assert all(p.requires_grad for p in method.critic.parameters())  # restored after the GAN pass


def test_backward_simulation_runs_the_generators_own_chain():
    student, teacher = tiny_models()
    method = DMD(student, teacher, DMDParams(steps=4), info_for(torch.randn(8, 2)))
    noise = torch.randn(5, 2)
    k = torch.tensor([0, 1, 2, 3, 2])
    torch.manual_seed(3)
    x_in, t_in = method.simulate(noise, None, k)
    ts = method.times
    torch.testing.assert_close(ts, time_grid(4, default_t_max(student.diffusion)))
    torch.testing.assert_close(t_in, ts[k])
    torch.manual_seed(3)  # the same chain by hand: x̂₀ at t_i, re-noised to t_{i+1} with fresh noise
    x = noise * ts[0]
    want = [x]
    with torch.no_grad():
        for i in range(3):
            x0 = method.student_x0_eps(x, ts[i].expand(5), None)[0]
            x = (1 - ts[i + 1]) * x0 + ts[i + 1] * torch.randn_like(x0)
            want.append(x)
    for j in range(5):
        torch.testing.assert_close(x_in[j], want[int(k[j])][j])


# --- decoupled DMD -------------------------------------------------------------------------------------------------
def test_ca_and_dm_terms_hand_values_and_their_sum_is_dmd():
    x = torch.tensor([[1.0, 0.0], [2.0, -1.0]])
    c = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    u = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    f = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    a = 3.0
    # cfg = u + 3(c − u): [[1.5, −0.5], [−1, 0]]; norm = mean|x − cfg| = [0.5, 2]
    ca_hand = torch.tensor([[-2 * 0.5 / 0.5, -2 * -0.5 / 0.5], [-2 * -1.0 / 2, -2 * 0.0 / 2]], dtype=torch.float64)
    dm_hand = torch.tensor([[0.5 / 0.5, 0.5 / 0.5], [-1.0 / 2, 0.0 / 2]], dtype=torch.float64)
    torch.testing.assert_close(P.ca_grad(x, c, u, a), ca_hand)
    torch.testing.assert_close(P.dm_grad(x, c, u, f, a), dm_hand)
    cfg = u + a * (c - u)
    torch.testing.assert_close(P.ca_grad(x, c, u, a) + P.dm_grad(x, c, u, f, a), dmd_grad(x, cfg, f))
    assert P.ca_grad(x, c, u, 1.0).abs().max() == 0  # no guidance, no engine


class Spy(nn.Module):
    """Wraps a denoiser and records the times of every call."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.diffusion, self.calls = inner, inner.diffusion, []

    def forward(self, x, t, cond=None, w=None):
        self.calls.append(t.detach().clone())
        return self.inner(x, t, cond)


def test_decoupled_noise_ranges_are_separate():
    student, teacher = tiny_models(num_classes=4)
    spy = Spy(teacher)
    x, y = torch.randn(256, 2), torch.randint(0, 4, (256,))
    method = DecoupledDMD(student, spy, DecoupledParams(steps=4, critic_steps=1, guidance=2.0), info_for(x, 4, y))
    method.updates.fill_(1)
    torch.manual_seed(0)
    k = torch.full((256,), 2)  # input time t_2 = 0.5
    method.draw_steps = lambda n, device: k
    spy.calls.clear()
    out = method.training_step(batch_of(x, y))
    assert set(out.losses) == {"student"} and {"ca", "dm"} <= set(out.metrics)
    ca, dm = spy.calls  # one batched (cond, uncond) call per term: CA first
    t_in = float(method.times[2])
    ca, dm = ca[:256], dm[:256]
    assert ca.max() <= t_in + 1e-6 and ca.min() >= 0.02 - 1e-6
    assert dm.max() > 0.8 and dm.min() < 0.2  # the DM term spans [0.02, 0.98]
    assert not torch.equal(ca, dm)


def test_decoupled_weights_are_separate():
    student, teacher = tiny_models(num_classes=4)
    x, y = torch.randn(32, 2), torch.randint(0, 4, (32,))

    def loss(ca, dm):
        m = DecoupledDMD(copy.deepcopy(student), teacher, DecoupledParams(steps=1, critic_steps=1, ca_weight=ca,
                                                                          dm_weight=dm), info_for(x, 4, y))
        with torch.no_grad():  # a critic off the teacher: a non-zero DM term
            m.critic.out[1].bias.add_(0.5)
        m.updates.fill_(1)
        torch.manual_seed(1)
        out = m.training_step(batch_of(x, y))
        return out.losses["student"].item(), out.metrics
    both, met = loss(1.0, 1.0)
    only_ca, _ = loss(1.0, 0.0)
    only_dm, _ = loss(0.0, 2.0)
    assert math.isclose(only_ca, met["ca"].item(), rel_tol=1e-6)
    assert math.isclose(only_dm, 2 * met["dm"].item(), rel_tol=1e-6)
    assert math.isclose(both, met["ca"].item() + met["dm"].item(), rel_tol=1e-6)
    assert met["ca"].item() > 1e-4 and met["dm"].item() > 1e-4


# --- phased DMD -------------------------------------------------------------------------------------------------------
def test_phase_boundaries_by_snr():
    flow, vp = get_schedule("flow"), get_schedule("vp_cosine")
    edges = P.phase_times(4, 0.999)
    torch.testing.assert_close(edges, torch.tensor([0.999, 0.74925, 0.4995, 0.24975, 0.0]))
    t = torch.tensor([0.999, 0.8, 0.74925, 0.6, 0.4995, 0.3, 0.24975, 0.1, 0.001])
    assert P.phase_index(t, edges, flow).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 3]
    # by SNR, not by time: SNR(t) = ((1 − t)/t)² for flow; phase 1 is SNR ∈ [SNR(t_1), SNR(t_2))
    snr = flow.snr(edges[1:-1].double())
    assert snr[0] < 1 and math.isclose(float(snr[1]), (0.5005 / 0.4995) ** 2, rel_tol=1e-5) and snr[2] > 1
    # any schedule: the phase of t is that of the edge SNRs (vp_cosine's SNR is monotone too)
    assert P.phase_index(t, edges, vp).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 3]


def test_phased_experts_route_by_phase_and_train_in_their_subinterval():
    student, teacher = tiny_models()
    x = torch.randn(128, 2)
    method = PhasedDMD(student, teacher, PhasedParams(steps=2, critic_steps=1), info_for(x))
    experts = method.student.experts
    assert len(experts) == 2
    with torch.no_grad():  # make the experts differ
        experts[1].out[1].bias.add_(1.0)
    mid = float(method.times[1])
    xt, t = torch.randn(4, 2), torch.tensor([float(method.times[0]), 0.6, mid, 0.1])
    out = method.student(xt, t)
    torch.testing.assert_close(out[:2], experts[0](xt[:2], t[:2]))
    torch.testing.assert_close(out[2:], experts[1](xt[2:], t[2:]))
    k = torch.tensor([0] * 64 + [1] * 64)
    tau = method.dmd_times(method.times[k], k)
    assert (tau[:64] >= mid - 1e-6).all() and (tau[64:] <= mid + 1e-6).all()
    assert (tau[64:] >= 0.02 - 1e-6).all() and (tau[:64] <= 0.98 + 1e-6).all()
    # a phase-0 generator step trains expert 0 only
    method.updates.fill_(1)
    method.draw_steps = lambda n, device: torch.zeros(n, dtype=torch.long)
    with torch.no_grad():  # a critic off the teacher, so the DMD gradient is not zero
        method.critic.out[1].bias.add_(0.5)
    method.training_step(batch_of(x)).losses["student"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in experts[0].parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in experts[1].parameters())


# --- flash DMD -------------------------------------------------------------------------------------------------------
def test_flash_reward_sign_and_timestep_weights():
    centers = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    x = torch.tensor([[0.9, 0.1], [0.0, 0.5]], requires_grad=True)
    r = P.mode_reward(x, centers)
    torch.testing.assert_close(r, torch.tensor([-(0.01 + 0.01), -(1.0 + 0.25)]))
    loss = P.reward_loss(r, 1.0)
    loss.backward()
    x_new = x.detach() - 0.1 * x.grad  # a descent step on −r moves samples toward their nearest mode
    assert (P.mode_reward(x_new, centers) > r.detach()).all()

    class Data:
        pass
    data = Data()
    data.centers = centers
    student, teacher = tiny_models()
    xs = torch.randn(64, 2)
    method = FlashDMD(student, teacher, FlashParams(steps=4, critic_steps=1, reward_weight=1.0), info_for(xs, data=data))
    assert method.reward_kind == "mode"
    torch.testing.assert_close(method.step_weight(torch.tensor([0, 3])), torch.tensor([0.25, 1.0], dtype=torch.float64))
    k = torch.tensor([0, 3])
    tau = method.dmd_times(method.times[k].repeat(200), k.repeat(200))
    assert tau[1::2].max() <= float(method.times[3]) + 1e-6 and tau[::2].max() > 0.9
    # the reward loss in the method: with DMD off, a generator step raises the reward
    method.params.dmd_weight = 0.0
    method.updates.fill_(1)
    torch.manual_seed(0)
    out = method.training_step(batch_of(xs))
    assert out.metrics["reward"] < 0 and math.isclose(out.losses["student"].item(), out.metrics["reward_loss"].item())

    sdata = Data()
    sdata.centers = None
    img = torch.randn(10, 1, 2, 2)
    torch.testing.assert_close(P.nearest_data_reward(img[:3] + 0.0, img), torch.zeros(3))
    yimg = torch.arange(10) % 2
    r = P.nearest_data_reward(img[:2], img, torch.tensor([1, 0]), yimg)  # other class only
    assert (r < 0).all()


# --- (4) end to end, exact resume mid-cycle -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    return tmp_path_factory.mktemp("refs")


def test_dmd_end_to_end_resumes_mid_cycle_bitwise(tmp_path, refs):
    data = tiny({"name": "dmd", "steps": 2, "critic_steps": 3, "gan_weight": 0.01}, 10)
    straight, resumed = resume_round_trip(data, tmp_path, 5)  # step 5 of cycles of 4: inside the second cycle
    ck = load_file(str(straight.run_dir / "checkpoints/latest/model.safetensors"))
    assert int(ck["updates"]) == 10 and any(k.startswith("critic.") for k in ck) and any(k.startswith("gan.") for k in ck)
    assert straight.metrics["test/mmd"] == resumed.metrics["test/mmd"]
    assert straight.metrics["test/steps"] == 2 and straight.metrics["test/nfe"] == 2


@pytest.mark.parametrize("method", [{"name": "phased_dmd", "steps": 2}, {"name": "flash_dmd", "steps": 4},
                                    {"name": "dmd", "steps": 1}])
def test_methods_run_end_to_end(tmp_path, refs, method):
    res = run_recipe(recipe_from_dict(tiny({**method, "critic_steps": 1}, 4)), out=tmp_path, refs_out=refs)
    assert res.metrics["test/steps"] == method["steps"] and res.metrics["test/nfe"] == method["steps"]
    assert math.isfinite(res.metrics["test/mmd"]) and 0 <= res.metrics["test/precision"] <= 1
    if method["name"] == "phased_dmd":  # the experts student loads back as the registered phased_experts arch
        from distill.diffusion.data.tasks import load_denoiser

        back = load_denoiser(res.run_dir)
        x, t = torch.randn(6, 2), torch.tensor([0.9, 0.7, 0.55, 0.45, 0.2, 0.05])
        assert len(back.experts) == 2 and back.diffusion["steps"] == 2
        assert torch.equal(back(x, t), res.student(x, t))
