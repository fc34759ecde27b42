"""The engine: exact resume, gradient accumulation, early stopping, NaN handling."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_recipe, tiny_teacher, resume_round_trip
from safetensors.torch import load_file

from distill.core.recipe import recipe_from_dict
from distill.core.runner import run_recipe
from distill.errors import NaNLossError


def _weights(run_dir):
    return load_file(str(run_dir / "student" / "model.safetensors"))


def test_resume_is_bitwise_exact(tmp_runs):
    # 2 epochs of 5 steps; interrupt after 3 steps (mid-epoch), resume, compare with a straight run
    resume_round_trip(tiny_recipe("kd", {"name": "kd"}, {"recipe": tiny_teacher()}, epochs=2), tmp_runs, 3)


def test_gradient_accumulation_matches_big_batch(tmp_runs):
    # SGD without momentum: 2 micro-batches of 32 accumulated == one batch of 64 in the same order
    base = dict(epochs=1, optimizer="sgd", momentum=0.0, schedule="constant", lr=0.1)
    big = run_recipe(recipe_from_dict(tiny_recipe("big", {"name": "ce"}, batch_size=64, **base)), out=tmp_runs)
    acc = tiny_recipe("acc", {"name": "ce"}, batch_size=32, grad_accum=2, **base)
    from distill.core import trainer as tr

    # same sample order: batches of 32 drawn from the same permutation as batches of 64
    acc_run = run_recipe(recipe_from_dict(acc), out=tmp_runs)
    wa, wb = _weights(big.run_dir), _weights(acc_run.run_dir)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6), k
    assert tr.EpochBatches(256, 64, 0).epoch(0)[0].tolist() == torch.cat(tr.EpochBatches(256, 32, 0).epoch(0)[:2]).tolist()


def test_early_stopping_restores_best_validation_model(tmp_runs):
    data = tiny_recipe("es", {"name": "ce"}, epochs=30, lr=0.05,
                       early_stopping={"metric": "val/nll", "mode": "min", "patience": 2})
    res = run_recipe(recipe_from_dict(data), out=tmp_runs)
    vals = [r["val/nll"] for r in res.history if "val/nll" in r]
    assert len(vals) < 30  # stopped early
    assert res.metrics["val/nll"] == pytest.approx(min(vals), rel=1e-5)


def test_nan_loss_stops_and_keeps_no_run_folder(tmp_runs):
    data = tiny_recipe("nan", {"name": "ce"}, lr=1e30, optimizer="sgd", epochs=3)
    with pytest.raises(NaNLossError, match="NaN"):
        run_recipe(recipe_from_dict(data), out=tmp_runs)
    assert not (tmp_runs / "nan").exists()


def test_teacher_is_trained_once_and_reused(tmp_runs):
    t = {"recipe": tiny_teacher()}
    run_recipe(recipe_from_dict(tiny_recipe("s1", {"name": "kd"}, t)), out=tmp_runs)
    run_recipe(recipe_from_dict(tiny_recipe("s2", {"name": "dkd", "warmup_epochs": 1}, t) | {"seed": 3}), out=tmp_runs)
    assert len(list((tmp_runs / "_teachers").iterdir())) == 1


def test_frozen_teacher_gets_no_gradient_and_stays_in_eval_mode():
    from distill.core.distiller import TaskInfo
    from distill.core.recipe import TrainConfig
    from distill.core.trainer import Trainer
    from distill.logits.methods.kd import HintonKD, KDParams
    from distill.tasks.base import ArrayDataset
    from distill.tasks.models import build_model

    torch.manual_seed(0)
    teacher = torch.nn.Sequential(build_model("mlp", {"width": 8}, (6,), 3), torch.nn.Dropout(0.5))
    student = build_model("mlp", {"width": 4}, (6,), 3)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    data = ArrayDataset(torch.randn(32, 6), torch.randint(0, 3, (32,)))
    d = HintonKD(student, teacher, KDParams(), TaskInfo(3, 32, (6,)))
    Trainer(d, data, TrainConfig(epochs=2, batch_size=8, progress=False, trackers="none")).fit()
    assert not teacher.training  # dropout off: the teacher's targets are deterministic
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_teacher_cache_equals_live_teacher(tmp_runs):
    t = {"recipe": tiny_teacher()}
    a = run_recipe(recipe_from_dict(tiny_recipe("live", {"name": "kd"}, t, cache_teacher=False)), out=tmp_runs)
    b = run_recipe(recipe_from_dict(tiny_recipe("cached", {"name": "kd"}, t, cache_teacher=True)), out=tmp_runs)
    wa, wb = _weights(a.run_dir), _weights(b.run_dir)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k


def test_lr_factor_warmup_cosine_and_step():
    from distill.core.recipe import TrainConfig
    from distill.core.trainer import LRFactor

    f = LRFactor(TrainConfig(schedule="cosine", warmup_steps=2), total_steps=10, steps_per_epoch=5)
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == 1.0 and abs(f(6) - 0.5) < 1e-9 and f(10) == 0.0
    g = LRFactor(TrainConfig(schedule="step", milestones=[1, 2], gamma=0.1), total_steps=15, steps_per_epoch=5)
    assert [g(4), g(5), g(10)] == [1.0, 0.1, pytest.approx(0.01)]


def test_bf16_mixed_precision_and_step_evaluation(tmp_runs):
    data = tiny_recipe("bf16", {"name": "kd"}, {"recipe": tiny_teacher()}, mixed_precision="bf16", eval_every=3)
    res = run_recipe(recipe_from_dict(data), out=tmp_runs)
    evals = [r["step"] for r in res.history if "val/accuracy" in r]
    assert evals == [3, 6, 9, 12, 15] and 0 <= res.metrics["test/accuracy"] <= 1
