"""Super-resolution (S34 IMDN; sr_train, sr_kd): SSIM / PSNR against explicit loops and hand values,
IMDN against the official sizes and a hand-written block forward, the methods' objectives against
independent computations, the digits-sr task and its model folders, and a recipe end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from distill.core.distiller import TaskInfo
from distill.core.recipe import load_recipe, recipe_from_dict
from distill.core.registry import TASKS
from distill.core.runner import run_recipe
from distill.errors import MismatchError, RecipeError
from distill.features.data.sr import DigitsSRParams, build_digits_sr, degrade, load_sr_model
from distill.features.methods.sr_kd import SRKD, SRKDParams, SRTrain, SRTrainParams, dihedral, paired_layers
from distill.features.sr import (CCALayer, IMDModule, IMDNParams, build_sr_model, imdn, psnr, sr_metrics, ssim,
                                 stdv_channels)

# --- measures ---------------------------------------------------------------------------------------


def ref_ssim(a: np.ndarray, b: np.ndarray, win: int, sigma: float = 1.5, L: float = 255.0) -> float:
    """Wang et al. 2004 written out: for every position where the window fits, Gaussian-weighted means,
    population variances and covariance by explicit sums, the SSIM formula, then the mean."""
    r = [math.exp(-((i - (win - 1) / 2) ** 2) / (2 * sigma**2)) for i in range(win)]
    w = [[r[i] * r[j] / sum(r) ** 2 for j in range(win)] for i in range(win)]
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    vals = []
    for y0 in range(a.shape[0] - win + 1):
        for x0 in range(a.shape[1] - win + 1):
            mx = my = sxx = syy = sxy = 0.0
            for i in range(win):
                for j in range(win):
                    p, q = float(a[y0 + i, x0 + j]), float(b[y0 + i, x0 + j])
                    mx += w[i][j] * p
                    my += w[i][j] * q
            for i in range(win):
                for j in range(win):
                    p, q = float(a[y0 + i, x0 + j]) - mx, float(b[y0 + i, x0 + j]) - my
                    sxx += w[i][j] * p * p
                    syy += w[i][j] * q * q
                    sxy += w[i][j] * p * q
            vals.append((2 * mx * my + c1) * (2 * sxy + c2) / ((mx * mx + my * my + c1) * (sxx + syy + c2)))
    return sum(vals) / len(vals)


@pytest.mark.parametrize("size,win", [(13, 11), (7, 3), (12, 5)])
def test_ssim_by_explicit_sums(size, win):
    g = torch.Generator().manual_seed(size)
    a = (torch.rand(2, 1, size, size, generator=g) * 255).round()
    b = (a + torch.randn(2, 1, size, size, generator=g) * 30).clamp(0, 255).round()
    got = ssim(a, b, 255.0, win)
    for n in range(2):
        assert got[n].item() == pytest.approx(ref_ssim(a[n, 0].numpy(), b[n, 0].numpy(), win), rel=1e-9)


def test_ssim_identity_and_hand_value():
    x = torch.rand(3, 1, 12, 12) * 255
    assert torch.allclose(ssim(x, x), torch.ones(3, dtype=torch.float64))
    # constant images: no variance, SSIM = (2ab + C1) / (a² + b² + C1) with C1 = (0.01·255)² = 6.5025
    a, b = torch.full((1, 1, 11, 11), 100.0), torch.full((1, 1, 11, 11), 120.0)
    assert ssim(a, b).item() == pytest.approx(24006.5025 / 24406.5025, rel=1e-12)
    with pytest.raises(ValueError, match="window 11 is larger"):
        ssim(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))


def test_psnr_hand_values():
    a = torch.zeros(2, 1, 4, 4)
    b = torch.stack([torch.full((1, 4, 4), 10.0), torch.full((1, 4, 4), 0.0)])
    got = psnr(b, a)
    assert got[0].item() == pytest.approx(10 * math.log10(255**2 / 100), rel=1e-12)  # 28.1308...
    assert got[1].item() == 100.0  # identical: capped


def test_sr_metrics_quantise_and_shave_as_official():
    g = torch.Generator().manual_seed(0)
    hr = torch.rand(4, 1, 16, 16, generator=g)
    sr = (hr + 0.05 * torch.randn(4, 1, 16, 16, generator=g)).clamp(0, 1)
    base = sr_metrics(sr, hr, border=2)
    border = sr.clone()
    border[..., :2, :] = 1 - border[..., :2, :]  # only the shaved rows change
    assert sr_metrics(border, hr, border=2) == base
    assert sr_metrics(border, hr, border=1)["psnr"] < base["psnr"] - 1
    # below half an 8-bit level: the same quantised image (the official tensor2np rounds)
    q = (hr * 255).round() / 255
    assert sr_metrics(q + 0.4 / 255, hr, 2) == sr_metrics(q, hr, 2)
    # against the explicit formulas on the 8-bit, shaved images
    a, b = (sr.clamp(0, 1) * 255).round()[..., 2:-2, 2:-2], (hr * 255).round()[..., 2:-2, 2:-2]
    mse = ((a.double() - b.double()) ** 2).flatten(1).mean(1)
    assert base["psnr"] == pytest.approx((10 * torch.log10(255.0**2 / mse)).mean().item(), rel=1e-9)
    assert base["ssim"] == pytest.approx(np.mean([ref_ssim(a[n, 0].numpy(), b[n, 0].numpy(), 11) for n in range(4)]), rel=1e-9)


# --- IMDN (S34) -------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale,count", [(2, 694_404), (4, 715_176)])
def test_imdn_official_size_and_names(scale, count):
    """The official IMDN (3 channels, nf 64, 6 blocks): the paper's 694K / 715K parameters, counted from
    the official checkpoints IMDN_x2.pth / IMDN_x4.pth, and the official state-dict names (so those
    checkpoints load as is: verified against Zheng222/IMDN, outputs equal within 1.3e-6)."""
    m = imdn(IMDNParams(nf=64, num_modules=6), (3, 8, 8), scale)
    assert sum(p.numel() for p in m.parameters()) == count
    keys = set(m.state_dict())
    for k in ["fea_conv.weight", "IMDB1.c1.weight", "IMDB1.c2.weight", "IMDB3.c4.bias", "IMDB6.c5.weight",
              "IMDB6.cca.conv_du.0.weight", "IMDB6.cca.conv_du.2.bias", "c.0.weight", "LR_conv.weight",
              "upsampler.0.weight"]:
        assert k in keys
    sd = m.state_dict()
    assert tuple(sd["IMDB1.c2.weight"].shape) == (64, 48, 3, 3)  # refines the 48 remaining channels
    assert tuple(sd["IMDB1.c4.weight"].shape) == (16, 48, 3, 3)
    assert tuple(sd["IMDB1.cca.conv_du.0.weight"].shape) == (4, 64, 1, 1)
    assert tuple(sd["c.0.weight"].shape) == (64, 384, 1, 1)
    assert tuple(sd["upsampler.0.weight"].shape) == (3 * scale**2, 64, 3, 3)


def test_imd_block_by_hand():
    """One IMDB written out from its weights: split 4 | 12 after each of c1..c3 (LeakyReLU 0.05), c4 on
    the last 12, concat of the four 4-channel slices, CCA (population std + mean per channel,
    bottleneck, sigmoid), 1×1 c5, plus the input."""
    torch.manual_seed(0)
    blk = IMDModule(16)
    x = torch.randn(2, 16, 5, 6)

    def conv(layer, z):
        return F.conv2d(z, layer.weight, layer.bias, padding=layer.weight.shape[-1] // 2)

    def lrelu(z):
        return torch.where(z > 0, z, 0.05 * z)

    o1 = lrelu(conv(blk.c1, x))
    o2 = lrelu(conv(blk.c2, o1[:, 4:]))
    o3 = lrelu(conv(blk.c3, o2[:, 4:]))
    cat = torch.cat([o1[:, :4], o2[:, :4], o3[:, :4], conv(blk.c4, o3[:, 4:])], 1)
    flat = cat.flatten(2)
    stat = (flat.std(2, unbiased=False) + flat.mean(2))[:, :, None, None]
    du = blk.cca.conv_du
    att = torch.sigmoid(conv(du[2], torch.relu(conv(du[0], stat))))
    want = conv(blk.c5, cat * att) + x
    assert torch.allclose(blk(x), want, atol=1e-5)


def test_imdn_forward_by_hand():
    """The network written out: 3×3 features, blocks in a chain, 1×1 fusion of every block's output
    (LeakyReLU 0.05), 3×3 conv plus the long skip from the features, 3×3 conv to C·r² channels and a
    pixel shuffle ``out[c, h·r + i, w·r + j] = in[c·r² + i·r + j, h, w]``."""
    torch.manual_seed(1)
    m = imdn(IMDNParams(nf=8, num_modules=2), (1, 4, 4), 2)
    x = torch.rand(2, 1, 4, 5)
    fea = F.conv2d(x, m.fea_conv.weight, m.fea_conv.bias, padding=1)
    b1 = m.IMDB1(fea)
    b2 = m.IMDB2(b1)
    fused = F.conv2d(torch.cat([b1, b2], 1), m.c[0].weight, m.c[0].bias)
    fused = torch.where(fused > 0, fused, 0.05 * fused)
    lr = F.conv2d(fused, m.LR_conv.weight, m.LR_conv.bias, padding=1) + fea
    up = F.conv2d(lr, m.upsampler[0].weight, m.upsampler[0].bias, padding=1)  # [2, 4, 4, 5]
    want = torch.zeros(2, 1, 8, 10)
    for i in range(2):
        for j in range(2):
            want[:, 0, i::2, j::2] = up[:, i * 2 + j]
    assert torch.allclose(m(x), want, atol=1e-5)


def test_cca_contrast_is_population_std():
    x = torch.randn(2, 3, 4, 5)
    want = torch.tensor(np.std(x.numpy(), axis=(2, 3)))[:, :, None, None]
    assert torch.allclose(stdv_channels(x), want, atol=1e-6)
    cca = CCALayer(4, reduction=16)  # bottleneck at least one channel
    assert cca.conv_du[0].out_channels == 1


def test_sr_archs_shapes_and_errors():
    for s in (2, 4):
        for name, params in (("imdn", {"nf": 8, "num_modules": 2}), ("edsr", {"nf": 8, "num_blocks": 2})):
            m = build_sr_model(name, params, (1, 4, 4), s)
            assert m(torch.rand(3, 1, 4, 4)).shape == (3, 1, 4 * s, 4 * s)
    with pytest.raises(RecipeError, match="not a super-resolution model"):
        build_sr_model("cnn2d", {}, (1, 8, 8), 2)
    with pytest.raises(RecipeError, match="multiple of 4"):
        build_sr_model("imdn", {"nf": 10}, (1, 8, 8), 2)
    from distill.tasks.models import build_model

    with pytest.raises(RecipeError, match="super-resolution model: use it on an SR task"):
        build_model("imdn", {}, (8, 8), 10)  # on the digits classifier task


# --- the task ---------------------------------------------------------------------------------------


def _task(**kw):
    return build_digits_sr(DigitsSRParams(num_train=40, num_val=20, num_test=30, **kw))


def test_digits_sr_task():
    d = _task(scale=2)
    assert d.input_shape == (1, 8, 8) and d.hr_shape == (1, 16, 16)
    assert len(d.train) == 40 and len(d.val) == 20 and len(d.test) == 30
    assert torch.allclose(d.train.x, degrade(d.train.hr, 2, "bicubic"))
    assert _task().input_shape == (1, 4, 4)  # the default: ×4
    a = _task(downsample="area", scale=4)
    hr = a.train.hr[0, 0]
    assert a.input_shape == (1, 4, 4)
    assert a.train.x[0, 0, 1, 2].item() == pytest.approx(hr[4:8, 8:12].mean().item(), abs=1e-6)
    with pytest.raises(ValueError, match="fewer than ssim_window"):
        DigitsSRParams(hr_size=8)
    DigitsSRParams(hr_size=8, scale=2, ssim_window=3)
    assert TASKS.get("digits-sr").obj is build_digits_sr


def test_model_folder_round_trip_and_mismatch(tmp_path):
    d = _task(scale=2)
    spec = {"name": "imdn", "params": {"nf": 8, "num_modules": 2}}
    m = d.build_model(spec)
    d.save_model(tmp_path / "m", m, spec)
    back = d.load_model(tmp_path / "m")
    x = d.test.x[:4]
    assert torch.equal(m.eval()(x), back.eval()(x))
    assert d.saved_spec(tmp_path / "m") == spec
    assert type(load_sr_model(tmp_path / "m")).__name__ == "IMDN"
    with pytest.raises(MismatchError, match="×2 SR"):
        _task(scale=4).load_model(tmp_path / "m")
    with pytest.raises(MismatchError, match="needs"):
        _task(scale=4).check_models(m, None)
    metrics = d.final_metrics(m, build_sr_model("edsr", {"nf": 8, "num_blocks": 1}, (1, 8, 8), 2))
    for k in ["test/psnr", "test/ssim", "test/bicubic_psnr", "test/bicubic_ssim", "test/psnr_to_teacher", "val/psnr",
              "teacher/psnr", "teacher/ssim", "params/student", "params/teacher", "flops/student",
              "time/student_images_per_s"]:
        assert k in metrics and math.isfinite(metrics[k]), k


# --- the methods ------------------------------------------------------------------------------------


def _models():
    torch.manual_seed(0)
    s = build_sr_model("imdn", {"nf": 8, "num_modules": 2}, (1, 4, 4), 2)
    t = build_sr_model("imdn", {"nf": 16, "num_modules": 4}, (1, 4, 4), 2)
    return s, t


def _batch():
    g = torch.Generator().manual_seed(5)
    return {"x": torch.rand(3, 1, 4, 4, generator=g), "hr": torch.rand(3, 1, 8, 8, generator=g), "index": torch.arange(3)}


def _l1(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().numpy().ravel(), b.detach().numpy().ravel()
    return sum(abs(float(p) - float(q)) for p, q in zip(a, b)) / len(a)


def test_sr_train_is_the_official_l1():
    s, _ = _models()
    info = TaskInfo(0, 3, (1, 4, 4))
    step = SRTrain(s, None, SRTrainParams(augment=False), info).training_step(b := _batch())
    assert step.losses["student"].item() == pytest.approx(_l1(s(b["x"]), b["hr"]), rel=1e-5)


@pytest.mark.parametrize("sr_w,kd_w", [(1.0, 1.0), (0.5, 2.0)])
def test_sr_kd_output_term(sr_w, kd_w):
    s, t = _models()
    b = _batch()
    d = SRKD(s, t, SRKDParams(augment=False, sr_weight=sr_w, kd_weight=kd_w), TaskInfo(0, 3, (1, 4, 4)))
    out, t_out = s(b["x"]), t(b["x"])
    step = d.training_step(b)
    want = sr_w * _l1(out, b["hr"]) + kd_w * _l1(out, t_out)
    assert step.losses["student"].item() == pytest.approx(want, rel=1e-5)
    assert abs(step.losses["student"].item() - sr_w * _l1(out, b["hr"])) > 0.01  # the teacher term counts
    step.losses["student"].backward()
    assert all(p.grad is None for p in t.parameters())  # the teacher is a fixed target


def test_sr_kd_feature_hint():
    s, t = _models()
    b = _batch()
    d = SRKD(s, t, SRKDParams(augment=False, kd_weight=0.5, hint_weight=2.0), TaskInfo(0, 3, (1, 4, 4)))
    assert d.s_layers == ["IMDB1", "IMDB2"] and d.t_layers == ["IMDB2", "IMDB4"]
    # a manual forward through both models' blocks
    fs, ft = [], []
    h = s.fea_conv(b["x"])
    for name in ("IMDB1", "IMDB2"):
        h = getattr(s, name)(h)
        fs.append(h)
    h = t.fea_conv(b["x"])
    for i in range(1, 5):
        h = getattr(t, f"IMDB{i}")(h)
        ft.append(h)
    hint = sum(_l1(d.projector(n)(f), g) for n, f, g in zip(["IMDB1", "IMDB2"], fs, [ft[1], ft[3]])) / 2
    out = s(b["x"])
    want = _l1(out, b["hr"]) + 0.5 * _l1(out, t(b["x"])) + 2.0 * hint
    step = d.training_step(b)
    assert step.losses["student"].item() == pytest.approx(want, rel=1e-5)
    assert step.metrics["hint"].item() == pytest.approx(hint, rel=1e-5)
    assert set(d.param_groups()) == {"student", "projectors"}
    with pytest.raises(RecipeError, match="needs a teacher"):
        SRKD(s, None, SRKDParams(), TaskInfo(0, 3, (1, 4, 4)))


def test_paired_layers_and_dihedral():
    assert paired_layers(["a", "b", "c"], [f"t{i}" for i in range(6)]) == ["t1", "t3", "t5"]
    assert paired_layers(["a", "b"], ["t0", "t1", "t2"]) == ["t1", "t2"]
    m = torch.tensor([[1.0, 2.0], [3.0, 4.0]])[None, None].repeat(8, 1, 1, 1)
    out = dihedral(m, torch.arange(8))
    assert out[1, 0].tolist() == [[2, 1], [4, 3]]  # horizontal flip
    assert out[2, 0].tolist() == [[3, 4], [1, 2]]  # vertical flip
    assert out[4, 0].tolist() == [[1, 3], [2, 4]]  # transpose
    assert out[5, 0].tolist() == [[2, 4], [1, 3]]  # flip, then transpose: a 90° rotation
    assert len({tuple(o.flatten().tolist()) for o in out}) == 8  # the whole dihedral group
    hr = torch.rand(8, 1, 8, 8)
    k = torch.arange(8)
    assert torch.allclose(dihedral(degrade(hr, 2, "bicubic"), k), degrade(dihedral(hr, k), 2, "bicubic"), atol=1e-6)


def test_sr_train_augments_lr_and_hr_alike():
    s, _ = _models()
    b = _batch()
    torch.manual_seed(3)
    step = SRTrain(s, None, SRTrainParams(augment=True), TaskInfo(0, 3, (1, 4, 4))).training_step(b)
    torch.manual_seed(3)
    k = torch.randint(0, 8, (3,))
    assert step.losses["student"].item() == pytest.approx(_l1(s(dihedral(b["x"], k)), dihedral(b["hr"], k)), rel=1e-5)


# --- recipes ----------------------------------------------------------------------------------------


def test_recipes_validate_with_equal_budgets():
    names = ["digits-sr-student", "digits-sr-kd", "digits-sr-sr_kd"]
    rs = [load_recipe(n) for n in names]
    assert len({r.train.model_dump_json() for r in rs}) == 1
    assert len({str(r.student.model_dump()) for r in rs}) == 1
    assert [r.method.name for r in rs] == ["sr_train", "sr_kd", "sr_kd"]
    assert load_recipe("digits-sr-teacher").method.name == "sr_train"


def test_classifier_arch_on_the_sr_task_is_a_one_line_error(tmp_path):
    r = recipe_from_dict({"name": "x", "task": {"name": "digits-sr", "num_train": 20, "num_val": 10, "num_test": 10},
                          "student": {"arch": "cnn2d"}, "method": {"name": "sr_train"},
                          "train": {"epochs": 1, "progress": False, "trackers": "none"}})
    with pytest.raises(RecipeError, match="not a super-resolution model"):
        run_recipe(r, out=tmp_path)


@pytest.mark.slow
def test_sr_kd_recipe_end_to_end(tmp_path):
    small = ["task.num_train=64", "task.num_val=32", "task.num_test=32", "train.epochs=1", "train.progress=false",
             "train.trackers=none"]
    t = load_recipe("digits-sr-teacher", small)
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(t.resolved()))
    r = load_recipe("digits-sr-sr_kd", small)
    r = r.model_copy(update={"teacher": r.teacher.model_copy(update={"recipe": str(tmp_path / "t.yaml")})})
    res = run_recipe(r, out=tmp_path / "runs")
    m = res.metrics
    assert 0 < m["test/psnr"] < 100 and 0 < m["test/ssim"] <= 1 and m["params/teacher"] > m["params/student"]
    assert (res.run_dir / "student" / "model.safetensors").is_file()
    back = load_sr_model(res.run_dir)
    assert back(torch.rand(1, 1, 4, 4)).shape == (1, 1, 16, 16)  # ×4
