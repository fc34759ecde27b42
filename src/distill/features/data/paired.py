"""``paired``: one synthetic bird's-eye-view scene seen by two sensors (ours), the task of ``calico`` (S55).

A scene is an ``grid``×``grid`` BEV map holding objects of ``num_types`` types, one per cell. The label
is the scene's majority type: ``majority`` objects of the label's type and at most half as many (0 to ``majority // 2``)
of every other type, at random distinct cells. Two renderings of the same scene are stacked on the
channel axis, ``x = [A (2 channels); B (3 channels)]`` of shape ``[5, grid, grid]``:

- modality A, "LiDAR": occupancy and height (type t stands ``(t + 1) / num_types`` high, ± 0.05), each
  object's return dropped with probability ``dropout``, and spurious low returns (clutter);
- modality B, "camera": each type's colour (fixed RGB vectors, close to one another), a per-scene
  brightness gain, Gaussian noise ``camera_noise``, then a 3×3 blur (objects bleed into neighbours).

The same cell of A and B is the same place of the scene: the regions CALICO contrasts. Arch ``bevnet``
(a ``convnet`` on one modality's channels) reads either side; ``modality`` picks it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from distill.core.registry import ARCHS, TASKS, Params
from distill.errors import RecipeError
from distill.features.models import ConvNetParams, StagedClassifier, convnet
from distill.tasks.base import ArrayDataset, TaskData

CHANNELS = {"a": slice(0, 2), "b": slice(2, 5)}  # modality A (LiDAR BEV) and B (camera) in x
COLOURS = torch.tensor([[0.8, 0.3, 0.3], [0.6, 0.5, 0.3], [0.5, 0.3, 0.6], [0.3, 0.6, 0.5],
                        [0.4, 0.4, 0.4], [0.7, 0.7, 0.2]])


def make_scenes(labels: Tensor, grid: int, num_types: int, majority: int, dropout: float, camera_noise: float,
                g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Scenes ``[n, 5, grid, grid]`` of majority types ``labels`` and their type maps ``[n, grid, grid]``
    (-1 = empty cell)."""
    n, cells = len(labels), grid * grid
    counts = torch.randint(0, majority // 2 + 1, (n, num_types), generator=g)
    counts[torch.arange(n), labels] = majority
    if int(counts.sum(1).max()) > cells:
        raise RecipeError(f"paired: up to {int(counts.sum(1).max())} objects do not fit a {grid}x{grid} grid")
    types = torch.full((n, cells), -1)
    order = torch.rand(n, cells, generator=g).argsort(1)  # random distinct cells per scene
    for i in range(n):
        seq = torch.repeat_interleave(torch.arange(num_types), counts[i])
        types[i, order[i, : len(seq)]] = seq
    occ = (types >= 0).float()
    keep = (torch.rand(n, cells, generator=g) >= dropout).float() * occ
    height = keep * ((types.clamp_min(0) + 1).float() / num_types + 0.05 * torch.randn(n, cells, generator=g))
    clutter = (torch.rand(n, cells, generator=g) < 0.05).float() * (1 - occ)
    height = height + clutter * 0.1 * torch.rand(n, cells, generator=g)
    lidar = torch.stack([(keep + clutter).clamp_max(1), height], 1)
    colour = COLOURS[types.clamp_min(0) % len(COLOURS)].permute(0, 2, 1) * occ.unsqueeze(1)  # n 3 cells
    colour = colour * (0.6 + 0.8 * torch.rand(n, 1, 1, generator=g)) + camera_noise * torch.randn(n, 3, cells, generator=g)
    camera = F.avg_pool2d(colour.view(n, 3, grid, grid), 3, stride=1, padding=1, count_include_pad=False)
    return torch.cat([lidar.view(n, 2, grid, grid), camera], 1), types.view(n, grid, grid)


class PairedParams(Params):
    num_train: int = Field(300, ge=4, description="labeled scenes")
    num_val: int = Field(300, ge=0)
    num_test: int = Field(1000, ge=4)
    num_transfer: int = Field(1500, ge=0, description="unlabeled scene pairs (CALICO's self-supervised data)")
    grid: int = Field(8, ge=2, description="BEV cells per side")
    num_types: int = Field(4, ge=2, le=len(COLOURS), description="object types = classes")
    majority: int = Field(3, ge=1, description="objects of the label's type; every other type has fewer")
    dropout: float = Field(0.1, ge=0, lt=1, description="LiDAR: probability an object gives no return")
    camera_noise: float = Field(0.1, ge=0, description="camera: Gaussian noise per pixel and channel")
    data_seed: int = 0


DEFAULT_STUDENT = {"arch": "bevnet", "modality": "b", "width": 8, "depth": 2}


@TASKS.register("paired", "synthetic BEV scenes in two modalities (LiDAR-like A, camera-like B), majority object type",
                PairedParams)
def build_paired(p: PairedParams) -> TaskData:
    g = torch.Generator().manual_seed(p.data_seed)
    sizes = [p.num_train, p.num_val, p.num_test, p.num_transfer]
    y = torch.arange(sum(sizes)) % p.num_types
    y = y[torch.randperm(len(y), generator=g)]
    x, types = make_scenes(y, p.grid, p.num_types, p.majority, p.dropout, p.camera_noise, g)
    cut = torch.tensor([0, *sizes]).cumsum(0).tolist()
    tr, va, te, tf = (slice(a, b) for a, b in zip(cut[:-1], cut[1:]))
    return TaskData(
        train=ArrayDataset(x[tr], y[tr]),
        val=ArrayDataset(x[va], y[va]) if p.num_val else None,
        test=ArrayDataset(x[te], y[te]),
        transfer=ArrayDataset(x[tf]) if p.num_transfer else None,
        num_classes=p.num_types,
        meta={"channels": {k: (v.start, v.stop) for k, v in CHANNELS.items()}, "test_types": types[te]},
    )
build_paired.default_student = DEFAULT_STUDENT  # type: ignore[attr-defined]


class ModalityClassifier(nn.Module):
    """A ``StagedClassifier`` on one modality's channels of the paired input (``x[:, channels]``);
    its stages are tapped as ``net.stages.i``."""

    def __init__(self, net: StagedClassifier, modality: str) -> None:
        super().__init__()
        self.net, self.modality = net, modality

    @property
    def head(self) -> nn.Linear:  # a property, not a second registration: safetensors refuses shared tensors
        return self.net.head

    def feature_layers(self) -> list[str]:
        return [f"net.{name}" for name in self.net.feature_layers()]

    def embed(self, x: Tensor) -> Tensor:
        return self.net.embed(x[:, CHANNELS[self.modality]])

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x[:, CHANNELS[self.modality]])


class BEVNetParams(ConvNetParams):
    modality: str = Field("b", pattern="^(a|b)$", description="which rendering it sees: a (LiDAR-like) or b (camera-like)")


@ARCHS.register("bevnet", "convnet on one modality (a: LiDAR-like, b: camera-like) of the paired task; "
                "stages tapped as net.stages.i", BEVNetParams)
def bevnet(p: BEVNetParams, input_shape: tuple[int, ...], num_classes: int) -> ModalityClassifier:
    if len(input_shape) != 3 or input_shape[0] != 5:
        raise RecipeError(f"bevnet reads the paired task's [5, H, W] inputs, not {tuple(input_shape)}")
    sl = CHANNELS[p.modality]
    net = convnet(ConvNetParams(width=p.width, depth=p.depth, growth=p.growth), (sl.stop - sl.start, *input_shape[1:]), num_classes)
    return ModalityClassifier(net, p.modality)
