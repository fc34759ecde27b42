"""What a run leaves behind and how it is written safely: run names, the run-folder lock, the
result of a run, durable writes, and the comparison of a resumed or reused run with its recipe."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from distill.errors import RecipeError, RunExistsError, RunLockedError

# one path component: no separators, not "." or "..", not hidden, not a folder the runner writes itself
NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$"
_RESERVED = ("_teachers",)
PARTIAL = ".partial"


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    student: nn.Module | None = None


def check_run_name(name: str, what: str = "run name") -> str:
    """``name`` if it is a single, safe path component (letters, digits, ``_ . -``; not ``.``/``..``, not
    ending in ``.partial``, not ``_teachers``); else a ``RecipeError``. Checked before anything is touched."""
    if (not isinstance(name, str) or not re.match(NAME_PATTERN, name) or name.endswith(PARTIAL)
            or name in _RESERVED or name.strip(".") == ""):
        raise RecipeError(f"{what} {name!r} is not allowed: use letters, digits, '_', '.', '-' (one folder name, "
                          f"not '.', '..', a path, '{PARTIAL}' or '_teachers')")
    return name


def run_folder(out: Path, name: str) -> Path:
    """``<out>/<name>``, checked to lie inside ``out``."""
    check_run_name(name)
    folder = out / name
    if folder.resolve().parent != out.resolve():
        raise RecipeError(f"run name {name!r} leaves the output folder {out}")
    return folder


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "another process"
    except OSError:
        return "another process"


@contextlib.contextmanager
def run_lock(out: Path, name: str, wait: bool = False,
             on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold an OS lock (``flock``) on ``<out>/.<name>.lock`` while ``<out>/<name>`` (and its ``.partial``)
    is written. The kernel drops the lock when the process dies, so a killed run never leaves a lock
    that blocks. ``wait``: block until the holder is done (shared teachers); else refuse at once."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f".{name}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(path)
            if not wait:
                os.close(fd)
                raise RunLockedError(f"run folder {out / name} is being written by {holder}; wait for it to "
                                     "finish or choose another --name") from None
            if on_wait is not None:
                on_wait(holder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        # the previous holder may have removed the lock file between our open and our lock: lock the file
        # that is at the path now
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"process {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}".encode())
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def fsync_path(path: Path) -> None:
    """Flush a file or a folder (its entries: renames, new files) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file in ``folder`` (recursively), then the folders themselves."""
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            fsync_path(p)
    for p in sorted((q for q in folder.rglob("*") if q.is_dir()), reverse=True):
        fsync_path(p)
    fsync_path(folder)


def flat(d: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as ``{"a.b.c": value}`` (lists are values)."""
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


# keys that cannot change the trained model: a resumed or reused run may differ in them
HARMLESS_KEYS = ("train.progress", "train.trackers", "train.log_every")


def recipe_diff(old: dict[str, Any], new: dict[str, Any], allowed: tuple[str, ...] = HARMLESS_KEYS) -> list[str]:
    """The flat keys in which two resolved recipes differ (``allowed`` ones left out)."""
    a, b = flat(old), flat(new)
    keys = sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))
    return [k for k in keys if not k.startswith(allowed)]


def describe_diff(old: dict[str, Any], new: dict[str, Any], keys: list[str], most: int = 4) -> str:
    a, b = flat(old), flat(new)
    shown = ", ".join(f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in keys[:most])
    return shown + (f" and {len(keys) - most} more" if len(keys) > most else "")


INPUTS = "inputs.json"


def _stamp(path: Path) -> str:
    """Cheap identity of a file or folder's contents: sizes and modification times (not a hash: a data
    set or a model folder may be large, and this is checked on every reuse)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()
                                                 and not any(part.startswith(".") for part in p.relative_to(path).parts))
    rows = [[str(p.relative_to(path)) if p != path else "", p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def input_stamps(resolved: dict[str, Any]) -> dict[str, list[str]]:
    """``{recipe key: [path, stamp]}`` for every existing file or folder the resolved recipe names by an
    absolute path (data, tokenizers, model and run folders, caches): what a reused run must still match."""
    out = {}
    for key, value in flat(resolved).items():
        if isinstance(value, str) and value.startswith(os.sep) and Path(value).exists():
            out[key] = [value, _stamp(Path(value))]
    return out


def changed_inputs(folder: Path) -> list[str]:
    """The recipe keys whose file or folder changed since the run in ``folder`` was trained."""
    saved = folder / INPUTS
    if not saved.is_file():
        return []
    stamps = json.loads(saved.read_text())
    return [f"{k} ({path})" for k, (path, stamp) in stamps.items()
            if not Path(path).exists() or _stamp(Path(path)) != stamp]


# --- a tool's output folder (distill search-student, prune-layers): the run-folder rules ------------
TOOL_OWNER = ".written-by"  # in a tool's .partial folder: which tool started it (so only it removes it)


def check_tool_out(out: Path, marker: str, overwrite: bool) -> Path:
    """``out`` may be written: absent, or (with ``overwrite``) a folder this tool wrote (holds ``marker``).
    Checked before any work and again under the lock."""
    out = Path(out).expanduser()
    check_run_name(out.resolve().name, "--out folder name")
    if out.exists():
        if not overwrite:
            raise RunExistsError(f"{out} exists; choose another --out or pass --overwrite")
        if not (out / marker).is_file():
            raise RunExistsError(f"{out} exists and was not written by this command (no {marker}); it is "
                                 "not touched: choose another --out")
    return out


@contextlib.contextmanager
def tool_output(out: Path, marker: str, overwrite: bool) -> Iterator[Path]:
    """Write a tool's outputs into ``<out>.partial`` under the run-folder lock, then fsync and rename it
    to ``out``. An existing ``out`` is replaced only with ``overwrite`` and only when it holds ``marker``
    (a folder this tool wrote); a leftover ``<out>.partial`` is removed only when this tool started it;
    a failure leaves no ``out`` and no partial of ours."""
    out = Path(out).expanduser().resolve()
    with run_lock(out.parent, out.name):
        check_tool_out(out, marker, overwrite)
        partial = out.with_name(out.name + PARTIAL)
        if partial.exists():
            owner = partial / TOOL_OWNER
            if not (owner.is_file() and owner.read_text() == marker):
                raise RunExistsError(f"{partial} exists and was not started by this command; it is not touched: "
                                     "choose another --out")
            shutil.rmtree(partial)  # an interrupted earlier attempt of this tool, under the same lock
        partial.mkdir(parents=True)
        (partial / TOOL_OWNER).write_text(marker)
        try:
            yield partial
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        (partial / TOOL_OWNER).unlink()
        fsync_tree(partial)
        if out.exists():
            shutil.rmtree(out)
        partial.rename(out)
