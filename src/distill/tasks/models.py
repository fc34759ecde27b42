"""Default architectures (small modules of our own; no timm/torchvision needed).

Every model exposes ``embed(x) -> [batch, features]`` and ``head`` (a Linear), with
``forward(x) = head(embed(x))``, so feature-level methods can reach the penultimate layer.
"""

from __future__ import annotations

import math

from pydantic import Field
from torch import Tensor, nn

from distill.core.registry import ARCHS, Params
from distill.errors import RecipeError


class Classifier(nn.Module):
    def __init__(self, body: nn.Module, features: int, num_classes: int) -> None:
        super().__init__()
        self.body = body
        self.head = nn.Linear(features, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class AddChannel(nn.Module):
    """``[batch, *spatial] -> [batch, 1, *spatial]`` for single-channel inputs."""

    def forward(self, x: Tensor) -> Tensor:
        return x.unsqueeze(1)


class MLPParams(Params):
    width: int = Field(256, ge=1)
    depth: int = Field(2, ge=1, description="hidden layers")


@ARCHS.register("mlp", "multi-layer perceptron on flattened inputs", MLPParams)
def mlp(p: MLPParams, input_shape: tuple[int, ...], num_classes: int) -> Classifier:
    layers: list[nn.Module] = [nn.Flatten()]
    d = math.prod(input_shape)
    for _ in range(p.depth):
        layers += [nn.Linear(d, p.width), nn.ReLU()]
        d = p.width
    return Classifier(nn.Sequential(*layers), d, num_classes)


class CNNParams(Params):
    width: int = Field(32, ge=1, description="channels")
    depth: int = Field(3, ge=1, description="convolution layers")


@ARCHS.register("cnn1d", "1-D CNN (stride-2 convolutions, then a linear head) for sequences", CNNParams)
def cnn1d(p: CNNParams, input_shape: tuple[int, ...], num_classes: int) -> Classifier:
    length = input_shape[-1]
    in_ch = 1 if len(input_shape) == 1 else input_shape[0]
    layers: list[nn.Module] = [AddChannel()] if len(input_shape) == 1 else []
    c = in_ch
    for i in range(p.depth):
        layers += [nn.Conv1d(c, p.width, 5 if i == 0 else 3, stride=2, padding=2 if i == 0 else 1), nn.ReLU()]
        c = p.width
        length = (length + 1) // 2
    layers.append(nn.Flatten())
    return Classifier(nn.Sequential(*layers), c * length, num_classes)


@ARCHS.register("cnn2d", "2-D CNN (3x3 convolutions, stride 2 after the first) for small images", CNNParams)
def cnn2d(p: CNNParams, input_shape: tuple[int, ...], num_classes: int) -> Classifier:
    layers: list[nn.Module] = []
    if len(input_shape) == 2:
        layers.append(AddChannel())
        c, h, w = 1, *input_shape
    else:
        c, h, w = input_shape
    for i in range(p.depth):
        stride = 1 if i == 0 else 2
        layers += [nn.Conv2d(c, p.width, 3, stride=stride, padding=1), nn.ReLU()]
        c = p.width
        h, w = (h - 1) // stride + 1, (w - 1) // stride + 1
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return Classifier(nn.Sequential(*layers), c, num_classes)


# an arch's ``family`` (other task kinds than classifiers): how an error names it and its tasks
FAMILIES = {"lm": ("a language model", "a language-model task"), "sr": ("a super-resolution model", "an SR task"),
            "detection": ("a detector", "a detection task")}


def build_model(arch: str, params: dict, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    entry = ARCHS.get(arch)
    family = getattr(entry.obj, "family", None)  # archs of other task kinds (lm, detection, sr) say theirs
    if family is not None:
        kind, task = FAMILIES.get(family, (f"a {family} model", f"a {family} task"))
        raise RecipeError(f"student.arch '{arch}' is {kind}: use it on {task}; this task is a classifier "
                          "(see `distill list`)")
    return build_arch(arch, params, input_shape, num_classes)


def build_arch(arch: str, params: dict, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A registered arch with the classifier signature, whatever its task kind (a saved folder's)."""
    entry = ARCHS.get(arch)
    return entry.obj(entry.params.model_validate(params), input_shape, num_classes)
