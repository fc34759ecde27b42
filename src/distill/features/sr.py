"""Single-image super-resolution for the feature family: the IMDN architecture (S34), a small
EDSR-style teacher, and the evaluation measures (PSNR, SSIM) of the official IMDN code.

IMDN (S34, official Zheng222/IMDN, ``model/architecture.py :: IMDN`` and ``model/block.py ::
IMDModule, CCALayer, stdv_channels, pixelshuffle_block``): a 3×3 feature conv, ``num_modules``
information multi-distillation blocks (IMDB), a 1×1 fusion of all blocks' outputs (+ LeakyReLU 0.05),
a 3×3 conv with a long skip from the first features, and a pixel-shuffle upsampler. Inside an IMDB
the "distillation" is a channel split: each of three 3×3 convs keeps ``distillation_rate`` of its
output channels and passes the rest on to the next conv (progressive refinement); the kept slices
and a fourth conv's output are concatenated, reweighted by contrast-aware channel attention (CCA:
channel std + channel mean, then a squeeze-excite bottleneck), fused by a 1×1 conv, plus the input.
Our module names equal the official ones (``fea_conv``, ``IMDB1``…, ``c``, ``LR_conv``,
``upsampler``), so an official checkpoint loads as is into ``imdn`` with ``in_channels=3, nf=64,
num_modules=6`` (``tests/test_features_sr.py`` checks the key set and the parameter count).

Archs here are super-resolution models: ``factory(params, input_shape=(C, h, w), scale)``; their
factory carries ``family = "sr"`` (the SR task refuses other archs, and these refuse a classifier
task's inputs).

Measures (``sr_metrics``), as the official ``train_IMDN.py :: valid`` with ``utils.py``: clamp to
[0, 1], quantise to 8 bits, shave ``scale`` pixels from each border, then per image PSNR (data range
255) and SSIM (Wang et al. 2004 with skimage's ``compare_ssim(gaussian_weights=True, sigma=1.5,
use_sample_covariance=False)``: an 11×11 Gaussian window, σ 1.5, K1 0.01, K2 0.03, population
statistics, the mean of the SSIM map over the positions where the window fits), averaged over images.
Images here are single-channel (the official code scores the Y channel of RGB images).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from distill.core.registry import ARCHS, Params
from distill.errors import RecipeError

MAX_PSNR = 100.0  # ours: identical images give this instead of inf (JSON-safe, averageable)


# --- measures -------------------------------------------------------------------------------------------
def gaussian_window(size: int = 11, sigma: float = 1.5, dtype: torch.dtype = torch.float64) -> Tensor:
    """The normalised 2-D Gaussian window ``[size, size]`` (outer product of the normalised 1-D one, as
    scipy's separable filter with ``truncate = (size // 2) / sigma``)."""
    r = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(x: Tensor, y: Tensor, data_range: float = 255.0, window: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> Tensor:
    """SSIM per image of ``[B, C, H, W]`` images (Wang et al. 2004, Eq. 13), one value per image:
    ``((2μxμy + C1)(2σxy + C2)) / ((μx² + μy² + C1)(σx² + σy² + C2))`` with local statistics under a
    Gaussian window (population (co)variances), ``C1 = (k1·L)²``, ``C2 = (k2·L)²``, averaged over
    channels and the positions where the window fits inside the image (a 'valid' filter, which equals
    skimage's reflect-padded filter cropped by ``window // 2``). Computed in float64."""
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim takes two [B, C, H, W] images of one shape, not {tuple(x.shape)} and {tuple(y.shape)}")
    if min(x.shape[-2:]) < window:
        raise ValueError(f"ssim window {window} is larger than the images ({x.shape[-2]}×{x.shape[-1]})")
    c = x.shape[1]
    w = gaussian_window(window, sigma).to(x.device).expand(c, 1, window, window)
    x, y = x.double(), y.double()

    def filt(z: Tensor) -> Tensor:
        return F.conv2d(z, w, groups=c)

    mx, my = filt(x), filt(y)
    vx, vy, cxy = filt(x * x) - mx * mx, filt(y * y) - my * my, filt(x * y) - mx * my
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def psnr(x: Tensor, y: Tensor, data_range: float = 255.0) -> Tensor:
    """PSNR per image, ``10·log10(L² / MSE)`` with the MSE over channels and pixels; float64. Identical
    images give ``MAX_PSNR`` (ours; skimage gives inf)."""
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    floor = data_range**2 * 10 ** (-MAX_PSNR / 10)
    return 10 * torch.log10(data_range**2 / mse.clamp_min(floor))


def to_uint8_range(img: Tensor) -> Tensor:
    """The official ``tensor2np``: clamp to [0, 1], ×255, round (8-bit values, kept as floats)."""
    return (img.float().clamp(0, 1) * 255.0).round()


def shave(img: Tensor, border: int) -> Tensor:
    """The official ``utils.shave``: drop ``border`` pixels on every side."""
    return img[..., border:-border, border:-border] if border > 0 else img


def sr_metrics(sr: Tensor, hr: Tensor, border: int, window: int = 11, quantize: bool = True) -> dict[str, float]:
    """Mean PSNR and SSIM over a batch of super-resolved images against the ground truth, as the
    official ``valid()`` (module doc); ``quantize=False`` scores the clamped floats on range 1."""
    if quantize:
        a, b, rng = shave(to_uint8_range(sr), border), shave(to_uint8_range(hr), border), 255.0
    else:
        a, b, rng = shave(sr.float().clamp(0, 1), border), shave(hr.float().clamp(0, 1), border), 1.0
    return {"psnr": psnr(a, b, rng).mean().item(), "ssim": ssim(a, b, rng, window).mean().item()}


def bicubic(lr: Tensor, scale: int) -> Tensor:
    """Bicubic ×``scale`` upsampling with the a = −0.5 kernel of MATLAB's ``imresize`` and PIL (torch's
    ``antialias=True`` path; the plain one uses a = −0.75): the baseline SR papers report."""
    return F.interpolate(lr, scale_factor=scale, mode="bicubic", align_corners=False, antialias=True)


# --- IMDN (S34) -----------------------------------------------------------------------------------------
def _conv(c_in: int, c_out: int, k: int) -> nn.Conv2d:
    """The official ``conv_layer``: 'same' padding, with bias."""
    return nn.Conv2d(c_in, c_out, k, padding=(k - 1) // 2)


def mean_channels(x: Tensor) -> Tensor:
    return x.mean(dim=(2, 3), keepdim=True)


def stdv_channels(x: Tensor) -> Tensor:
    """The official ``stdv_channels``: each channel's population standard deviation over its pixels,
    the "contrast" of CCA."""
    return (x - mean_channels(x)).pow(2).mean(dim=(2, 3), keepdim=True).pow(0.5)


class CCALayer(nn.Module):
    """Contrast-aware channel attention (S34 §3.2, official ``CCALayer``): ``x · σ(W2 ReLU(W1 (std(x) +
    mean(x))))`` per channel. The bottleneck is ``channel // reduction`` (at least 1: ours, for widths
    below ``reduction``)."""

    def __init__(self, channel: int, reduction: int = 16) -> None:
        super().__init__()
        mid = max(1, channel // reduction)
        self.conv_du = nn.Sequential(nn.Conv2d(channel, mid, 1), nn.ReLU(), nn.Conv2d(mid, channel, 1), nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        return x * self.conv_du(stdv_channels(x) + mean_channels(x))


class IMDModule(nn.Module):
    """The information multi-distillation block (S34 §3.1, official ``IMDModule``): three 3×3 convs
    (LeakyReLU 0.05) each split off ``d = int(C · distillation_rate)`` channels and refine the other
    ``C − d``; a fourth 3×3 conv maps those to ``d``; the four slices are concatenated (``4d``
    channels), passed through CCA and a 1×1 conv to ``C``, plus the block's input."""

    def __init__(self, in_channels: int, distillation_rate: float = 0.25, reduction: int = 16) -> None:
        super().__init__()
        self.distilled_channels = int(in_channels * distillation_rate)
        self.remaining_channels = int(in_channels - self.distilled_channels)
        d, r = self.distilled_channels, self.remaining_channels
        self.c1 = _conv(in_channels, in_channels, 3)
        self.c2 = _conv(r, in_channels, 3)
        self.c3 = _conv(r, in_channels, 3)
        self.c4 = _conv(r, d, 3)
        self.act = nn.LeakyReLU(0.05)
        self.c5 = _conv(in_channels, in_channels, 1)  # official: in_channels (= 4d when C % 4 == 0) -> C
        self.cca = CCALayer(d * 4, reduction)

    def forward(self, x: Tensor) -> Tensor:
        split = (self.distilled_channels, self.remaining_channels)
        d1, r1 = torch.split(self.act(self.c1(x)), split, dim=1)
        d2, r2 = torch.split(self.act(self.c2(r1)), split, dim=1)
        d3, r3 = torch.split(self.act(self.c3(r2)), split, dim=1)
        out = torch.cat([d1, d2, d3, self.c4(r3)], dim=1)
        return self.c5(self.cca(out)) + x


class IMDNParams(Params):
    nf: int = Field(16, ge=4, description="feature channels (official 64); a multiple of 4 (distillation_rate 0.25)")
    num_modules: int = Field(3, ge=1, description="IMDB blocks (official 6)")
    distillation_rate: float = Field(0.25, gt=0, lt=1, description="share of channels each conv keeps (official 0.25)")
    reduction: int = Field(16, ge=1, description="CCA bottleneck reduction (official 16)")


class IMDN(nn.Module):
    """S34's network (official ``architecture.IMDN``) for any block count; blocks are ``IMDB1``…``IMDBn``."""

    def __init__(self, in_channels: int, scale: int, p: IMDNParams) -> None:
        super().__init__()
        self.num_modules, self.scale = p.num_modules, scale
        self.fea_conv = _conv(in_channels, p.nf, 3)
        for i in range(p.num_modules):
            self.add_module(f"IMDB{i + 1}", IMDModule(p.nf, p.distillation_rate, p.reduction))
        self.c = nn.Sequential(nn.Conv2d(p.nf * p.num_modules, p.nf, 1), nn.LeakyReLU(0.05))
        self.LR_conv = _conv(p.nf, p.nf, 3)
        self.upsampler = nn.Sequential(_conv(p.nf, in_channels * scale**2, 3), nn.PixelShuffle(scale))

    def feature_layers(self) -> list[str]:
        return [f"IMDB{i + 1}" for i in range(self.num_modules)]

    def forward(self, x: Tensor) -> Tensor:
        fea = self.fea_conv(x)
        outs, h = [], fea
        for name in self.feature_layers():
            h = getattr(self, name)(h)
            outs.append(h)
        out_lr = self.LR_conv(self.c(torch.cat(outs, dim=1))) + fea
        return self.upsampler(out_lr)


def _sr_shape(arch: str, input_shape: tuple[int, ...], scale: int) -> int:
    """The channel count of an SR input ``(C, h, w)``; a one-line error for a classifier task's inputs."""
    if len(tuple(input_shape)) != 3 or not isinstance(scale, int) or scale < 2:
        raise RecipeError(f"arch '{arch}' is a super-resolution model: use it on an SR task (digits-sr), "
                          "not on a classifier task")
    return int(input_shape[0])


@ARCHS.register("imdn", "IMDN super-resolution net (S34): IMDB blocks tapped as IMDB1..IMDBn", IMDNParams)
def imdn(p: IMDNParams, input_shape: tuple[int, ...], scale: int) -> IMDN:
    c = _sr_shape("imdn", input_shape, scale)
    if 4 * int(p.nf * p.distillation_rate) != p.nf:  # the 4 kept slices must refill nf channels (c5, CCA)
        raise RecipeError(f"imdn: 4 × int(nf × distillation_rate) must equal nf, not 4 × int({p.nf} × "
                          f"{p.distillation_rate}); use distillation_rate 0.25 and nf a multiple of 4")
    return IMDN(c, scale, p)


imdn.family = "sr"  # type: ignore[attr-defined]


# --- EDSR-style teacher (ours) --------------------------------------------------------------------------
class EDSRParams(Params):
    nf: int = Field(64, ge=1, description="feature channels")
    num_blocks: int = Field(8, ge=1, description="residual blocks (conv-ReLU-conv, no batch norm)")
    res_scale: float = Field(1.0, gt=0, description="residual scaling (EDSR: 0.1 for wide models)")


class ResBlock(nn.Module):
    def __init__(self, nf: int, res_scale: float) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv(nf, nf, 3), nn.ReLU(), _conv(nf, nf, 3))
        self.res_scale = res_scale

    def forward(self, x: Tensor) -> Tensor:
        return x + self.res_scale * self.body(x)


class EDSR(nn.Module):
    """EDSR-baseline-style (Lim et al. 2017): head conv, residual blocks without batch norm + conv with a
    long skip, pixel-shuffle upsampler, tail conv. Not a paper of the catalogue: a stronger SR teacher
    (ours; no mean shift, single scale). Blocks are tapped as ``body.i``."""

    def __init__(self, in_channels: int, scale: int, p: EDSRParams) -> None:
        super().__init__()
        self.head = _conv(in_channels, p.nf, 3)
        self.body = nn.ModuleList(ResBlock(p.nf, p.res_scale) for _ in range(p.num_blocks))
        self.body_conv = _conv(p.nf, p.nf, 3)
        self.upsampler = nn.Sequential(_conv(p.nf, p.nf * scale**2, 3), nn.PixelShuffle(scale))
        self.tail = _conv(p.nf, in_channels, 3)

    def feature_layers(self) -> list[str]:
        return [f"body.{i}" for i in range(len(self.body))]

    def forward(self, x: Tensor) -> Tensor:
        h = fea = self.head(x)
        for block in self.body:
            h = block(h)
        return self.tail(self.upsampler(self.body_conv(h) + fea))


@ARCHS.register("edsr", "EDSR-style residual SR net (no BN, pixel shuffle), a super-resolution teacher", EDSRParams)
def edsr(p: EDSRParams, input_shape: tuple[int, ...], scale: int) -> EDSR:
    return EDSR(_sr_shape("edsr", input_shape, scale), scale, p)


edsr.family = "sr"  # type: ignore[attr-defined]


def build_sr_model(name: str, params: dict, input_shape: tuple[int, ...], scale: int) -> nn.Module:
    """A registered SR arch; a one-line error for an arch that is not one."""
    entry = ARCHS.get(name)
    if getattr(entry.obj, "family", None) != "sr":
        sr = [e.name for e in ARCHS.entries() if getattr(e.obj, "family", None) == "sr"]
        raise RecipeError(f"arch '{name}' is not a super-resolution model; SR tasks take {', '.join(sr)}")
    return entry.obj(entry.params.model_validate(params), tuple(input_shape), scale)


def count_flops(model: nn.Module, x: Tensor) -> int:
    """FLOPs of one forward of ``x`` (``torch.utils.flop_counter``, multiply-adds counted as 2)."""
    from distill.features.tap import flop_counter

    was = model.training
    model.eval()
    try:
        with torch.no_grad(), flop_counter() as fc:
            model(x)
        return int(fc.get_total_flops())
    finally:
        model.train(was)


def images_per_second(model: nn.Module, x: Tensor, repeats: int = 3) -> float:
    """Throughput of ``model`` on the batch ``x`` (best of ``repeats`` timed forwards after a warm-up)."""
    import time

    was = model.training
    model.eval()
    try:
        with torch.inference_mode():
            model(x)
            best = math.inf
            for _ in range(repeats):
                t0 = time.perf_counter()
                model(x)
                best = min(best, time.perf_counter() - t0)
        return len(x) / max(best, 1e-9)
    finally:
        model.train(was)
