"""Offline sparse teacher: the teacher's top-k next-token log-probs, written once, trained from later.

Catalogue B4 ("offline / sparse teacher"; the top-k "concentrated knowledge" of FIRST, S03, is the
same observation: a few tokens hold nearly all of an LM teacher's mass). ``distill cache-teacher``
runs the teacher (eval, inference mode) once over the training split and stores, for every
supervised position of every sample, i.e. every position ``i`` with ``labels[i + 1] != -100`` (the
rows the losses read, ``losses._valid_rows``), the top-k token ids (int32), their log-probs at
temperature 1 (float16 or bfloat16) and the remaining mass ``1 − Σ p_topk`` (float32, computed from
the float32 log-probs before rounding). ``lm_kd`` with ``teacher: {cache: DIR}`` feeds them to
``sparse_token_divergence`` (``docs/conventions.md``, "Sparse teacher"); that loss recomputes the
tail from the rounded log-probs, so the stored tail is for inspection and other consumers.

Layout of a cache folder::

    manifest.json              identity (teacher, tokenizer and dataset fingerprints, k, dtype, ...),
                               per-shard sha256, complete flag
    shard-00000.safetensors    samples [0, shard_size): ids [R, k] int32, logprobs [R, k], tail [R],
                               offsets [n + 1] int64 (sample j's rows: offsets[j]:offsets[j+1]),
                               sample [n] int64 (train indices)
    index.safetensors          per train index: shard [N] int32, offset [N] int64, length [N] int64

Storage per supervised token: ``4k + 2k + 4`` bytes (388 at k = 64) plus the shards' offsets and
headers. Writing resumes: every shard is written to a temporary file and renamed, the manifest is
rewritten after each shard, and a restarted write keeps the shards that verify (checksum and contents).
Opening validates the manifest against a schema (every key, the writer's own file names in the writer's
order), checks the fingerprints against the task, and refuses a file whose checksum, sample ids, shapes,
dtypes or row offsets differ from what the manifest and index say, before any of its data is used.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

from distill.core.refs import RefContext, RefKind
from distill.core.registry import REFS
from distill.errors import CorruptCacheError, MismatchError, MissingFileError, RecipeError
from distill.lm.losses import IGNORE_INDEX, _valid_rows
from distill.lm.models import token_logits
from distill.lm.data.task import LMTaskData, tokenizer_fingerprint

FORMAT = "distill-teacher-cache"
VERSION = 1
MANIFEST = "manifest.json"
INDEX = "index.safetensors"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
# manifest keys that must agree for a write to resume into (or a reader to trust) a folder
IDENTITY = ("format", "version", "teacher", "tokenizer", "dataset", "task", "vocab", "k", "dtype",
            "num_samples", "shard_size")
_HINT = "re-run `distill cache-teacher` with the same arguments to rewrite it"


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def _is_temp(name: str) -> bool:
    """A temporary file of ``_atomic_write``'s for one of the cache's own files (the only files a write deletes)."""
    return re.fullmatch(r"\.(manifest\.json|index\.safetensors|shard-\d{5,}\.safetensors)\.tmp", name) is not None


def _rewrite_hint(folder: Path) -> str:
    return f"delete {folder} and re-run `distill cache-teacher`"


class _Strict(BaseModel):
    # strict: no "5" -> 5 or true -> 1; a manifest holds exactly what the writer writes
    model_config = ConfigDict(extra="forbid", strict=True)


class _FileEntry(_Strict):
    file: str
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class _ShardEntry(_FileEntry):
    samples: list[int] = Field(min_length=2, max_length=2)
    rows: int = Field(ge=0)


class _Manifest(_Strict):
    """The schema of ``manifest.json``. The layout is fixed by ``num_samples`` and ``shard_size``: entry
    ``i`` must name ``shard_name(i)`` and hold samples ``[i * shard_size, ...)``, so no entry can point
    outside the folder or at another shard's file (swapped entries are refused here)."""

    format: Literal["distill-teacher-cache"]
    version: int
    teacher: str
    tokenizer: str
    dataset: str
    task: str
    vocab: int = Field(ge=1)
    k: int = Field(ge=1)
    dtype: Literal["float16", "bfloat16"]
    num_samples: int = Field(ge=1)
    shard_size: int = Field(ge=1)
    complete: bool
    rows: int | None = Field(ge=0)
    shards: list[_ShardEntry | None]
    index: _FileEntry | None

    @model_validator(mode="after")
    def _layout(self) -> _Manifest:
        n, size = self.num_samples, self.shard_size
        num_shards = -(-n // size)  # ceil in integers: no float overflow on an absurd num_samples
        if self.k > self.vocab:
            raise ValueError(f"k {self.k} exceeds the vocabulary ({self.vocab})")
        if len(self.shards) != num_shards:
            raise ValueError(f"{len(self.shards)} shard entries, but {n} samples in shards of {size} make {num_shards}")
        for i, e in enumerate(self.shards):
            if e is None:
                continue
            if e.file != shard_name(i):
                raise ValueError(f"shards.{i} names file {e.file!r}, expected {shard_name(i)!r}")
            want = [i * size, min(n, (i + 1) * size)]
            if e.samples != want:
                raise ValueError(f"shards.{i} holds samples {e.samples}, expected {want}")
        if self.index is not None and self.index.file != INDEX:
            raise ValueError(f"index names file {self.index.file!r}, expected {INDEX!r}")
        if self.complete and self.rows != sum(e.rows for e in self.shards if e):
            raise ValueError(f"rows is {self.rows}, the shards hold {sum(e.rows for e in self.shards if e)}")
        return self


def _schema_error(err: ValidationError) -> str:
    """The first problem pydantic found, as one short clause."""
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"])
    if e["type"] == "missing":
        return f"key '{loc}' is missing"
    if e["type"] == "extra_forbidden":
        return f"unknown key '{loc}'"
    msg = str(e["ctx"]["error"]) if e["type"] == "value_error" else e["msg"]
    return f"{loc}: {msg}" if loc else msg


def _sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, fsync, then rename: ``path`` is whole or absent."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    _atomic_write(folder / MANIFEST, json.dumps(manifest, indent=1).encode())


def _identity(data: LMTaskData, top_k: int, dtype: str, shard_size: int, teacher_id: str) -> dict[str, Any]:
    return {"format": FORMAT, "version": VERSION, "teacher": teacher_id, "tokenizer": tokenizer_fingerprint(data.tokenizer),
            "dataset": data.fingerprint, "task": data.name, "vocab": data.vocab, "k": int(top_k), "dtype": dtype,
            "num_samples": len(data.train), "shard_size": int(shard_size)}


def _check_args(data: LMTaskData, top_k: int, dtype: str, shard_size: int, batch_size: int) -> None:
    if dtype not in DTYPES:
        raise RecipeError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if not 1 <= top_k <= data.vocab:
        raise RecipeError(f"--top-k {top_k}: must be between 1 and the vocabulary size ({data.vocab})")
    if shard_size < 1 or batch_size < 1:
        raise RecipeError(f"shard size ({shard_size}) and batch size ({batch_size}) must be positive")
    if len(data.train) == 0:
        raise RecipeError(f"task '{data.name}' has no training samples to cache")


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """A cache folder's manifest, validated against the schema (``_Manifest``); None where there is none.
    Anything else is a one-line CorruptCacheError naming the manifest."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        m = json.loads(path.read_bytes())
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CorruptCacheError(f"{path} is not valid JSON; {_rewrite_hint(folder)}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise CorruptCacheError(f"{path} is not a teacher-cache manifest (format {m.get('format') if isinstance(m, dict) else None!r})")
    if m.get("version") != VERSION:  # before the schema: another version may have other keys
        raise CorruptCacheError(f"teacher cache {path} has format version {m.get('version')!r}, this distill reads "
                                f"version {VERSION}; {_rewrite_hint(folder)}")
    try:
        _Manifest.model_validate(m)
    except ValidationError as err:
        raise CorruptCacheError(f"teacher cache {path} is malformed ({_schema_error(err)}); "
                                f"{_rewrite_hint(folder)}") from None
    return m  # the dict as written: a resumed write rewrites it byte for byte


def _own_file(name: str) -> bool:
    """A file a cache write creates: the manifest, the index, a shard, or one of their temporary files."""
    return name in (MANIFEST, INDEX) or re.fullmatch(r"shard-\d{5,}\.safetensors", name) is not None or _is_temp(name)


def check_existing(out: Path, identity: dict[str, Any], overwrite: bool = False) -> dict[str, Any] | None:
    """The manifest of a cache already in ``out`` that a write with ``identity`` may resume, None for
    a new or empty folder; refuses a folder that holds something else (never mixes two caches) or whose
    manifest is malformed (CorruptCacheError): a refused folder is left as it is. ``overwrite``: a cache
    written with other settings is replaced (only the files a cache write creates are removed)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RecipeError(f"--out {out} is a file, not a folder")
    m = read_manifest(out) if out.is_dir() else None
    if m is None:
        if out.is_dir() and not overwrite and any(not _is_temp(p.name) for p in out.iterdir()):
            raise RecipeError(f"--out {out} exists and is not a teacher cache (no {MANIFEST}); choose an empty or new folder")
        return None
    diff = [f"{k}: {m.get(k)!r} there, {identity[k]!r} now" for k in IDENTITY if m.get(k) != identity[k]]
    if diff and overwrite:
        for f in out.iterdir():
            if f.is_file() and _own_file(f.name):
                f.unlink()
        return None
    if diff:
        raise MismatchError(f"{out} holds a teacher cache written with other settings ({'; '.join(diff)}); "
                            "choose another --out, or pass --overwrite to replace it")
    return m


def bytes_per_token(manifest: dict[str, Any]) -> float:
    """Shard bytes (headers and offsets included, the small index not) per stored row (supervised token)."""
    shards = [e for e in manifest["shards"] if e]
    return sum(e["bytes"] for e in shards) / max(1, sum(e["rows"] for e in shards))


# ------------------------------------------------------------------------------------------- writing


@torch.inference_mode()
def _shard_tensors(teacher: nn.Module, data: LMTaskData, lo: int, hi: int, k: int, dtype: torch.dtype,
                   batch_size: int, device: torch.device, advance: Callable[[int], None]) -> dict[str, Tensor]:
    """Top-k rows of train samples ``[lo, hi)``, in sample order, each sample's rows in position order."""
    ids, lps, tails, lengths = [], [], [], []
    for a in range(lo, hi, batch_size):
        b = min(hi, a + batch_size)
        batch = data.train.__getitems__(list(range(a, b)))
        labels = batch["labels"]
        seq = labels.shape[1]
        logits = token_logits(teacher, {k_: batch[k_].to(device) for k_ in ("input_ids", "attention_mask")},
                              data.vocab)
        rows = _valid_rows(labels, seq).to(device)  # the losses' rows, in the same (sample, position) order
        lp = torch.log_softmax(logits.reshape(-1, data.vocab).index_select(0, rows).float(), dim=-1)
        top, idx = lp.topk(k, dim=-1)
        tail = (-torch.expm1(torch.logsumexp(top, dim=-1))).clamp_(min=0.0)  # 1 − Σ p_topk, exact for tiny tails
        ids.append(idx.to(torch.int32).cpu())
        lps.append(top.to(dtype).cpu())
        tails.append(tail.cpu())
        lengths.append((labels[:, 1:] != IGNORE_INDEX).sum(1))
        advance(b - a)
    length = torch.cat(lengths).to(torch.int64)
    return {"ids": torch.cat(ids).contiguous(), "logprobs": torch.cat(lps).contiguous(),
            "tail": torch.cat(tails).contiguous(),
            "offsets": torch.cat([torch.zeros(1, dtype=torch.int64), length.cumsum(0)]),
            "sample": torch.arange(lo, hi, dtype=torch.int64)}


class _Bar:
    """A rich progress bar over samples; a no-op when disabled."""

    def __init__(self, total: int, done: int, enabled: bool) -> None:
        self.progress = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("[bold]cache-teacher"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("samples"), TimeRemainingColumn(), transient=True)
            self.task = self.progress.add_task("cache", total=total, completed=done)

    def __enter__(self) -> "_Bar":
        if self.progress is not None:
            self.progress.start()
        return self

    def advance(self, n: int) -> None:
        if self.progress is not None:
            self.progress.advance(self.task, n)

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()


def _verified(folder: Path, entry: dict[str, Any] | None) -> bool:
    path = folder / entry["file"] if entry else None
    return bool(entry) and path.is_file() and path.stat().st_size == entry["bytes"] and _sha256_file(path) == entry["sha256"]


def write_cache(
    teacher: nn.Module,
    data: LMTaskData,
    out: Path,
    top_k: int,
    dtype: str = "float16",
    shard_size: int = 1024,
    batch_size: int = 32,
    teacher_id: str = "",
    progress: bool = True,
    on_shard: Callable[[int], None] | None = None,
    overwrite: bool = False,
) -> Path:
    """Run ``teacher`` over ``data.train`` and write (or finish) the cache folder ``out``; returns it.

    ``teacher_id`` names the teacher in the manifest (the CLI gives the resolved model path or the
    teacher recipe's fingerprint); a folder written with another teacher, task, tokenizer, k, dtype or
    shard size is refused (MismatchError), never mixed. Shards already there whose checksum verifies
    are kept; the others are (re)computed. ``on_shard(i)`` is called after shard ``i`` is written
    (tests use it to simulate an interruption). The teacher runs on its own device, in eval mode under
    inference mode (its train/eval mode is restored afterwards). ``overwrite``: a cache written with
    other settings is replaced (only its own files; other files in the folder are left as they are).
    """
    out = Path(out)
    _check_args(data, top_k, dtype, shard_size, batch_size)
    ident = _identity(data, top_k, dtype, shard_size, teacher_id)
    old = check_existing(out, ident, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.iterdir():  # a write interrupted mid-file (only our own temporary names)
        if _is_temp(stale.name) and stale.is_file():
            stale.unlink()
    n = len(data.train)
    num_shards = math.ceil(n / shard_size)
    shards: list[dict[str, Any] | None] = [None] * num_shards
    offsets: list[Tensor | None] = [None] * num_shards  # each shard's row offsets, for the index
    if old is not None:  # same identity, so the same number of shards (the schema checked the count)
        for i, entry in enumerate(old["shards"]):
            if entry is None:
                continue
            try:
                offsets[i] = _load_shard(out, old, i)["offsets"]
                shards[i] = entry
            except CorruptCacheError:
                pass  # missing, corrupt, or not what its entry says: computed again below
    if old is not None and old["complete"] and all(shards):
        index = _index_blob(shards, offsets, n)
        if old["index"] == _entry(INDEX, index) and _verified(out, old["index"]):
            return out  # complete, and every file is what it should be: nothing to do
    manifest = {**ident, "complete": False, "rows": None, "shards": shards, "index": None}
    _write_manifest(out, manifest)

    try:
        device = next(teacher.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    was_training = teacher.training
    teacher.eval()
    done = sum(e["samples"][1] - e["samples"][0] for e in shards if e)
    try:
        with _Bar(n, done, progress) as bar:
            for i in range(num_shards):
                if shards[i] is not None:
                    continue
                lo, hi = i * shard_size, min(n, (i + 1) * shard_size)
                tensors = _shard_tensors(teacher, data, lo, hi, top_k, DTYPES[dtype], batch_size, device, bar.advance)
                blob = st_save(tensors, metadata={"format": FORMAT})  # one key: byte-identical rewrites
                _atomic_write(out / shard_name(i), blob)
                shards[i] = {"file": shard_name(i), "samples": [lo, hi], "rows": int(tensors["ids"].shape[0]),
                             "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
                offsets[i] = tensors["offsets"]
                _write_manifest(out, manifest)
                if on_shard is not None:
                    on_shard(i)
    finally:
        teacher.train(was_training)

    blob = _index_blob(shards, offsets, n)
    _atomic_write(out / INDEX, blob)
    manifest["index"] = _entry(INDEX, blob)
    manifest["rows"] = int(sum(e["rows"] for e in shards))
    manifest["complete"] = True
    _write_manifest(out, manifest)
    return out


def _entry(name: str, blob: bytes) -> dict[str, Any]:
    return {"file": name, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}


def _index_blob(shards: list[dict[str, Any]], offsets: list[Tensor], n: int) -> bytes:
    """``index.safetensors``: per train sample, its shard and rows (from the shards' row offsets)."""
    shard_of, offset, length = (torch.empty(n, dtype=t) for t in (torch.int32, torch.int64, torch.int64))
    for i, (e, off) in enumerate(zip(shards, offsets)):
        lo, hi = e["samples"]
        shard_of[lo:hi], offset[lo:hi], length[lo:hi] = i, off[:-1], off[1:] - off[:-1]
    return st_save({"shard": shard_of, "offset": offset, "length": length}, metadata={"format": FORMAT})


def _read_checked(folder: Path, entry: dict[str, Any]) -> dict[str, Tensor]:
    """A cache file's tensors, checked against its manifest size and sha256 on the very bytes that are parsed."""
    path = folder / entry["file"]
    if not path.is_file():
        raise CorruptCacheError(f"teacher cache {path} is missing; {_HINT}")
    if path.stat().st_size != entry["bytes"]:  # before reading: a wrong size needs no hashing
        raise CorruptCacheError(f"teacher cache {path} is corrupt ({path.stat().st_size} bytes, the manifest says "
                                f"{entry['bytes']}); {_HINT}")
    blob = path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != entry["sha256"]:
        raise CorruptCacheError(f"teacher cache {path} is corrupt (sha256 differs from the manifest); {_HINT}")
    try:
        return st_load(blob)
    except (SafetensorError, ValueError, KeyError):
        raise CorruptCacheError(f"teacher cache {path} is not a safetensors file; {_HINT}") from None


def _check_tensors(path: Path, tensors: dict[str, Tensor], spec: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                   source: str) -> None:
    """Refuse ``tensors`` unless they are exactly ``spec``'s names, dtypes and shapes (``source`` says where
    the expectation comes from)."""
    if sorted(tensors) != sorted(spec):
        raise CorruptCacheError(f"teacher cache {path} holds tensors {sorted(tensors)}, expected {sorted(spec)}; "
                                f"{_HINT}")
    for name, (dtype, shape) in spec.items():
        t = tensors[name]
        if t.dtype != dtype or tuple(t.shape) != shape:
            got, want = (f"{str(d).removeprefix('torch.')} {list(sh)}"
                         for d, sh in ((t.dtype, t.shape), (dtype, shape)))
            raise CorruptCacheError(f"teacher cache {path}: '{name}' is {got}, {source} says {want}; {_HINT}")


def _load_shard(folder: Path, manifest: dict[str, Any], i: int) -> dict[str, Tensor]:
    """Shard ``i``'s tensors, refused unless they are what the manifest says: its checksum, the sample ids
    of its entry, ``rows`` rows of top-``k`` in ``dtype``, row offsets from 0 to ``rows`` in order."""
    e = manifest["shards"][i]
    path = folder / e["file"]
    t = _read_checked(folder, e)
    (lo, hi), rows, k = e["samples"], e["rows"], manifest["k"]
    sample = t.get("sample")
    if sample is None or sample.dtype != torch.int64 or not torch.equal(sample, torch.arange(lo, hi)):
        ids = [] if sample is None else sample.flatten().tolist()
        held = f"{len(ids)} sample ids ({ids[0]}..{ids[-1]})" if ids else "no sample ids"
        raise CorruptCacheError(f"teacher cache {path} holds {held}, its manifest entry says samples {lo}..{hi - 1}; "
                                f"{_HINT}")
    _check_tensors(path, t, {"ids": (torch.int32, (rows, k)), "logprobs": (DTYPES[manifest["dtype"]], (rows, k)),
                             "tail": (torch.float32, (rows,)), "offsets": (torch.int64, (hi - lo + 1,)),
                             "sample": (torch.int64, (hi - lo,))},
                   f"the manifest (k {k}, {manifest['dtype']}, {rows} rows)")
    off = t["offsets"]
    if int(off[0]) != 0 or int(off[-1]) != rows or bool((off.diff() < 0).any()):
        raise CorruptCacheError(f"teacher cache {path}: its row offsets do not run from 0 to {rows} in order; {_HINT}")
    return t


def _load_index(folder: Path, manifest: dict[str, Any]) -> dict[str, Tensor]:
    """The index, refused unless it puts every sample in the shard the manifest's layout gives it (its
    offsets and lengths are checked against each shard's when the shard is loaded)."""
    path = folder / INDEX
    t = _read_checked(folder, manifest["index"])
    n = manifest["num_samples"]
    _check_tensors(path, t, {"shard": (torch.int32, (n,)), "offset": (torch.int64, (n,)),
                             "length": (torch.int64, (n,))}, f"the manifest ({n} samples)")
    expected = (torch.arange(n) // manifest["shard_size"]).to(torch.int32)
    bad = (t["shard"] != expected).nonzero().flatten()
    if len(bad):
        j = int(bad[0])
        raise CorruptCacheError(f"teacher cache {path} puts sample {j} in shard {int(t['shard'][j])}, the manifest's "
                                f"layout in shard {int(expected[j])} (of {len(manifest['shards'])}); {_HINT}")
    return t


# ------------------------------------------------------------------------------------------- reading


class TeacherCache:
    """A verified teacher cache, read by ``lm_kd`` through :meth:`lookup`. Open with :meth:`open`."""

    def __init__(self, folder: Path, manifest: dict[str, Any], index: dict[str, Tensor]) -> None:
        self.folder = Path(folder)
        self._manifest = manifest
        self._shard = index["shard"].long()
        self._offset = index["offset"]
        self._length = index["length"]
        self._shards: dict[int, dict[str, Tensor]] = {}  # loaded shards, kept for the whole run

    @classmethod
    def open(cls, folder: Path, data: LMTaskData, verify: bool = True) -> "TeacherCache":
        """Read ``folder``'s manifest and refuse a cache that was written for another tokenizer or
        dataset (MismatchError), or that is incomplete, malformed, or has a file whose checksum or contents
        differ from what the manifest and index say (CorruptCacheError, one line naming the file).
        ``verify`` loads and checks every shard now (so a broken cache fails before training starts);
        each shard is checked again when it is loaded for use."""
        folder = Path(folder)
        if not folder.is_dir():
            raise MissingFileError(f"teacher cache {folder} does not exist; write it with `distill cache-teacher`")
        m = read_manifest(folder)  # schema-checked: every key there, shard entries named as the writer names them
        if m is None:
            raise CorruptCacheError(f"{folder} is not a teacher cache (no {MANIFEST}); write it with `distill cache-teacher`")
        tok = tokenizer_fingerprint(data.tokenizer)
        if m["tokenizer"] != tok:
            raise MismatchError(f"teacher cache {folder} was written with another tokenizer (fingerprint "
                                f"{m['tokenizer']}, the task's is {tok}); re-run `distill cache-teacher` for this task")
        if m["dataset"] != data.fingerprint or m["num_samples"] != len(data.train):
            raise MismatchError(f"teacher cache {folder} was written for another dataset ({m['task']} {m['dataset']}, "
                                f"{m['num_samples']} samples; this task: {data.name} {data.fingerprint}, "
                                f"{len(data.train)} samples); re-run `distill cache-teacher` for this task")
        if m["k"] > data.vocab:
            raise MismatchError(f"teacher cache {folder} keeps top-{m['k']} but the vocabulary has {data.vocab} tokens")
        shards = m["shards"]
        if not m["complete"] or m["index"] is None or not all(shards):
            have = sum(1 for e in shards if e)
            raise CorruptCacheError(f"teacher cache {folder} is incomplete ({have} of {len(shards)} shards); "
                                    "re-run `distill cache-teacher` with the same arguments to finish it")
        cache = cls(folder, m, _load_index(folder, m))
        if verify:  # every check a load makes, now, without keeping the shards
            for i in range(len(shards)):
                cache._checked_shard(i)
        return cache

    @property
    def manifest(self) -> dict[str, Any]:
        return dict(self._manifest)

    @property
    def k(self) -> int:
        return int(self._manifest["k"])

    def bytes_per_token(self) -> float:
        return bytes_per_token(self._manifest)

    def _checked_shard(self, i: int) -> dict[str, Tensor]:
        """Shard ``i``, refused unless its rows are where the index says (:meth:`rows` slices by the index)."""
        s = _load_shard(self.folder, self._manifest, i)
        lo, hi = self._manifest["shards"][i]["samples"]
        off = s["offsets"]
        if not (torch.equal(self._offset[lo:hi], off[:-1]) and torch.equal(self._length[lo:hi], off.diff())):
            raise CorruptCacheError(f"teacher cache {self.folder / INDEX} gives samples {lo}..{hi - 1} other rows than "
                                    f"{shard_name(i)} holds; {_HINT}")
        return s

    def _get_shard(self, i: int) -> dict[str, Tensor]:
        if i not in self._shards:
            self._shards[i] = self._checked_shard(i)
        return self._shards[i]

    def rows(self, sample: int) -> dict[str, Tensor]:
        """One train sample's stored rows: ``ids`` [n, k] int32, ``logprobs`` [n, k], ``tail`` [n]."""
        if not 0 <= sample < len(self._shard):
            raise IndexError(f"sample {sample} is not in the cache ({len(self._shard)} samples)")
        s = self._get_shard(int(self._shard[sample]))
        lo = int(self._offset[sample])
        hi = lo + int(self._length[sample])
        return {k: s[k][lo:hi] for k in ("ids", "logprobs", "tail")}

    def lookup(self, index: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """``(ids long [B, T, k], logprobs float32 [B, T, k])`` on ``labels``' device for the train samples
        ``index`` [B]: each sample's rows at its positions ``i`` with ``labels[b, i + 1] != -100`` (the
        positions the losses read); other positions get id 0 and log-prob −inf (never read). A sample
        whose stored row count differs from its supervised positions in ``labels`` is an error."""
        if labels.dim() != 2 or index.shape != labels.shape[:1]:
            raise ValueError(f"index [B] and labels [B, T] expected, got {list(index.shape)} and {list(labels.shape)}")
        batch, seq = labels.shape
        idx = index.detach().long().cpu()
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= len(self._shard)):
            raise MismatchError(f"teacher cache {self.folder} holds samples 0..{len(self._shard) - 1}, the batch "
                                f"asks for {idx.tolist()}")
        for s in self._shard[idx].unique().tolist():  # checked against the index first: a count that
            self._get_shard(s)                         # differs below is then the labels', not a damaged cache
        valid = (labels[:, 1:] != IGNORE_INDEX).cpu()
        counts, stored = valid.sum(1), self._length[idx]
        bad = (counts != stored).nonzero().flatten()
        if len(bad):
            b = int(bad[0])
            raise MismatchError(f"teacher cache {self.folder}: sample {int(idx[b])} has {int(stored[b])} cached "
                                f"positions but {int(counts[b])} supervised positions in the batch; the cache was "
                                "written for other labels: re-run `distill cache-teacher` for this task")
        k = self.k
        ids = torch.zeros(batch * seq, k, dtype=torch.long)
        lps = torch.full((batch * seq, k), float("-inf"), dtype=torch.float32)
        if int(counts.sum()):
            parts = [self.rows(int(i)) for i in idx]
            pos = _valid_rows(labels.cpu(), seq)  # sample-major, as the rows were written
            # widen before cat: under CPU bf16 autocast, cat of float16 tensors raises
            ids[pos] = torch.cat([p["ids"].long() for p in parts])
            lps[pos] = torch.cat([p["logprobs"].float() for p in parts])
        dev = labels.device
        return ids.view(batch, seq, k).to(dev, non_blocking=True), lps.view(batch, seq, k).to(dev, non_blocking=True)



# ------------------------------------------------------------------------------------- from a recipe


def cache_from_recipe(recipe: Any, out: Path, top_k: int, dtype: str = "float16", shard_size: int = 1024,
                      batch_size: int = 32, runs: Path = Path("runs"), progress: bool = True,
                      device: str | None = None, overwrite: bool = False) -> Path:
    """``distill cache-teacher``: the recipe's task and teacher, resolved exactly as a run resolves them
    (a teacher recipe is trained once and kept under ``<runs>/_teachers``), cached into ``out``.

    The teacher's identity in the manifest is the teacher recipe's name and fingerprint, or the
    resolved path of its run or model folder. ``device`` defaults to CUDA when available.
    """
    from distill.core.runner import build_task, resolve_teacher, task_ops, teacher_recipe
    from distill.lm.models import check_vocab

    ref = recipe.teacher
    if ref is None:
        raise RecipeError(f"recipe '{recipe.name}' has no teacher: cache-teacher needs 'teacher: {{recipe: ...}}', "
                          "'teacher: {run: ...}' or 'teacher: {model: ...}'")
    if ref.kind == "cache":
        raise RecipeError(f"recipe '{recipe.name}' already trains from a teacher cache (teacher.cache); give the "
                          "teacher to cache as recipe, run or model")
    data = build_task(recipe)
    if not isinstance(data, LMTaskData):
        raise RecipeError(f"cache-teacher is for language-model tasks; '{recipe.task.name}' is a classifier task")
    _check_args(data, top_k, dtype, shard_size, batch_size)
    t = teacher_recipe(recipe)
    if t is not None:
        teacher_id = f"recipe:{t.name}-{t.fingerprint()}"
    elif ref.kind in ("run", "model"):
        teacher_id = f"{ref.kind}:{recipe.path(ref.value).resolve()}"
    else:
        raise RecipeError(f"cache-teacher caches a teacher given as recipe, run or model, not '{ref.kind}'")
    check_existing(Path(out), _identity(data, top_k, dtype, shard_size, teacher_id), overwrite)  # before training
    ops = task_ops(data)
    teacher = ops.load_model(resolve_teacher(recipe, Path(runs), progress))
    check_vocab(teacher, data.tokenizer, "teacher")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return write_cache(teacher.to(dev), data, Path(out), top_k, dtype, shard_size, batch_size, teacher_id, progress,
                       overwrite=overwrite)


def _cache_folder(ctx: RefContext, value: str) -> Path:
    path = ctx.recipe.path(value)
    if not path.is_dir():
        raise MissingFileError(f"teacher.cache: {path} does not exist; write it with `distill cache-teacher`")
    return path


REFS.register("cache", "an offline teacher: top-k log-probs written by `distill cache-teacher`")(
    RefKind(resolve=_cache_folder, offline=True, teacher_only=True))
