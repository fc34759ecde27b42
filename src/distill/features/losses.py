"""Pure feature-distillation losses and similarity measures: tensors in, tensor out, no state.

Shapes: features ``[batch, ...]`` (vectors ``[batch, dim]``, tokens ``[batch, tokens, dim]``, maps
``[batch, channels, *spatial]``); student and teacher features must already have the same shape
(map one onto the other with ``distill.features.projectors``). Everything is computed in float32
(float64 inputs stay float64). ``mask`` (``[batch]`` or ``[batch, tokens]``, true = counted) makes
masked positions contribute exactly zero; ``reduction`` is ``mean`` (over the counted positions),
``sum`` or ``none`` (one value per sample).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_EPS = 1e-12


def _work(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _check_same(s: Tensor, t: Tensor, what: str) -> None:
    if s.shape != t.shape:
        raise ValueError(f"{what}: student {tuple(s.shape)} and teacher {tuple(t.shape)} differ; add a projector")


def _reduce(per_pos: Tensor, mask: Tensor | None, reduction: str) -> Tensor:
    """``per_pos`` is ``[batch]`` or ``[batch, tokens]``; the mask selects what is counted."""
    if mask is not None:
        if mask.shape != per_pos.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match the positions {tuple(per_pos.shape)}")
        m = mask.to(per_pos.dtype)
        per_pos = torch.where(mask.bool(), per_pos, torch.zeros_like(per_pos))  # zero even where NaN
    else:
        m = torch.ones_like(per_pos)
    if reduction == "mean":
        return per_pos.sum() / m.sum().clamp_min(1.0)
    if reduction == "sum":
        return per_pos.sum()
    if reduction == "none":  # one value per sample: the mean over its counted positions
        return per_pos if per_pos.dim() == 1 else per_pos.sum(1) / m.sum(1).clamp_min(1.0)
    raise ValueError(f"reduction must be mean, sum or none, not {reduction!r}")


def _positions(x: Tensor, mask: Tensor | None) -> int:
    """How many leading dims index positions: 2 for token features with a ``[batch, tokens]`` mask."""
    return 2 if mask is not None and mask.dim() == 2 else 1


def hint_loss(student: Tensor, teacher: Tensor, mask: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """FitNets hint loss (Romero et al. 2015, Eq. 3): ``‖u_h(x) − r(v_g(x))‖²`` between the teacher's
    hint layer and the (projected) student's guided layer.

    We average the squared error over feature elements (so ``reduction="mean"`` is ``F.mse_loss``);
    the paper's ``½`` and sum are a constant factor left to the method's weight.
    """
    _check_same(student, teacher, "hint_loss")
    k = _positions(student, mask)
    d = (_work(student) - _work(teacher)).pow(2)
    return _reduce(d.flatten(k).mean(-1), mask, reduction)


def cosine_loss(student: Tensor, teacher: Tensor, mask: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """``1 − cos(s, t)`` over the last dimension (the cosine embedding loss of DistilBERT, Sanh et al.
    2019, §2), averaged over the other positions; insensitive to the features' scale."""
    _check_same(student, teacher, "cosine_loss")
    k = _positions(student, mask)
    d = 1.0 - F.cosine_similarity(_work(student), _work(teacher), dim=-1, eps=1e-8)
    d = d.reshape(*d.shape[:k], -1).mean(-1) if d.dim() > k else d
    return _reduce(d, mask, reduction)


def attention_map(features: Tensor, p: float = 2.0) -> Tensor:
    """Activation-based spatial attention (Zagoruyko & Komodakis 2017, §3.1, ``F^p_sum``):
    ``Q = Σ_c |A_c|^p`` over channels, flattened and L2-normalised (Eq. 2's ``Q/‖Q‖₂``).

    ``features``: ``[batch, channels, *spatial]`` -> ``[batch, prod(spatial)]``. The official code
    (szagoruyko/attention-transfer ``at``) takes the channel mean; the normalisation removes the 1/C.
    """
    a = _work(features).abs().pow(p).sum(1).flatten(1)
    return F.normalize(a, dim=1, eps=_EPS)


def at_loss(student: Tensor, teacher: Tensor, p: float = 2.0, reduction: str = "mean") -> Tensor:
    """Attention transfer (Zagoruyko & Komodakis 2017, Eq. 2), as in the official ``at_loss``:
    ``mean((Q_S/‖Q_S‖ − Q_T/‖Q_T‖)²)`` over positions and batch, for one pair of layers.

    Channels may differ (the map sums them out); spatial sizes must match. The paper's ``β/2``
    (β = 1000 in their experiments) and the sum over layer pairs are the method's.
    """
    if student.shape[0] != teacher.shape[0] or student.shape[2:] != teacher.shape[2:]:
        raise ValueError(f"at_loss: spatial shapes differ, student {tuple(student.shape)} teacher {tuple(teacher.shape)}")
    d = (attention_map(student, p) - attention_map(teacher, p)).pow(2).mean(1)
    return _reduce(d, None, reduction)


def similarity_matrix(features: Tensor) -> Tensor:
    """Similarity-preserving Gram matrix (Tung & Mori 2019, Eq. 1-2): ``G = Q Qᵀ`` of the flattened
    batch ``Q`` (``[b, -1]``), each row L2-normalised. Returns ``[b, b]``."""
    q = _work(features).flatten(1)
    return F.normalize(q @ q.T, dim=1, eps=_EPS)


def sp_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Similarity-preserving KD (Tung & Mori 2019, Eq. 3-4): ``‖G̃_T − G̃_S‖²_F / b²`` for one layer pair.

    Student and teacher widths may differ (the ``[b, b]`` matrices always match): no projector needed.
    The paper's γ and sum over layer pairs are the method's.
    """
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"sp_loss: batch sizes differ ({student.shape[0]} vs {teacher.shape[0]})")
    b = student.shape[0]
    return (similarity_matrix(teacher) - similarity_matrix(student)).pow(2).sum() / (b * b)


def _centre_gram(k: Tensor) -> Tensor:
    """``H K H`` with ``H = I − 11ᵀ/n``."""
    return k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()


def _cka_from_grams(k: Tensor, l: Tensor) -> Tensor:
    kc, lc = _centre_gram(k), _centre_gram(l)
    hsic = (kc * lc).sum()  # tr(KHLH), the 1/(n−1)² cancels in the ratio
    return hsic / ((kc * kc).sum().sqrt() * (lc * lc).sum().sqrt()).clamp_min(_EPS)


def _as_matrix(x: Tensor, name: str) -> Tensor:
    if x.dim() < 2:
        raise ValueError(f"{name} must be [N, D] (or [N, ...], flattened), got {tuple(x.shape)}")
    return _work(x).flatten(1)


def linear_cka(x: Tensor, y: Tensor) -> Tensor:
    """Linear centred kernel alignment (Kornblith et al. 2019, Eq. 5 after centring):
    ``‖YᵀX‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F)`` of column-centred ``x`` ``[N, D1]`` and ``y`` ``[N, D2]``.

    A similarity in [0, 1], invariant to orthogonal transforms and isotropic scaling of either side;
    widths may differ. Computed in feature space or, when cheaper, from the N×N Gram matrices.
    """
    x, y = _as_matrix(x, "x"), _as_matrix(y, "y")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka: x has {x.shape[0]} rows and y {y.shape[0]}; they must be the same examples")
    n, dx, dy = x.shape[0], x.shape[1], y.shape[1]
    if n * n > dx * dy:  # feature space: D1×D2 products
        x, y = x - x.mean(0), y - y.mean(0)
        num = (y.T @ x).pow(2).sum()
        den = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
        return num / den.clamp_min(_EPS)
    return _cka_from_grams(x @ x.T, y @ y.T)


def _rbf_gram(x: Tensor, sigma_frac: float) -> Tensor:
    sq = x.pow(2).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * x @ x.T).clamp_min(0)
    # official gram_rbf: σ² = threshold² · median of all squared distances (diagonal zeros included)
    med = torch.quantile(d2.flatten(), 0.5)
    return torch.exp(-d2 / (2 * sigma_frac**2 * med).clamp_min(_EPS))


def rbf_cka(x: Tensor, y: Tensor, sigma_frac: float = 0.8) -> Tensor:
    """CKA with Gaussian kernels (Kornblith et al. 2019, §4, their ``gram_rbf`` + ``cka``):
    ``k(xi, xj) = exp(−‖xi − xj‖² / (2σ²))`` with ``σ = sigma_frac · sqrt(median squared distance)``
    (the median over the whole N×N matrix, as in the official notebook), then
    ``HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))``. In [0, 1]; ``x`` ``[N, D1]``, ``y`` ``[N, D2]``.
    """
    x, y = _as_matrix(x, "x"), _as_matrix(y, "y")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"rbf_cka: x has {x.shape[0]} rows and y {y.shape[0]}; they must be the same examples")
    return _cka_from_grams(_rbf_gram(x, sigma_frac), _rbf_gram(y, sigma_frac))


def cka_loss(student: Tensor, teacher: Tensor, kernel: str = "linear", sigma_frac: float = 0.8) -> Tensor:
    """``1 − CKA(student, teacher)`` over the batch (rows = samples): a width-free feature loss."""
    if kernel == "linear":
        return 1.0 - linear_cka(student, teacher)
    if kernel == "rbf":
        return 1.0 - rbf_cka(student, teacher, sigma_frac)
    raise ValueError(f"cka kernel must be linear or rbf, not {kernel!r}")


# --- the classic feature losses (issue 15): PKT, RKD, VID, ReviewKD's HCL, CRD's NCE --------------
def match_spatial(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """Adaptive average pooling of the larger map down to the smaller one's spatial size, as the
    official AT and VID losses do (RepDistiller ``Attention.at_loss``, ``VIDLoss.forward``); maps
    ``[batch, channels, *spatial]`` (1-D or 2-D), channels untouched."""
    s_sp, t_sp = tuple(student.shape[2:]), tuple(teacher.shape[2:])
    if s_sp == t_sp:
        return student, teacher
    pool = F.adaptive_avg_pool1d if student.dim() == 3 else F.adaptive_avg_pool2d
    if all(s >= t for s, t in zip(s_sp, t_sp)):
        return pool(student, t_sp), teacher
    if all(s <= t for s, t in zip(s_sp, t_sp)):
        return student, pool(teacher, s_sp)
    raise ValueError(f"match_spatial: neither map is larger, student {s_sp} teacher {t_sp}")


def _kernel_probs(x: Tensor, eps: float) -> Tensor:
    """PKT's cosine kernel ``(cos + 1) / 2`` between every pair of the batch, rows normalised to sum 1."""
    x = x.flatten(1)
    x = x / (x.pow(2).sum(1, keepdim=True).sqrt() + eps)
    x = torch.nan_to_num(x, nan=0.0)  # the official zeroes NaNs
    k = (x @ x.T + 1.0) / 2.0
    return k / k.sum(1, keepdim=True)


def pkt_loss(student: Tensor, teacher: Tensor, eps: float = 1e-7) -> Tensor:
    """Probabilistic knowledge transfer (Passalis & Tefas 2018, §3): the conditional probabilities
    ``p_{i|j} = K(x_i, x_j) / Σ_i K(x_i, x_j)`` from the cosine-similarity kernel
    ``K(a, b) = (aᵀb / (‖a‖‖b‖) + 1) / 2`` of the teacher's and the student's batch, and
    ``KL(P_T ‖ Q_S)`` between them. As the authors' code (RepDistiller ``PKT.cosine_similarity_loss``):
    the diagonal (i = j) is kept, and the KL terms are averaged over all ``b²`` entries (the paper sums).
    Widths may differ: only the ``[b, b]`` matrices are compared."""
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"pkt_loss: batch sizes differ ({student.shape[0]} vs {teacher.shape[0]})")
    q, p = _kernel_probs(_work(student), eps), _kernel_probs(_work(teacher), eps)
    return (p * torch.log((p + eps) / (q + eps))).mean()


def pairwise_distances(x: Tensor, eps: float = 1e-12) -> Tensor:
    """Euclidean distances ``[b, b]`` of the flattened batch, the diagonal exactly 0 (RepDistiller
    ``RKDLoss.pdist``: squared distances clamped at ``eps`` before the root)."""
    x = x.flatten(1)
    sq = x.pow(2).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * x @ x.T).clamp_min(eps).sqrt()
    return d * (1 - torch.eye(len(x), dtype=d.dtype, device=d.device))


def rkd_distance_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """RKD distance-wise loss (Park et al. 2019, Eq. 3-4): ``ψ_D(t_i, t_j) = ‖t_i − t_j‖ / μ`` with μ the
    mean of the batch's non-zero distances, compared by the Huber loss (δ = 1, ``F.smooth_l1_loss``)
    averaged over all ``b²`` pairs, as the official ``RKDLoss``."""
    def psi(x: Tensor) -> Tensor:
        d = pairwise_distances(_work(x))
        return d / d[d > 0].mean()
    return F.smooth_l1_loss(psi(student), psi(teacher))


def _angles(x: Tensor) -> Tensor:
    """``[b, b, b]``: ``cos∠(x_j, x_i, x_k) = ⟨e_ij, e_ik⟩`` with ``e_ij = (x_j − x_i) / ‖x_j − x_i‖``
    (0 where ``i = j``), the vertex at ``i``."""
    x = x.flatten(1)
    e = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), p=2, dim=2)
    return torch.bmm(e, e.transpose(1, 2))


def rkd_angle_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """RKD angle-wise loss (Park et al. 2019, Eq. 5-6): the cosine of the angle each triple makes,
    compared by the Huber loss (δ = 1) averaged over all ``b³`` triples (degenerate ones included, as
    the official ``RKDLoss``)."""
    return F.smooth_l1_loss(_angles(_work(student)), _angles(_work(teacher)))


def vid_nll(mean: Tensor, target: Tensor, log_scale: Tensor, eps: float = 1e-5) -> Tensor:
    """Variational information distillation (Ahn et al. 2019, §3): the negative log-likelihood of the
    teacher's feature under a Gaussian with the student's predicted ``mean`` and a learned variance per
    channel ``σ²_c = softplus(α_c) + eps`` (heteroscedastic across channels, constant over positions):
    ``mean_{n,c,pos} ½ ((t − μ)² / σ²_c + log σ²_c)`` (the constant ½ log 2π dropped), as the authors'
    code (RepDistiller ``VIDLoss``). ``mean``/``target`` ``[batch, channels, ...]``, ``log_scale`` ``[channels]``."""
    _check_same(mean, target, "vid_nll")
    var = F.softplus(log_scale.float() if log_scale.dtype != torch.float64 else log_scale) + eps
    var = var.view(1, -1, *([1] * (mean.dim() - 2)))
    return (0.5 * ((_work(mean) - _work(target)).pow(2) / var + torch.log(var))).mean()


def hcl_loss(student: Tensor, teacher: Tensor, levels: tuple[int, ...] = (4, 2, 1)) -> Tensor:
    """ReviewKD's hierarchical context loss for one stage (Chen et al. 2021, §3.3), the official
    ``hcl_loss`` (mdistiller ``distillers/ReviewKD.py``): the MSE of the full maps plus, for each
    pyramid level ``l < H`` (maps pooled to ``l×l`` by adaptive average pooling, ``l`` for 1-D), the
    MSE of the pooled maps with weights ½, ¼, ...; divided by the sum of the weights."""
    _check_same(student, teacher, "hcl_loss")
    s, t = _work(student), _work(teacher)
    pool = F.adaptive_avg_pool1d if s.dim() == 3 else F.adaptive_avg_pool2d
    loss, cnt, tot = F.mse_loss(s, t), 1.0, 1.0
    for level in levels:
        if s.dim() < 3 or level >= s.shape[2]:
            continue
        cnt /= 2.0
        size = level if s.dim() == 3 else (level, level)
        loss = loss + F.mse_loss(pool(s, size), pool(t, size)) * cnt
        tot += cnt
    return loss / tot


def nce_contrast_loss(scores: Tensor, n_data: int, eps: float = 1e-7) -> Tensor:
    """CRD's NCE loss (Tian et al. 2020, Eq. 18; RepDistiller ``crd/criterion.py :: ContrastLoss``):
    ``scores`` ``[batch, 1 + m]`` are the normalised critic values ``exp(⟨·,·⟩/τ) / Z``, column 0 the
    positive pair, the others the ``m`` negatives; with the noise probability ``P_n = 1 / n_data``,
    ``−(Σ log(s₊ / (s₊ + m·P_n)) + Σ log(m·P_n / (s₋ + m·P_n))) / batch``."""
    x = _work(scores)
    m, pn = x.shape[1] - 1, 1.0 / float(n_data)
    pos, neg = x[:, 0], x[:, 1:]
    log_d1 = torch.log(pos / (pos + m * pn + eps))
    log_d0 = torch.log((m * pn) / (neg + m * pn + eps))
    return -(log_d1.sum() + log_d0.sum()) / x.shape[0]


def info_nce(a: Tensor, b: Tensor, temperature: float, symmetric: bool = False) -> Tensor:
    """InfoNCE between paired embeddings ``[..., N, D]`` (L2-normalised here, float32): row ``a[..., i]``
    picks ``b[..., i]`` among the ``N`` rows of ``b`` with the same leading indices, similarities cosine /
    ``temperature``; the mean over every row. ``symmetric`` adds ``b`` → ``a`` and halves the sum (CLIP).
    SimCSE (unsupervised, Gao et al. 2021) is ``info_nce(z1, z2, 0.05)``; CALICO's region loss (S55) uses
    ``[B·R, D]`` (negatives from every scene) or ``[B, R, D]`` (from the same scene)."""
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    logits = a @ b.transpose(-1, -2) / temperature
    n = logits.shape[-1]
    target = torch.arange(n, device=a.device).expand(logits.shape[:-1]).reshape(-1)
    loss = F.cross_entropy(logits.reshape(-1, n), target)
    if symmetric:
        loss = (loss + F.cross_entropy(logits.transpose(-1, -2).reshape(-1, n), target)) / 2
    return loss
