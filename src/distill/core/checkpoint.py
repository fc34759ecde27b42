"""Checkpoints: weights in safetensors, optimizer/schedule/RNG state loaded with weights_only=True,
trainer and method state in JSON.

Crash-safe: a checkpoint is written to ``.latest.tmp`` (``state.json`` last), every file and the folder
fsynced, then the previous ``latest`` is moved to ``.latest.old`` and the new one renamed into place.
A crash at any point leaves a complete checkpoint that ``find`` returns: ``latest``, or, when the crash
fell between the two renames, ``.latest.old``."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from distill.core.distiller import Distiller
from distill.core.rundir import fsync_path
from distill.errors import MissingFileError

LATEST = "latest"


def cpu_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict as contiguous CPU copies: what safetensors can write (no shared storage)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def trainable_state(distiller: Distiller) -> dict[str, torch.Tensor]:
    """The distiller's state without a frozen teacher (it is rebuilt from its own run)."""
    sd = distiller.state_dict()
    if distiller.teacher is not None and not distiller.teacher_trainable:
        sd = {k: v for k, v in sd.items() if not k.startswith("teacher.")}
    return cpu_tensors(sd)


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }


def _set_rng_state(s: dict[str, Any]) -> None:
    py = s["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npy = s["numpy"]
    np.random.set_state((npy[0], np.array(npy[1], dtype=np.uint32), *npy[2:]))


def _complete(d: Path) -> bool:
    return all((d / f).is_file() for f in ("model.safetensors", "optim.pt", "state.json"))


def find(folder: Path) -> Path | None:
    """The last complete checkpoint in ``folder``: ``latest``, else ``.latest.old`` (a crash between the
    two renames of ``save``), else None."""
    for d in (folder / LATEST, folder / f".{LATEST}.old"):
        if _complete(d):
            return d
    return None


def exists(folder: Path) -> bool:
    return find(folder) is not None




def save(folder: Path, distiller: Distiller, optimizers: list, schedulers: list, state: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{LATEST}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(trainable_state(distiller), str(tmp / "model.safetensors"))
    torch.save(
        {
            "optimizers": [o.state_dict() for o in optimizers],
            "schedulers": [s.state_dict() for s in schedulers],
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        },
        tmp / "optim.pt",
    )
    meta = {"trainer": state, "rng": _rng_state(), "method": distiller.state_extra(), "epoch": distiller.epoch}
    (tmp / "state.json").write_text(json.dumps(meta))  # last: its presence marks a complete checkpoint
    for f in ("model.safetensors", "optim.pt", "state.json"):
        fsync_path(tmp / f)
    fsync_path(tmp)
    final = folder / LATEST
    old = folder / f".{LATEST}.old"
    if _complete(final):
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    else:
        shutil.rmtree(final, ignore_errors=True)
    fsync_path(folder)
    tmp.rename(final)
    fsync_path(folder)
    shutil.rmtree(old, ignore_errors=True)


def load(folder: Path, distiller: Distiller, optimizers: list, schedulers: list, device: torch.device) -> dict[str, Any]:
    src = find(folder)
    if src is None:
        raise MissingFileError(f"no checkpoint in {folder}")
    missing, unexpected = distiller.load_state_dict(load_file(str(src / "model.safetensors"), device=str(device)), strict=False)
    missing = [k for k in missing if not k.startswith("teacher.") or distiller.teacher_trainable]
    if missing or unexpected:
        raise MissingFileError(f"checkpoint {src} does not match this method/model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    blob = torch.load(src / "optim.pt", map_location=device, weights_only=True)
    for o, sd in zip(optimizers, blob["optimizers"]):
        o.load_state_dict(sd)
    for s, sd in zip(schedulers, blob["schedulers"]):
        s.load_state_dict(sd)
    torch.set_rng_state(blob["torch_rng"].cpu())
    if blob["cuda_rng"]:
        torch.cuda.set_rng_state_all([r.cpu() for r in blob["cuda_rng"]])  # map_location moved them
    meta = json.loads((src / "state.json").read_text())
    _set_rng_state(meta["rng"])
    distiller.load_state_extra(meta["method"])
    distiller.epoch = meta["epoch"]
    return meta["trainer"]


def save_best(folder: Path, student: nn.Module) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".best.tmp.safetensors"
    save_file(cpu_tensors(student.state_dict()), str(tmp))
    fsync_path(tmp)
    tmp.replace(folder / "best_student.safetensors")
    fsync_path(folder)


def load_best(folder: Path, student: nn.Module) -> None:
    path = folder / "best_student.safetensors"
    if path.is_file():
        dev = next(student.parameters()).device
        student.load_state_dict(load_file(str(path), device=str(dev)))
