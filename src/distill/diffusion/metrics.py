"""Sample-quality measures of the diffusion family (pure functions of samples and references).

- ``mmd``: the unbiased squared MMD (Gretton et al. 2012, Eq. 3) with a sum of Gaussian kernels over
  several bandwidths (multiples of the reference set's median pairwise distance); ``mmd`` of two
  independent data draws is the floor no sampler beats on a finite sample.
- ``mode_stats`` (mixtures): precision = share of samples within ``k·σ`` of some mode; coverage = share
  of modes that hold at least ``min_share`` of a uniform share of the samples (a quarter by default).
- ``frechet``: Fréchet distance between Gaussians fitted to features (FID's formula; here the features
  of a digits classifier trained by the task itself, so the number is not comparable to FID).
- ``diversity``: mean pairwise distance of samples divided by that of data (1 = data-like spread;
  collapsed generators give ≪ 1).
- ``sample_grid``: a PNG of samples (a scatter over the data for 2-D tasks, an image grid for images).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

BANDWIDTHS = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)  # × the median pairwise distance of the reference set (small ones see mode sharpness)


def _flat(x: Tensor) -> Tensor:
    return x.reshape(len(x), -1).double()


def median_distance(x: Tensor) -> float:
    d = torch.cdist(_flat(x), _flat(x))
    return float(d[torch.triu(torch.ones_like(d, dtype=torch.bool), 1)].median())


def mmd(x: Tensor, y: Tensor, scale: float | None = None, bandwidths: tuple[float, ...] = BANDWIDTHS) -> float:
    """Unbiased MMD² between samples ``x`` [n, ...] and ``y`` [m, ...] (float64); kernel
    Σ_b exp(−‖a − c‖² / (2 (b·scale)²)), ``scale`` default the median pairwise distance of ``y``."""
    x, y = _flat(x), _flat(y)
    scale = scale if scale is not None else median_distance(y)
    n, m = len(x), len(y)

    def k(a: Tensor, c: Tensor) -> Tensor:
        d2 = torch.cdist(a, c) ** 2
        return sum(torch.exp(-d2 / (2 * (b * scale) ** 2)) for b in bandwidths)

    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(sxx + syy - 2 * kxy.mean())


def mode_stats(x: Tensor, centers: Tensor, std: float, k: float = 3.0, min_share: float = 0.25) -> tuple[float, float]:
    """(precision, coverage) of 2-D samples ``x`` against mixture ``centers`` [K, d] of isotropic ``std``."""
    d = torch.cdist(x.double(), centers.double())
    near, which = d.min(dim=1)
    ok = near <= k * std
    counts = torch.bincount(which[ok], minlength=len(centers)).double()
    covered = counts >= min_share * len(x) / len(centers)
    return float(ok.double().mean()), float(covered.double().mean())


def frechet(f1: Tensor, f2: Tensor) -> float:
    """‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½) of Gaussians fitted to features [n, d] (float64; the square
    root through the eigenvalues of Σ₁^½ Σ₂ Σ₁^½, which are real and ≥ 0)."""
    a, b = f1.double(), f2.double()
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = torch.cov(a.T), torch.cov(b.T)
    ev, evec = torch.linalg.eigh(s1)
    r1 = evec @ torch.diag(ev.clamp_min(0).sqrt()) @ evec.T
    tr_sqrt = torch.linalg.eigvalsh(r1 @ s2 @ r1).clamp_min(0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * tr_sqrt)


def mean_pairwise(x: Tensor, limit: int = 1000) -> float:
    x = _flat(x[:limit])
    d = torch.cdist(x, x)
    n = len(x)
    return float(d.sum() / (n * (n - 1)))


def diversity(x: Tensor, data: Tensor) -> float:
    return mean_pairwise(x) / max(mean_pairwise(data), 1e-12)


def sample_grid(path: Path, samples: Tensor, data: Tensor | None = None, title: str = "", labels: Tensor | None = None) -> None:
    """Write a PNG: 2-D samples over the data (grey), or images in a grid (rows by label if given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = samples.detach().float().cpu()
    if s.dim() == 2 and s.shape[1] == 2:
        fig, ax = plt.subplots(figsize=(4, 4))
        if data is not None:
            ax.scatter(*data[:2000].float().T.numpy(), s=2, c="0.7", label="data")
        ax.scatter(*s[:2000].T.numpy(), s=2, c="tab:blue", label="samples")
        ax.set_aspect("equal")
        ax.legend(loc="upper right", fontsize=7)
    else:
        imgs = s[:, 0] if s.dim() == 4 else s
        if labels is not None:  # up to 8 per class, a row per class
            order = [i for c in torch.unique(labels).tolist() for i in (labels == c).nonzero().flatten()[:8].tolist()]
            imgs = imgs[order]
        n = min(len(imgs), 80)
        cols = 8
        rows = (n + cols - 1) // cols
        canvas = np.ones((rows * 9, cols * 9), dtype=np.float32)
        for i in range(n):
            r, c = divmod(i, cols)
            canvas[r * 9 : r * 9 + 8, c * 9 : c * 9 + 8] = imgs[i].clamp(-1, 1).numpy() * 0.5 + 0.5
        fig, ax = plt.subplots(figsize=(cols * 0.6, rows * 0.6 + 0.3))
        ax.imshow(canvas, cmap="gray", vmin=0, vmax=1)
        ax.axis("off")
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
