"""``flash_dmd``: Flash-DMD (S54, arXiv 2511.20549; no official code, the abstract only).

The abstract: an efficient timestep-aware distillation, and a reward objective trained jointly with
the ongoing distillation, which regularises it against reward hacking. Ours, all of it:

- timestep-aware DMD: a sample of the generator's step k (input time t_k) is re-noised for its DMD
  loss only below its input's noise level, τ ~ U(t_min, min(t_k, t_max)) (the noise levels above
  t_k are fixed by the input), otherwise ``dmd`` (critic, ratio, backward simulation);
- the joint reward: loss = DMD + λ · w_k · (−r(x̂₀)) with the timestep-aware weight w_k = (k + 1)/K
  (the last step, which sets the fine detail the reward measures, at full λ; one step: w = 1);
- rewards (functions of the samples, ``dmd_parts``): ``mode`` −min_c ‖x − c‖² over the task's mode
  centres (mixtures), ``data`` −min_i mean((x − x_i)²) over training data of the sample's class
  (images); ``auto`` picks ``mode`` where the task has centres. The mean reward of the generator's
  samples is logged as ``train/reward``.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from distill.core.registry import METHODS
from distill.diffusion.dmd_parts import mode_reward, nearest_data_reward, reward_loss
from distill.diffusion.methods.dmd import DMD, DMDParams
from distill.errors import RecipeError


class FlashParams(DMDParams):
    reward: Literal["auto", "mode", "data"] = Field("auto", description="the reward r(x) (ours; see the docstring)")
    reward_weight: float = Field(0.5, ge=0, description="λ: weight of −r in the generator loss")


@METHODS.register("flash_dmd", "Flash-DMD (S54): timestep-aware DMD with a joint reward objective", FlashParams)
class FlashDMD(DMD):
    def __init__(self, student, teacher, params: FlashParams, info) -> None:
        super().__init__(student, teacher, params, info)
        data = info.data
        centers = getattr(data, "centers", None)
        kind = params.reward if params.reward != "auto" else ("mode" if centers is not None else "data")
        if kind == "mode" and centers is None:
            raise RecipeError("flash_dmd: reward 'mode' needs a mixture task with mode centres (ring8); use 'data'")
        self.reward_kind = kind
        self.register_buffer("centers", centers.clone() if centers is not None else torch.zeros(0), persistent=False)
        self.register_buffer("data_x", info.train.x.clone() if kind == "data" else torch.zeros(0), persistent=False)
        y = getattr(info.train, "y", None)
        self.register_buffer("data_y", y.clone() if kind == "data" and y is not None and self.num_classes
                             else torch.zeros(0, dtype=torch.long), persistent=False)

    def reward(self, x: Tensor, cond: Tensor | None) -> Tensor:
        if self.reward_kind == "mode":
            return mode_reward(x, self.centers)
        return nearest_data_reward(x, self.data_x, cond, self.data_y if len(self.data_y) else None)

    def dmd_times(self, t_in: Tensor, k: Tensor) -> Tensor:
        p = self.params
        hi = t_in.clamp(p.t_min, p.t_max)
        return p.t_min + (hi - p.t_min) * torch.rand_like(t_in)

    def step_weight(self, k: Tensor) -> Tensor:
        return (k.double() + 1) / self.params.steps

    def generator_losses(self, x0: Tensor, t_in: Tensor, k: Tensor, batch: dict[str, Tensor]) -> tuple[Tensor, dict]:
        loss, metrics = super().generator_losses(x0, t_in, k, batch)
        r = self.reward(x0, self.cond(batch))
        lr = reward_loss(r, self.step_weight(k).to(r.dtype))
        metrics.update(reward=r.detach().mean(), reward_loss=lr.detach())
        return loss + self.params.reward_weight * lr, metrics
