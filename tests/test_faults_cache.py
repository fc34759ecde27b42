"""Fault injection for the teacher cache (``distill.lm.cache``): a manifest, index or shard that was edited,
truncated or swapped is refused with one line naming the file, whether the cache is opened (verified or lazily)
or a write resumes into it; a resumed write never deletes or reads anything outside its own files, and a
``distill cache-teacher`` killed with SIGKILL resumes to the very bytes of an uninterrupted run."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from typer.testing import CliRunner

from distill.errors import DistillError
from distill.lm.cache import TeacherCache, write_cache
from distill.lm.data.tasks import ArithmeticParams, build_arithmetic
from distill.lm.data.text import tiny_causal_lm

ARITH = {"num_train": 40, "num_val": 10, "num_test": 10, "eval_size": 5}
K = 5
WRITE = {"top_k": K, "shard_size": 16, "batch_size": 8, "teacher_id": "tiny", "progress": False}  # shards 16, 16, 8
MANIFEST, INDEX = "manifest.json", "index.safetensors"
S0, S1 = "shard-00000.safetensors", "shard-00001.safetensors"


@pytest.fixture(scope="module")
def data():
    return build_arithmetic(ArithmeticParams(**ARITH))


@pytest.fixture(scope="module")
def teacher(data):
    return tiny_causal_lm(None, 32, 1, 2, data.tokenizer, seed=0).eval()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, data, teacher) -> Path:
    return write_cache(teacher, data, tmp_path_factory.mktemp("cache") / "c", **WRITE)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ------------------------------------------------------------------------------------------- mutations
# each takes the cache folder (a copy) and breaks it; "outside" files sit beside the folder


def _manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text())


def _edit(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        m = _manifest(folder)
        fn(m)
        (folder / MANIFEST).write_text(json.dumps(m, indent=1))
    return mutate


def _rewrite(name: str, fn: Callable[[dict], dict]) -> Callable[[Path], None]:
    """Change the tensors of ``name`` and record the new size and checksum (and row counts) in the manifest,
    so that only the contents check can tell."""
    def mutate(folder: Path) -> None:
        tensors = fn(st_load((folder / name).read_bytes()))
        blob = st_save(tensors, metadata={"format": "distill-teacher-cache"})
        (folder / name).write_bytes(blob)
        m = _manifest(folder)
        entry = m["index"] if name == INDEX else next(e for e in m["shards"] if e["file"] == name)
        entry.update(bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest())
        if "ids" in tensors:
            entry["rows"] = int(tensors["ids"].shape[0])
            m["rows"] = sum(e["rows"] for e in m["shards"])
        (folder / MANIFEST).write_text(json.dumps(m, indent=1))
    return mutate


def _point_outside(value: Callable[[Path], str]) -> Callable[[Path], None]:
    """Shard 1's entry names a file outside the folder, a valid copy of shard 1 (so only the name is wrong)."""
    def mutate(folder: Path) -> None:
        shutil.copy(folder / S1, folder.parent / "x")
        _edit(lambda m: m["shards"][1].update(file=value(folder)))(folder)
    return mutate


def _renamed(folder: Path) -> None:
    (folder / S1).rename(folder / "shard-1.safetensors")
    _edit(lambda m: m["shards"][1].update(file="shard-1.safetensors"))(folder)


def _swap_entries(m: dict) -> None:
    m["shards"][0], m["shards"][1] = m["shards"][1], m["shards"][0]


def _swap_files(folder: Path) -> None:
    """Shards 0 and 1 swapped on disk, their checksums, sizes and row counts swapped in the manifest."""
    (folder / S0).rename(folder / "tmp")
    (folder / S1).rename(folder / S0)
    (folder / "tmp").rename(folder / S1)
    m = _manifest(folder)
    a, b = m["shards"][0], m["shards"][1]
    for key in ("bytes", "sha256", "rows"):
        a[key], b[key] = b[key], a[key]
    (folder / MANIFEST).write_text(json.dumps(m, indent=1))


def _drop_last_shard(m: dict) -> None:
    m["rows"] -= m["shards"].pop()["rows"]  # the total kept consistent: only the shard count is wrong


def _fewer_samples(t: dict) -> dict:
    """Shard 1 without its last sample: 15 samples where the index says 16."""
    end = int(t["offsets"][-2])
    return {"ids": t["ids"][:end], "logprobs": t["logprobs"][:end], "tail": t["tail"][:end],
            "offsets": t["offsets"][:-1], "sample": t["sample"][:-1]}


def _past_last_shard(t: dict) -> dict:
    shard = t["shard"].clone()
    shard[-1] = 3  # there are shards 0, 1, 2
    return {**t, "shard": shard}


def _other_rows(t: dict) -> dict:
    length = t["length"].clone()
    length[20] += 1  # sample 20 (shard 1) reads one row of sample 21
    return {**t, "length": length}


def _truncate(folder: Path) -> None:
    raw = (folder / S1).read_bytes()
    (folder / S1).write_bytes(raw[: len(raw) // 2])


def _not_json(folder: Path) -> None:
    (folder / MANIFEST).write_text('{"format": "distill-teacher-cache", "k": ')


# (mutation, the file its error names, what a resumed write with the same arguments does)
MUTATIONS: dict[str, tuple[Callable[[Path], None], str, str]] = {
    "file ../x": (_point_outside(lambda folder: "../x"), MANIFEST, "refused"),
    "absolute file": (_point_outside(lambda folder: str((folder.parent / "x").resolve())), MANIFEST, "refused"),
    "file not named as written": (_renamed, MANIFEST, "refused"),
    "index file elsewhere": (_edit(lambda m: m["index"].update(file="../index.safetensors")), MANIFEST, "refused"),
    "swapped shard entries": (_edit(_swap_entries), MANIFEST, "refused"),
    "swapped shard files, checksums swapped": (_swap_files, S0, "repaired"),
    "changed k": (_edit(lambda m: m.update(k=K - 1)), S0, "refused"),
    "changed dtype": (_edit(lambda m: m.update(dtype="bfloat16")), S0, "refused"),
    "missing key": (_edit(lambda m: m.pop("k")), MANIFEST, "refused"),
    "missing shard key": (_edit(lambda m: m["shards"][0].pop("sha256")), MANIFEST, "refused"),
    "unknown key": (_edit(lambda m: m.update(extra=1)), MANIFEST, "refused"),
    "k as a string": (_edit(lambda m: m.update(k=str(K))), MANIFEST, "refused"),
    "shards null": (_edit(lambda m: m.update(shards=None)), MANIFEST, "refused"),
    "a shard entry short": (_edit(_drop_last_shard), MANIFEST, "refused"),
    "total rows wrong": (_edit(lambda m: m.update(rows=m["rows"] + 1)), MANIFEST, "refused"),
    "index past the last shard": (_rewrite(INDEX, _past_last_shard), INDEX, "repaired"),
    "index rows differ from the shard's": (_rewrite(INDEX, _other_rows), INDEX, "repaired"),
    "truncated shard": (_truncate, S1, "repaired"),
    "shard with fewer samples than the index": (_rewrite(S1, _fewer_samples), S1, "repaired"),
    "manifest not JSON": (_not_json, MANIFEST, "refused"),
}


@pytest.fixture(params=list(MUTATIONS))
def broken(request, tmp_path, cache_dir) -> tuple[Path, str, str]:
    """A copy of the cache with one mutation applied: (folder, the file an error must name, resume outcome)."""
    mutate, named, resume = MUTATIONS[request.param]
    folder = tmp_path / "c"
    shutil.copytree(cache_dir, folder)
    mutate(folder)
    return folder, named, resume


def _one_line_naming(err: pytest.ExceptionInfo, path: Path) -> str:
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg, msg
    return msg


def _read_all(cache: TeacherCache, data) -> None:
    for lo in range(0, len(data.train), 8):
        batch = data.train.__getitems__(list(range(lo, min(len(data.train), lo + 8))))
        cache.lookup(batch["index"], batch["labels"])


def test_open_refuses_a_broken_cache(broken, data):
    folder, named, _ = broken
    with pytest.raises(DistillError) as err:
        TeacherCache.open(folder, data)
    _one_line_naming(err, folder / named)


def test_unverified_open_refuses_it_before_its_data_is_used(broken, data):
    folder, named, _ = broken
    with pytest.raises(DistillError) as err:
        _read_all(TeacherCache.open(folder, data, verify=False), data)
    _one_line_naming(err, folder / named)


def test_resumed_write_refuses_or_repairs_and_never_touches_other_files(broken, data, teacher, cache_dir):
    folder, _, resume = broken
    outside = {p: p.read_bytes() for p in folder.parent.iterdir() if p.is_file()}
    before = _files(folder)
    if resume == "refused":
        with pytest.raises(DistillError) as err:
            write_cache(teacher, data, folder, **WRITE)
        _one_line_naming(err, folder)
        assert _files(folder) == before  # nothing deleted or rewritten
    else:
        write_cache(teacher, data, folder, **WRITE)
        assert _files(folder) == _files(cache_dir)  # exactly the cache an untouched write gives
        TeacherCache.open(folder, data)
    assert {p: p.read_bytes() for p in outside} == outside


def test_a_write_deletes_only_its_own_temporary_files(tmp_path, data, teacher, cache_dir):
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / ".notes.tmp").write_text("mine")  # not a temporary name of the writer's
    with pytest.raises(DistillError, match="not a teacher cache"):
        write_cache(teacher, data, folder, **WRITE)
    assert _files(folder) == {".notes.tmp": b"mine"}
    shutil.rmtree(folder)
    shutil.copytree(cache_dir, folder)
    _truncate(folder)  # a write to do
    (folder / ".notes.tmp").write_text("mine")
    (folder / f".{S1}.tmp").write_text("half a shard")  # the writer's own, from a killed write
    write_cache(teacher, data, folder, **WRITE)
    assert _files(folder) == {**_files(cache_dir), ".notes.tmp": b"mine"}


# ---------------------------------------------------------------------------------- kill -9, then resume


def _args(out: str) -> list[str]:
    return ["cache-teacher", "kd.yaml", "--top-k", "4", "--out", out, "--shard-size", "4", "--batch-size", "2"]


@pytest.mark.slow
def test_cache_teacher_killed_with_sigkill_resumes_to_the_uninterrupted_bytes(tmp_path, monkeypatch):
    from distill.cli import app

    task = {"name": "arithmetic", "num_train": 96, "num_val": 10, "num_test": 10, "eval_size": 5}
    tok = build_arithmetic(ArithmeticParams(num_train=2, num_val=1, num_test=1, eval_size=1)).tokenizer
    tiny_causal_lm(None, 32, 1, 2, tok, seed=0).save_pretrained(tmp_path / "teacher")
    student = {"arch": "llama", "hidden": 16, "layers": 1, "heads": 2}
    recipe = {"name": "kd", "seed": 0, "task": task, "student": student, "method": "lm_kd",
              "teacher": {"model": "teacher"}}
    (tmp_path / "kd.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.chdir(tmp_path)

    # a separate process (the one killed), with as many threads as this one: the same float sums
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen([sys.executable, "-c", "from distill.cli import app; app()", *_args("killed")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = tmp_path / "killed" / "shard-00000.safetensors"
    deadline = time.monotonic() + 120
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)  # 24 shards of 4 samples: killed right after the first, far from the end
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not json.loads((tmp_path / "killed" / MANIFEST).read_text())["complete"]  # really partway

    runner = CliRunner()
    for out in ("killed", "straight"):  # the same command again, then an uninterrupted run
        res = runner.invoke(app, _args(out))
        assert res.exit_code == 0, res.output
    straight, resumed = _files(tmp_path / "straight"), _files(tmp_path / "killed")
    assert len([n for n in straight if n.startswith("shard-")]) == 24
    assert resumed == straight  # shards, index and manifest, byte for byte
