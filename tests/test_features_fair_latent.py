"""S46 fair representation distillation (``fair_vae``, ``fair_latent``): distance covariance, the record
likelihood and the KL terms against explicit loops / hand values, both training steps against an
independent computation (the fairness term and the shared decoder included), the fairness metrics by
hand, the task's model folder, and the two stages end to end."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from distill.core.distiller import TaskInfo
from distill.core.recipe import recipe_from_dict, shipped_recipe
from distill.core.refs import load_student
from distill.core.registry import TASKS
from distill.core.runner import run_recipe
from distill.errors import MismatchError
from distill.features import fair
from distill.features.methods.fair_latent import FairLatent, FairLatentParams, FairVAE, FairVAEParams


def ref_dcov2_u(z: list[list[float]], a: list[float]) -> float:
    """Unbiased distance covariance (Székely & Rizzo 2014, U-centring), written out element by element."""
    n = len(z)

    def dist(u, v):
        return math.sqrt(sum((p - q) ** 2 for p, q in zip(u, v)))

    def ucenter(rows):
        d = [[dist(rows[i], rows[j]) for j in range(n)] for i in range(n)]
        rs = [sum(d[i]) for i in range(n)]
        cs = [sum(d[i][j] for i in range(n)) for j in range(n)]
        tot = sum(rs)
        return [[0.0 if i == j else d[i][j] - rs[i] / (n - 2) - cs[j] / (n - 2) + tot / ((n - 1) * (n - 2))
                 for j in range(n)] for i in range(n)]

    A, B = ucenter(z), ucenter([[v] for v in a])
    return sum(A[i][j] * B[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 3))


def test_dcov2_by_explicit_loops_and_its_meaning():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(9, 3, generator=g)
    a = (torch.rand(9, generator=g) < 0.5).float()
    assert fair.dcov2(z, a).item() == pytest.approx(ref_dcov2_u(z.tolist(), a.tolist()), rel=1e-4, abs=1e-6)
    big = torch.Generator().manual_seed(1)
    a2 = (torch.rand(400, generator=big) < 0.5).float()
    dep = torch.stack([a2 * 2 + 0.3 * torch.randn(400, generator=big), torch.randn(400, generator=big)], 1)
    ind = torch.randn(400, 2, generator=big)
    assert fair.dcov2(dep, a2) > 0.1 and abs(fair.dcov2(ind, a2).item()) < 0.01  # unbiased: ~0 when independent


def test_record_likelihood_and_kls_by_hand():
    x_hat, x = torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 1.0]])
    log_sigma = torch.tensor([math.log(2.0), 0.0])
    y_logit, y = torch.tensor([0.0]), torch.tensor([1])
    want = (1.0 / (2 * 4.0) + math.log(2.0)) + 0.0 + math.log(2.0)  # feature 1, feature 2, BCE at p = ½
    assert fair.recon_loss(x_hat, log_sigma, y_logit, x, y).item() == pytest.approx(want, rel=1e-6)
    mu, logvar = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, math.log(4.0)]])
    assert fair.gaussian_kl(mu, logvar).item() == pytest.approx(0.5 * 1 + 0.5 * (4 - 1 - math.log(4)), rel=1e-6)
    p, q = torch.tensor([2.0]), torch.tensor([-1.0])
    sp, sq = 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(1))
    assert fair.bernoulli_kl(p, q).item() == pytest.approx(sp * math.log(sp / sq) + (1 - sp) * math.log((1 - sp) / (1 - sq)), rel=1e-6)


def test_dp_gap_by_hand():
    pred = torch.tensor([1, 1, 0, 0, 1, 0])
    a = torch.tensor([1, 1, 1, 0, 0, 0])
    assert fair.dp_gap(pred, a) == pytest.approx(abs(2 / 3 - 1 / 3))
    assert fair.dp_gap(pred, torch.ones(6, dtype=torch.long)) == 0.0


def _data():
    e = TASKS.get("fair_tabular")
    return e.obj(e.params(num_train=64, num_val=32, num_test=64))


def _vae(enc: int = 8, dec: int = 6, latent: int = 3, seed: int = 0) -> fair.TabVAE:
    torch.manual_seed(seed)
    return fair.TabVAE(fair.TabVAEParams(enc_hidden=enc, dec_hidden=dec, latent=latent), 7)


def _info(d) -> TaskInfo:
    return d.task_info(False)


def test_fair_vae_step_by_an_independent_computation():
    d = _data()
    m = _vae()
    fv = FairVAE(m, None, FairVAEParams(beta=0.5, dcov_weight=3.0), _info(d))
    batch = d.train.__getitems__(list(range(12)))
    torch.manual_seed(7)
    step = fv.training_step(batch)
    torch.manual_seed(7)  # the same reparameterisation noise
    r = torch.cat([batch["x"], batch["y"].float()[:, None]], 1)
    h = m.encoder(r)
    mu, logvar = h[:, :3], h[:, 3:].clamp(-10, 10)
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    out = m.decoder.net(z)
    sig = m.decoder.log_sigma
    rec = sum(sum(((batch["x"][i, j] - out[i, j]) ** 2 / (2 * torch.exp(2 * sig[j])) + sig[j]) for j in range(6))
              for i in range(12)) / 12
    p = torch.sigmoid(out[:, 6])
    rec = rec + (-(batch["y"] * p.log() + (1 - batch["y"]) * (1 - p).log())).mean()
    kl = (0.5 * (mu ** 2 + logvar.exp() - 1 - logvar)).sum(1).mean()
    dc = ref_dcov2_u(mu.tolist(), batch["a"].float().tolist())
    want = rec + 0.5 * kl + 3.0 * dc
    assert step.losses["student"].item() == pytest.approx(want.item(), rel=1e-4)
    assert step.metrics["dcov"].item() == pytest.approx(dc, rel=1e-4, abs=1e-6)
    # the fairness term is live: with dcov_weight 0 the loss differs by exactly 3·dCov²
    torch.manual_seed(7)
    plain = FairVAE(m, None, FairVAEParams(beta=0.5, dcov_weight=0.0), _info(d)).training_step(batch)
    assert step.losses["student"].item() - plain.losses["student"].item() == pytest.approx(3.0 * dc, rel=1e-3, abs=1e-6)


def test_fair_latent_shares_the_teacher_decoder_and_matches_an_independent_computation():
    d = _data()
    teacher, student = _vae(enc=16, seed=1), _vae(enc=4, seed=2)
    fl = FairLatent(student, teacher, FairLatentParams(quality_weight=0.7, utility_weight=1.9), _info(d))
    for k, v in teacher.decoder.state_dict().items():
        assert torch.equal(student.decoder.state_dict()[k], v)  # the shared decoder, copied
    assert not any(p.requires_grad for p in student.decoder.parameters())
    assert set(id(p) for p in fl.param_groups()["student"]) == set(id(p) for p in student.encoder.parameters())
    batch = d.train.__getitems__(list(range(10)))
    step = fl.training_step(batch)
    r = torch.cat([batch["x"], batch["y"].float()[:, None]], 1)
    hs, ht = student.encoder(r), teacher.encoder(r)
    mu_s, lv_s, mu_t, lv_t = hs[:, :3], hs[:, 3:].clamp(-10, 10), ht[:, :3], ht[:, 3:].clamp(-10, 10)
    quality = ((mu_s - mu_t) ** 2).mean() + ((lv_s - lv_t) ** 2).mean()
    ys, yt = torch.sigmoid(teacher.decoder.net(mu_s)[:, 6]), torch.sigmoid(teacher.decoder.net(mu_t)[:, 6])
    utility = (yt * (yt / ys).log() + (1 - yt) * ((1 - yt) / (1 - ys)).log()).mean()
    assert step.losses["student"].item() == pytest.approx((0.7 * quality + 1.9 * utility).item(), rel=1e-4)
    assert step.metrics["utility"].item() == pytest.approx(utility.item(), rel=1e-4)  # KL(teacher ‖ student)
    assert step.metrics["quality"].item() == pytest.approx(quality.item(), rel=1e-4)


def test_fair_latent_rejects_a_student_that_cannot_share_the_decoder():
    d = _data()
    with pytest.raises(MismatchError, match="dec_hidden"):
        FairLatent(_vae(dec=5), _vae(dec=6), FairLatentParams(), _info(d))


def test_synthetic_records_sample_the_features_noise_and_the_label():
    d = _data()
    m = _vae()
    with torch.no_grad():
        m.decoder.net[2].weight.zero_()
        m.decoder.net[2].bias.copy_(torch.tensor([0.0] * 6 + [10.0]))
        m.decoder.log_sigma.fill_(math.log(3.0))
    x_hat, y_hat = fair.synthesize(m, d.train.x, d.train.y)
    assert x_hat.std().item() == pytest.approx(3.0, rel=0.1)  # N(x̂ = 0, σ = 3), not the decoder mean alone
    assert y_hat.float().mean().item() > 0.98  # Bern(σ(10))


def test_metrics_and_model_folder(tmp_path):
    d = _data()
    m = _vae()
    got = fair.fair_metrics(m, d.train, d.test)
    assert set(got) == {"accuracy", "dp_gap", "data_dp", "latent_dp", "latent_a_acc", "latent_dcov", "quality_mmd"}
    assert fair.fair_metrics(m, d.train, d.test) == got  # fixed noise: reproducible
    d.save_model(tmp_path / "m", m, {"name": "tab_vae", "params": {"enc_hidden": 8, "dec_hidden": 6, "latent": 3}})
    back = load_student(tmp_path / "m")  # through the registered formats, not the classifier's
    assert isinstance(back, fair.TabVAE)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), back.state_dict().values()))
    assert d.saved_spec(tmp_path / "m") == {"name": "tab_vae", "params": {"enc_hidden": 8, "dec_hidden": 6, "latent": 3}}


@pytest.mark.slow
def test_both_stages_end_to_end(tmp_runs):
    data = yaml.safe_load(shipped_recipe("fair-fair_latent").read_text())
    teacher = yaml.safe_load(shipped_recipe("fair-teacher").read_text())
    task = {"name": "fair_tabular", "num_train": 300, "num_val": 100, "num_test": 300}
    small = {"epochs": 2, "batch_size": 64, "progress": False, "trackers": "none"}
    teacher |= {"task": task, "train": {**teacher["train"], **small}}
    data |= {"task": task, "teacher": {"recipe": teacher}, "train": {**data["train"], **small}}
    res = run_recipe(recipe_from_dict(data), out=tmp_runs)
    for k in ("test/accuracy", "test/dp_gap", "test/latent_dp", "teacher/dp_gap", "test/real_dp_gap"):
        assert k in res.metrics
    assert res.metrics["params/student_encoder"] < res.metrics["params/teacher_encoder"]
    assert isinstance(load_student(res.run_dir), fair.TabVAE)
