"""Self-distillation with weighted ground-truth targets in kernel ridge regression (S09).

Borup & Andersen 2021, "Even your Teacher Needs Guidance: Ground-Truth Targets Dampen
Regularization Imposed by Self-Distillation" (official code: Kennethborup/self_distillation,
``toy_example.ipynb``, where the label weight is called ``alpha``; here ``label_weight`` = ξ).

Kernel ridge regression with Gram matrix ``K = V diag(d) Vᵀ`` ``[n, n]`` and ridge ``λ``:

- step τ = 1 fits the labels: ``f⁽¹⁾(x) = k(x)ᵀ (K + λI)⁻¹ y``;
- step τ ≥ 2 refits the same model to ``ξ·y + (1 − ξ)·f⁽ᵗ⁻¹⁾(X)`` (the weighted-MSE objective
  ``ξ‖y − f(X)‖² + (1 − ξ)‖f⁽ᵗ⁻¹⁾(X) − f(X)‖² + λ‖f‖²`` has the same minimiser).

On the training points ``f⁽ᵗ⁾(X) = V diag(b_τ) Vᵀ y`` with ``a = d / (d + λ)``, ``b₁ = a`` and
``b_τ = a·(ξ + (1 − ξ)·b_{τ−1})`` (the notebook's ``Recurser``), i.e. in closed form
``b_τ = ξ·a·Σ_{i<τ−1} ((1 − ξ)a)^i + (1 − ξ)^{τ−1} a^τ``: every step is a function of the initial
fit. As τ → ∞, ``b_∞ = d / (d + λ/ξ)``: the original problem with the ridge amplified to ``λ/ξ``.

Every fit is affine in ξ: ``f_ξ = f₀ + ξ·(f₁ − f₀)`` with ``f₁`` the fit to the labels and ``f₀``
the fit to the previous step's predictions, so the squared error against any target is a
quadratic in ξ whose minimiser is ``ξ* = ⟨target − f₀, f₁ − f₀⟩ / ‖f₁ − f₀‖²`` (the optimal weight
of a step; the paper measures it against the noise-free function). For networks the paper
estimates ξ* the same way from two trained models (ξ = 0 and ξ = 1) on held-out data, instead of
a grid search (``estimate_label_weight``); there it is an estimate, as a network is not affine in ξ.

Note: the paper's full text was not available when this was written; the formulas above are
derived from the official notebook and the setting the abstract states, and checked numerically
(``tests/test_self_distill.py``), so no equation numbers are cited.
Everything is computed in float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def rbf_kernel(a: Tensor, b: Tensor, gamma: float) -> Tensor:
    """``exp(−γ‖a_i − b_j‖²)`` ``[n, d] × [m, d] -> [n, m]`` (scikit-learn's ``rbf_kernel``)."""
    a, b = a.double(), b.double()
    return torch.exp(-gamma * torch.cdist(a, b).square())


def _weights(label_weight: float | Sequence[float], steps: int) -> list[float]:
    """ξ for steps 2..steps (a constant, or one value per distillation step)."""
    if isinstance(label_weight, (int, float)):
        return [float(label_weight)] * (steps - 1)
    w = [float(v) for v in label_weight]
    if len(w) != steps - 1:
        raise ValueError(f"need {steps - 1} label weights (steps 2..{steps}), got {len(w)}")
    return w


def iterative_self_distillation(
    K: Tensor,
    y: Tensor,
    lam: float,
    label_weight: float | Sequence[float],
    steps: int,
    K_eval: Tensor | None = None,
) -> list[Tensor]:
    """The procedure itself: refit kernel ridge regression ``steps`` times.

    ``K`` ``[n, n]`` training Gram matrix, ``y`` ``[n]`` or ``[n, outputs]``, ``K_eval`` ``[m, n]``
    kernel between evaluation and training points (default: the training points). Returns
    ``[f⁽¹⁾, …, f⁽ˢᵗᵉᵖˢ⁾]`` at the evaluation points.
    """
    K, y = K.double(), y.double()
    K_eval = K if K_eval is None else K_eval.double()
    ridge = K + lam * torch.eye(len(K), dtype=K.dtype)
    targets, out = y, []
    weights = [1.0] + _weights(label_weight, steps)
    for xi in weights:
        targets = xi * y + (1 - xi) * targets  # step 1: ξ = 1, the labels alone
        coef = torch.linalg.solve(ridge, targets)
        out.append(K_eval @ coef)
        targets = K @ coef  # this step's predictions on the training points
    return out


def closed_form_self_distillation(
    K: Tensor, y: Tensor, lam: float, label_weight: float, step: int, K_eval: Tensor | None = None
) -> Tensor:
    """``f⁽ᵗ⁾`` at the evaluation points directly from the eigen-decomposition of ``K`` (constant ξ).

    ``f⁽ᵗ⁾(x) = k(x)ᵀ V diag(c_τ / (d + λ)) Vᵀ y`` with ``c_τ = b_τ / a =
    ξ·(1 − r^{τ−1}) / (1 − r) + (1 − ξ)^{τ−1} a^{τ−1}``, ``r = (1 − ξ)a`` (no inverse of ``d`` is
    needed, so a singular ``K`` is fine).
    """
    K, y = K.double(), y.double()
    K_eval = K if K_eval is None else K_eval.double()
    d, V = torch.linalg.eigh(K)
    d = d.clamp_min(0.0)  # round-off can make tiny eigenvalues negative
    a = d / (d + lam)
    r = (1 - label_weight) * a
    n_prev = step - 1
    # Σ_{i<τ−1} r^i; r < 1 whenever ξ > 0 or λ > 0, and the term is multiplied by ξ anyway
    geometric = torch.where(r < 1, (1 - r**n_prev) / (1 - r).clamp_min(1e-300), torch.full_like(r, float(n_prev)))
    c = label_weight * geometric + (1 - label_weight) ** n_prev * a**n_prev
    proj = V.T @ y
    scale = (c / (d + lam)).reshape(-1, *([1] * (y.dim() - 1)))
    return K_eval @ (V @ (scale * proj))


def limit_self_distillation(
    K: Tensor, y: Tensor, lam: float, label_weight: float, K_eval: Tensor | None = None
) -> Tensor:
    """``f⁽∞⁾``: plain kernel ridge regression with the ridge amplified to ``λ / ξ`` (ξ > 0)."""
    if label_weight <= 0:
        raise ValueError("with label_weight 0 the iterates shrink to the zero function; the limit needs ξ > 0")
    K, y = K.double(), y.double()
    K_eval = K if K_eval is None else K_eval.double()
    return K_eval @ torch.linalg.solve(K + lam / label_weight * torch.eye(len(K), dtype=K.dtype), y)


def best_interpolation_weight(label_fit: Tensor, distill_fit: Tensor, target: Tensor, clip: bool = True) -> Tensor:
    """``argmin_ξ ‖target − (ξ·label_fit + (1 − ξ)·distill_fit)‖²`` over all entries.

    ``ξ* = ⟨target − f₀, f₁ − f₀⟩ / ‖f₁ − f₀‖²`` with ``f₁ = label_fit`` (ξ = 1) and
    ``f₀ = distill_fit`` (ξ = 0). The loss is a convex quadratic in ξ, so clipping to [0, 1] (the
    paper's range) gives the constrained minimiser.
    """
    f1, f0, t = label_fit.double(), distill_fit.double(), target.double()
    diff = f1 - f0
    xi = ((t - f0) * diff).sum() / (diff * diff).sum().clamp_min(1e-300)
    return xi.clamp(0.0, 1.0) if clip else xi


def optimal_label_weight(
    K: Tensor,
    y: Tensor,
    lam: float,
    previous: Tensor,
    target: Tensor,
    K_eval: Tensor | None = None,
    clip: bool = True,
) -> Tensor:
    """The optimal ξ of one distillation step of kernel ridge regression (exact).

    ``previous`` ``[n]``: the previous step's predictions on the training points; ``target`` the
    values to be matched at the evaluation points (the paper: the noise-free function). Exact
    because the step's fit is affine in ξ.
    """
    K = K.double()
    K_eval = K if K_eval is None else K_eval.double()
    ridge = K + lam * torch.eye(len(K), dtype=K.dtype)
    f1 = K_eval @ torch.linalg.solve(ridge, y.double())
    f0 = K_eval @ torch.linalg.solve(ridge, previous.double())
    return best_interpolation_weight(f1, f0, target, clip)


def estimate_label_weight(label_fit_probs: Tensor, distill_fit_probs: Tensor, labels: Tensor) -> Tensor:
    """The paper's estimate of ξ* for networks, from held-out predictions of two trained models.

    ``label_fit_probs`` ``[n, classes]``: the softmax of a model trained with ξ = 1 (labels only);
    ``distill_fit_probs``: of a model trained with ξ = 0 (the previous generation's outputs only);
    ``labels`` ``[n]``. Treats the network as if it were affine in ξ (exact for kernel ridge) and
    returns the ξ ∈ [0, 1] whose interpolated prediction is closest to the one-hot labels in
    squared error (the MSE-on-probabilities loss of the official ``self_distiller.py``).
    """
    onehot = F.one_hot(labels.long(), label_fit_probs.shape[-1]).double()
    return best_interpolation_weight(label_fit_probs, distill_fit_probs, onehot)
