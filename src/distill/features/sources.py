"""Several source teachers as one teacher: the ``sources`` model-reference kind and its folder format.

``teacher: {sources: [REF, REF, ...]}`` (any model references: recipes trained once, run or model
folders, nested kinds) resolves every member with ``ctx.folder`` (as ``merge`` does its inputs) and
writes a small manifest folder ``<out>/_teachers/sources-<fingerprint>/config.json`` (format
``distill-sources-v1``: the members' absolute folders and names; no weights are copied). Loading that
folder (``distill.load_student``, hence ``TaskOps.load_model``) gives a ``SourceSet``: an
``nn.ModuleList`` of the members. The engine sees one teacher module and learns nothing new; a method
that wants several teachers (S22 ``multi_source``) reads ``SourceSet.members``.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field
from torch import Tensor, nn

from distill.core.recipe import ModelRef
from distill.core.refs import ModelFormat, RefContext, RefKind, load_student, record_ref
from distill.core.registry import FORMATS, REFS
from distill.core.rundir import run_lock
from distill.errors import MismatchError, ModelError, RecipeError

SourceRefs = Annotated[list[ModelRef], Field(min_length=1)]
SOURCES_FORMAT = "distill-sources-v1"


class SourceSet(nn.Module):
    """Source models of one input shape, each a classifier with ``embed(x)`` (its own label space)."""

    def __init__(self, members: list[nn.Module], names: list[str]) -> None:
        super().__init__()
        if not members:
            raise RecipeError("sources: give at least one source model")
        for name, m in zip(names, members):
            if not callable(getattr(m, "embed", None)):
                raise MismatchError(f"source {name} ({type(m).__name__}) has no embed(x); sources must be classifiers "
                                    "with embed/head (any registered classifier arch)")
        self.members = nn.ModuleList(members)
        self.names = list(names)

    def __len__(self) -> int:
        return len(self.members)

    def forward(self, x: Tensor) -> Tensor:
        raise ModelError("a source set has no logits for the target task: distil from it with method multi_source")


def as_sources(teacher: nn.Module) -> SourceSet:
    """A ``SourceSet`` as is; any other classifier as a set of one (single-source distillation)."""
    return teacher if isinstance(teacher, SourceSet) else SourceSet([teacher], ["teacher"])


def _stamp(folder: Path) -> list[Any]:
    d = folder / "student" if (folder / "student" / "config.json").is_file() else folder
    return [str(d.resolve()), [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(d.iterdir()) if p.is_file()]]


def _name(folder: Path) -> str:
    return re.sub(r"-[0-9a-f]{12}$", "", folder.name)  # a trained recipe's cache folder: <name>-<fingerprint>


def resolve_sources(ctx: RefContext, refs: list[ModelRef]) -> Path:
    """Every member resolved as any model reference, then one manifest folder per set of member folders
    (keyed by their contents' stamps), written once under ``<out>/_teachers``."""
    folders = [ctx.folder(r) for r in refs]
    key = hashlib.sha256(json.dumps([_stamp(f) for f in folders]).encode()).hexdigest()[:12]
    out = Path(ctx.out) / "_teachers" / f"sources-{key}"
    if not (out / "config.json").is_file():
        with run_lock(out.parent, out.name, wait=True):
            if not (out / "config.json").is_file():
                out.mkdir(parents=True, exist_ok=True)
                manifest = {"format": SOURCES_FORMAT, "members": [str(f.resolve()) for f in folders],
                            "names": [_name(f) for f in folders]}
                tmp = out / "config.json.partial"
                tmp.write_text(json.dumps(manifest, indent=2))
                tmp.rename(out / "config.json")
    return out


def load_sources(folder: Path) -> SourceSet:
    cfg = json.loads((folder / "config.json").read_text())
    return SourceSet([load_student(m) for m in cfg["members"]], cfg["names"])


def record_sources(recipe: Any, refs: list[ModelRef], key: str) -> list[Any]:
    return [record_ref(recipe, r, key) for r in refs]


REFS.register("sources", "several source teachers as one (S22 multi_source): a list of model references")(
    RefKind(resolve=resolve_sources, schema=SourceRefs, record=record_sources, teacher_only=True))
FORMATS.register(SOURCES_FORMAT, "a source set's manifest: member model folders (S22 multi_source)")(
    ModelFormat(claims=lambda cfg: cfg.get("format") == SOURCES_FORMAT, load=load_sources))
