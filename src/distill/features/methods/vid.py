"""``vid``: variational information distillation (Ahn et al. 2019, "Variational Information
Distillation for Knowledge Transfer").

Official code: ssahn0215/variational-information-distillation, as copied in RepDistiller
``distiller_zoo/VID.py :: VIDLoss`` (``--distill vid -a 0 -b 1``, pairs ``feat[1:-1]``,
``VIDLoss(s, t, t)``, ``init_pred_var 5.0``, ``eps 1e-5``); mdistiller ``distillers/VID.py``.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import Tensor, nn

from distill.core.distiller import Step, TaskInfo
from distill.core.registry import METHODS
from distill.errors import RecipeError
from distill.features.losses import match_spatial, vid_nll
from distill.features.classic import ClassicDistiller, LayerParams


class VIDRegressor(nn.Module):
    """The mean of the variational ``q(t | s)``: 1×1 conv (no bias) to ``mid`` channels, ReLU, 1×1 conv,
    ReLU, 1×1 conv to the teacher's channels (RepDistiller ``VIDLoss.regressor``, with mid = the
    teacher's channels); and ``log_scale`` α_c per teacher channel, ``σ²_c = softplus(α_c) + eps``,
    initialised so that ``σ²_c = init_var``. Linear layers for vector features."""

    def __init__(self, c_in: int, c_mid: int, c_out: int, rank: int, init_var: float, eps: float) -> None:
        super().__init__()
        if rank == 1:
            layer = lambda a, b: nn.Linear(a, b, bias=False)  # noqa: E731
        else:
            conv = nn.Conv1d if rank == 2 else nn.Conv2d
            layer = lambda a, b: conv(a, b, 1, bias=False)  # noqa: E731
        self.net = nn.Sequential(layer(c_in, c_mid), nn.ReLU(), layer(c_mid, c_mid), nn.ReLU(), layer(c_mid, c_out))
        self.log_scale = nn.Parameter(math.log(math.expm1(init_var - eps)) * torch.ones(c_out))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class VIDParams(LayerParams):
    vid_weight: float = Field(1.0, ge=0, description="β of the summed VID terms (RepDistiller -b 1)")
    init_var: float = Field(5.0, gt=0, description="initial variance σ² of every channel (official init_pred_var)")
    eps: float = Field(1e-5, gt=0, description="floor added to the softplus variance")


@METHODS.register("vid", "variational information distillation: Gaussian NLL with a learned variance per channel (Ahn2019)", VIDParams)
class VID(ClassicDistiller):
    """Variational information distillation (Ahn et al. 2019, §3): maximise a variational lower bound
    of the mutual information between teacher and student features, i.e. minimise, per layer pair,
    ``−log q(t | s)`` with ``q`` a Gaussian whose mean is a regressor of the student's map and whose
    variance is learned per teacher channel (heteroscedastic across channels, softplus-parametrised)::

        loss = ce_weight·CE + kd_weight·KD + vid_weight · Σ_pairs mean ½((t − μ(s))²/σ²_c + log σ²_c)

    (``vid_nll``; the larger map is average-pooled to the smaller's size first, as the official code).
    Default pairs: every feature layer (RepDistiller ``feat[1:-1]``). Regressors and variances live in
    ``self.projectors`` (the ``projectors`` parameter group, trained with the student).
    """

    maps = True  # a ViT's tokens become [B, D, h, w] maps (classic.tokens_to_map)
    params: VIDParams

    def __init__(self, student: nn.Module, teacher: nn.Module | None, params: VIDParams, info: TaskInfo) -> None:
        super().__init__(student, teacher, params, info)
        for name, (s_shape, t_shape) in zip(self.student_layers, self.shapes):
            if len(s_shape) != len(t_shape) or len(s_shape) not in (1, 2, 3):
                raise RecipeError(f"vid: student {s_shape} and teacher {t_shape} features of {name}: both maps or both vectors")
            reg = VIDRegressor(s_shape[0], t_shape[0], t_shape[0], len(s_shape), params.init_var, params.eps)
            self.projectors[name.replace(".", "__")] = reg

    def training_step(self, batch: dict[str, Tensor]) -> Step:
        s, t = self.forwards(batch["x"])
        terms = []
        for name, fs, ft in zip(self.student_layers, s.feats, t.feats):
            reg = self.projector(name)
            fs, ft = match_spatial(fs, ft) if fs.dim() > 2 else (fs, ft)
            terms.append(vid_nll(reg(fs), ft, reg.log_scale, self.params.eps))
        vid = torch.stack(terms).sum()
        return self.step(s, t, batch, self.params.vid_weight * vid, {"vid": vid})
