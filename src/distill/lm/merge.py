"""Weighted merging of same-architecture checkpoints: S33 BAI, Balanced Actor Initialization (Zheng et
al. 2025, arXiv 2509.00309), the actor's initialisation before RL.

BAI merges in two stages (as the paper's abstract states them; equations written by us):

1. stage one, a weighted average of fine-tuned models of one architecture (in the paper the
   instruction-following SFT model and the distillation-trained reasoning model)::

       θ_merge = Σ_i w_i · θ_i,        w_i ≥ 0,  Σ_i w_i = 1                     (BAI stage 1)

2. stage two, the stage-one model averaged with the pretrained (base) model they share, to restore
   foundational knowledge::

       θ_BAI = (1 − b) · θ_merge + b · θ_base,   b = ``base_weight`` ∈ [0, 1]      (BAI stage 2)

Both stages are linear interpolation per tensor; the paper's point is the initialisation (and its
"balanced" ratios), not a new merge operator. Stage two is optional here (``base=None``: plain
weighted averaging, "model soup").

Conventions and numerics:

- Weights are normalised to sum to 1 (``1 1`` is an even average); they must be finite and ≥ 0 with
  a positive sum (no extrapolation).
- Computed per tensor as ``θ_1 + Σ_{i≥2} w_i · (θ_i − θ_1)`` — equal to ``Σ_i w_i θ_i`` when the
  weights sum to 1 — in float32 (float64 tensors stay float64), then cast back to the first model's
  dtype. Written so, a merge of identical checkpoints is exactly the identity (every difference is
  exactly 0), and fine-tuned models close to each other lose no precision to cancellation.
- Every model must have the same state-dict keys and shapes; integer and boolean tensors (buffers)
  must be equal and are copied.
- ``merge_models`` reads models one at a time (memory: the first model, one float32 accumulator and
  the model being added), writes an HF model folder (``save_pretrained``) with the first model's
  config and tokenizer, and ``merge.json`` recording the inputs and weights.

We could not read the paper's full text here (only its abstract and summaries): the two stages above
are as the abstract states them ("first merges instruction-following and distillation-based reasoning
fine-tuned models, then further combines this intermediate model with the pretrained model"), written
as convex combinations; no official code is public.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, model_validator
from torch import Tensor

from distill.core.recipe import ModelRef, Strict
from distill.core.refs import RefContext, RefKind, record_ref
from distill.core.registry import REFS
from distill.core.rundir import run_lock
from distill.errors import MismatchError, RecipeError, RunExistsError
from distill.lm import models

MERGE_FILE = "merge.json"


def check_weights(weights: Sequence[float], n: int, what: str = "weights") -> list[float]:
    """``weights`` normalised to sum to 1; one per model, finite, ≥ 0, with a positive sum."""
    w = [float(x) for x in weights]
    if n < 1:
        raise RecipeError("a merge needs at least one model")
    if len(w) != n:
        raise RecipeError(f"{what}: {len(w)} weights for {n} models; give one weight per model")
    if any(not math.isfinite(x) or x < 0 for x in w):
        raise RecipeError(f"{what}: {w} must be finite and >= 0")
    total = sum(w)
    if total <= 0:
        raise RecipeError(f"{what}: {w} sum to 0; give at least one positive weight")
    return [x / total for x in w]


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


class _Merger:
    """Accumulates ``Σ_{i≥2} w_i · (θ_i − θ_1)`` per floating tensor, one state dict at a time."""

    def __init__(self, first: Mapping[str, Tensor], name: str = "model 1") -> None:
        self.first = dict(first)
        self.name = name
        self.delta: dict[str, Tensor] = {}

    def add(self, state: Mapping[str, Tensor], weight: float, name: str) -> None:
        _check_same(self.first, state, self.name, name)
        for k, t0 in self.first.items():
            t = state[k].to(t0.device)
            if not t0.is_floating_point():
                if not torch.equal(t0, t):
                    raise MismatchError(f"{name}: non-float tensor '{k}' differs from {self.name}'s; "
                                        "only models of one architecture and configuration can be merged")
                continue
            acc = _acc_dtype(t0)
            d = (t.to(acc) - t0.to(acc)).mul_(weight)
            if k in self.delta:
                self.delta[k].add_(d)
            else:
                self.delta[k] = d

    def result(self) -> dict[str, Tensor]:
        out = {}
        for k, t0 in self.first.items():
            if k in self.delta:
                out[k] = (t0.to(self.delta[k].dtype) + self.delta[k]).to(t0.dtype)
            else:
                out[k] = t0.detach().clone()
        return out


def _check_same(a: Mapping[str, Tensor], b: Mapping[str, Tensor], name_a: str, name_b: str) -> None:
    missing, extra = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. '{missing[0]}')")
        if extra:
            parts.append(f"{len(extra)} extra (e.g. '{extra[0]}')")
        raise MismatchError(f"{name_b} has other tensors than {name_a}: {', '.join(parts)}; "
                            "only models of one architecture can be merged")
    for k, t in a.items():
        if tuple(t.shape) != tuple(b[k].shape):
            raise MismatchError(f"tensor '{k}' is {list(t.shape)} in {name_a} but {list(b[k].shape)} in {name_b}; "
                                "only models of one architecture and size can be merged")
        if t.is_floating_point() != b[k].is_floating_point():
            raise MismatchError(f"tensor '{k}' is {t.dtype} in {name_a} but {b[k].dtype} in {name_b}")


def merge_state_dicts(states: Sequence[Mapping[str, Tensor]], weights: Sequence[float],
                      names: Sequence[str] | None = None) -> dict[str, Tensor]:
    """BAI stage 1 (S33): the weighted average ``Σ_i w_i θ_i`` of state dicts, per tensor (see the module
    docstring for the numerics). ``weights`` are normalised to sum to 1. Raises ``MismatchError`` for
    other keys, shapes or non-float tensors, ``RecipeError`` for bad weights."""
    w = check_weights(weights, len(states))
    names = list(names) if names is not None else [f"model {i + 1}" for i in range(len(states))]
    merger = _Merger(states[0], names[0])
    for s, wi, name in zip(states[1:], w[1:], names[1:]):
        merger.add(s, wi, name)
    return merger.result()


def two_stage_merge(states: Sequence[Mapping[str, Tensor]], weights: Sequence[float],
                    base: Mapping[str, Tensor], base_weight: float) -> dict[str, Tensor]:
    """BAI (S33): stage 1 ``θ_merge = Σ_i w_i θ_i``, then stage 2 ``(1 − b)·θ_merge + b·θ_base`` with
    ``b = base_weight`` ∈ [0, 1]."""
    b = _check_base_weight(base_weight)
    stage_one = merge_state_dicts(states, weights)
    return merge_state_dicts([stage_one, base], [1.0 - b, b], ["the stage-one merge", "the base model"])


def _check_base_weight(base_weight: float) -> float:
    b = float(base_weight)
    if not (math.isfinite(b) and 0.0 <= b <= 1.0):
        raise RecipeError(f"base_weight {base_weight} must be in [0, 1] (the base model's share in stage two)")
    return b


# --- model folders -------------------------------------------------------------------------------

def _load(folder: Path) -> Any:
    return models.load_causal_lm(folder)  # quiet_hf inside; run folders resolve to student/


def _same_arch(a: Any, b: Any, name_a: str, name_b: str) -> None:
    ta, tb = getattr(a.config, "model_type", None), getattr(b.config, "model_type", None)
    if ta != tb or type(a) is not type(b):
        raise MismatchError(f"{name_b} is a {type(b).__name__} ({tb}) but {name_a} is a {type(a).__name__} ({ta}); "
                            "only models of one architecture can be merged")


def merge_models(folders: Sequence[str | Path], weights: Sequence[float], out: str | Path,
                 base: str | Path | None = None, base_weight: float | None = None,
                 overwrite: bool = False) -> Path:
    """Merge HF causal-LM folders (or run folders) into ``out`` (an HF model folder): BAI stage 1 over
    ``folders`` with ``weights``, and stage 2 with ``base`` at ``base_weight`` when given (S33). The
    config and tokenizer are the first model's; tokenizers saved beside the others must equal it.
    Written to ``<out>.partial`` and renamed when complete. Returns ``out``."""
    folders = [Path(f).expanduser() for f in folders]
    w = check_weights(weights, len(folders))
    if (base is None) != (base_weight is None):
        raise RecipeError("stage two needs both a base model and base_weight (or neither)")
    b = _check_base_weight(base_weight) if base_weight is not None else None
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise RunExistsError(f"{out} exists; choose another --out or pass --overwrite")
    if out.exists() and not (out / MERGE_FILE).is_file():  # --overwrite replaces a merge, nothing else
        raise RunExistsError(f"{out} exists and is not a merged model folder (no {MERGE_FILE}); it is not touched: "
                             "choose another --out")

    tok = models.model_tokenizer(folders[0])
    inputs = folders + ([Path(base).expanduser()] if base is not None else [])
    for f in inputs[1:]:
        other = models.model_tokenizer(f)
        if tok is not None and other is not None:
            models.check_same_tokenizer(other, tok, f"model in {f}")

    first = _load(folders[0])
    merger = _Merger(first.state_dict(), str(folders[0]))
    for f, wi in zip(folders[1:], w[1:]):
        m = _load(f)
        _same_arch(first, m, str(folders[0]), str(f))
        merger.add(m.state_dict(), wi, str(f))
        del m
    state = merger.result()
    if base is not None:
        m = _load(Path(base).expanduser())
        _same_arch(first, m, str(folders[0]), str(base))
        stage_two = _Merger(state, "the stage-one merge")
        stage_two.add(m.state_dict(), b, f"base model {base}")
        del m
        state = stage_two.result()
    first.load_state_dict(state)

    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    with models.quiet_hf():
        first.save_pretrained(str(partial), safe_serialization=True)
    if tok is not None:
        tok.save_pretrained(str(partial))
    record = {
        "method": "S33 BAI: stage 1 sum_i w_i theta_i; stage 2 (1 - base_weight) theta_merge + base_weight theta_base",
        "models": [str(f.resolve()) for f in folders], "weights": w,
        "base": str(Path(base).expanduser().resolve()) if base is not None else None, "base_weight": b,
    }
    (partial / MERGE_FILE).write_text(json.dumps(record, indent=2))
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    return out


# --- recipes: ``init: {merge: {models: [...], weights: [...], base: ..., base_weight: ...}}`` -------

def _model_dir(folder: Path) -> Path:
    return folder / "student" if (folder / "student" / "config.json").is_file() else folder


def _stamp(folder: Path) -> list[Any]:
    """What identifies a model folder's contents cheaply: its path and each file's name, size, mtime."""
    d = _model_dir(folder).resolve()
    files = sorted(p for p in d.iterdir() if p.is_file())
    return [str(d), [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]]


def merge_fingerprint(folders: Sequence[Path], weights: Sequence[float], base: Path | None,
                      base_weight: float | None) -> str:
    """12 hex digits identifying a merge: the inputs' stamps, the normalised weights and stage two."""
    w = check_weights(weights, len(folders))
    key = [[_stamp(Path(f)) for f in folders], w, _stamp(Path(base)) if base is not None else None, base_weight]
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


class MergeRef(Strict):
    """``{merge: {models, weights, base, base_weight}}`` (BAI stages 1 and 2 above). Merged once and cached
    under ``<out>/_teachers/merge-<fingerprint>``."""

    models: list[ModelRef] = Field(min_length=1, description="models of one architecture (any model reference)")
    weights: list[float] = Field(description="one weight >= 0 per model; normalised to sum to 1")
    base: ModelRef | None = Field(None, description="stage two: the pretrained model merged back in")
    base_weight: float | None = Field(None, ge=0, le=1, description="the base model's share in stage two")

    @model_validator(mode="after")
    def _weights(self) -> "MergeRef":
        if len(self.weights) != len(self.models):
            raise ValueError(f"{len(self.weights)} weights for {len(self.models)} models; give one weight per model")
        if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
            raise ValueError("weights must be >= 0 with a positive sum")
        if (self.base is None) != (self.base_weight is None):
            raise ValueError("stage two needs both 'base' and 'base_weight' (or neither)")
        return self


def resolve_merge(ctx: RefContext, spec: MergeRef) -> Path:
    """The folder of a recipe's ``merge`` reference: every input resolved as any model reference
    (trained from its recipe once, or a run/model folder, or a nested merge), then merged once into
    ``<out>/_teachers/merge-<fingerprint>`` and reused while the inputs are unchanged."""
    inputs = [ctx.folder(r) for r in spec.models]
    base = ctx.folder(spec.base) if spec.base is not None else None
    cached = Path(ctx.out) / "_teachers" / f"merge-{merge_fingerprint(inputs, spec.weights, base, spec.base_weight)}"
    if not (cached / MERGE_FILE).is_file():
        with run_lock(cached.parent, cached.name, wait=True):  # another process may be merging the same
            if not (cached / MERGE_FILE).is_file():
                merge_models(inputs, spec.weights, cached, base, spec.base_weight, overwrite=True)
    return cached


def record_merge(recipe: Any, spec: MergeRef, key: str) -> dict[str, Any]:
    """A merge as recipe.yaml records it: every input recorded as any reference (recursively)."""
    return {**spec.model_dump(mode="json"), "models": [record_ref(recipe, r, key) for r in spec.models],
            "base": record_ref(recipe, spec.base, key) if spec.base is not None else None}


REFS.register("merge", "S33 BAI: a weighted merge of models of one architecture")(
    RefKind(resolve=resolve_merge, schema=MergeRef, record=record_merge))
