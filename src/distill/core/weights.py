"""Check a weights file against the model it is for, before the model is materialised.

A model is first built on the meta device (no memory), its state dict's keys and shapes compared with
the safetensors headers (which are read without reading the tensors), and only then built for real
and loaded. Missing, unexpected or mis-shaped tensors are one ``WeightsError`` naming the file and the
first offending keys, so a partial, empty or foreign file never yields a silently random model.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from distill.errors import WeightsError


def header(path: Path) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of a safetensors file, from its header alone."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise WeightsError(f"{path}: not a readable safetensors file ({str(err).splitlines()[0]})") from None


def read(path: Path, device: str = "cpu") -> dict[str, Tensor]:
    """A safetensors file's tensors; a damaged file is a ``WeightsError`` naming it."""
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as err:
        raise WeightsError(f"{path}: not a readable safetensors file ({str(err).splitlines()[0]})") from None


def _first(keys: Sequence[str], most: int = 3) -> str:
    return ", ".join(keys[:most]) + (f" (+{len(keys) - most} more)" if len(keys) > most else "")


def check(expected: dict[str, tuple[int, ...]], files: Iterable[Path], ignore_missing: Sequence[str] = (),
          ignore_unexpected: Sequence[str] = ()) -> None:
    """Raise ``WeightsError`` unless ``files`` hold exactly the tensors ``expected`` (key -> shape).
    ``ignore_*``: regular expressions of keys that may be absent (tied weights) or extra."""
    files = list(files)
    got: dict[str, tuple[int, ...]] = {}
    for f in files:
        got.update(header(f))
    name = str(files[0]) if len(files) == 1 else f"{files[0].parent} ({len(files)} shards)"
    if not got:
        raise WeightsError(f"{name} holds no tensors")

    def ignored(key: str, patterns: Sequence[str]) -> bool:
        return any(re.search(p, key) for p in patterns)

    missing = [k for k in expected if k not in got and not ignored(k, ignore_missing)]
    unexpected = [k for k in got if k not in expected and not ignored(k, ignore_unexpected)]
    shaped = [f"{k} {list(got[k])} != {list(expected[k])}" for k in expected if k in got and got[k] != expected[k]]
    problems = [f"{what}: {_first(keys)}" for what, keys in
                (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shaped)) if keys]
    if problems:
        raise WeightsError(f"{name} does not match the model ({len(expected)} tensors expected, {len(got)} in the "
                           f"file); {'; '.join(problems)}")


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """A (meta) model's state dict as ``{key: shape}``."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def load_checked(build: Callable[[], nn.Module], weights: Path) -> nn.Module:
    """``build()`` with ``weights`` loaded, after checking the file's keys and shapes against a model built
    on the meta device (from the header: nothing is materialised before the file is known to fit)."""
    with torch.device("meta"):
        check(shapes(build()), [weights])
    model = build()
    model.load_state_dict(read(weights))
    return model
