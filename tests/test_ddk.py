"""DDK (S48) and the engine's domain samplers: Eq. 1 and Eq. 2 against direct computations, sampling
frequencies, per-domain perplexities, errors, and exact resume of a run that samples with DDK."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from distill.core.recipe import SamplerConfig, recipe_from_dict
from distill.core.runner import run_recipe
from distill.core.sampler import DomainSampler
from distill.core.trainer import Trainer
from distill.errors import Interrupted, RecipeError
from distill.lm.methods.ddk import DDKSampler, discrepancy_factor, smooth_update
from distill.lm.data.tasks import ArithmeticParams, build_arithmetic
from distill.lm.data.text import tiny_causal_lm

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

OPS = ["+", "-", "*"]
TASK = {"name": "arithmetic", "num_train": 32, "num_val": 24, "num_test": 8, "max_digits": 2, "eval_size": 4,
        "ops": OPS}
STUDENT = {"arch": "llama", "hidden": 16, "layers": 1, "heads": 2}
TRAIN = {"epochs": 1, "batch_size": 8, "lr": 0.01, "progress": False, "trackers": "none", "log_every": 1}


def task():
    return build_arithmetic(ArithmeticParams(**{k: v for k, v in TASK.items() if k != "name"}))


# --- the paper's formulas --------------------------------------------------------------------------

def test_discrepancy_factor_is_eq1():
    ps, pt = [4.0, 2.0, 9.0], [2.0, 2.0, 3.0]
    z = sum(math.exp(s / t) for s, t in zip(ps, pt))
    want = [math.exp(s / t) / z for s, t in zip(ps, pt)]  # exp(2), exp(1), exp(3), normalised
    got = discrepancy_factor(torch.tensor(ps), torch.tensor(pt))
    assert got.tolist() == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_smooth_update_is_eq2(alpha):
    r, ps, pt = [0.2, 0.5, 0.3], [6.0, 3.0, 4.0], [3.0, 3.0, 2.0]
    psi = [ri * math.exp(s / t) for ri, s, t in zip(r, ps, pt)]
    want = [alpha * p / sum(psi) + (1 - alpha) / 3 for p in psi]
    got = smooth_update(*(torch.tensor(x, dtype=torch.float64) for x in (r, ps, pt)), alpha)
    assert got.tolist() == pytest.approx(want, rel=1e-12)
    assert float(got.sum()) == pytest.approx(1.0, abs=1e-12)
    if alpha == 0.0:
        assert got.tolist() == pytest.approx([1 / 3] * 3)  # the uniform mixture
    # a huge perplexity ratio (exp overflows) stays finite: all of α on that domain
    big = smooth_update(torch.tensor([0.5, 0.5]), torch.tensor([1e4, 1.0]), torch.tensor([1.0, 1.0]), alpha)
    assert big.tolist() == pytest.approx([alpha + (1 - alpha) / 2, (1 - alpha) / 2])


# --- sampling --------------------------------------------------------------------------------------

def fake_set(sizes: list[int]) -> SimpleNamespace:
    return SimpleNamespace(domains=[d for d, n in enumerate(sizes) for _ in range(n)],
                           domain_names=OPS[: len(sizes)])


def test_domain_sampler_frequencies_follow_the_weights_not_the_domain_sizes():
    data = fake_set([5, 20, 5])
    cfg = SamplerConfig(name="domains", weights={"+": 0.6, "-": 0.3, "*": 0.1}, every=7)
    s = DomainSampler(cfg, data, None, seed=3, batch_size=8, grad_accum=2)
    assert s.update(0, None, None) == pytest.approx({"weight/+": 0.6, "weight/-": 0.3, "weight/*": 0.1})
    steps = [s.indices(k) for k in range(200)]
    assert all(len(g) == 2 and all(len(b) == 8 for b in g) for g in steps)  # accum micro-batches of batch_size
    drawn = torch.cat([b for g in steps for b in g])
    freq = Counter(data.domains[i] for i in drawn.tolist())
    n = len(drawn)  # 3200 draws: 4 standard deviations is < 0.04
    for d, p in enumerate([0.6, 0.3, 0.1]):
        assert abs(freq[d] / n - p) < 4 * math.sqrt(p * (1 - p) / n)
    # within an interval a domain's examples are each drawn once before any is drawn again
    plan = torch.cat([b for k in range(7) for b in s.indices(k)]).tolist()
    plus = [i for i in plan if data.domains[i] == 0]
    for j in range(0, len(plus) - 5, 5):
        assert sorted(plus[j : j + 5]) == [0, 1, 2, 3, 4]
    # deterministic in (seed, step): a fresh sampler, steps asked in another order, gives the same batches
    again = DomainSampler(cfg, data, None, seed=3, batch_size=8, grad_accum=2)
    again.update(0, None, None)
    for k in (150, 3, 77, 0):
        assert all(torch.equal(a, b) for a, b in zip(again.indices(k), steps[k]))
    other = DomainSampler(cfg, data, None, seed=4, batch_size=8, grad_accum=2)
    other.update(0, None, None)
    assert not torch.equal(other.indices(0)[0], steps[0][0])


def test_domain_sampler_splits_a_step_between_processes():
    data, cfg = fake_set([6, 6, 6]), SamplerConfig(name="domains", every=3)
    ranks = [DomainSampler(cfg, data, None, 0, 4, 2, rank=r, world=2) for r in range(2)]
    whole = DomainSampler(cfg, data, None, 0, 4, 4)  # the same draws as one process with 4 micro-batches
    for k in range(6):
        a, b, w = ranks[0].indices(k), ranks[1].indices(k), whole.indices(k)
        assert [t.tolist() for t in w] == [a[0].tolist(), b[0].tolist(), a[1].tolist(), b[1].tolist()]


def test_sampler_errors():
    data = fake_set([3, 3, 3])
    with pytest.raises(RecipeError, match=r"unknown domain\(s\) \['/'\]"):
        DomainSampler(SamplerConfig(name="domains", weights={"/": 1.0}), data, None, 0, 4, 1)
    with pytest.raises(RecipeError, match="carry domains"):
        DomainSampler(SamplerConfig(name="domains"), SimpleNamespace(), None, 0, 4, 1)
    base = {"name": "x", "task": TASK, "student": STUDENT, "method": "sft", "train": TRAIN}
    for sampler, match in (({"name": "ddk", "weights": {"+": 1}}, "ddk computes"),
                           ({"name": "ddkk"}, "train.sampler.name"),
                           ({"name": "ddk", "smoothing": 2}, "train.sampler.smoothing"),
                           ({"name": "domains", "weights": {"+": 0}}, "positive sum")):
        with pytest.raises(RecipeError, match=match):
            recipe_from_dict({**base, "train": {**TRAIN, "sampler": sampler}})


def direct_perplexity(model, examples, vocab: int) -> float:
    """exp(mean NLL) over the supervised tokens, one unpadded example at a time."""
    nll, n = 0.0, 0
    with torch.no_grad():
        for e in examples:
            logp = torch.log_softmax(model(input_ids=torch.tensor([e.input_ids])).logits[0, :, :vocab].double(), -1)
            for i in range(len(e.input_ids) - 1):
                y = e.labels[i + 1]
                if y != -100:
                    nll -= float(logp[i, y])
                    n += 1
    return math.exp(nll / n)


def test_ddk_weights_from_per_domain_perplexities():
    data = task()
    tok = data.tokenizer
    student, teacher = (tiny_causal_lm(None, 16, 1, 2, tok, seed=s) for s in (0, 1))
    distiller = SimpleNamespace(teacher=teacher, info=data.task_info(False), teacher_trainable=False)
    assert SamplerConfig(name="ddk").smoothing == 0.5  # the paper's α
    cfg = SamplerConfig(name="ddk", every=2, smoothing=0.3, eval_batches=1)  # not the default: α must be passed on
    s = DDKSampler(cfg, data.train, distiller, seed=0, batch_size=4, grad_accum=1)
    # eval_batches=1 of batch_size 4: each domain's first 4 validation examples
    parts = [[e for e, d in zip(data.val.examples, data.val.domains) if d == k][:4] for k in range(3)]
    pt = [direct_perplexity(teacher, p, data.vocab) for p in parts]

    def expected_ratio():
        return [direct_perplexity(student, p, data.vocab) / t for p, t in zip(parts, pt)]

    logged = s.update(0, student, teacher)
    ratio = expected_ratio()
    r0 = [math.exp(x) / sum(math.exp(y) for y in ratio) for x in ratio]  # Eq. 1
    assert s.weights.tolist() == pytest.approx(r0, rel=1e-5)
    assert [logged[f"weight/{o}"] for o in OPS] == pytest.approx(r0, rel=1e-5)
    assert [logged[f"ppl_ratio/{o}"] for o in OPS] == pytest.approx(ratio, rel=1e-5)
    assert s.update(0, student, teacher) is None and s.update(1, student, teacher) is None  # not an interval end
    assert s.weights.tolist() == pytest.approx(r0, rel=1e-5)

    with torch.no_grad():  # the student "learns": new perplexities at the next interval
        for p in student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    s.update(2, student, teacher)
    ratio = expected_ratio()
    psi = [r * math.exp(x) for r, x in zip(r0, ratio)]
    r1 = [0.3 * p / sum(psi) + 0.7 / 3 for p in psi]  # Eq. 2 with α = 0.3
    assert s.weights.tolist() == pytest.approx(r1, rel=1e-5)


def test_ddk_needs_domains_on_train_and_validation_and_a_live_teacher(tmp_path):
    tdir = save_teacher(tmp_path / "teacher")
    r = recipe_from_dict(ddk_recipe(tdir))
    for split in ("train", "val"):
        data = task()
        getattr(data, split).domains = getattr(data, split).domain_names = None
        with pytest.raises(RecipeError, match=("training" if split == "train" else "validation") + " examples carry domains"):
            run_recipe(r, out=tmp_path / "runs", data=data)
    with pytest.raises(RecipeError, match="live teacher"):
        run_recipe(recipe_from_dict({**ddk_recipe(tdir), "method": "sft", "teacher": None}), out=tmp_path / "runs")
    assert not any((tmp_path / "runs").iterdir())


# --- runs ------------------------------------------------------------------------------------------

def save_teacher(folder):
    tok = task().tokenizer
    tiny_causal_lm(None, 16, 1, 2, tok, seed=1).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def ddk_recipe(teacher_dir, **train) -> dict:
    return {"name": "ddk", "task": TASK, "student": STUDENT, "teacher": {"model": str(teacher_dir)},
            "method": {"name": "lm_kd", "ce_weight": 1.0},
            "train": {**TRAIN, "max_steps": 4, "sampler": {"name": "ddk", "every": 2, "eval_batches": 1}, **train}}


def test_the_engine_trains_on_the_sampler_batches(tmp_path, monkeypatch):
    seen: list[int] = []
    original = Trainer._step

    def step(self, group, want_metrics):
        seen.extend(int(i) for b in group for i in b)
        return original(self, group, want_metrics)

    monkeypatch.setattr(Trainer, "_step", step)
    d = {"name": "mix", "task": TASK, "student": STUDENT, "method": "sft",
         "train": {**TRAIN, "epochs": 5, "max_steps": 3, "grad_accum": 2, "sampler": {"name": "domains", "weights": {"*": 1}}}}
    res = run_recipe(recipe_from_dict(d), out=tmp_path)
    data = task()
    assert len(seen) == 3 * 2 * 8 and {data.train.domains[i] for i in seen} == {OPS.index("*")}
    assert res.history[0] == {"step": 0, "epoch": 0, "sampler/weight/+": 0.0, "sampler/weight/-": 0.0,
                              "sampler/weight/*": 1.0}


def test_ddk_with_lm_kd_end_to_end_and_exact_resume(tmp_path):
    tdir = save_teacher(tmp_path / "teacher")
    straight = run_recipe(recipe_from_dict(ddk_recipe(tdir)), out=tmp_path / "a")
    rows = [r for r in straight.history if "sampler/weight/+" in r]
    assert [r["step"] for r in rows] == [0, 2]  # r_0 before training, Eq. 2 after K = 2 steps (none at the end)
    for r in rows:
        assert sum(r[f"sampler/weight/{o}"] for o in OPS) == pytest.approx(1.0)
    assert all(rows[1][f"sampler/weight/{o}"] >= 0.5 / 3 for o in OPS)  # Eq. 2's floor (1 − α)/N
    assert "test/perplexity" in straight.metrics and "train/kd" in straight.history[1]

    r = recipe_from_dict(ddk_recipe(tdir))
    with pytest.raises(Interrupted):
        run_recipe(r, out=tmp_path / "b", stop_at_step=3)  # mid-interval: the plan is redrawn from the checkpoint
    state = json.loads((tmp_path / "b" / "ddk.partial" / "checkpoints" / "latest" / "state.json").read_text())
    assert state["trainer"]["sampler"]["weights"] == pytest.approx([rows[1][f"sampler/weight/{o}"] for o in OPS])
    resumed = run_recipe(r, out=tmp_path / "b", resume=True)
    for name in ("student/model.safetensors", "checkpoints/latest/model.safetensors"):
        wa, wb = load_file(str(straight.run_dir / name)), load_file(str(resumed.run_dir / name))
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0, msg=f"{name}: {k}")
    assert [r for r in resumed.history if "sampler/weight/+" in r] == rows
