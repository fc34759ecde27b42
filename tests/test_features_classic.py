"""The classic feature methods (issue 15): fitnet, at, pkt, rkd, sp, vid, reviewkd (crd: test_features_crd.py).

Each objective is checked against an independent computation on small tensors (explicit loops or hand
formulas, not our functions re-called), and each method's training step against a manual forward, so
that replacing a method by plain KD or CE, or breaking its distinguishing piece, fails.
"""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from distill.core.distiller import TaskInfo
from distill.core.recipe import load_recipe, recipe_from_dict, shipped_recipe
from distill.core.registry import METHODS
from distill.core.runner import run_recipe
from distill.errors import RecipeError
from distill.features.losses import hcl_loss, match_spatial, pkt_loss, rkd_angle_loss, rkd_distance_loss, vid_nll
from distill.features.methods.fitnet import ConvRegressor
from distill.features.methods.reviewkd import ABF
from distill.tasks.models import build_model

L = ["body.2", "body.4", "body.6"]  # cnn2d: the ReLU after each conv (8x8, 4x4, 2x2)


# --- hand references -----------------------------------------------------------------------------
def huber(a: float, b: float) -> float:
    d = abs(a - b)
    return 0.5 * d * d if d < 1 else d - 0.5


def ce_by_hand(logits: torch.Tensor, y: torch.Tensor) -> float:
    rows = [(logits[i], int(y[i])) for i in range(len(y)) if y[i] >= 0]
    return sum(-(r[c] - torch.logsumexp(r, 0)).item() for r, c in rows) / len(rows)


def kd_by_hand(s: torch.Tensor, t: torch.Tensor, temp: float = 4.0) -> float:
    total = 0.0
    for i in range(len(s)):
        ps, pt = torch.softmax(s[i] / temp, 0), torch.softmax(t[i] / temp, 0)
        total += sum(pt[c].item() * (math.log(pt[c].item()) - math.log(ps[c].item())) for c in range(len(ps)))
    return temp * temp * total / len(s)


def pool_by_hand(f: torch.Tensor, size: int) -> torch.Tensor:
    """Average pooling of ``[b, c, h, h]`` to ``size × size`` when ``h`` is a multiple of ``size``."""
    k = f.shape[-1] // size
    out = torch.zeros(*f.shape[:2], size, size, dtype=torch.float64)
    for i in range(size):
        for j in range(size):
            out[:, :, i, j] = f[:, :, i * k:(i + 1) * k, j * k:(j + 1) * k].double().mean((-1, -2))
    return out


def at_by_hand(fs: torch.Tensor, ft: torch.Tensor, p: float = 2.0) -> float:
    """Zagoruyko & Komodakis Eq. 2: the larger map pooled first, Q = Σ_c |A_c|^p normalised, mean sq. diff."""
    hs, ht = fs.shape[-1], ft.shape[-1]
    fs, ft = (pool_by_hand(fs, ht), ft.double()) if hs > ht else (fs.double(), pool_by_hand(ft, hs) if ht > hs else ft.double())
    total, count = 0.0, 0
    for n in range(fs.shape[0]):
        qs = [sum(abs(fs[n, c, i, j].item()) ** p for c in range(fs.shape[1])) for i in range(fs.shape[2]) for j in range(fs.shape[3])]
        qt = [sum(abs(ft[n, c, i, j].item()) ** p for c in range(ft.shape[1])) for i in range(ft.shape[2]) for j in range(ft.shape[3])]
        ns, nt = math.sqrt(sum(v * v for v in qs)), math.sqrt(sum(v * v for v in qt))
        for a, b in zip(qs, qt):
            total += (a / ns - b / nt) ** 2
            count += 1
    return total / count


def sp_by_hand(fs: torch.Tensor, ft: torch.Tensor) -> float:
    """Tung & Mori Eq. 1-4 with explicit Gram matrices."""
    def gram(f: torch.Tensor) -> list[list[float]]:
        q = f.reshape(f.shape[0], -1).double()
        g = [[float((q[i] * q[j]).sum()) for j in range(len(q))] for i in range(len(q))]
        return [[v / math.sqrt(sum(w * w for w in row)) for v in row] for row in g]
    gs, gt = gram(fs), gram(ft)
    b = len(gs)
    return sum((gt[i][j] - gs[i][j]) ** 2 for i in range(b) for j in range(b)) / (b * b)


def pkt_by_hand(s: torch.Tensor, t: torch.Tensor, eps: float = 1e-7) -> float:
    def probs(x: torch.Tensor) -> list[list[float]]:
        x = x.double()
        cos = [[float((x[i] @ x[j]) / (x[i].norm() + eps) / (x[j].norm() + eps)) for j in range(len(x))] for i in range(len(x))]
        k = [[(v + 1) / 2 for v in row] for row in cos]
        return [[v / sum(row) for v in row] for row in k]
    q, p = probs(s), probs(t)
    b = len(p)
    return sum(p[i][j] * math.log((p[i][j] + eps) / (q[i][j] + eps)) for i in range(b) for j in range(b)) / (b * b)


def rkd_by_hand(s: torch.Tensor, t: torch.Tensor) -> tuple[float, float]:
    """Park et al. Eq. 3-6 by explicit pair and triple loops."""
    def dist(x: torch.Tensor) -> list[list[float]]:
        d = [[0.0 if i == j else float((x[i] - x[j]).norm()) for j in range(len(x))] for i in range(len(x))]
        mu = sum(v for row in d for v in row if v > 0) / sum(1 for row in d for v in row if v > 0)
        return [[v / mu for v in row] for row in d]

    def angle(x: torch.Tensor, i: int, j: int, k: int) -> float:  # vertex i
        a, b = x[j] - x[i], x[k] - x[i]
        if a.norm() == 0 or b.norm() == 0:
            return 0.0
        return float(a @ b / (a.norm() * b.norm()))

    s, t = s.double(), t.double()
    b = len(s)
    ds, dt = dist(s), dist(t)
    ld = sum(huber(ds[i][j], dt[i][j]) for i in range(b) for j in range(b)) / b**2
    la = sum(huber(angle(s, i, j, k), angle(t, i, j, k)) for i in range(b) for j in range(b) for k in range(b)) / b**3
    return ld, la


# --- fixtures --------------------------------------------------------------------------------------
def pair(method: str, **kw):
    torch.manual_seed(0)
    s = build_model("cnn2d", {"width": 4, "depth": 3}, (8, 8), 4)
    t = build_model("cnn2d", {"width": 6, "depth": 3}, (8, 8), 4)
    for p in t.parameters():  # a teacher unlike the student
        p.data.add_(0.3 * torch.randn_like(p))
    entry = METHODS.get(method)
    return entry.obj(s, t, entry.params(**kw), TaskInfo(4, 6, (8, 8)))


def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"x": torch.rand(6, 8, 8, generator=g), "y": torch.tensor([0, 1, 2, 3, -1, 1]), "index": torch.arange(6)}


def feats(model, x: torch.Tensor, upto: int) -> torch.Tensor:
    """cnn2d's body run by hand up to module ``upto`` (inclusive)."""
    h = x
    for m in list(model.body)[: upto + 1]:
        h = m(h)
    return h


def logit_terms(d, b, kd_weight: float = 0.0) -> float:
    with torch.no_grad():
        s, t = d.student(b["x"]), d.teacher(b["x"])
    return ce_by_hand(s, b["y"]) + kd_weight * kd_by_hand(s, t)


# --- the pure losses against hand computations -------------------------------------------------------
def test_pure_losses_by_explicit_loops():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 3, generator=g), torch.randn(5, 4, generator=g) * 2
    assert pkt_loss(s, t).item() == pytest.approx(pkt_by_hand(s, t), rel=1e-5)
    ld, la = rkd_by_hand(s, t)
    assert rkd_distance_loss(s, t).item() == pytest.approx(ld, rel=1e-5)
    assert rkd_angle_loss(s, t).item() == pytest.approx(la, rel=1e-5)
    # relations only: invariant to the scale of either side (distance) and to translation (angle)
    assert rkd_distance_loss(3 * s, t).item() == pytest.approx(ld, rel=1e-5)
    assert rkd_angle_loss(s + 5, t).item() == pytest.approx(la, rel=1e-4)
    assert pkt_loss(t, t).item() == pytest.approx(0.0, abs=1e-7) and pkt_loss(s, t).item() > 1e-4


def test_vid_nll_by_hand_with_a_variance_per_channel():
    g = torch.Generator().manual_seed(1)
    mu, tgt, alpha = torch.randn(2, 3, 2, 2, generator=g), torch.randn(2, 3, 2, 2, generator=g), torch.tensor([-1.0, 0.5, 2.0])
    total, n = 0.0, 0
    for i in range(2):
        for c in range(3):
            var = math.log(1 + math.exp(alpha[c].item())) + 1e-5
            for h in range(2):
                for w in range(2):
                    total += 0.5 * ((tgt[i, c, h, w].item() - mu[i, c, h, w].item()) ** 2 / var + math.log(var))
                    n += 1
    assert vid_nll(mu, tgt, alpha).item() == pytest.approx(total / n, rel=1e-5)
    # heteroscedastic: a channel with a large error is better served by a large variance
    big = torch.zeros(1, 2, 1, 1)
    big[0, 1] = 10.0
    assert vid_nll(torch.zeros(1, 2, 1, 1), big, torch.tensor([0.0, 5.0])) < vid_nll(torch.zeros(1, 2, 1, 1), big, torch.tensor([5.0, 0.0]))


def test_hcl_by_hand_pyramid_4_2_1():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)

    def mse(x, y):
        return float(((x.double() - y.double()) ** 2).mean())
    # levels 4, 2, 1 (all < 8): weights 1, 1/2, 1/4, 1/8
    want = (mse(a, b) + mse(pool_by_hand(a, 4), pool_by_hand(b, 4)) / 2 + mse(pool_by_hand(a, 2), pool_by_hand(b, 2)) / 4
            + mse(pool_by_hand(a, 1), pool_by_hand(b, 1)) / 8) / (1 + 1 / 2 + 1 / 4 + 1 / 8)
    assert hcl_loss(a, b).item() == pytest.approx(want, rel=1e-5)
    # a 4x4 map skips level 4 (l >= h): weights 1, 1/2 (level 2), 1/4 (level 1)
    a4, b4 = a[..., :4, :4], b[..., :4, :4]
    want4 = (mse(a4, b4) + mse(pool_by_hand(a4, 2), pool_by_hand(b4, 2)) / 2 + mse(pool_by_hand(a4, 1), pool_by_hand(b4, 1)) / 4) / 1.75
    assert hcl_loss(a4, b4).item() == pytest.approx(want4, rel=1e-5)
    assert hcl_loss(a4, b4).item() != pytest.approx(mse(a4, b4), rel=1e-3)  # the pyramid counts


def test_match_spatial_pools_the_larger_map():
    big, small = torch.rand(2, 3, 4, 4), torch.rand(2, 5, 2, 2)
    s, t = match_spatial(big, small)
    torch.testing.assert_close(s.double(), pool_by_hand(big, 2))
    s, t = match_spatial(small, big)
    torch.testing.assert_close(t.double(), pool_by_hand(big, 2))


# --- the methods' training steps against manual forwards ---------------------------------------------
def test_fitnet_joint_step_by_hand():
    d, b = pair("fitnet", student_layers=["body.4"], teacher_layers=["body.4"], kd_weight=0.5), batch()
    step = d.training_step(b)
    with torch.no_grad():
        r = d.projectors["hint"](feats(d.student, b["x"], 4))
        hint = float(((r - feats(d.teacher, b["x"], 4)) ** 2).mean())
    assert step.metrics["hint"].item() == pytest.approx(hint, rel=1e-5)
    assert step.losses["student"].item() == pytest.approx(logit_terms(d, b, 0.5) + 100 * hint, rel=1e-5)
    assert abs(step.losses["student"].item() - logit_terms(d, b, 0.5)) > 1.0  # not CE + KD alone


def test_fitnet_default_layers_and_regressor_shapes():
    d = pair("fitnet", student_layers=["body.2"], teacher_layers=["body.4"])
    assert isinstance(d.projectors["hint"].conv, torch.nn.Conv2d) and d.projectors["hint"].conv.stride == (2, 2)  # 8x8 -> 4x4
    assert ConvRegressor((4, 4, 4), (6, 8, 8))(torch.rand(2, 4, 4, 4)).shape == (2, 6, 8, 8)  # transposed
    assert ConvRegressor((4, 5, 5), (6, 3, 3))(torch.rand(2, 4, 5, 5)).shape == (2, 6, 3, 3)  # valid 3x3
    assert ConvRegressor((4, 16), (6, 8))(torch.rand(2, 4, 16)).shape == (2, 6, 8)  # 1-D
    with pytest.raises(RecipeError, match="one guided"):
        pair("fitnet", student_layers=L, teacher_layers=L)
    convnet = build_model("convnet", {"width": 4, "depth": 3}, (8, 8), 4)
    d = METHODS.get("fitnet").obj(convnet, build_model("convnet", {"width": 8, "depth": 3}, (8, 8), 4),
                                  METHODS.get("fitnet").params(), TaskInfo(4, 6, (8, 8)))
    assert d.student_layers == ["stages.1"] == d.teacher_layers  # the middle stage by default


def test_fitnet_hint_stage_trains_only_up_to_the_guided_layer():
    d, b = pair("fitnet", student_layers=["body.4"], teacher_layers=["body.4"], stage="hint", hint_weight=2.0), batch()
    step = d.training_step(b)
    with torch.no_grad():
        hint = float(((d.projectors["hint"](feats(d.student, b["x"], 4)) - feats(d.teacher, b["x"], 4)) ** 2).mean())
    assert step.losses["student"].item() == pytest.approx(2.0 * hint, rel=1e-5)  # no CE, no KD
    step.losses["student"].backward()
    assert d.student.body[3].weight.grad.abs().sum() > 0  # the guided layer's conv
    assert d.student.body[5].weight.grad is None and d.student.head.weight.grad is None  # never run
    b2 = dict(b, y=torch.tensor([3, 2, 1, 0, -1, 0]))
    assert d.training_step(b2).losses["student"].item() == pytest.approx(step.losses["student"].item(), rel=1e-5)


def test_at_step_by_hand_over_three_pairs():
    d, b = pair("at", student_layers=L, teacher_layers=["body.2", "body.2", "body.4"]), batch()  # 4x4 vs 8x8: pooling
    step = d.training_step(b)
    with torch.no_grad():
        fs = [feats(d.student, b["x"], i) for i in (2, 4, 6)]
        ft = [feats(d.teacher, b["x"], i) for i in (2, 2, 4)]
    at = sum(at_by_hand(s, t) for s, t in zip(fs, ft))
    assert step.metrics["at"].item() == pytest.approx(at, rel=1e-5)
    assert step.losses["student"].item() == pytest.approx(logit_terms(d, b) + 1000 * at, rel=1e-5)
    assert abs(step.losses["student"].item() - logit_terms(d, b, 1.0)) > 0.1


def test_sp_step_by_hand_gram_matrices():
    d, b = pair("sp", student_layers=["body.6"], teacher_layers=["body.6"]), batch()
    step = d.training_step(b)
    with torch.no_grad():
        sp = sp_by_hand(feats(d.student, b["x"], 6), feats(d.teacher, b["x"], 6))
    assert step.metrics["sp"].item() == pytest.approx(sp, rel=1e-4)
    assert step.losses["student"].item() == pytest.approx(logit_terms(d, b) + 3000 * sp, rel=1e-4)
    with pytest.raises(RecipeError, match="no list of blocks"):  # cnn2d has no default layers: a recipe names them
        pair("sp")


def test_pkt_and_rkd_steps_use_the_penultimate_embedding():
    b = batch()
    d = pair("pkt", kd_weight=0.3)
    step = d.training_step(b)
    with torch.no_grad():
        es, et = d.student.embed(b["x"]), d.teacher.embed(b["x"])
    assert step.losses["student"].item() == pytest.approx(logit_terms(d, b, 0.3) + 30000 * pkt_by_hand(es, et), rel=1e-4)
    d = pair("rkd")
    step = d.training_step(b)
    ld, la = rkd_by_hand(es, et)
    assert step.metrics["rkd_angle"].item() == pytest.approx(la, rel=1e-5)
    assert step.losses["student"].item() == pytest.approx(logit_terms(d, b) + 25 * ld + 50 * la, rel=1e-5)


def test_vid_step_by_hand_and_the_variance_learns():
    d, b = pair("vid", student_layers=L, teacher_layers=L), batch()
    reg = d.projector("body.2")
    assert torch.allclose(torch.nn.functional.softplus(reg.log_scale) + 1e-5, torch.full((6,), 5.0))  # init σ² = 5
    step = d.training_step(b)
    want = 0.0
    with torch.no_grad():
        for i in (2, 4, 6):
            r = d.projector(f"body.{i}")
            mu, tgt = r(feats(d.student, b["x"], i)), feats(d.teacher, b["x"], i)
            var = [math.log(1 + math.exp(a)) + 1e-5 for a in r.log_scale.tolist()]
            terms = [0.5 * ((tgt[n, c, h, w] - mu[n, c, h, w]).item() ** 2 / var[c] + math.log(var[c]))
                     for n in range(mu.shape[0]) for c in range(mu.shape[1]) for h in range(mu.shape[2]) for w in range(mu.shape[3])]
            want += sum(terms) / len(terms)
    assert step.losses["student"].item() == pytest.approx(logit_terms(d, b) + want, rel=1e-5)
    step.losses["student"].backward()
    assert reg.log_scale.grad is not None and reg.log_scale.grad.abs().sum() > 0
    assert "projectors" in d.param_groups() and any(p is reg.log_scale for p in d.param_groups()["projectors"])


def test_reviewkd_reviews_deep_to_shallow_and_matches_hcl_by_hand():
    d, b = pair("reviewkd", student_layers=L, teacher_layers=L, warmup_epochs=4), batch()
    d.on_epoch_start(1)  # warm-up (1 + 1) / 4
    step = d.training_step(b)
    with torch.no_grad():
        fs = [feats(d.student, b["x"], i) for i in (2, 4, 6)]
        ft = [feats(d.teacher, b["x"], i) for i in (2, 4, 6)]
        fs.append(fs[-1].mean((2, 3), keepdim=True))
        ft.append(ft[-1].mean((2, 3), keepdim=True))
        out = d.review(fs)
    assert [o.shape for o in out] == [f.shape for f in ft]  # teacher sizes and channels at every level
    hcl = float(sum(hcl_loss(o, f) for o, f in zip(out, ft)))
    assert step.metrics["review"].item() == pytest.approx(hcl, rel=1e-5)
    assert step.losses["student"].item() == pytest.approx(logit_terms(d, b) + 0.5 * hcl, rel=1e-5)
    # the review: a deep student stage reaches every shallower output, a shallow one only its own
    with torch.no_grad():
        deep = d.review(fs[:2] + [fs[2] + 1.0] + fs[3:])
        shallow = d.review([fs[0] + 1.0] + fs[1:])
    assert all(not torch.allclose(a, c) for a, c in zip(out[:3], deep[:3])) and torch.allclose(out[3], deep[3])
    assert not torch.allclose(out[0], shallow[0]) and all(torch.allclose(a, c) for a, c in zip(out[1:], shallow[1:]))


def test_abf_fuses_with_attention_from_the_residual():
    torch.manual_seed(0)
    abf = ABF(4, 3, 5, True, 2).eval()
    x, res = torch.rand(2, 4, 4, 4), torch.rand(2, 3, 2, 2)
    y, r = abf(x, res, (4, 4))
    with torch.no_grad():
        xm = abf.conv1(x)
        up = res.repeat_interleave(2, 2).repeat_interleave(2, 3)  # nearest upsampling by hand
        z = abf.att_conv(torch.cat([xm, up], 1))
        want = xm * z[:, :1] + up * z[:, 1:2]
    torch.testing.assert_close(r, want)
    torch.testing.assert_close(y, abf.conv2(want))


@pytest.mark.parametrize("method", ["fitnet", "at", "pkt", "rkd", "sp", "vid", "reviewkd"])
def test_each_method_differs_from_plain_kd(method):
    kw = {"student_layers": ["body.4"], "teacher_layers": ["body.4"]} if method in ("fitnet", "sp") else (
        {"student_layers": L, "teacher_layers": L} if method in ("at", "vid", "reviewkd") else {})
    d, b = pair(method, kd_weight=1.0, **kw), batch()
    step = d.training_step(b)
    assert abs(step.losses["student"].item() - logit_terms(d, b, 1.0)) > 1e-3
    assert step.metrics["kd"].item() == pytest.approx(kd_by_hand(d.student(b["x"]).detach(), d.teacher(b["x"])), rel=1e-5)


@pytest.mark.slow
def test_staged_fitnet_recipe_end_to_end(tmp_runs):
    r = load_recipe("digits-fitnet-staged")
    assert [s.name for s in r.stages] == ["hint", "kd"]
    data = yaml.safe_load(shipped_recipe("digits-fitnet-staged").read_text())
    data["task"] = {"name": "digits", "num_train": 200, "num_val": 50, "num_test": 100}
    data["teacher"] = {"recipe": {"name": "t", "seed": 0, "task": data["task"], "student": {"arch": "cnn2d", "width": 8, "depth": 3},
                                  "method": {"name": "ce"}, "train": {"epochs": 1, "batch_size": 64, "progress": False, "trackers": "none"}}}
    data["train"] |= {"epochs": 1, "progress": False, "trackers": "none"}
    data["stages"][0]["train"] = {"epochs": 1}
    res = run_recipe(recipe_from_dict(data), out=tmp_runs)
    assert "stage/hint/test/accuracy" in res.metrics and "stage/kd/test/accuracy" in res.metrics
    from safetensors.torch import load_file
    stage_dirs = sorted((res.run_dir / "stages").iterdir())
    hint = load_file(str(stage_dirs[0] / "student" / "model.safetensors"))
    ckpt = load_file(str(stage_dirs[0] / "checkpoints" / "latest" / "model.safetensors"))
    assert not any("projectors" in k for k in hint) and any(k.startswith("projectors.hint") for k in ckpt)


@pytest.mark.parametrize("task", ["digits", "mnist1d"])
@pytest.mark.parametrize("method", ["fitnet", "at", "pkt", "rkd", "sp", "vid", "crd", "reviewkd"])
def test_shipped_recipes_build_and_step(task, method):
    """Each shipped recipe's method on its real student/teacher shapes (2-D digits, 1-D MNIST-1D): one step."""
    from distill.tasks.base import ArrayDataset
    r = load_recipe(f"{task}-{method}")
    t_recipe = load_recipe(r.teacher.recipe)
    shape = (8, 8) if task == "digits" else (40,)
    torch.manual_seed(0)
    s = build_model(r.student.name, r.student.params, shape, 10)
    t = build_model(t_recipe.student.name, t_recipe.student.params, shape, 10)
    x, y = torch.rand(16, *shape), torch.arange(16) % 10
    entry = METHODS.get(method)
    d = entry.obj(s, t, entry.params(**r.method.params), TaskInfo(10, 16, shape, 16, train=ArrayDataset(x, y)))
    step = d.training_step({"x": x, "y": y, "index": torch.arange(16)})
    step.losses["student"].backward()
    assert torch.isfinite(step.losses["student"]) and s.head.weight.grad is not None
