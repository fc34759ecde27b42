"""``FeatureDistiller``: the base of the feature methods: taps on student and teacher, projectors.

Projectors live in ``self.projectors`` (an ``nn.ModuleDict``), so they are part of the distiller's
``state_dict`` (the run's checkpoint, exact resume) but not of ``self.student`` (what the engine
exports); ``param_groups`` gives them their own group ``projectors`` (its own optimizer, and
``train.groups.projectors`` may set its lr / weight decay). Their loss is the student's: the engine
sums a step's losses for one backward pass, and each optimizer steps its own group.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from distill.core.distiller import Distiller, TaskInfo
from distill.core.registry import Params
from distill.features.projectors import make_projector
from distill.features.tap import FeatureTap, feature_shapes


class FeatureDistiller(Distiller):
    """A ``Distiller`` with ``projectors`` and helpers to tap and project features."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None, params: Params, info: TaskInfo) -> None:
        super().__init__(student, teacher, params, info)
        self.projectors = nn.ModuleDict()

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        groups = super().param_groups()
        proj = [p for p in self.projectors.parameters() if p.requires_grad]
        if proj:
            groups["projectors"] = proj
        return groups

    def example_input(self, batch: int = 2) -> Tensor:
        """A zero batch of the task's input shape, to read feature shapes before training."""
        return torch.zeros(batch, *self.info.input_shape)

    def add_projector(self, key: str, kind: str, in_shape: Sequence[int], out_shape: Sequence[int]) -> nn.Module:
        """``make_projector(kind, in_shape, out_shape)`` kept as ``self.projectors[key]`` (dots in ``key``,
        as in layer names, become ``__``: a ModuleDict key cannot hold a dot)."""
        proj = make_projector(kind, tuple(in_shape), tuple(out_shape))
        self.projectors[key.replace(".", "__")] = proj
        return proj

    def projector(self, key: str) -> nn.Module:
        return self.projectors[key.replace(".", "__")]

    def pair_projectors(self, kind: str, student_layers: Sequence[str], teacher_layers: Sequence[str],
                        example: Tensor | None = None) -> dict[str, nn.Module]:
        """One projector per (student layer, teacher layer) pair, keyed by the student layer, sized from
        one stopped forward of ``example`` (default ``example_input()``) through each model."""
        assert self.teacher is not None
        x = self.example_input() if example is None else example
        s_shapes = feature_shapes(self.student, student_layers, x)
        t_shapes = feature_shapes(self.teacher, teacher_layers, x)
        return {s: self.add_projector(s, kind, s_shapes[s], t_shapes[t]) for s, t in zip(student_layers, teacher_layers)}

    def teacher_features(self, tap: FeatureTap, *args, runner: nn.Module | None = None, **kwargs) -> dict[str, Tensor]:
        """The teacher's tapped features under inference mode (stopped after the last tapped layer when
        ``tap.stop_after``), cloned so autograd may save them. ``runner`` (default: the teacher) is what
        is called, a wrapper whose forward goes through the teacher's tapped layers (DMAE's forward on
        the visible tokens only)."""
        assert self.teacher is not None
        model = self.teacher if runner is None else runner
        if self.teacher_trainable:
            tap.run(model, *args, **kwargs)
            return {name: tap[name] for name in tap.layers}
        with torch.inference_mode():
            tap.run(model, *args, **kwargs)
        out = {name: tap[name].clone() for name in tap.layers}  # outside inference mode: normal tensors
        tap.clear()
        return out
