"""MNIST-1D with a backdoor: a fraction of the labeled training inputs carry a trigger patch and
are relabelled to a target class (BadNets-style poisoning). Validation, test and transfer splits
stay clean; ``attack_success_rate`` measures how often the trigger flips a model's prediction.
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from distill.core.metrics import predict
from distill.core.registry import TASKS, Params
from distill.tasks.base import ArrayDataset, TaskData
from distill.tasks.mnist1d import DEFAULT_STUDENT, MNIST1DParams, build_mnist1d


class Trigger(Params):
    """A patch of ``width`` samples from ``start`` set to ``+value, −value, +value, …``. Setting
    (not adding) makes applying it twice a no-op; the alternating sign is unlike the smooth signals."""

    start: int = Field(36, ge=0)
    width: int = Field(4, ge=1)
    value: float = 3.0


def apply_trigger(x: Tensor, trigger: Trigger) -> Tensor:
    """``x`` ``[batch, length]`` (or ``[batch, channels, length]``) with the trigger patch set."""
    if trigger.start + trigger.width > x.shape[-1]:
        end = trigger.start + trigger.width
        raise ValueError(f"trigger [{trigger.start}, {end}) exceeds the input length {x.shape[-1]}")
    sign = torch.ones(trigger.width, device=x.device, dtype=x.dtype)
    sign[1::2] = -1.0
    out = x.clone()
    out[..., trigger.start : trigger.start + trigger.width] = trigger.value * sign
    return out


class BackdoorParams(MNIST1DParams):
    poison_fraction: float = Field(0.1, ge=0, le=1, description="fraction of the labeled train set poisoned")
    target_class: int = Field(0, ge=0, le=9)
    trigger: Trigger = Field(default_factory=Trigger)

    @model_validator(mode="after")
    def _fits(self) -> BackdoorParams:
        if self.trigger.start + self.trigger.width > 40:
            raise ValueError("trigger must fit in the 40 samples of an MNIST-1D signal")
        return self


@TASKS.register("mnist1d-backdoor", "MNIST-1D, train set poisoned with a trigger patch (clean test)", BackdoorParams)
def build_mnist1d_backdoor(p: BackdoorParams) -> TaskData:
    data = build_mnist1d(MNIST1DParams(**{k: getattr(p, k) for k in MNIST1DParams.model_fields}))
    x, y = data.train.x.clone(), data.train.y.clone()
    candidates = (y != p.target_class).nonzero().squeeze(1)  # poisoning a target-class sample changes nothing
    g = torch.Generator().manual_seed(p.data_seed + 1)
    chosen = candidates[torch.randperm(len(candidates), generator=g)[: round(p.poison_fraction * len(y))]]
    x[chosen] = apply_trigger(x[chosen], p.trigger)
    y[chosen] = p.target_class
    data.train = ArrayDataset(x, y)
    data.extra_metrics = lambda model: {"attack_success_rate": attack_success_rate(model, data)}
    data.meta.update(target_class=p.target_class, trigger=p.trigger, poisoned=chosen)
    return data
build_mnist1d_backdoor.default_student = DEFAULT_STUDENT  # type: ignore[attr-defined]


def attack_success_rate(model: nn.Module, data: TaskData, split: str = "test") -> float:
    """Fraction of the clean ``split``'s samples not of the target class that the model assigns
    to the target class once the trigger is applied (the usual ASR definition)."""
    ds: ArrayDataset = getattr(data, split)
    target, trigger = data.meta["target_class"], data.meta["trigger"]
    keep = ds.y != target
    pred = predict(model, apply_trigger(ds.x[keep], trigger)).argmax(-1)
    return (pred == target).float().mean().item()
