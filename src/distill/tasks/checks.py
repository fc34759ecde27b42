"""Checks of what a Python user passes to ``distill.distill``, before anything is written.

Datasets: any map-style dataset of ``(x, y)`` pairs becomes an ``ArrayDataset``; splits must be
non-empty, with finite inputs of one shape and labels in ``0..C-1`` (-1, unlabeled, only in
``transfer``). Models: each runs once on a small real batch under ``torch.no_grad`` and must return
``[batch, C]`` logits; an output that is an HF ``ModelOutput`` (``.logits``), a mapping with
``"logits"`` or a tuple (first element), or logits in another dtype, is adapted with forward hooks
(removed again after the run), and a teacher in another dtype gets its inputs cast to its dtype, so
the module, its ``state_dict`` and its saved weights stay the user's own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, IterableDataset, TensorDataset
from torch.utils.hooks import RemovableHandle

from distill.errors import DataError, MismatchError, ModelError
from distill.tasks.base import ArrayDataset

PROBE_ROWS = 2  # rows of ``train`` each model runs on before training


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


# --- datasets ------------------------------------------------------------------------------------

def as_array_dataset(ds: Any, arg: str, labeled: bool) -> ArrayDataset:
    """``ds`` (an ``ArrayDataset``, a ``TensorDataset`` or any map-style dataset of ``(x, y)`` pairs, or
    of ``x`` alone when not ``labeled``) as an ``ArrayDataset``; ``arg`` names it in errors."""
    if isinstance(ds, ArrayDataset):
        return ds
    what = "distill.ArrayDataset(x, y)" + ("" if labeled else " or distill.ArrayDataset(x)")
    if isinstance(ds, IterableDataset):
        raise DataError(f"{arg} is an IterableDataset: pass {what} or a map-style dataset of (x, y) pairs")
    if not isinstance(ds, Dataset):
        raise DataError(f"{arg} must be a dataset ({what}, or a map-style torch Dataset of (x, y) pairs), "
                        f"got {type(ds).__name__}")
    try:
        if isinstance(ds, TensorDataset):
            parts = list(ds.tensors)
            if not 1 <= len(parts) <= 2:
                raise DataError(f"{arg} is a TensorDataset of {len(parts)} tensors: expected (x, y)"
                                + ("" if labeled else " or (x,)"))
        else:
            parts = _stack_items(ds, arg)
        if len(parts) == 1 and labeled:
            raise DataError(f"{arg} has inputs but no labels: pass (x, y) pairs (unlabeled data goes in transfer=)")
        return ArrayDataset(*parts)
    except DataError as err:
        msg = str(err)
        raise DataError(msg if msg.startswith(arg) else f"{arg}: {msg}") from None


def _stack_items(ds: Dataset, arg: str) -> list[Tensor]:
    try:
        n = len(ds)  # type: ignore[arg-type]
    except TypeError:
        raise DataError(f"{arg} has no len(): pass a map-style dataset of (x, y) pairs") from None
    xs, ys = [], []
    for i in range(n):
        item = ds[i]
        if isinstance(item, Mapping) and "x" in item:
            pair = (item["x"], item["y"]) if "y" in item else (item["x"],)
        elif isinstance(item, (tuple, list)) and 1 <= len(item) <= 2:
            pair = tuple(item)
        elif torch.is_tensor(item):
            pair = (item,)
        else:
            raise DataError(f"{arg}[{i}] is a {type(item).__name__}: expected an (x, y) pair")
        if ys and len(pair) == 1 or xs and not ys and len(pair) == 2:
            raise DataError(f"{arg}[{i}] has {len(pair)} elements but {arg}[0] has {2 if ys else 1}")
        try:
            xs.append(torch.as_tensor(pair[0]))
            if len(pair) == 2:
                ys.append(torch.as_tensor(pair[1]))
        except (TypeError, ValueError, RuntimeError) as err:
            raise DataError(f"{arg}[{i}] is not numbers ({_one_line(err)}); return tensors from the dataset") from None
        if xs[-1].shape != xs[0].shape:
            raise DataError(f"{arg}[{i}] has x of shape {list(xs[-1].shape)} but {arg}[0] has {list(xs[0].shape)}")
        if ys and ys[-1].numel() != 1:
            raise DataError(f"{arg}[{i}] has a label of shape {list(ys[-1].shape)}: labels must be one class index")
    if not xs:
        return [torch.zeros(0), torch.zeros(0, dtype=torch.long)]
    x = torch.stack(xs)
    return [x, torch.stack([y.reshape(()) for y in ys])] if ys else [x]


def check_split(ds: ArrayDataset, arg: str, input_shape: tuple[int, ...] | None) -> None:
    """Non-empty, finite inputs of ``input_shape`` (the training set's; None for ``train`` itself)."""
    if len(ds) == 0:
        hint = ": pass transfer=None when there is no unlabeled data" if arg == "transfer" else ""
        raise DataError(f"{arg} is empty{hint}")
    shape = tuple(ds.x.shape[1:])
    if input_shape is not None and shape != input_shape:
        raise DataError(f"{arg} has inputs of shape {list(shape)} but train has {list(input_shape)}")
    finite = torch.isfinite(ds.x).reshape(len(ds), -1).all(1)
    if not finite.all():
        bad = (~finite).nonzero()[:, 0]
        raise DataError(f"{arg} has non-finite inputs (NaN or inf) in {len(bad)} row(s), the first is row {int(bad[0])}")
    if ds.y.dim() != 1 or len(ds.y) != len(ds) or ds.y.dtype != torch.long:
        raise DataError(f"{arg}.y must be {len(ds)} class indices (1-D, integer), got {ds.y.dtype} of shape "
                        f"{list(ds.y.shape)}")


def check_labels(ds: ArrayDataset, arg: str, num_classes: int, source: str) -> None:
    """Labels in ``0..num_classes-1``; -1 (unlabeled) only in ``transfer``. ``source`` says where
    ``num_classes`` comes from (``num_classes=3``, ``the student predicts 3 classes``)."""
    if arg != "transfer" and (ds.y == -1).any():
        row = int((ds.y == -1).nonzero()[0])
        raise DataError(f"{arg} has unlabeled samples (label -1, the first in row {row}): "
                        "labeled splits need a class index for every sample; pass unlabeled data as transfer=")
    bad = (ds.y < -1) | (ds.y >= num_classes)  # -1 in a labeled split is refused above
    if bad.any():
        row = int(bad.nonzero()[0])
        allowed = f"0..{num_classes - 1}" + (" or -1 (unlabeled)" if arg == "transfer" else "")
        raise DataError(f"{arg} has label {int(ds.y[row])} in row {row} but {source}: labels must be {allowed}")


# --- models --------------------------------------------------------------------------------------

def _float_dtype(model: nn.Module) -> torch.dtype | None:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def logits_of(out: Any) -> Tensor | None:
    """The logits in a model's output: a tensor, ``.logits`` (HF ``ModelOutput``), ``["logits"]`` or the
    first element of a tuple/list; None when there are none."""
    if torch.is_tensor(out):
        return out
    logits = getattr(out, "logits", None)
    if torch.is_tensor(logits):
        return logits
    if isinstance(out, Mapping) and torch.is_tensor(out.get("logits")):
        return out["logits"]
    if isinstance(out, (tuple, list)) and out and torch.is_tensor(out[0]):
        return out[0]
    return None


def _cast_inputs(module: nn.Module, args: tuple) -> tuple:
    dtype = _float_dtype(module)
    return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() and dtype is not None else a
                 for a in args)


def _float_logits(module: nn.Module, args: tuple, out: Any) -> Tensor:
    return logits_of(out).float()


class ModelProbe:
    """Checks ``model`` on ``x`` (a few real rows) and adapts its calls with hooks: ``width`` is its
    number of classes; ``remove()`` takes the hooks off again."""

    def __init__(self, model: Any, who: str, x: Tensor, arg: str = "train") -> None:
        if not isinstance(model, nn.Module):
            raise ModelError(f"{who} must be a torch.nn.Module, got {type(model).__name__}")
        self.handles: list[RemovableHandle] = []
        dtype = _float_dtype(model)
        if who == "student":
            if dtype is not None and dtype != torch.float32:
                raise ModelError(f"the student's parameters are {dtype}: pass a float32 student (student.float()); "
                                 "train_config={'mixed_precision': 'bf16'} computes in bf16")
            if not any(p.requires_grad for p in model.parameters()):
                raise ModelError("the student has no trainable parameters (none requires grad): call "
                                 "student.requires_grad_(True) if it was frozen, e.g. as an earlier run's teacher")
        if dtype is not None and dtype != torch.float32:
            self.handles.append(model.register_forward_pre_hook(_cast_inputs))  # e.g. a bf16 teacher
        try:
            self.width = self._probe(model, who, x, arg)
        except BaseException:
            self.remove()
            raise

    def _probe(self, model: nn.Module, who: str, x: Tensor, arg: str) -> int:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model(x.to(_device(model)))
        except Exception as err:
            raise ModelError(f"the {who} failed on {len(x)} rows of {arg} (x of shape {list(x.shape)}): "
                             f"{_one_line(err)}") from err
        finally:
            model.train(was_training)
        logits = logits_of(out)
        if logits is None:
            raise ModelError(f"the {who} returned a {type(out).__name__}: return logits [batch, classes] (a tensor, "
                             "a tuple whose first element is the logits, or an object with .logits)")
        if logits.dim() != 2 or len(logits) != len(x):
            raise ModelError(f"the {who} returned logits of shape {list(logits.shape)} for {len(x)} rows: expected "
                             f"[{len(x)}, classes]")
        if not logits.is_floating_point():
            raise ModelError(f"the {who} returned {logits.dtype} outputs: expected float logits")
        if logits.shape[1] < 2:
            raise ModelError(f"the {who} returns {logits.shape[1]} logit per sample: a classifier needs one per "
                             "class (2 for a binary task)")
        if not torch.isfinite(logits).all():
            raise ModelError(f"the {who} returned non-finite logits (NaN or inf) on {len(x)} rows of {arg}")
        if out is not logits or logits.dtype != torch.float32:
            self.handles.append(model.register_forward_hook(_float_logits))
        return int(logits.shape[1])

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def check_widths(student: ModelProbe, teacher: ModelProbe | None, num_classes: int | None) -> None:
    """The student's and teacher's class counts agree with each other and with ``num_classes``."""
    if num_classes is not None and student.width != num_classes:
        raise MismatchError(f"the student predicts {student.width} classes but num_classes={num_classes}")
    if teacher is not None and teacher.width != student.width:
        raise MismatchError(f"the teacher predicts {teacher.width} classes but the student predicts "
                            f"{student.width}: they must have one output per class of the task")
