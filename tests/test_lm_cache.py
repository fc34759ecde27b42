"""The offline sparse teacher cache (``distill.lm.cache``, ``distill cache-teacher``): values, lm_kd from the
cache, corruption and mismatch detection, resumable writes, storage size, and the CLI end to end."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from distill.errors import CorruptCacheError, MismatchError, RecipeError
from distill.lm import losses as L
from distill.lm.cache import TeacherCache, write_cache
from distill.lm.methods.lm_kd import LMKD, LMKDParams
from distill.lm.data.task import TokenDataset, tokenizer_fingerprint
from distill.lm.data.tasks import ArithmeticParams, PyTextParams, build_arithmetic, build_pytext_task
from distill.lm.data.text import tiny_causal_lm

ARITH = {"num_train": 40, "num_val": 10, "num_test": 10, "eval_size": 5}
K = 5


@pytest.fixture(scope="module")
def data():
    return build_arithmetic(ArithmeticParams(**ARITH))


@pytest.fixture(scope="module")
def teacher(data):
    return tiny_causal_lm(None, 32, 1, 2, data.tokenizer, seed=0).eval()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, data, teacher) -> Path:
    # 40 samples, 16 per shard: shards of 16, 16, 8; batches of 7 cross no shard boundary
    out = tmp_path_factory.mktemp("cache") / "c"
    return write_cache(teacher, data, out, top_k=K, shard_size=16, batch_size=7, teacher_id="tiny", progress=False)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_round_trip_matches_topk_of_log_softmax(data, teacher, cache_dir):
    cache = TeacherCache.open(cache_dir, data)
    m = cache.manifest
    assert (m["k"], m["dtype"], m["teacher"], m["num_samples"]) == (K, "float16", "tiny", 40)
    assert m["dataset"] == data.fingerprint and m["tokenizer"] == tokenizer_fingerprint(data.tokenizer)
    assert m["rows"] == data.train.num_tokens()  # one row per supervised position, nothing else
    for e in m["shards"]:
        assert hashlib.sha256((cache_dir / e["file"]).read_bytes()).hexdigest() == e["sha256"]

    index = torch.tensor([3, 17, 39, 0, 16])  # several shards, out of order
    batch = data.train.__getitems__(index)
    ids, lps = cache.lookup(batch["index"], batch["labels"])
    assert ids.dtype == torch.long and lps.dtype == torch.float32 and ids.shape == (5, batch["labels"].shape[1], K)
    for b, i in enumerate(index.tolist()):
        ex = data.train.examples[i]  # the sample alone: no padding, a different forward than the write's
        with torch.no_grad():
            logits = teacher(input_ids=torch.tensor([ex.input_ids])).logits[0, :, : data.vocab].double()
        lp = torch.log_softmax(logits, -1)
        pos = [t for t in range(len(ex.labels) - 1) if ex.labels[t + 1] != -100]
        top, top_ids = lp[pos].topk(K, -1)
        assert torch.equal(ids[b, pos], top_ids)
        torch.testing.assert_close(lps[b, pos].double(), top.half().double(), rtol=0, atol=2e-3)  # fp16 ulp at |lp|≈4
        rest = [t for t in range(ids.shape[1]) if t not in pos]
        assert (ids[b, rest] == 0).all() and torch.isneginf(lps[b, rest]).all()
        rows = cache.rows(i)
        torch.testing.assert_close(rows["tail"].double(), 1 - top.exp().sum(-1), rtol=0, atol=1e-6)
    assert cache.bytes_per_token() == sum(e["bytes"] for e in m["shards"]) / m["rows"]


def test_lookup_refuses_labels_with_other_supervised_positions(data, cache_dir):
    cache = TeacherCache.open(cache_dir, data)
    batch = data.train.__getitems__([2, 5])
    labels = batch["labels"].clone()
    first = int((labels[1, 1:] != -100).nonzero()[0]) + 1
    labels[1, first] = -100
    with pytest.raises(MismatchError, match="sample 5 has .* cached positions but"):
        cache.lookup(batch["index"], labels)


@pytest.mark.parametrize("kind", ["forward_kl", "jsd", "reverse_kl"])
def test_k_equal_vocab_cache_gives_the_live_teachers_lm_kd_loss(tmp_path, data, teacher, kind):
    cache = TeacherCache.open(write_cache(teacher, data, tmp_path / "full", top_k=data.vocab, shard_size=32,
                                          progress=False), data)
    student = tiny_causal_lm(None, 16, 1, 2, data.tokenizer, seed=1)
    params = LMKDParams(kind=kind)
    info_live, info_cache = data.task_info(False), data.task_info(False)
    info_cache.teacher_cache = cache
    live = LMKD(student, teacher, params, info_live)
    cached = LMKD(student, None, params, info_cache)
    batch = data.train.__getitems__([1, 7, 30, 35])
    kd_live, _ = live.divergence(batch)
    kd_cache, _ = cached.divergence(batch)
    # independently: the dense loss against the teacher's logits, and the sparse one on fp16-rounded log-probs
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    dense = L.token_divergence(s, t, batch["labels"], kind=kind)
    top, top_ids = torch.log_softmax(t.float(), -1).topk(data.vocab, -1)
    sparse = L.sparse_token_divergence(s, top_ids, top.half().float(), batch["labels"], kind=kind)
    torch.testing.assert_close(kd_live, dense, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(kd_cache, sparse, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(kd_cache, dense, rtol=5e-3, atol=1e-5)  # fp16 log-probs
    fused = LMKD(student, None, LMKDParams(kind=kind, fused=True, chunk_size=16), info_cache)
    torch.testing.assert_close(fused.divergence(batch)[0], kd_cache, rtol=1e-5, atol=1e-7)


def _corrupt(path: Path, at: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_corrupt_shard_is_named_and_repaired(tmp_path, data, teacher, cache_dir):
    folder = tmp_path / "c"
    shutil.copytree(cache_dir, folder)
    _corrupt(folder / "shard-00001.safetensors", -10)
    with pytest.raises(CorruptCacheError, match=r"shard-00001\.safetensors is corrupt.*distill cache-teacher"):
        TeacherCache.open(folder, data)
    lazy = TeacherCache.open(folder, data, verify=False)  # unverified at open: still caught before use
    batch = data.train.__getitems__([3])
    lazy.lookup(batch["index"], batch["labels"])  # shard 0 is fine
    batch = data.train.__getitems__([20])
    with pytest.raises(CorruptCacheError, match=r"shard-00001\.safetensors"):
        lazy.lookup(batch["index"], batch["labels"])
    (folder / "shard-00002.safetensors").write_bytes(b"")  # truncated
    with pytest.raises(CorruptCacheError, match=r"shard-0000[12]\.safetensors"):
        TeacherCache.open(folder, data)
    # re-running the write recomputes exactly the two bad shards
    written = []
    write_cache(teacher, data, folder, top_k=K, shard_size=16, batch_size=7, teacher_id="tiny", progress=False,
                on_shard=written.append)
    assert written == [1, 2]
    assert _files(folder) == _files(cache_dir)
    TeacherCache.open(folder, data)


def test_other_dataset_or_tokenizer_or_settings_are_refused(tmp_path, data, teacher, cache_dir):
    other = build_arithmetic(ArithmeticParams(**ARITH, data_seed=1))
    with pytest.raises(MismatchError, match="another dataset"):
        TeacherCache.open(cache_dir, other)
    folder = tmp_path / "c"
    shutil.copytree(cache_dir, folder)
    m = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**m, "tokenizer": "0" * 16}))
    with pytest.raises(MismatchError, match="another tokenizer"):
        TeacherCache.open(folder, data)
    # writing into a cache made with other settings is refused, and leaves it untouched
    before = _files(cache_dir)
    for kw, what in (({"top_k": K + 1}, "k: 5 there, 6 now"), ({"dtype": "bfloat16"}, "dtype"),
                     ({"teacher_id": "other"}, "teacher"), ({"shard_size": 8}, "shard_size")):
        args = {"top_k": K, "shard_size": 16, "teacher_id": "tiny", **kw}
        with pytest.raises(MismatchError, match=what):
            write_cache(teacher, data, cache_dir, progress=False, **args)
    with pytest.raises(MismatchError):
        write_cache(teacher, other, cache_dir, top_k=K, shard_size=16, teacher_id="tiny", progress=False)
    assert _files(cache_dir) == before
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(RecipeError, match="not a teacher cache"):
        write_cache(teacher, data, tmp_path / "busy", top_k=K, progress=False)
    with pytest.raises(RecipeError, match="--top-k"):
        write_cache(teacher, data, tmp_path / "new", top_k=data.vocab + 1, progress=False)


class _Stop(KeyboardInterrupt):
    pass


def test_interrupted_write_resumes_to_the_same_cache(tmp_path, data, teacher, cache_dir):
    folder = tmp_path / "c"

    def stop(i: int) -> None:
        raise _Stop

    with pytest.raises(_Stop):  # interrupted right after the first shard was written
        write_cache(teacher, data, folder, top_k=K, shard_size=16, batch_size=7, teacher_id="tiny", progress=False,
                    on_shard=stop)
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "shard-00000.safetensors"]
    with pytest.raises(CorruptCacheError, match=r"incomplete \(1 of 3 shards\).*cache-teacher"):
        TeacherCache.open(folder, data)
    (folder / ".shard-00001.safetensors.tmp").write_bytes(b"half a shard")  # killed mid-file
    first = (folder / "shard-00000.safetensors").stat()
    written = []
    write_cache(teacher, data, folder, top_k=K, shard_size=16, batch_size=7, teacher_id="tiny", progress=False,
                on_shard=written.append)
    assert written == [1, 2]  # the complete shard was kept, not rewritten
    again = (folder / "shard-00000.safetensors").stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    assert _files(folder) == _files(cache_dir)  # byte for byte the uninterrupted write (manifest included)
    written.clear()
    write_cache(teacher, data, folder, top_k=K, shard_size=16, batch_size=7, teacher_id="tiny", progress=False,
                on_shard=written.append)
    assert written == []  # a complete cache: nothing to do


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_bytes_per_token_at_k64(tmp_path, dtype):
    full = build_pytext_task(PyTextParams(block_size=16, vocab_size=300))
    data = dataclasses.replace(full, train=TokenDataset(full.train.examples[:48], full.train.pad_id))
    teacher = tiny_causal_lm(None, 16, 1, 2, data.tokenizer, seed=0)
    cache = TeacherCache.open(write_cache(teacher, data, tmp_path / "c", top_k=64, dtype=dtype, shard_size=32,
                                          progress=False), data)
    rows = cache.manifest["rows"]
    assert rows == data.train.num_tokens() == 48 * 15
    payload = 64 * 4 + 64 * 2 + 4  # int32 ids, 16-bit log-probs, float32 tail
    assert payload <= cache.bytes_per_token() <= 6 * 64 + 16
    st = load_file(str(tmp_path / "c" / "shard-00000.safetensors"))
    assert st["logprobs"].dtype == getattr(torch, dtype) and st["ids"].dtype == torch.int32
    assert torch.equal(st["offsets"], torch.arange(33) * 15)
    assert math.isclose(float(st["logprobs"][0].float().exp().sum() + st["tail"][0]), 1.0, rel_tol=2e-2)


def _recipe(name: str, student: dict, method, teacher: dict | None = None) -> dict:
    r = {"name": name, "seed": 0, "task": {"name": "arithmetic", **ARITH}, "student": {"arch": "llama", **student},
         "method": method, "train": {"epochs": 1, "max_steps": 3, "batch_size": 8, "lr": 0.003, "progress": False,
                                      "trackers": "none", "log_every": 1}}
    if teacher is not None:
        r["teacher"] = teacher
    return r


def test_cli_cache_teacher_then_lm_kd_from_the_cache(tmp_path, monkeypatch):
    from distill.cli import app

    monkeypatch.chdir(tmp_path)
    small = {"hidden": 16, "layers": 1, "heads": 2}
    Path("teacher.yaml").write_text(yaml.safe_dump(_recipe("teacher", {"hidden": 32, "layers": 1, "heads": 2}, "sft")))
    Path("kd.yaml").write_text(yaml.safe_dump(_recipe("kd", small, {"name": "lm_kd", "kind": "jsd"},
                                                      {"recipe": "teacher.yaml"})))
    runner = CliRunner()
    res = runner.invoke(app, ["cache-teacher", "kd.yaml", "--top-k", "4", "--out", "cache", "--runs", "runs",
                              "--shard-size", "16"])
    assert res.exit_code == 0, res.output
    assert "40 samples" in res.output and "bytes/token" in res.output
    teachers = list(Path("runs/_teachers").iterdir())
    assert len(teachers) == 1 and (teachers[0] / "metrics.json").is_file()  # the teacher recipe was trained once
    m = json.loads(Path("cache/manifest.json").read_text())
    assert m["complete"] and m["k"] == 4 and m["teacher"] == "recipe:" + teachers[0].name

    Path("kd-cache.yaml").write_text(yaml.safe_dump(_recipe("kd-cache", small, {"name": "lm_kd", "kind": "jsd"},
                                                            {"cache": "cache"})))
    res = runner.invoke(app, ["run", "kd-cache.yaml", "--out", "runs"])
    assert res.exit_code == 0, res.output
    metrics = json.loads(Path("runs/kd-cache/metrics.json").read_text())
    assert math.isfinite(metrics["test/perplexity"])
    history = Path("runs/kd-cache/history.csv").read_text()
    assert "train/kd" in history

    # errors: a recipe that already trains from a cache; a cache folder written with another k
    res = runner.invoke(app, ["cache-teacher", "kd-cache.yaml", "--top-k", "4", "--out", "c2"])
    assert res.exit_code == 2 and "teacher.cache" in res.output and len(res.output.strip().splitlines()) == 1
    res = runner.invoke(app, ["cache-teacher", "kd.yaml", "--top-k", "3", "--out", "cache", "--runs", "runs",
                              "--shard-size", "16"])
    assert res.exit_code == 2 and "k: 4 there, 3 now" in res.output
