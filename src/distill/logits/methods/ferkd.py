"""``ferkd``: FerKD, surgical soft/hard label adaptation on augmented views (Shen 2023, S13)."""

from __future__ import annotations

import torch
from pydantic import Field, model_validator
from torch import Tensor

from distill.core.distiller import Distiller, Step
from distill.core.registry import METHODS, Params
from distill.logits.methods.kd import targets_or_teacher
from distill.logits.losses import ferkd_loss, ferkd_regions
from distill.tasks.augment import MNIST1D_VIEW, random_view, self_mix


class FerKDParams(Params):
    discard_below: float = Field(
        0.1, ge=0, le=1, description="views whose teacher probability of the target is below this are dropped"
    )
    soft_above: float = Field(0.5, ge=0, le=1, description="views at or above this keep the teacher's soft label")
    smoothing: float = Field(0.1, ge=0, lt=1, description="label smoothing of the hard label given to views in between")
    temperature: float = Field(1.0, gt=0, description="of the soft labels (FKD/FerKD: 1)")
    self_mix_prob: float = Field(0.5, ge=0, le=1, description="fraction of samples trained on a SelfMix of two views")
    max_shift: int = Field(MNIST1D_VIEW["max_shift"], ge=0, description="circular shift, positions")
    crop_min: float = Field(MNIST1D_VIEW["crop_scale"][0], gt=0, le=1, description="smallest crop fraction")
    noise_std: float = Field(MNIST1D_VIEW["noise_std"], ge=0, description="Gaussian noise added to each view")

    @model_validator(mode="after")
    def _ordered(self) -> "FerKDParams":
        if self.discard_below > self.soft_above:
            raise ValueError(f"discard_below ({self.discard_below}) must not exceed soft_above ({self.soft_above})")
        return self


@METHODS.register(
    "ferkd", "FerKD: teacher-confidence regions of augmented views (drop / smoothed hard / soft) + SelfMix (S13)",
    FerKDParams,
)
class FerKD(Distiller):
    """FerKD (S13): each step trains on a fresh augmented view of every sample, which the teacher
    labels as the student sees it. By the teacher's probability of the target class on that view
    (``ferkd_regions``) a view is a hard negative (dropped), a hard positive (trained on the
    label-smoothed ground truth: "calibrates the less-confident regions ... using softened hard
    groundtruth labels") or an easy positive (trained on the teacher's soft label, FKD's soft
    cross-entropy); ``ferkd_loss`` averages over the views kept. No separate CE term (as FKD).

    Views (``distill.tasks.augment.random_view``): crop-resize, circular shift, Gaussian noise. With
    probability ``self_mix_prob`` a sample's view is instead SelfMix (``self_mix``) of two views of
    the same sample, labelled by the teacher on the mixed input.

    Deviations, and why: the official FerKD code is not released beyond FKD's training script
    (github.com/szq0214/FKD/tree/main/FerKD only holds a README; its soft labels are precomputed
    offline over many crops per ImageNet image and ranked per image). Here the teacher labels each
    view online and the regions are cut by fixed thresholds of its target-class probability;
    ``discard_below`` = 0.1 (chance level of 10 classes), ``soft_above`` = 0.5 and ``smoothing`` =
    0.1 (Szegedy's ε, torch's ``(1 − ε)·onehot + ε/C`` convention) are this library's defaults, not
    the paper's. Transfer-set samples have no label: their target is the teacher's top-1 on the
    un-augmented input.
    """

    params: FerKDParams

    def _view(self, x: Tensor) -> Tensor:
        p = self.params
        return random_view(x, p.max_shift, (p.crop_min, 1.0), p.noise_std)

    def training_step(self, batch: dict[str, Tensor]) -> Step:
        p, x = self.params, batch["x"]
        view = self._view(x)
        if p.self_mix_prob > 0:
            mixed, _ = self_mix(view, self._view(x))
            pick = torch.rand(len(x), device=x.device) < p.self_mix_prob
            view = torch.where(pick.view(-1, *[1] * (x.dim() - 1)), mixed, view)
        target = targets_or_teacher(batch, self.teacher_logits(x, batch["index"]))  # clean input: cache ok
        t = self.teacher_logits(view)  # the augmented view: never the cache
        s = self.student(view)
        loss = ferkd_loss(s, t, target, p.discard_below, p.soft_above, p.smoothing, p.temperature)
        region = ferkd_regions(t, target, p.discard_below, p.soft_above)
        metrics = {f"{name}_frac": (region == r).float().mean() for r, name in enumerate(("dropped", "hard", "soft"))}
        return Step({"student": loss}, {"ferkd": loss.detach(), **metrics})
