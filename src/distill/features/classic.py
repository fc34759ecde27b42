"""What the eight classic feature methods (``fitnet at pkt rkd sp vid crd reviewkd``, issue 15) share:
``ClassicParams`` (the CE and logit-KD weights, RepDistiller's ``-r`` and ``-a``), ``LayerParams``
(which layers are paired) and ``ClassicDistiller`` (one student forward that gives logits, tapped
features and the penultimate embedding; the same for the frozen teacher). A ViT's tapped tokens become
spatial maps (``tokens_to_map``) for the methods that compare maps (``at vid reviewkd``, ``fitnet``'s
conv regressor), so they run unchanged on a CNN teacher / ViT student pair.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
from pydantic import Field
from torch import Tensor, nn

from distill.core.distiller import Step, TaskInfo
from distill.core.registry import Params
from distill.errors import RecipeError
from distill.features.base import FeatureDistiller
from distill.features.tap import FeatureTap, default_layers, feature_shapes
from distill.logits.losses import kd_loss
from distill.logits.methods.kd import labeled_ce


class ClassicParams(Params):
    """RepDistiller's ``loss = γ·CE + α·KD + β·L_method``: ``ce_weight`` is γ (``-r``), ``kd_weight`` α
    (``-a``), the method's own weight β (``-b``) is named after its term."""

    ce_weight: float = Field(1.0, ge=0, description="CE on labeled samples (RepDistiller -r)")
    kd_weight: float = Field(0.0, ge=0, description="Hinton KD T²·KL term (RepDistiller -a): 0 = the method alone, "
                                                    "as RepDistiller's CIFAR-100 table; 1 = '+KD' (CRD+KD)")
    temperature: float = Field(4.0, gt=0, description="KD temperature (RepDistiller --kd_T)")


class LayerParams(ClassicParams):
    student_layers: list[str] | None = Field(None, description="student layers (e.g. stages.1, body.3); default: the method's pick of its feature layers")
    teacher_layers: list[str] | None = Field(None, description="teacher layers paired one to one with student_layers; default: the same pick")


def pick_layers(model: nn.Module, names: Sequence[str] | None, pick: str) -> list[str]:
    """``names``, or from ``default_layers(model)``: ``all`` of them, the ``middle`` one, the ``last``."""
    if names is not None:
        return list(names)
    layers = default_layers(model)
    return {"all": layers, "middle": [layers[len(layers) // 2]], "last": layers[-1:]}[pick]


def pair_layers(student: nn.Module, teacher: nn.Module, p: LayerParams, pick: str, what: str) -> tuple[list[str], list[str]]:
    """Student and teacher layers, paired by position (when the teacher has more by default, each
    student layer is paired with the teacher layer at the same relative depth)."""
    s = pick_layers(student, p.student_layers, pick)
    if p.teacher_layers is not None or pick != "all":
        t = pick_layers(teacher, p.teacher_layers, pick)
    else:
        t_all = default_layers(teacher)
        t = [t_all[round(i * (len(t_all) - 1) / max(len(s) - 1, 1))] for i in range(len(s))]
    if len(s) != len(t):
        raise RecipeError(f"{what}: {len(s)} student layers and {len(t)} teacher layers; pair them one to one")
    return s, t


@contextmanager
def head_input(model: nn.Module) -> Iterator[dict[str, Tensor]]:
    """Capture the input of ``model.head`` (the classifier contract's penultimate embedding, RepDistiller's
    ``feat[-1]``) during the forwards inside the block: ``box["embed"]``."""
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Module):
        raise RecipeError(f"{type(model).__name__} has no head: these methods need a classifier (embed + head)")
    box: dict[str, Tensor] = {}
    handle = head.register_forward_pre_hook(lambda _m, args: box.__setitem__("embed", args[0]))
    try:
        yield box
    finally:
        handle.remove()


def token_grid(model: nn.Module) -> tuple[int, ...] | None:
    """The patch grid of our ``vit`` arch (``pixel_shape`` + a transformers ``vit.config``): ``(H/p, W/p)``
    for an image, ``(L/p,)`` for a 1-D signal (a 1×L image), so that the map has the rank of a CNN's on
    the same input; None for any other model (its features are left as they are)."""
    cfg, pixel = getattr(getattr(model, "vit", None), "config", None), getattr(model, "pixel_shape", None)
    if cfg is None or pixel is None:
        return None
    patch = cfg.patch_size if isinstance(cfg.patch_size, (tuple, list)) else (cfg.patch_size, cfg.patch_size)
    grid = tuple(s // q for s, q in zip(pixel[1:], patch))
    return grid[1:] if pixel[1] == 1 else grid


def is_tokens(shape: Sequence[int], grid: Sequence[int] | None) -> bool:
    """Whether a feature shape (without the batch) is a ViT token sequence ``(1 + N, D)`` of ``grid``."""
    return grid is not None and len(shape) == 2 and shape[0] == 1 + math.prod(grid)


def tokens_to_map(tokens: Tensor, grid: Sequence[int]) -> Tensor:
    """ViT tokens ``[B, 1 + N, D]`` ([CLS] first, then the N = prod(grid) patches in row-major order, as a
    ViT's patch embedding flattens them) → a map ``[B, D, *grid]``: [CLS] dropped, channels = the hidden
    width (ours: the plain reshape; no learned token mixing)."""
    b, n, d = tokens.shape
    if n != 1 + math.prod(grid):
        raise RecipeError(f"tokens_to_map: {n} tokens are not [CLS] + a {'x'.join(map(str, grid))} patch grid")
    return tokens[:, 1:].transpose(1, 2).reshape(b, d, *grid)


def as_map(f: Tensor, grid: Sequence[int] | None) -> Tensor:
    """``tokens_to_map(f, grid)`` when ``f`` is a token sequence of ``grid``, else ``f`` unchanged."""
    return tokens_to_map(f, grid) if grid is not None and is_tokens(f.shape[1:], grid) else f


@dataclass
class Forward:
    """One forward of a model: logits, tapped features (in layer order), penultimate embedding."""

    logits: Tensor
    feats: list[Tensor]
    embed: Tensor


def run_model(model: nn.Module, x: Tensor, layers: Sequence[str]) -> Forward:
    with head_input(model) as box:
        if layers:
            with FeatureTap(model, layers) as tap:
                logits = model(x)
                feats = [tap[name] for name in layers]  # a layer may be paired twice (the tap keeps one)
        else:
            logits, feats = model(x), []
    return Forward(logits, feats, box["embed"])


class ClassicDistiller(FeatureDistiller):
    """A student and a frozen teacher each run once per step, giving logits, the features of the paired
    layers and the penultimate embedding; ``step`` adds the CE and logit-KD terms to the method's own.
    Helper modules (regressors, embeddings, fusion) live in ``self.projectors`` (own parameter group,
    checkpointed, not exported). ``layer_pick``: the default layers (``all``, ``middle``, ``last``; None =
    the method reads only the embedding). ``maps``: the method compares spatial maps, so a ViT's tapped
    tokens are turned into maps (``tokens_to_map``) in ``shapes`` and every forward."""

    layer_pick: ClassVar[str | None] = "all"
    maps: ClassVar[bool] = False
    params: ClassicParams

    def wants_maps(self, params: ClassicParams) -> bool:
        return self.maps

    def __init__(self, student: nn.Module, teacher: nn.Module | None, params: ClassicParams, info: TaskInfo) -> None:
        super().__init__(student, teacher, params, info)
        assert teacher is not None
        self.student_layers: list[str] = []
        self.teacher_layers: list[str] = []
        self.grids = (token_grid(student), token_grid(teacher)) if self.wants_maps(params) else (None, None)
        if self.layer_pick is not None:
            assert isinstance(params, LayerParams)
            name = type(self).__name__.lower()
            self.student_layers, self.teacher_layers = pair_layers(student, teacher, params, self.layer_pick, name)
            x = self.example_input()
            s_sh, t_sh = feature_shapes(student, self.student_layers, x), feature_shapes(teacher, self.teacher_layers, x)
            self.shapes = [(self.map_shape(s_sh[s], self.grids[0]), self.map_shape(t_sh[t], self.grids[1]))
                           for s, t in zip(self.student_layers, self.teacher_layers)]
            if self.wants_maps(params):
                for s, (ss, ts) in zip(self.student_layers, self.shapes):
                    if len(ss) != len(ts):
                        raise RecipeError(f"{name}: student {s} gives {ss} and its teacher layer {ts}; this method pairs "
                                          "maps of one rank (CNN stages or ViT layers, whose tokens become maps)")

    @staticmethod
    def map_shape(shape: tuple[int, ...], grid: Sequence[int] | None) -> tuple[int, ...]:
        """A feature shape as ``as_map`` leaves it: ``(1 + N, D)`` tokens of ``grid`` → ``(D, *grid)``."""
        return (shape[1], *grid) if grid is not None and is_tokens(shape, grid) else shape

    def embed_dims(self) -> tuple[int, int]:
        """Widths of the student's and the teacher's penultimate embeddings."""
        x = self.example_input()
        was = self.student.training, self.teacher.training
        self.student.eval()
        self.teacher.eval()
        try:
            with torch.no_grad():
                return run_model(self.student, x, []).embed.flatten(1).shape[1], run_model(self.teacher, x, []).embed.flatten(1).shape[1]
        finally:
            self.student.train(was[0])
            self.teacher.train(was[1])

    def forwards(self, x: Tensor) -> tuple[Forward, Forward]:
        """The student's forward (with its graph) and the teacher's (inference mode, cloned)."""
        s = run_model(self.student, x, self.student_layers)
        s.feats = [as_map(f, self.grids[0]) for f in s.feats]
        with torch.inference_mode():
            t = run_model(self.teacher, x, self.teacher_layers)
        return s, Forward(t.logits.clone(), [as_map(f, self.grids[1]).clone() for f in t.feats], t.embed.clone())

    def step(self, s: Forward, t: Forward, batch: dict[str, Tensor], feature_loss: Tensor,
             metrics: dict[str, Tensor | float]) -> Step:
        """``ce_weight·CE + kd_weight·T²·KL(t ‖ s) + feature_loss`` (the method's weighted terms)."""
        p = self.params
        ce = labeled_ce(s.logits, batch)
        kd = kd_loss(s.logits, t.logits, p.temperature)
        loss = p.ce_weight * ce + p.kd_weight * kd + feature_loss
        return Step({"student": loss}, {"ce": ce.detach(), "kd": kd.detach(), **{k: (v.detach() if isinstance(v, Tensor) else v)
                                                                                 for k, v in metrics.items()}})
