"""``fitnet``: FitNets, hint-based training (Romero et al. 2015, "FitNets: Hints for Thin Deep Nets").

Official code: none of the paper's own in PyTorch; RepDistiller (HobbitLong/RepDistiller)
``distiller_zoo/FitNet.py :: HintLoss`` and ``models/util.py :: ConvReg``, ``train_student.py``
(``--distill hint``, hint layer 2, ``-b 100``); mdistiller ``distillers/FitNet.py``.

Its base, shared with the seven other classic methods, is ``features/classic.py``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import Tensor, nn

from distill.core.distiller import Step, TaskInfo
from distill.core.registry import METHODS
from distill.errors import RecipeError
from distill.features.classic import ClassicDistiller, LayerParams, as_map
from distill.features.losses import hint_loss
from distill.features.projectors import make_projector
from distill.features.tap import FeatureTap


# --- FitNets -------------------------------------------------------------------------------------
class ConvRegressor(nn.Module):
    """RepDistiller's ``ConvReg`` (FitNets' convolutional regressor, §3.1), 1-D or 2-D: a 3×3 stride-2
    conv when the student map is twice the teacher's, a 4×4 stride-2 transposed conv when half, else a
    ``(1 + s − t)`` "valid" conv; then batch norm and ReLU (the hint layers are post-ReLU)."""

    def __init__(self, s_shape: tuple[int, ...], t_shape: tuple[int, ...]) -> None:
        super().__init__()
        if len(s_shape) != len(t_shape) or len(s_shape) not in (2, 3):
            raise RecipeError(f"fitnet: a convolutional regressor maps (C, L) or (C, H, W) maps, not {s_shape} -> {t_shape}")
        two = len(s_shape) == 3
        conv, tconv, bn = (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d) if two else (nn.Conv1d, nn.ConvTranspose1d, nn.BatchNorm1d)
        (sc, *ss), (tc, *ts) = s_shape, t_shape
        if all(s == 2 * t for s, t in zip(ss, ts)):
            self.conv = conv(sc, tc, 3, stride=2, padding=1)
        elif all(2 * s == t for s, t in zip(ss, ts)):
            self.conv = tconv(sc, tc, 4, stride=2, padding=1)
        elif all(s >= t for s, t in zip(ss, ts)):
            self.conv = conv(sc, tc, tuple(1 + s - t for s, t in zip(ss, ts)))
        else:
            raise RecipeError(f"fitnet: no regressor from a student map {s_shape} to a smaller-or-equal teacher map {t_shape}")
        self.bn, self.relu = bn(tc), nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self.conv(x)))


def hint_regressor(kind: str, s_shape: tuple[int, ...], t_shape: tuple[int, ...]) -> nn.Module:
    """``conv``: ``ConvRegressor`` between maps, RepDistiller's ``Regress`` (Linear + ReLU) between
    vectors; any other kind is a ``make_projector`` kind (``linear`` for a ViT's tokens)."""
    if kind != "conv":
        return make_projector(kind, s_shape, t_shape)
    if len(s_shape) == 1 and len(t_shape) == 1:
        return nn.Sequential(nn.Linear(s_shape[0], t_shape[0]), nn.ReLU())
    return ConvRegressor(s_shape, t_shape)


class FitNetParams(LayerParams):
    hint_weight: float = Field(100.0, ge=0, description="β of the hint MSE (RepDistiller -b 100)")
    regressor: str = Field("conv", description="conv (RepDistiller ConvReg; Linear+ReLU for vectors) or a projector kind (linear, mlp, conv1x1)")
    stage: Literal["joint", "hint"] = Field("joint", description="joint: CE (+KD) + β·hint in one run (RepDistiller); "
                                            "hint: FitNets stage 1, the hint MSE alone, the student run only up to its guided layer")


@METHODS.register("fitnet", "FitNets: hint MSE through a learned regressor (Romero2015); stage: hint for the two-stage recipe", FitNetParams)
class FitNet(ClassicDistiller):
    """FitNets (Romero et al. 2015), hint-based training: a regressor ``r`` maps the student's guided
    layer onto the teacher's hint layer and ``L_HT = ‖u_h(x) − r(v_g(x))‖²`` (Eq. 3) is minimised.

    - ``stage: joint`` (RepDistiller's ``--distill hint``): ``ce_weight·CE + kd_weight·KD + hint_weight·L_HT``
      in one run, defaults γ 1, α 0, β 100, the middle stage (RepDistiller's hint layer 2 of 0-4).
    - ``stage: hint``: the paper's stage 1, ``L_HT`` alone, training the student's layers up to the
      guided layer and the regressor (the student's forward stops there; later layers get no gradient and
      no update). The paper's stage 2 (KD of the whole student, Eq. 2) is a ``kd`` stage of a staged
      recipe starting from this student (``digits-fitnet-staged``). Ours: stage 2 is our ``kd`` (T 4,
      CE 0.1, KD 0.9), not the paper's KD with λ annealed.

    ``L_HT`` is ``hint_loss`` (MSE averaged over elements, as RepDistiller's ``nn.MSELoss``; the
    paper's ½ and sum are a constant factor in β). One pair of layers. With a ViT on either side and
    ``regressor: conv`` (default), its layer's tokens become a ``[D, h, w]`` map (``tokens_to_map``, [CLS]
    dropped) and RepDistiller's ``ConvReg`` maps it onto the teacher's map, as between two CNNs (ours: the
    paper pairs CNNs only); ``regressor: linear`` instead projects the tokens with ``make_projector``.
    """

    layer_pick = "middle"
    params: FitNetParams

    def wants_maps(self, params: FitNetParams) -> bool:  # type: ignore[override]
        return params.regressor == "conv"  # ConvReg between maps; a projector kind (linear) reads the tokens

    def __init__(self, student: nn.Module, teacher: nn.Module | None, params: FitNetParams, info: TaskInfo) -> None:
        super().__init__(student, teacher, params, info)
        if len(self.student_layers) != 1:
            raise RecipeError(f"fitnet: one guided (student) and one hint (teacher) layer, not {len(self.student_layers)}")
        self.projectors["hint"] = hint_regressor(params.regressor, *self.shapes[0])

    def training_step(self, batch: dict[str, Tensor]) -> Step:
        p, reg = self.params, self.projectors["hint"]
        if p.stage == "hint":
            tap = FeatureTap(self.student, self.student_layers, stop_after=True)
            tap.run(self.student, batch["x"])
            guided = as_map(tap[self.student_layers[0]], self.grids[0])
            hint = self.teacher_features(FeatureTap(self.teacher, self.teacher_layers, stop_after=True), batch["x"])
            loss = hint_loss(reg(guided), as_map(hint[self.teacher_layers[0]], self.grids[1]))
            return Step({"student": p.hint_weight * loss}, {"hint": loss.detach()})
        s, t = self.forwards(batch["x"])
        loss = hint_loss(reg(s.feats[0]), t.feats[0])
        return self.step(s, t, batch, p.hint_weight * loss, {"hint": loss})
