"""Vision classifiers for feature distillation, without torchvision or timm: a staged CNN (1-D signals
or 2-D images), a staged MLP, and a small ViT built from a transformers ``ViTConfig`` + ``ViTModel``.

Each follows the classifier contract of ``distill.tasks.models`` (``embed(x) -> [batch, features]``,
``head`` a Linear, ``forward = head(embed(x))``) and names its stages for ``FeatureTap``:
``model.feature_layers()`` lists them, shallow to deep. Registered as archs ``convnet``, ``mlpnet``,
``vit``, so any pair (CNN ↔ ViT ↔ MLP) runs on the classifier tasks (``digits``, ``mnist1d``).
"""

from __future__ import annotations

import math

from pydantic import Field
from torch import Tensor, nn

from distill.core.registry import ARCHS, Params
from distill.errors import RecipeError


class StagedClassifier(nn.Module):
    """``stages`` (a ModuleList, tapped as ``stages.i``) → ``pool`` → ``head``."""

    def __init__(self, stages: list[nn.Module], pool: nn.Module, features: int, num_classes: int) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.pool = pool
        self.head = nn.Linear(features, num_classes)

    def feature_layers(self) -> list[str]:
        return [f"stages.{i}" for i in range(len(self.stages))]

    def embed(self, x: Tensor) -> Tensor:
        for stage in self.stages:
            x = stage(x)
        return self.pool(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.embed(x))


def _image(input_shape: tuple[int, ...]) -> tuple[int, tuple[int, ...], bool]:
    """(channels, spatial, add a channel axis?) of a classifier input: a signal ``(L)``, a single-channel
    image ``(H, W)`` or an image ``(C, H, W)``."""
    if len(input_shape) in (1, 2):
        return 1, tuple(input_shape), True
    if len(input_shape) == 3:
        return input_shape[0], tuple(input_shape[1:]), False
    raise RecipeError(f"these archs take (L), (H, W) or (C, H, W) inputs, not {input_shape}")


class _AddChannel(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.unsqueeze(1)


class ConvNetParams(Params):
    width: int = Field(16, ge=1, description="channels of the first stage")
    depth: int = Field(3, ge=1, description="stages (3x3 conv, batch norm, ReLU; stride 2 after the first)")
    growth: float = Field(2.0, ge=1.0, description="channel multiplier per stage")


@ARCHS.register("convnet", "staged CNN (1-D or 2-D by input), stages tapped as stages.i", ConvNetParams)
def convnet(p: ConvNetParams, input_shape: tuple[int, ...], num_classes: int) -> StagedClassifier:
    c, spatial, add = _image(tuple(input_shape))
    conv, norm, pool = (nn.Conv1d, nn.BatchNorm1d, nn.AdaptiveAvgPool1d) if len(spatial) == 1 else (
        nn.Conv2d, nn.BatchNorm2d, nn.AdaptiveAvgPool2d)
    stages: list[nn.Module] = []
    for i in range(p.depth):
        out = max(1, round(p.width * p.growth**i))
        layers = [_AddChannel()] if add and i == 0 else []
        layers += [conv(c, out, 3, stride=1 if i == 0 else 2, padding=1, bias=False), norm(out), nn.ReLU()]
        stages.append(nn.Sequential(*layers))
        c = out
    return StagedClassifier(stages, nn.Sequential(pool(1), nn.Flatten()), c, num_classes)


class MLPNetParams(Params):
    width: int = Field(128, ge=1)
    depth: int = Field(3, ge=1, description="stages (Linear, ReLU)")


@ARCHS.register("mlpnet", "staged MLP on flattened inputs, stages tapped as stages.i", MLPNetParams)
def mlpnet(p: MLPNetParams, input_shape: tuple[int, ...], num_classes: int) -> StagedClassifier:
    d = math.prod(input_shape)
    stages: list[nn.Module] = []
    for i in range(p.depth):
        stages.append(nn.Sequential(*([nn.Flatten()] if i == 0 else []), nn.Linear(d, p.width), nn.ReLU()))
        d = p.width
    return StagedClassifier(stages, nn.Identity(), d, num_classes)


class ViTParams(Params):
    hidden: int = Field(64, ge=1, description="hidden size")
    depth: int = Field(2, ge=1, description="transformer layers")
    heads: int = Field(4, ge=1)
    mlp_ratio: float = Field(2.0, gt=0)
    patch: int = Field(2, ge=1, description="patch side (images) or length (1-D signals)")


class ViTClassifier(nn.Module):
    """A transformers ``ViTModel`` (no pooler) and a linear head on the final [CLS] state (as
    ``ViTForImageClassification``). Inputs ``[batch, *input_shape]`` are reshaped to pixel values
    ``[batch, C, H, W]`` (a 1-D signal is a 1×L image with 1×patch patches)."""

    def __init__(self, vit: nn.Module, pixel_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        self.vit = vit
        self.pixel_shape = pixel_shape
        self.head = nn.Linear(vit.config.hidden_size, num_classes)

    def feature_layers(self) -> list[str]:
        """The transformer layers: ``vit.layers.i`` (``vit.encoder.layer.i`` in transformers 4)."""
        if hasattr(self.vit, "layers"):
            return [f"vit.layers.{i}" for i in range(len(self.vit.layers))]
        return [f"vit.encoder.layer.{i}" for i in range(len(self.vit.encoder.layer))]

    def embed(self, x: Tensor) -> Tensor:
        out = self.vit(pixel_values=x.reshape(x.shape[0], *self.pixel_shape))
        return out.last_hidden_state[:, 0]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.embed(x))


@ARCHS.register("vit", "small ViT (transformers ViTModel + linear head on [CLS]), layers tapped as vit.layers.i", ViTParams)
def vit(p: ViTParams, input_shape: tuple[int, ...], num_classes: int) -> ViTClassifier:
    from transformers import ViTConfig, ViTModel  # lazy: loading the plug-in stays cheap

    c, spatial, _ = _image(tuple(input_shape))
    if len(spatial) == 1:
        image, patch = (1, spatial[0]), (1, p.patch)
    else:
        image, patch = tuple(spatial), (p.patch, p.patch)
    if any(s % q for s, q in zip(image, patch)):
        raise RecipeError(f"vit: patch {p.patch} does not divide the input {tuple(input_shape)}")
    if p.hidden % p.heads:
        raise RecipeError(f"vit: hidden {p.hidden} is not a multiple of heads {p.heads}")
    cfg = ViTConfig(hidden_size=p.hidden, num_hidden_layers=p.depth, num_attention_heads=p.heads,
                    intermediate_size=max(1, round(p.hidden * p.mlp_ratio)), image_size=image, patch_size=patch,
                    num_channels=c)
    return ViTClassifier(ViTModel(cfg, add_pooling_layer=False), (c, *image), num_classes)
