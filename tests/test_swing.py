"""Swing distillation (S44): per-sample/per-token temperatures from the teacher's confidence and
noisy soft targets against explicit loops, the noise drawn once per sample, the classifier and LM
methods' steps, and the shipped recipe end to end on the canary task."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import resume_round_trip, tiny_recipe

from distill.core.distiller import TaskInfo
from distill.core.recipe import load_recipe, recipe_from_dict
from distill.core.runner import run_recipe
from distill.core.trainer import fetch
from distill.lm.data.tasks import ArithmeticParams, build_arithmetic
from distill.lm.data.text import tiny_causal_lm
from distill.lm.losses import token_cross_entropy
from distill.lm.methods.swing import LMSwing, LMSwingParams, token_swing_loss
from distill.logits.losses import kd_loss
from distill.logits.methods.swing import Swing, SwingParams, keyed_laplace, swing_loss, swing_temperatures
from distill.tasks.base import ArrayDataset


def _softmax(row: list[float], temp: float) -> list[float]:
    e = [math.exp(v / temp) for v in row]
    return [v / sum(e) for v in e]


def _ref_row(s: list[float], t: list[float], noise: list[float], t_min: float, t_max: float) -> tuple[float, float]:
    """(temperature, T²·KL(q̃ ‖ p_s)) of one row, written out."""
    c = len(t)
    top = max(_softmax(t, 1.0))
    temp = t_min + (t_max - t_min) * min(max((top - 1 / c) / (1 - 1 / c), 0.0), 1.0)
    q = [max(a + b, 0.0) for a, b in zip(_softmax(t, temp), noise)]
    q = [v / sum(q) for v in q] if sum(q) > 0 else [1 / c] * c
    p = _softmax(s, temp)
    return temp, temp**2 * sum(qi * (math.log(qi) - math.log(pi)) for qi, pi in zip(q, p) if qi > 0)


def test_swing_loss_by_explicit_loops():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g) * 3
    t[0] = torch.tensor([9.0, 0, 0, 0, 0])  # a sure teacher: the top temperature
    noise = torch.randn(6, 5, generator=g) * 0.1
    noise[1] = -1.0  # every entry clipped: the uniform target
    temps = swing_temperatures(t, 2.0, 10.0)
    got = swing_loss(s, t, noise, 2.0, 10.0, reduction="none")
    for i in range(6):
        temp, ref = _ref_row(s[i].tolist(), t[i].tolist(), noise[i].tolist(), 2.0, 10.0)
        assert temps[i].item() == pytest.approx(temp, rel=1e-5)
        assert got[i].item() == pytest.approx(ref, rel=1e-4, abs=1e-6)
    assert temps[0] > 9.9 and temps.min() < 9  # the temperature does vary by sample
    # equal temperatures and no noise: Hinton KD; Swing's own settings are not
    assert swing_loss(s, t, torch.zeros_like(s), 4.0, 4.0).item() == pytest.approx(kd_loss(s, t, 4.0).item(), rel=1e-5)
    assert abs(swing_loss(s, t, torch.zeros_like(s), 2.0, 10.0).item() - kd_loss(s, t, 2.0).item()) > 1e-2
    assert abs(swing_loss(s, t, noise, 4.0, 4.0).item() - kd_loss(s, t, 4.0).item()) > 1e-3


def test_noise_is_laplace_and_fixed_per_index():
    a = keyed_laplace(torch.tensor([3, 1, 3]), (4,), 0.5, seed=11)
    b = keyed_laplace(torch.tensor([1]), (4,), 0.5, seed=11)
    assert torch.equal(a[0], a[2]) and torch.equal(a[1], b[0]) and not torch.equal(a[0], a[1])
    assert not torch.equal(keyed_laplace(torch.tensor([1]), (4,), 0.5, seed=12), b)
    big = keyed_laplace(torch.arange(200), (100,), 0.5, seed=0)
    assert big.abs().mean().item() == pytest.approx(0.5, rel=0.05)  # E|X| = b for Laplace(0, b)
    assert big.mean().abs().item() < 0.02 and (big.abs() > 2.0).float().mean().item() == pytest.approx(
        math.exp(-4), abs=0.005)  # P(|X| > 2) = exp(−2 / b)
    assert torch.equal(keyed_laplace(torch.arange(3), (4,), 0.0, seed=0), torch.zeros(3, 4))


def _swing(**params) -> Swing:
    torch.manual_seed(0)
    train = ArrayDataset(torch.randn(10, 4), torch.randint(0, 3, (10,)))
    return Swing(torch.nn.Linear(4, 3), torch.nn.Linear(4, 3), SwingParams(**params), TaskInfo(3, 10, (4,), train=train))


def test_training_step_uses_the_same_noise_every_epoch():
    d = _swing(t_min=1.0, t_max=6.0, noise_scale=0.1, ce_weight=0.3, kd_weight=0.7)
    batch = {"x": torch.randn(4, 4), "y": torch.tensor([0, 2, -1, 1]), "index": torch.tensor([7, 2, 9, 0])}
    noise = keyed_laplace(batch["index"], (3,), 0.1, int(d.noise_seed))
    s, t = d.student(batch["x"]).detach(), d.teacher(batch["x"]).detach()
    kd = sum(_ref_row(s[i].tolist(), t[i].tolist(), noise[i].tolist(), 1.0, 6.0)[1] for i in range(4)) / 4
    lab = [0, 1, 3]
    ce = -sum(math.log(_softmax(s[i].tolist(), 1.0)[batch["y"][i].item()]) for i in lab) / 3
    first = d.training_step(batch).losses["student"].item()
    assert first == pytest.approx(0.3 * ce + 0.7 * kd, rel=1e-5)
    d.on_epoch_start(1)
    assert d.training_step(batch).losses["student"].item() == first  # the same noisy targets next epoch
    torch.manual_seed(1)
    other = Swing(d.student, d.teacher, d.params, d.info)
    assert other.noise_seed != d.noise_seed  # a run's seed draws its noise


def test_token_swing_loss_by_explicit_loops():
    g = torch.Generator().manual_seed(2)
    b, n, v = 2, 5, 6
    s, t = torch.randn(b, n, v, generator=g), torch.randn(b, n, v, generator=g) * 4
    noise = torch.randn(b, n, v, generator=g) * 0.05
    labels = torch.tensor([[-100, 1, 2, 3, -100], [4, -100, 0, 5, 1]])
    got = token_swing_loss(s, t, labels, noise, 1.0, 3.0)
    total, count = 0.0, 0
    for i in range(b):
        for j in range(n - 1):  # position j predicts label j + 1
            if labels[i, j + 1] == -100:
                continue
            total += _ref_row(s[i, j].tolist(), t[i, j].tolist(), noise[i, j].tolist(), 1.0, 3.0)[1]
            count += 1
    assert count == 6 and got.item() == pytest.approx(total / count, rel=1e-5)
    assert token_swing_loss(s, t, labels, noise, 1.0, 3.0, num_items=12.0).item() == pytest.approx(total / 12, rel=1e-5)


@pytest.mark.slow
def test_recipe_runs_on_the_canary_task(tmp_runs):
    r = load_recipe("mnist1d-swing")
    assert r.method.name == "swing" and r.task.name == "mnist1d-canary" and r.method.params["ce_weight"] == 0.0
    task = {"name": "mnist1d-canary", "num_train": 256, "num_val": 64, "num_test": 128, "num_transfer": 256,
            "num_canaries": 4, "canary_repeats": 8}
    teacher = tiny_recipe("canary-teacher", {"name": "ce"}, epochs=3, lr=0.01) | {"task": task}
    s = tiny_recipe("swing", {"name": "swing", **r.method.params}, {"recipe": teacher}, epochs=2) | {"task": task}
    res, _ = resume_round_trip(s, tmp_runs, 5)  # the noise table is rebuilt on resume: bitwise equal
    assert 0.0 <= res.metrics["test/canary_exposure"] <= math.log2(10)
    assert any(row.get("train/temperature", 0) > r.method.params["t_min"] for row in res.history)


def test_lm_step_is_the_token_loss_with_per_sequence_noise():
    data = build_arithmetic(ArithmeticParams(num_train=8, num_val=4, num_test=4, eval_size=2))
    info = data.task_info(False)
    torch.manual_seed(0)
    d = LMSwing(tiny_causal_lm(None, 16, 1, 2, data.tokenizer, seed=0), tiny_causal_lm(None, 24, 1, 2, data.tokenizer,
                seed=1), LMSwingParams(t_min=1.0, t_max=3.0, noise_scale=1e-3, ce_weight=0.5), info)
    batch = fetch(info.train, torch.tensor([5, 2, 7]))
    s, t = d.student_logits(batch).detach(), d.teacher_token_logits(batch)
    noise = torch.stack([keyed_laplace(torch.tensor([i]), tuple(t.shape[1:]), 1e-3, int(d.noise_seed))[0]
                         for i in (5, 2, 7)])  # one sequence at a time: the noise depends on the index only
    expected = token_swing_loss(s, t, batch["labels"], noise, 1.0, 3.0) + 0.5 * token_cross_entropy(s, batch["labels"])
    out = d.training_step(batch)
    assert out.losses["student"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert d.training_step(batch).losses["student"].item() == out.losses["student"].item()


@pytest.mark.slow
def test_lm_swing_end_to_end_tiny_arithmetic(tmp_path):
    task = {"name": "arithmetic", "num_train": 32, "num_val": 8, "num_test": 8, "eval_size": 4}
    train = {"epochs": 1, "batch_size": 8, "lr": 0.003, "progress": False, "trackers": "none", "log_every": 1}
    arch = {"arch": "llama", "hidden": 16, "layers": 1, "heads": 2}
    teacher = {"name": "t", "seed": 0, "task": task, "method": {"name": "sft"}, "student": arch, "train": train}
    data = {"name": "swing", "seed": 0, "task": task, "teacher": {"recipe": teacher}, "student": arch,
            "method": {"name": "lm_swing"}, "train": train}
    res = run_recipe(recipe_from_dict(data), out=tmp_path / "runs")
    assert all(row["train/kd"] > 0 for row in res.history if "train/kd" in row)
    assert (res.run_dir / "student" / "model.safetensors").is_file()
