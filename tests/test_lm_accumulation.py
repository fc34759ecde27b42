"""The engine's token reduction for language models (``Trainer._fetch`` / ``_grads``): one optimizer step
over micro-batches with different valid-token counts, accumulated (``grad_accum``) or spread over
processes (``accelerate.debug_launcher``, CPU/gloo), gives the gradients and the updated weights of one
big batch over the same samples; ``num_items`` is the step's global valid-token count on every rank. The
policy methods' other step-wide values (``num_seqs``, the ``scale_rewards="batch"`` std) are global too."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from distill.core.recipe import TrainConfig
from distill.core.registry import METHODS
from distill.core.trainer import EpochBatches, Trainer
from distill.lm.base import LMDistiller
from distill.lm.methods.grpo import GRPO, GRPOParams
from distill.lm.methods.sft import SFT, SFTParams
from distill.lm.data.tasks import ArithmeticParams, build_arithmetic
from distill.lm.data.text import tiny_causal_lm

N, B, LR = 32, 4, 0.1
METHOD_CASES = {
    "sft": {"name": "sft"},
    "kd_jsd": {"name": "lm_kd", "kind": "jsd", "beta": 0.5},
    "kd_fkl": {"name": "lm_kd", "kind": "forward_kl"},
    "taid": {"name": "lm_taid"},
}


def _task():
    # 1-3 digit sums and differences: completions (and so valid-token counts) differ in length
    return build_arithmetic(ArithmeticParams(num_train=N, num_val=4, num_test=4, eval_size=2))


def _distiller(data, method: dict[str, Any]) -> LMDistiller:
    entry = METHODS.get(method["name"])
    params = entry.params.model_validate({k: v for k, v in method.items() if k != "name"})
    student = tiny_causal_lm(None, 16, 1, 2, data.tokenizer, seed=0)
    teacher = tiny_causal_lm(None, 24, 1, 2, data.tokenizer, seed=1) if entry.obj.needs_teacher else None
    return entry.obj(student, teacher, params, data.task_info(False))


def _one_step(d: LMDistiller, data, batch_size: int, grad_accum: int) -> dict[str, Any]:
    """One optimizer step (plain SGD) through the engine; the gradients the optimizer saw, the updated
    weights, and the ``num_items`` / local valid-token counts / sample indices ``_fetch`` produced."""
    cfg = TrainConfig(epochs=1, batch_size=batch_size, grad_accum=grad_accum, max_steps=1, optimizer="sgd",
                      momentum=0.0, weight_decay=0.0, schedule="constant", lr=LR, progress=False, trackers="none")
    trainer = Trainer(d, data.train, cfg, seed=0)
    names = {id(p): n for n, p in d.student.named_parameters()}
    seen: dict[str, Any] = {"num_items": [], "counts": [], "index": []}

    def pre_hook(opt, args, kwargs):
        seen["grads"] = {names[id(p)]: p.grad.detach().clone() for g in opt.param_groups for p in g["params"]}

    trainer.optimizers[0].optimizer.register_step_pre_hook(pre_hook)
    fetch = trainer._fetch

    def recording_fetch(group):
        batches = fetch(group)
        for b in batches:
            seen["num_items"].append(float(b["num_items"]) if "num_items" in b else None)
            seen["counts"].append(int((b["labels"][:, 1:] != -100).sum()))
            seen["index"].append(b["index"].tolist())
        return batches

    trainer._fetch = recording_fetch
    trainer.fit()
    seen["weights"] = {k: v.detach().clone() for k, v in d.student.state_dict().items()}
    if hasattr(d, "schedule"):
        seen["taid_prev_loss"] = float(d.schedule.prev_loss)
    return seen


def _assert_same_step(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Same gradients and updated weights, relative to each tensor's largest entry: float32 sums in another
    order differ by ~1e-7 of the scale (measured ≤ 8e-7 for gradients, ≤ 4e-9 absolute for weights of
    scale ~0.1), while one SGD step moves the weights by ~1e-3."""
    assert a["grads"].keys() == b["grads"].keys() and a["weights"].keys() == b["weights"].keys()
    for what, tol in (("grads", 1e-5), ("weights", 1e-6)):
        for k, vb in b[what].items():
            err = (a[what][k] - vb).abs().max().item()
            assert err <= tol * vb.abs().max().item(), f"{what} {k}: max difference {err:.3g}"


@pytest.fixture(scope="module")
def data():
    return _task()


@pytest.mark.parametrize("case", ["sft", "kd_jsd", "kd_fkl"])
def test_grad_accum_equals_one_big_batch(data, case):
    acc = _one_step(_distiller(data, METHOD_CASES[case]), data, B, 4)
    big = _one_step(_distiller(data, METHOD_CASES[case]), data, 4 * B, 1)
    # the same 4B samples, in 4 micro-batches of different valid-token counts
    assert sum(acc["index"], []) == big["index"][0] == EpochBatches(N, 4 * B, 0).epoch(0)[0].tolist()
    assert len(set(acc["counts"])) > 1 and sum(acc["counts"]) == big["counts"][0]
    assert acc["num_items"] == [float(big["counts"][0])] * 4 and big["num_items"] == [float(big["counts"][0])]
    _assert_same_step(acc, big)
    moved = sum((big["weights"][k] - v).abs().sum().item()
                for k, v in _distiller(data, METHOD_CASES[case]).student.state_dict().items())
    assert moved > 1e-3  # the step did change the weights


class _PerBatchMeanSFT(SFT):
    """SFT that counts no items: every micro-batch is its own token mean (the engine then averages them)."""

    def count_items(self, batch):
        return None


def test_per_micro_batch_means_would_differ(data):
    # the control: averaging micro-batch means weights tokens unequally, so the equality above is not vacuous
    student = tiny_causal_lm(None, 16, 1, 2, data.tokenizer, seed=0)
    naive = _one_step(_PerBatchMeanSFT(student, None, SFTParams(), data.task_info(False)), data, B, 4)
    big = _one_step(_distiller(data, METHOD_CASES["sft"]), data, 4 * B, 1)
    assert naive["num_items"] == [None] * 4
    diff = max((naive["grads"][k] - big["grads"][k]).abs().max().item() for k in big["grads"])
    assert diff > 1e-3 * max(g.abs().max().item() for g in big["grads"].values())


def test_taid_grad_accum_equals_one_big_batch_and_t_sees_the_big_batch_loss(data):
    acc = _one_step(_distiller(data, METHOD_CASES["taid"]), data, B, 4)
    big = _one_step(_distiller(data, METHOD_CASES["taid"]), data, 4 * B, 1)
    _assert_same_step(acc, big)
    assert acc["taid_prev_loss"] == pytest.approx(big["taid_prev_loss"], rel=1e-6)


# ------------------------------------------------------------------------------------------ processes


def _probe_worker() -> None:
    import torch.distributed as dist

    x = torch.ones(1)
    dist.all_reduce(x)
    assert x.item() == dist.get_world_size() == 2


def _ddp_worker(out_dir: str) -> None:
    """Runs in each of 2 processes: for every method and grad_accum in (1, 2), one step with batch B per
    process; writes what ``_fetch`` produced (every rank) and the gradients and weights (every rank)."""
    import torch.distributed as dist
    from accelerate.state import AcceleratorState

    torch.set_num_threads(1)
    # a forked child inherits the parent's (single-process) accelerate state singleton: start afresh
    AcceleratorState._reset_state(reset_partial_state=True)
    rank = dist.get_rank()
    data = _task()
    out = Path(out_dir)
    for case, method in METHOD_CASES.items():
        for accum in (1, 2):
            seen = _one_step(_distiller(data, method), data, B, accum)
            tag = f"{case}-{accum}-rank{rank}"
            save_file({f"grad.{k}": v.contiguous() for k, v in seen["grads"].items()}
                      | {f"weight.{k}": v.contiguous() for k, v in seen["weights"].items()}, str(out / f"{tag}.safetensors"))
            meta = {k: seen[k] for k in ("num_items", "counts", "index")}
            meta["taid_prev_loss"] = seen.get("taid_prev_loss")
            meta["world"] = dist.get_world_size()
            (out / f"{tag}.json").write_text(json.dumps(meta))
    # grpo's step-wide counts: rank r samples r + 1 micro-batches (uneven); both ranks must see the global
    # sequence count and the std of every rank's rewards (collectives inside prepare_batches)
    parity = dataclasses.replace(data, verify=lambda text, ref: len(text) % 2 == 0)
    torch.manual_seed(rank)
    grpo = GRPO(tiny_causal_lm(None, 16, 1, 2, data.tokenizer, seed=0), None,
                GRPOParams(group_size=3, max_new_tokens=4, scale_rewards="batch"), parity.task_info(False))
    batches = grpo.prepare_batches([parity.train.__getitems__([2 * rank + j]) for j in range(rank + 1)])
    (out / f"grpo-rank{rank}.json").write_text(json.dumps(
        [{k: b[k].tolist() for k in ("reward", "group", "advantages", "num_seqs")} for b in batches]))


def launch_two(worker: str, *args: str) -> None:
    """``accelerate.debug_launcher(worker, args, num_processes=2)`` from a fresh Python process.

    debug_launcher forks, and a fork of a process whose OpenMP pool already ran threads (this pytest
    process, after any earlier test) deadlocks the children in their first parallel region; a fresh
    parent has no such pool. The workers are this module's functions, imported by name."""
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import {Path(__file__).stem} as t; "
        f"from accelerate import debug_launcher; debug_launcher(t.{worker}, args={args!r}, num_processes=2)"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    if done.returncode:
        raise RuntimeError(f"{worker} failed:\n{done.stderr[-3000:]}")


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory, data):
    """Launch the workers once (2 CPU processes, gloo); skip with the detected reason if the launcher
    itself cannot run here (no process group, sockets forbidden)."""
    try:
        launch_two("_probe_worker")
    except Exception as e:  # noqa: BLE001 - any failure of the bare launcher means it cannot run here
        pytest.skip(f"accelerate.debug_launcher cannot run 2 CPU processes here: {e}")
    out = tmp_path_factory.mktemp("ddp")
    launch_two("_ddp_worker", str(out))
    return out


def _load(out: Path, tag: str) -> dict[str, Any]:
    st = load_file(str(out / f"{tag}.safetensors"))
    seen = json.loads((out / f"{tag}.json").read_text())
    seen["grads"] = {k[5:]: v for k, v in st.items() if k.startswith("grad.")}
    seen["weights"] = {k[7:]: v for k, v in st.items() if k.startswith("weight.")}
    return seen


@pytest.mark.parametrize("case", list(METHOD_CASES))
@pytest.mark.parametrize("accum", [1, 2])
def test_two_processes_equal_one_big_batch(ddp_runs, data, case, accum):
    ranks = [_load(ddp_runs, f"{case}-{accum}-rank{r}") for r in (0, 1)]
    big = _one_step(_distiller(data, METHOD_CASES[case]), data, 2 * accum * B, 1)
    assert all(r["world"] == 2 for r in ranks)
    # process p gets micro-batches p, p + 2, ... of the permutation: together the big batch's samples
    chunks = EpochBatches(N, B, 0).epoch(0)
    for p, r in enumerate(ranks):
        assert r["index"] == [chunks[p + 2 * j].tolist() for j in range(accum)]
    assert sorted(sum(ranks[0]["index"] + ranks[1]["index"], [])) == sorted(big["index"][0])
    # num_items: the global valid-token count, the same on both ranks and for every micro-batch
    total = sum(ranks[0]["counts"]) + sum(ranks[1]["counts"])
    assert total == big["counts"][0] and sum(ranks[0]["counts"]) != sum(ranks[1]["counts"])
    for r in ranks:
        assert r["num_items"] == [float(total)] * accum
    for r in ranks:  # every rank holds the all-reduced gradient and the same updated weights
        _assert_same_step(r, big)
    if case == "taid":  # t's update uses the all-process token mean: the big batch's loss, on both ranks
        for r in ranks:
            assert r["taid_prev_loss"] == pytest.approx(big["taid_prev_loss"], rel=1e-6)


def test_two_processes_policy_step_counts(ddp_runs):
    ranks = [json.loads((ddp_runs / f"grpo-rank{r}.json").read_text()) for r in (0, 1)]
    assert [len(r) for r in ranks] == [1, 2]  # micro-batches per rank
    every = [x for r in ranks for b in r for x in b["reward"]]
    assert len(every) == 9 and statistics.stdev(every) > 0
    std = statistics.stdev(every)
    for r in ranks:
        for b in r:
            assert b["num_seqs"] == 9.0  # all ranks' sequences
            for i, g in enumerate(b["group"]):
                members = [x for x, h in zip(b["reward"], b["group"]) if h == g]
                expect = (b["reward"][i] - statistics.fmean(members)) / (std + 1e-4)
                assert math.isclose(b["advantages"][i], expect, rel_tol=1e-6, abs_tol=1e-7)
    # rank 1's own std differs: the scaling used the global one
    assert abs(statistics.stdev([x for b in ranks[1] for x in b["reward"]]) - std) > 1e-3
