"""``FeatureTap``: read the outputs of named submodules of any ``nn.Module`` with forward hooks.

No model is rewritten: a hook on each tapped submodule (``model.get_submodule(name)``) stores its
output, read back by name (``tap["stages.1"]``). With ``stop_after=True``, ``tap.run(model, x)``
stops the forward as soon as every tapped layer has produced its output (DMAE's partial teacher,
S05): the hook of the last one raises a private exception that ``run`` catches, so the layers after
it never execute.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from distill.errors import RecipeError, did_you_mean

Select = int | Callable[[Any], Tensor]


class _StopForward(Exception):
    """Raised by the last tapped layer's hook inside ``FeatureTap.run``; never escapes it."""


def _first(out: Any, select: Select) -> Tensor:
    """The tensor of a module's output: itself, ``select(out)``, or item ``select`` of a tuple/ModelOutput."""
    if callable(select):
        return select(out)
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "to_tuple"):  # transformers ModelOutput
        out = out.to_tuple()
    if isinstance(out, (tuple, list)):
        return out[select]
    raise TypeError(f"cannot take a tensor from a {type(out).__name__} output; pass select=callable")


def resolve_layer(model: nn.Module, name: str) -> nn.Module:
    """``model.get_submodule(name)`` with a one-line error naming a close match."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        hint = did_you_mean(name, names) or f" (its layers include {', '.join(names[:6])}{', ...' if len(names) > 6 else ''})"
        raise RecipeError(f"{type(model).__name__} has no layer '{name}'{hint}") from None


def default_layers(model: nn.Module) -> list[str]:
    """The layers a method taps when a recipe names none, shallow to deep: ``model.feature_layers()``
    when the model has it (our archs), else the blocks of its longest ``nn.ModuleList`` of one block
    class (a transformers model's ``encoder.layer.i`` / ``layers.i``)."""
    if callable(getattr(model, "feature_layers", None)):
        return list(model.feature_layers())
    best: tuple[int, str] = (0, "")
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > best[0] and len({type(m) for m in mod}) == 1:
            best = (len(mod), name)
    if not best[0]:
        raise RecipeError(f"{type(model).__name__} has no list of blocks to tap by default; name its layers")
    return [f"{best[1]}.{i}" if best[1] else str(i) for i in range(best[0])]


def flop_counter() -> Any:
    """``torch.utils.flop_counter.FlopCounterMode`` (no display) that also counts CPU attention:
    torch registers FLOPs for the CUDA ``scaled_dot_product_attention`` kernels only, so on CPU a
    transformer's attention matmuls would count zero."""
    from torch.utils import flop_counter as fcm

    def sdpa(q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return fcm.sdpa_flop_count(q, k, v)

    cpu = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    extra = {cpu: sdpa} if cpu is not None and hasattr(fcm, "sdpa_flop_count") else None
    return fcm.FlopCounterMode(display=False, custom_mapping=extra)


@dataclass
class TapProfile:
    """What a stopped forward skipped: leaf modules (modules without children) and, when measured, FLOPs."""

    leaf_modules: int  # leaves that run in a full forward
    skipped: int  # of those, leaves the stopped forward did not run
    flops_full: int | None = None
    flops_partial: int | None = None

    @property
    def flops_saved(self) -> float | None:
        """The fraction of the full forward's FLOPs that stopping saved."""
        if not self.flops_full or self.flops_partial is None:
            return None
        return 1.0 - self.flops_partial / self.flops_full


class FeatureTap:
    """Capture the outputs of ``layers`` (submodule names) of ``model``.

    >>> with FeatureTap(model, ["stages.0", "stages.1"]) as tap:
    ...     model(x)
    ...     f = tap["stages.1"]

    Kept on a distiller, call ``attach()`` once (``detach()`` removes the hooks). Outputs are cleared
    at the start of each forward of ``model``, so ``tap[name]`` is always the last forward's; they keep
    their autograd graph (a student's features train it). A module's output that is a tuple or a
    transformers ``ModelOutput`` gives item ``select`` (default 0, the hidden states); ``select`` may
    be a callable ``output -> Tensor``. A module called several times in one forward keeps its last
    output (a forward that does not go through ``model.__call__``, e.g. ``model.embed(x)``, overwrites
    the outputs it produces and leaves the others).
    """

    def __init__(self, model: nn.Module, layers: Iterable[str], stop_after: bool = False, select: Select = 0) -> None:
        self.model = model
        self.layers = list(dict.fromkeys(layers))
        if not self.layers:
            raise RecipeError("FeatureTap needs at least one layer name")
        self.modules = {name: resolve_layer(model, name) for name in self.layers}
        self.stop_after, self.select = stop_after, select
        self._out: dict[str, Tensor] = {}
        self._handles: list[RemovableHandle] = []
        self._running = False  # stopping happens only inside run()

    # --- hooks ---------------------------------------------------------------------------------
    def attach(self) -> FeatureTap:
        if not self._handles:
            self._handles.append(self.model.register_forward_pre_hook(lambda *_: self._out.clear()))
            for name, mod in self.modules.items():
                self._handles.append(mod.register_forward_hook(self._hook(name)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def clear(self) -> None:
        """Drop the captured outputs (and the graphs they hold)."""
        self._out.clear()

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self._out[name] = _first(output, self.select)
            if self._running and self.stop_after and len(self._out) == len(self.layers):
                raise _StopForward

        return hook

    def __enter__(self) -> FeatureTap:  # noqa: PYI034
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    # --- reading -------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Tensor:
        if name not in self._out:
            if name not in self.modules:
                raise KeyError(f"'{name}' is not tapped{did_you_mean(name, self.layers)}; tapped: {self.layers}")
            raise KeyError(f"layer '{name}' did not run in the last forward (is the tap attached?)")
        return self._out[name]

    def __contains__(self, name: object) -> bool:
        return name in self._out

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def features(self) -> list[Tensor]:
        """The captured outputs in the order of ``layers``."""
        return [self[name] for name in self.layers]

    # --- running -------------------------------------------------------------------------------
    def run(self, model: nn.Module | None = None, *args: Any, **kwargs: Any) -> Any:
        """``model(*args, **kwargs)`` (``model`` defaults to the tapped one; pass a wrapper of it, e.g.
        DDP's, to run through that), attaching the hooks if needed. With ``stop_after`` the forward
        ends after the last tapped layer and this returns None; else the model's output."""
        attached = bool(self._handles)
        self.attach()
        self._out.clear()
        self._running = True
        try:
            return (model if model is not None else self.model)(*args, **kwargs)
        except _StopForward:
            return None
        finally:
            self._running = False
            if not attached:
                self.detach()

    def profile(self, model: nn.Module | None, *args: Any, flops: bool = False, **kwargs: Any) -> TapProfile:
        """Run once under ``no_grad`` to count the leaf modules a stopped forward skips and, with
        ``flops=True``, both forwards' FLOPs (``torch.utils.flop_counter``). Leaves a full forward
        does not run either (an unused pooler) are not counted as skipped."""
        root = model if model is not None else self.model
        leaves = [m for m in root.modules() if next(m.children(), None) is None]

        def count(stop: bool) -> tuple[set[int], int | None]:
            seen: set[int] = set()
            hs = [m.register_forward_hook(lambda m, *_: seen.add(id(m))) for m in leaves]
            saved, self.stop_after = self.stop_after, stop
            try:
                with torch.no_grad():
                    if flops:
                        with flop_counter() as fc:
                            self.run(root, *args, **kwargs)
                        return seen, fc.get_total_flops()
                    self.run(root, *args, **kwargs)
                    return seen, None
            finally:
                self.stop_after = saved
                for h in hs:
                    h.remove()

        full, f_full = count(False)
        part, f_part = count(self.stop_after)
        return TapProfile(len(full), len(full - part), f_full, f_part)


def feature_shapes(model: nn.Module, layers: Iterable[str], example: Tensor, select: Select = 0) -> dict[str, tuple[int, ...]]:
    """The per-sample output shape of each layer (batch dimension dropped), from one stopped forward of
    ``example`` in eval mode under ``no_grad`` (so no batch-norm statistics or RNG are touched)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            tap = FeatureTap(model, layers, stop_after=True, select=select)
            tap.run(model, example)
            return {name: tuple(tap[name].shape[1:]) for name in tap.layers}
    finally:
        model.train(was_training)
