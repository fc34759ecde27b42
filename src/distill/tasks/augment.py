"""Batch augmentations of signals ``[batch, length]`` and single-channel images ``[batch, H, W]``.

Pure functions: a tensor in, a new tensor out, every sample drawn independently. Randomness comes
from torch's RNG: the device's default generator (which the engine seeds from the recipe and
checkpoints, so runs and resumes are repeatable) or an explicit ``generator``. Used by methods that
train on augmented views, e.g. FerKD (S13), whose teacher labels the same view the student sees.

``MNIST1D_VIEW`` holds defaults for MNIST-1D (length-40 signals of unit std): the dataset's own
generator translates circularly, scales and adds noise, so the views stay in its distribution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

MNIST1D_VIEW: dict = {"max_shift": 4, "crop_scale": (0.7, 1.0), "noise_std": 0.05}


def _check(x: Tensor) -> None:
    if x.dim() not in (2, 3):
        raise ValueError(f"expected [batch, length] or [batch, H, W], got shape {tuple(x.shape)}")


def _uniform(n: int, low: float, high: float, x: Tensor, generator: torch.Generator | None) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device=x.device, dtype=torch.float32)


def _roll_rows(x: Tensor, shift: Tensor, dim: int) -> Tensor:
    """Circular shift of each sample by its own integer ``shift`` along ``dim`` (1 or 2)."""
    n = x.shape[dim]
    idx = (torch.arange(n, device=x.device) - shift[:, None]) % n  # out[i] = in[i - k]
    if x.dim() == 3:
        idx = idx[:, :, None] if dim == 1 else idx[:, None, :]
        idx = idx.expand_as(x)
    return x.gather(dim, idx)


def random_shift(x: Tensor, max_shift: int, generator: torch.Generator | None = None) -> Tensor:
    """Circular shift of every sample by an integer drawn uniformly from ``[-max_shift, max_shift]``
    along the last axis (and, for images, an independent one along the rows). ``x[i]`` moves to
    ``x[i + k]``, wrapping around, as MNIST-1D's own ``translate``. Values are only permuted."""
    _check(x)
    if max_shift <= 0:
        return x.clone()
    out = x
    for dim in range(1, x.dim()):
        k = torch.randint(-max_shift, max_shift + 1, (len(x),), generator=generator, device=x.device)
        out = _roll_rows(out, k, dim)
    return out


def random_resized_crop(
    x: Tensor, scale: tuple[float, float] = (0.7, 1.0), generator: torch.Generator | None = None
) -> Tensor:
    """RandomResizedCrop for signals and images: a window covering a fraction ``s ~ U(scale)`` of
    each axis (images: the same fraction on both axes, aspect ratio 1), at a uniformly random
    position inside the input, stretched back to the full size by (bi)linear interpolation.

    Output coordinate ``u ∈ [-1, 1]`` reads the input at ``s·u + c`` with ``c ~ U(-(1-s), 1-s)``
    (``align_corners=True``), so ``s = 1`` is the identity and the window never leaves the input.
    """
    _check(x)
    lo, hi = scale
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"crop scale must satisfy 0 < low <= high <= 1, got {scale}")
    n = len(x)
    s = _uniform(n, lo, hi, x, generator)
    img = x.float()[:, None] if x.dim() == 3 else x.float()[:, None, None]  # [n, 1, H, W] with H = 1 for signals
    cx = (2 * torch.rand(n, generator=generator, device=x.device) - 1) * (1 - s)
    if x.dim() == 3:
        sy, cy = s, (2 * torch.rand(n, generator=generator, device=x.device) - 1) * (1 - s)
    else:  # a signal is one row: nothing to crop vertically
        sy, cy = torch.ones_like(s), torch.zeros_like(s)
    h, w = img.shape[-2:]
    u = torch.linspace(-1, 1, w, device=x.device)
    v = torch.linspace(-1, 1, h, device=x.device) if h > 1 else torch.zeros(1, device=x.device)
    gx = (s[:, None, None] * u + cx[:, None, None]).expand(n, h, w)
    gy = (sy[:, None, None] * v[:, None] + cy[:, None, None]).expand(n, h, w)
    grid = torch.stack([gx, gy], dim=-1)  # [n, H, W, (x, y)] in grid_sample's normalised coordinates
    out = F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out.reshape(x.shape).to(x.dtype)


def gaussian_noise(x: Tensor, std: float, generator: torch.Generator | None = None) -> Tensor:
    """``x + std · ε`` with i.i.d. standard normal ``ε`` of the shape of ``x``."""
    _check(x)
    return x + std * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def random_view(
    x: Tensor,
    max_shift: int = 4,
    crop_scale: tuple[float, float] = (0.7, 1.0),
    noise_std: float = 0.05,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One augmented view: crop-resize, then circular shift, then Gaussian noise."""
    view = random_shift(random_resized_crop(x, crop_scale, generator), max_shift, generator)
    return gaussian_noise(view, noise_std, generator)


def self_mix(view_a: Tensor, view_b: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """FerKD's stable SelfMix (S13: "mixing similar regions within the same image"): CutMix between
    two views *of the same samples*, so the mixed input (and its soft label) stays close to both.

    Per sample, a fraction ``1 − λ`` with ``λ ~ U(0, 1)`` (CutMix's Beta(1, 1)) of the length (for
    images, ``sqrt(1 − λ)`` of each side: a box) at a uniform random position is copied from
    ``view_b`` into ``view_a``. Returns the mixed batch and ``λ`` ``[batch]``, the fraction actually
    kept from ``view_a`` (after rounding to whole positions), to mix precomputed labels; a live
    teacher can label the mixed view directly. With ``view_b = view_a[perm]`` this is plain CutMix.
    """
    _check(view_a)
    if view_a.shape != view_b.shape:
        raise ValueError(f"views differ in shape: {tuple(view_a.shape)} vs {tuple(view_b.shape)}")
    n, dims = len(view_a), view_a.shape[1:]
    lam = torch.rand(n, generator=generator, device=view_a.device)
    side = (1 - lam) if len(dims) == 1 else (1 - lam).sqrt()
    box = torch.ones((n, *dims), dtype=torch.bool, device=view_a.device)  # True = copied from view_b
    for axis, size in enumerate(dims):
        cut = (side * size).round().long()
        start = (torch.rand(n, generator=generator, device=view_a.device) * (size - cut + 1)).floor().long()
        start = start.clamp(max=size - cut)  # rand < 1, but guard the float edge
        pos = torch.arange(size, device=view_a.device)
        inside = (pos >= start[:, None]) & (pos < (start + cut)[:, None])  # [n, size]
        shape = [n] + [1] * len(dims)
        shape[axis + 1] = size
        box = box & inside.view(shape)
    mixed = torch.where(box, view_b, view_a)
    return mixed, 1 - box.flatten(1).float().mean(1)
