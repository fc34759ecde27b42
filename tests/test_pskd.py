"""PS-KD (S41): the progressive target by hand, the memory keyed by dataset index, alpha_t, resume,
and the cross-process gather of the memory updates."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import tiny_recipe, resume_round_trip
from safetensors.torch import load_file

from distill.core.distiller import TaskInfo
from distill.core.recipe import load_recipe
from distill.logits.methods.pskd import ProgressiveSelfKD, PSKDParams


def _distiller(num_train: int = 6, epochs: int = 4) -> ProgressiveSelfKD:
    torch.manual_seed(0)
    return ProgressiveSelfKD(torch.nn.Linear(2, 3), None, PSKDParams(epochs=epochs), TaskInfo(3, num_train, (2,)))


def test_target_by_hand():
    d = _distiller()
    with torch.no_grad():  # a student whose logits are [0, 1, 2] for every input
        d.student.weight.zero_()
        d.student.bias.copy_(torch.tensor([0.0, 1.0, 2.0]))
    log_q = [v - math.log(1 + math.e + math.e**2) for v in (0.0, 1.0, 2.0)]
    batch = {"x": torch.randn(1, 2), "y": torch.tensor([1]), "index": torch.tensor([4])}
    # epoch 0: the target is the one-hot label (plain CE)
    d.on_epoch_start(0)
    assert d.training_step(batch).losses["student"].item() == pytest.approx(-log_q[1], rel=1e-6)
    d.on_optimizer_step()
    # epoch 1 of 4: alpha_t = 0.8 * 2 / 4 = 0.4; target = 0.6·onehot(1) + 0.4·p_prev
    d.memory[4] = torch.tensor([0.2, 0.5, 0.3])
    d.on_epoch_start(1)
    target = [0.4 * 0.2, 0.6 + 0.4 * 0.5, 0.4 * 0.3]
    expected = -sum(q * lq for q, lq in zip(target, log_q))
    out = d.training_step(batch)
    assert out.metrics["alpha_t"] == pytest.approx(0.4)
    assert out.losses["student"].item() == pytest.approx(expected, rel=1e-6)


def test_alpha_t_rises_linearly_to_alpha_T():
    d = _distiller(epochs=4)
    got = []
    for e in range(6):
        d.on_epoch_start(e)
        got.append(round(d.alpha_t(), 6))
    assert got == [0.2, 0.4, 0.6, 0.8, 0.8, 0.8]  # official (epoch + 1) / end_epoch, held at alpha_T after


def test_memory_is_keyed_by_dataset_index_not_batch_position():
    d = _distiller()
    x = torch.randn(2, 2)
    d.on_epoch_start(0)
    d.training_step({"x": x, "y": torch.tensor([0, 2]), "index": torch.tensor([5, 2])})
    assert d.memory.abs().sum() == 0  # written only after the optimizer step
    d.on_optimizer_step()
    with torch.no_grad():
        p = F.softmax(d.student(x), -1)
    assert torch.allclose(d.memory[5], p[0]) and torch.allclose(d.memory[2], p[1])
    assert d.memory[[0, 1, 3, 4]].abs().sum() == 0
    # next epoch, the same samples in swapped batch positions read their own rows
    d.on_epoch_start(1)
    batch = {"x": x.flip(0), "y": torch.tensor([2, 0]), "index": torch.tensor([2, 5])}
    a = d.alpha_t()
    target = (1 - a) * F.one_hot(batch["y"], 3).float() + a * p.flip(0)
    expected = -(target * F.log_softmax(d.student(batch["x"]), -1)).sum(-1).mean()
    assert d.training_step(batch).losses["student"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_sam_replay_does_not_overwrite_the_memory():
    d = _distiller()
    batch = {"x": torch.randn(2, 2), "y": torch.tensor([0, 1]), "index": torch.tensor([0, 1])}
    with torch.no_grad():
        first = F.softmax(d.student(batch["x"]), -1)
    d.training_step(batch)
    with torch.no_grad():  # SAM's second pass: same micro-batch at perturbed weights
        d.student.bias.add_(1.0)
    d.replaying = True  # as the engine sets it
    d.training_step(batch)
    d.replaying = False
    d.on_optimizer_step()
    assert torch.allclose(d.memory[[0, 1]], first)


def test_resume_restores_the_memory_exactly(tmp_runs):
    # 256 labeled samples / 64 = 4 steps per epoch, 3 epochs; interrupt mid-epoch 1, when the
    # memory of epoch 0 and half of epoch 1 is needed for the rest of the run
    def inspect(ckpt):
        saved = load_file(str(ckpt / "model.safetensors"))
        assert saved["memory"].shape == (256, 10)
        assert torch.allclose(saved["memory"].sum(-1), torch.ones(256))  # every sample was seen in epoch 0

    data = tiny_recipe("pskd", {"name": "pskd", "epochs": 3}, epochs=3)
    straight, _ = resume_round_trip(data, tmp_runs, 6, inspect)
    alphas = [row["train/alpha_t"] for row in straight.history if "train/alpha_t" in row]
    assert alphas[0] == pytest.approx(0.8 / 3) and alphas[-1] == pytest.approx(0.8)
    assert "test/ece" in straight.metrics and "params/teacher" not in straight.metrics


def test_recipe_loads():
    r = load_recipe("mnist1d-pskd")
    assert r.method.name == "pskd" and r.method.params["epochs"] is None and r.teacher is None


def _gather_worker(rank: int, world: int, folder: str) -> None:
    import torch.distributed as dist

    from distill.core.steps import gather_rows, mean_over_processes

    dist.init_process_group("gloo", init_method=f"file://{folder}/rdv", rank=rank, world_size=world)
    try:
        n = 2 + rank  # unequal shards, as the last batch of an epoch can be
        index = torch.arange(n) + 10 * rank
        rows = torch.full((n, 3), float(rank))
        gi, gr = gather_rows(index, rows)
        m = mean_over_processes(torch.tensor(float(rank)))
        (Path(folder) / f"out{rank}.json").write_text(json.dumps([gi.tolist(), gr[:, 0].tolist(), m.item()]))
    finally:
        dist.destroy_process_group()


def test_memory_updates_are_gathered_from_all_processes(tmp_path):
    mp.start_processes(_gather_worker, args=(2, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    expected = [[0, 1, 10, 11, 12], [0.0, 0.0, 1.0, 1.0, 1.0], 0.5]
    for rank in (0, 1):
        assert json.loads((tmp_path / f"out{rank}.json").read_text()) == expected


def test_epochs_default_to_the_run_length():
    d = ProgressiveSelfKD(torch.nn.Linear(2, 3), None, PSKDParams(), TaskInfo(3, 6, (2,)))
    d.on_train_start(total_steps=40, total_epochs=4)
    d.on_epoch_start(1)
    assert d.alpha_t() == pytest.approx(0.8 * 2 / 4)
