"""``multi_source``: DistillNearest / DistillWeighted (S22, Borup, Phoo & Hariharan 2023, "Distilling from
Similar Tasks for Transfer Learning on a Budget", arXiv 2304.12314). No official code is public.

Several source models trained on other tasks (no source data), a target task with few labels and an
unlabelled transfer set. Each source is scored by a task-similarity measure computed on the labelled
target data through the source's features; DistillNearest distils from the best-scoring source only,
DistillWeighted from every source, weighted by the softmax of the scores. What is distilled are the
sources' features (the student's penultimate features through one projector per source) and their
pseudo-labels for the target classes (the abstract: "merely need features and pseudo-labels of the source
models"), a linear probe on each source's features fitted to the labelled target data.

Only the abstract and the paper's title page could be read here, so the formulas below are ours:

- scores (``score``): ``ncc``, the leave-one-out accuracy of a nearest-centroid classifier on the
  source's z-scored features of the labelled target samples (the default); ``gbc``, the Gaussian
  Bhattacharyya coefficient of Pándy et al. 2022 (``−Σ_{c≠c'} BC(c, c')`` of per-class diagonal
  Gaussians), one of the transferability metrics the paper's selection draws on;
- weights: ``w = onehot(argmax score)`` (nearest) or ``w = softmax(score / temperature)`` (weighted);
- loss on a batch (labelled and transfer samples; CE on the labelled ones only)::

      ce_weight · CE(s, y) + feat_weight · Σ_i w_i · ‖P_i(f_S(x)) − ĝ_i(x)‖²
                           + pl_weight · T² · KL(Σ_i w_i softmax(probe_i(ĝ_i(x))) ‖ softmax(s / T))

  ``ĝ_i`` is source i's penultimate feature z-scored with the labelled target set's statistics (so the
  sources' hint losses share a scale), ``P_i`` a projector (``features/projectors.py``), ``‖·‖²`` the
  mean squared error (``features.losses.hint_loss``), ``probe_i`` an L2-regularised multinomial logistic
  regression fitted once (L-BFGS) on the labelled target features. Sources of weight 0 are not run.

The engine hands a method one teacher: give the sources as ``teacher: {sources: [REF, ...]}``
(``features/sources.py``); a plain classifier teacher is a set of one (single-source feature KD). After
scoring, ``self.teacher`` is the pseudo-label teacher (``SourceTeacher``: the weighted mixture of the
probes), so ``teacher/accuracy`` and the fidelity metrics are the probes' on the target classes.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from distill.core.distiller import Step, TaskInfo
from distill.core.registry import METHODS, Params
from distill.errors import DataError, RecipeError
from distill.features.base import FeatureDistiller
from distill.features.losses import hint_loss
from distill.features.sources import SourceSet, as_sources
from distill.logits.losses import kd_loss
from distill.logits.methods.kd import labeled_ce


def zscore_stats(g: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Per-feature mean and std (unbiased=False, floored at ``eps``) of ``g`` ``[n, d]``."""
    g = g.float()
    return g.mean(0), g.std(0, unbiased=False).clamp_min(eps)


def ncc_loo_score(g: Tensor, y: Tensor, num_classes: int) -> Tensor:
    """Leave-one-out accuracy of the nearest-centroid classifier on features ``g`` ``[n, d]`` with labels
    ``y``: sample i is compared with the centroids of the other classes and with its own class's centroid
    computed without it (a class of one sample cannot be right). Returns a scalar in [0, 1]."""
    g = g.float()
    onehot = F.one_hot(y, num_classes).float()
    count = onehot.sum(0)  # [C]
    sums = onehot.T @ g  # [C, d]
    mu = sums / count.clamp_min(1).unsqueeze(1)
    d2 = torch.cdist(g, mu).pow(2)  # [n, C]
    own = (sums[y] - g) / (count[y] - 1).clamp_min(1).unsqueeze(1)  # own centroid without the sample
    d_own = (g - own).pow(2).sum(1)
    d_own = torch.where(count[y] > 1, d_own, torch.full_like(d_own, float("inf")))
    d2 = torch.where(onehot.bool(), d_own.unsqueeze(1), d2)
    d2 = torch.where(count.unsqueeze(0) > 0, d2, torch.full_like(d2, float("inf")))  # classes absent from y
    return (d2.argmin(1) == y).float().mean()


def gbc_score(g: Tensor, y: Tensor, num_classes: int, eps: float = 1e-6) -> Tensor:
    """Gaussian Bhattacharyya coefficient (Pándy et al. 2022, GBC): class-conditional diagonal Gaussians
    ``N(μ_c, diag σ²_c)``; ``D_B = ⅛ Σ_k (μ_c − μ_c')²_k / σ²_k + ½ Σ_k ln(σ²_k / √(σ²_c,k σ²_c',k))`` with
    ``σ² = (σ²_c + σ²_c')/2``; ``GBC = −Σ_{c≠c'} exp(−D_B)`` over ordered pairs of the classes present.
    Higher (closer to 0) = better separated classes."""
    g = g.float()
    present = [c for c in range(num_classes) if (y == c).any()]
    mu = torch.stack([g[y == c].mean(0) for c in present])
    var = torch.stack([g[y == c].var(0, unbiased=False) for c in present]).clamp_min(eps)
    v = (var.unsqueeze(1) + var.unsqueeze(0)) / 2  # [C, C, d]
    db = ((mu.unsqueeze(1) - mu.unsqueeze(0)).pow(2) / v).sum(-1) / 8
    db = db + 0.5 * (v.log() - 0.5 * (var.unsqueeze(1).log() + var.unsqueeze(0).log())).sum(-1)
    bc = torch.exp(-db)
    return -(bc.sum() - bc.diagonal().sum())


SCORES = {"ncc": ncc_loo_score, "gbc": gbc_score}


def source_weights(scores: Tensor, select: str, temperature: float) -> Tensor:
    """DistillNearest: one-hot on the best score (the first on ties); DistillWeighted: ``softmax(s / T)``."""
    if select == "nearest":
        return F.one_hot(scores.argmax(), len(scores)).float()
    return torch.softmax(scores.float() / temperature, dim=0)


def fit_probe(g: Tensor, y: Tensor, num_classes: int, l2: float, steps: int = 100) -> nn.Linear:
    """Multinomial logistic regression ``softmax(W g + b)`` minimising ``CE + l2·‖W‖²`` with L-BFGS from
    zeros (deterministic); ``g`` are already z-scored features."""
    probe = torch.nn.utils.skip_init(nn.Linear, g.shape[1], num_classes)  # draws no random numbers
    nn.init.zeros_(probe.weight)
    nn.init.zeros_(probe.bias)
    opt = torch.optim.LBFGS(probe.parameters(), max_iter=steps, line_search_fn="strong_wolfe")
    g = g.float().detach()

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(probe(g), y) + l2 * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    probe.zero_grad(set_to_none=True)
    return probe.requires_grad_(False)


def weighted_feature_loss(projected: list[Tensor], targets: list[Tensor], weights: list[float]) -> Tensor:
    """``Σ_i w_i · hint_loss(P_i f_S, ĝ_i)`` over the active sources."""
    return torch.stack([w * hint_loss(p, t) for p, t, w in zip(projected, targets, weights)]).sum()


class SourceTeacher(nn.Module):
    """The sources with their feature statistics, probes and weights: ``features(x)`` gives the active
    sources' z-scored features, ``forward(x)`` the log of the weighted mixture of the probes'
    target-class distributions (the pseudo-labels)."""

    def __init__(self, sources: SourceSet, mean: list[Tensor], std: list[Tensor], probes: list[nn.Linear],
                 weights: Tensor, scores: Tensor) -> None:
        super().__init__()
        self.sources = sources
        self.probes = nn.ModuleList(probes)
        self.register_buffer("weights", weights)
        self.register_buffer("scores", scores)
        for i, (m, s) in enumerate(zip(mean, std)):
            self.register_buffer(f"mean{i}", m)
            self.register_buffer(f"std{i}", s)
        self.active = [i for i in range(len(sources)) if float(weights[i]) > 0]

    def features(self, x: Tensor) -> list[Tensor]:
        return [(self.sources.members[i].embed(x).float() - getattr(self, f"mean{i}")) / getattr(self, f"std{i}")
                for i in self.active]

    def mixture(self, feats: list[Tensor]) -> Tensor:
        """``log Σ_i w_i softmax(probe_i(ĝ_i))`` from the active sources' ``features``."""
        logp = [F.log_softmax(self.probes[i](g), -1) + self.weights[i].log() for i, g in zip(self.active, feats)]
        return torch.logsumexp(torch.stack(logp), 0)

    def forward(self, x: Tensor) -> Tensor:
        return self.mixture(self.features(x))


class MultiSourceParams(Params):
    select: Literal["nearest", "weighted"] = Field("weighted", description="DistillNearest (best source) or DistillWeighted (softmax of the scores)")
    score: Literal["ncc", "gbc"] = Field("ncc", description="task similarity on the labelled target data through each source's features")
    temperature: float = Field(0.1, gt=0, description="softmax temperature over the scores (weighted)")
    ce_weight: float = Field(1.0, ge=0)
    feat_weight: float = Field(1.0, ge=0, description="weighted feature distillation (MSE through a projector per source)")
    pl_weight: float = Field(1.0, ge=0, description="weighted pseudo-label KD from the sources' linear probes")
    pl_temperature: float = Field(1.0, gt=0, description="KD temperature of the pseudo-label term (T² applied)")
    probe_l2: float = Field(1e-3, ge=0, description="L2 penalty of the linear probes")
    projector: Literal["linear", "mlp"] = Field("linear")


@METHODS.register("multi_source", "DistillNearest / DistillWeighted: task-similarity choice or weighting of several source teachers (S22)", MultiSourceParams)
class MultiSource(FeatureDistiller):
    """S22 DistillNearest / DistillWeighted; the loss and every choice are in the module docstring."""

    params: MultiSourceParams

    def __init__(self, student: nn.Module, teacher: nn.Module | None, params: MultiSourceParams, info: TaskInfo) -> None:
        super().__init__(student, teacher, params, info)
        if not (callable(getattr(student, "embed", None)) and isinstance(getattr(student, "head", None), nn.Module)):
            raise RecipeError("multi_source: the student must be a classifier with embed(x) and head (any registered classifier arch)")
        sources = as_sources(teacher)
        train = info.train
        lab = train.y >= 0
        if int(lab.sum()) < 2:
            raise DataError("multi_source: the task has fewer than 2 labelled training samples to score the sources with")
        x, y = train.x[lab], train.y[lab]
        means, stds, probes, scores = [], [], [], []
        with torch.inference_mode():
            raw = [m.embed(x).float() for m in sources.members]
        for g in raw:
            g = g.clone()
            m, s = zscore_stats(g)
            z = (g - m) / s
            means.append(m)
            stds.append(s)
            scores.append(SCORES[params.score](z, y, info.num_classes))
            probes.append(fit_probe(z, y, info.num_classes, params.probe_l2))
        score_t = torch.stack(scores)
        weights = source_weights(score_t, params.select, params.temperature)
        self.teacher = SourceTeacher(sources, means, stds, probes, weights, score_t).eval().requires_grad_(False)
        self.names = sources.names
        example = self.example_input()
        with torch.inference_mode():
            s_dim = student.embed(example).shape[1:]
        for i, g in enumerate(raw):
            if i in self.teacher.active:
                self.add_projector(f"source{i}", params.projector, s_dim, g.shape[1:])

    def training_step(self, batch: dict[str, Tensor]) -> Step:
        p, t = self.params, self.teacher
        f = self.student.embed(batch["x"])
        s = self.student.head(f)
        with torch.inference_mode():
            feats = t.features(batch["x"])
            pl = t.mixture(feats).clone()
            targets = [g.clone() for g in feats]
        ce = labeled_ce(s, batch)
        projected = [self.projector(f"source{i}")(f) for i in t.active]
        feat = weighted_feature_loss(projected, targets, [float(t.weights[i]) for i in t.active])
        pl_kd = kd_loss(s, pl, p.pl_temperature)
        loss = p.ce_weight * ce + p.feat_weight * feat + p.pl_weight * pl_kd
        metrics = {"ce": ce.detach(), "feat": feat.detach(), "pl": pl_kd.detach()}
        metrics |= {f"weight_{n}": float(w) for n, w in zip(self.names, t.weights)}
        metrics |= {f"score_{n}": float(v) for n, v in zip(self.names, t.scores)}
        return Step({"student": loss}, metrics)
