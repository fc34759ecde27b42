"""FIRST for language models (S03): the calibrated top-k target and token loss against direct formulas,
k = V and τ = 1 as forward KL, the token-level ECE fit against a brute-force grid, the teacher's val
top-k, the method with a live teacher and from a cache, and a tiny end-to-end run."""

from __future__ import annotations

import math

import pytest
import torch

from distill.core.recipe import RecipeError, recipe_from_dict
from distill.core.runner import run_recipe
from distill.lm.cache import TeacherCache, write_cache
from distill.lm.methods.lm_first import (LMFIRST, LMFIRSTParams, first_token_loss, first_token_targets, fit_token_calibration,
                                         fused_first_token_loss,
                                 teacher_topk_on, token_calibration_ece)
from distill.lm.losses import token_divergence
from distill.lm.data.tasks import ArithmeticParams, build_arithmetic
from distill.lm.data.text import tiny_causal_lm
from distill.logits.methods.first import CALIBRATION_GRID
from distill.logits.losses import first_targets

B, T, V = 3, 6, 9


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = 2 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    z = 3 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = -100  # a prompt
    labels[1, -2:] = -100  # padding
    return s, z, labels


def _direct(s, z, labels, k, tau, scaling, num_items=None, student_norm="topk"):
    """Written from S03's definition (official distill.py l. 268-293), position by position in float64
    (autograd through s); the student is renormalised over the top-k as the target, at τ_s = 1."""
    total, n = 0.0, 0
    for b in range(B):
        for i in range(T - 1):
            if labels[b, i + 1] == -100:
                continue
            p = torch.softmax(z[b, i].double(), 0)
            top, ids = p.sort(descending=True)
            x = top[:k] if scaling == "probs" else top[:k].log()
            q = torch.softmax(x / tau, 0)
            log_s = torch.log_softmax(s[b, i], 0)[ids[:k]]
            if student_norm == "topk":
                y = log_s.exp() if scaling == "probs" else log_s
                log_s = y - torch.log(torch.exp(y).sum())
            total = total + (q * (q.log() - log_s)).sum()
            n += 1
    return total / (n if num_items is None else num_items)


def _topk(z, k):
    lp, ids = torch.log_softmax(z, -1).topk(k, dim=-1)
    return ids, lp


def test_targets_by_hand_and_as_the_classifier_first():
    lp = torch.tensor([[math.log(0.6), math.log(0.3), math.log(0.05)]], dtype=torch.float64)
    a, b, c = (math.exp(p / 0.5) for p in (0.6, 0.3, 0.05))
    got = first_token_targets(lp, 0.5, "probs").exp()[0].tolist()
    assert got == pytest.approx([a / (a + b + c), b / (a + b + c), c / (a + b + c)], rel=1e-12)
    a, b, c = (p ** 2 for p in (0.6, 0.3, 0.05))  # logprobs: p^(1/τ) renormalised
    got = first_token_targets(lp, 0.5, "logprobs").exp()[0].tolist()
    assert got == pytest.approx([a / (a + b + c), b / (a + b + c), c / (a + b + c)], rel=1e-12)
    # probs scaling is the classifier FIRST's target on the teacher's top-k
    z = torch.randn(7, 11, generator=torch.Generator().manual_seed(3))
    ref, ref_ids = first_targets(z, 4, 0.3)
    ids, lp = _topk(z, 4)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(first_token_targets(lp, 0.3).exp(), ref, rtol=1e-5, atol=1e-7)
    # a row a cache lookup leaves unfilled (−inf) stays finite
    assert torch.isfinite(first_token_targets(torch.full((2, 3), float("-inf")), 0.7, "logprobs")).all()
    with pytest.raises(ValueError, match="calibration_temperature"):
        first_token_targets(lp, 0.0)


@pytest.mark.parametrize("student_norm", ["topk", "full"])
@pytest.mark.parametrize("scaling", ["probs", "logprobs"])
@pytest.mark.parametrize("k,tau", [(3, 0.2), (5, 1.0), (2, 3.0)])
def test_loss_matches_direct_formula(scaling, k, tau, student_norm):
    s, z, labels = _data(1)
    ids, lp = _topk(z, k)
    for num_items in (None, 13.0):
        sg = s.clone().requires_grad_()
        got = first_token_loss(sg, ids, lp, labels, tau, scaling, num_items, student_norm)
        sd = s.clone().requires_grad_()
        ref = _direct(sd, z, labels, k, tau, scaling, num_items, student_norm)
        assert got.item() == pytest.approx(ref.item(), rel=1e-10)
        (g1,) = torch.autograd.grad(got, sg)
        (g2,) = torch.autograd.grad(ref, sd)
        torch.testing.assert_close(g1, g2, rtol=1e-8, atol=1e-12)


def test_default_student_norm_is_the_official_top_k_renormalisation():
    s, z, labels = _data(3)
    ids, lp = _topk(z, 5)
    official = _direct(s, z, labels, 5, 1.0, "probs", None, "topk").item()
    ours = _direct(s, z, labels, 5, 1.0, "probs", None, "full").item()
    assert ours > 10 * official  # the two normalisations are far apart
    assert first_token_loss(s, ids, lp, labels, 1.0).item() == pytest.approx(official, rel=1e-10)
    assert LMFIRSTParams().student_norm == "topk"
    # fused, chunked: same value and gradients as the unfused loss, for both normalisations
    g = torch.Generator().manual_seed(9)
    h, w = torch.randn(B, T, 4, generator=g, dtype=torch.float64), torch.randn(V, 4, generator=g, dtype=torch.float64)
    for norm in ("topk", "full"):
        h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
        h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
        ref = first_token_loss(h1 @ w1.T, ids, lp, labels, 0.5, "probs", 7.0, norm)
        got = fused_first_token_loss(h2, w2, ids, lp, labels, 0.5, "probs", 7.0, norm, chunk_size=4)
        assert got.item() == pytest.approx(ref.item(), rel=1e-10)
        for a, b in zip(torch.autograd.grad(ref, (h1, w1)), torch.autograd.grad(got, (h2, w2))):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


def test_k_equal_vocab_and_temperature_one_is_forward_kl():
    s, z, labels = _data(2)
    ids, lp = _topk(z, V)
    sg = s.clone().requires_grad_()
    got = first_token_loss(sg, ids, lp, labels, 1.0, "logprobs", 11.0)
    fkl = token_divergence(s.clone().requires_grad_(), z, labels, "forward_kl", num_items=11.0)
    assert got.item() == pytest.approx(fkl.item(), rel=1e-10)
    s2 = s.clone().requires_grad_()
    (g1,) = torch.autograd.grad(got, sg)
    (g2,) = torch.autograd.grad(token_divergence(s2, z, labels, "forward_kl", num_items=11.0), s2)
    torch.testing.assert_close(g1, g2, rtol=1e-8, atol=1e-12)


# --------------------------------------------------------------------------------------- calibration


def _overconfident_tokens(n: int = 4000, k: int = 5, acc: float = 0.7):
    """Top-k log-probs with ~0.97 top-1 confidence whose top-1 is the next token 70% of the time."""
    g = torch.Generator().manual_seed(4)
    logits = 0.5 * torch.randn(n, 50, generator=g)
    logits[:, 0] += 6.0
    lp = torch.log_softmax(logits, -1).topk(k, dim=-1).values
    right = torch.rand(n, generator=g) < acc
    pos = torch.where(right, 0, torch.randint(1, k + 1, (n,), generator=g))  # k: outside the top k
    return lp, pos


def _ece_by_hand(q: torch.Tensor, pos: torch.Tensor, bins: int = 15) -> float:
    conf, pred = q.max(-1)
    correct = (pred == pos).double()
    total = 0.0
    for j in range(bins):
        lo, hi = j / bins, (j + 1) / bins
        inb = [i for i in range(len(conf)) if lo < conf[i] <= hi]
        if inb:
            c = sum(float(conf[i]) for i in inb) / len(inb)
            a = sum(float(correct[i]) for i in inb) / len(inb)
            total += len(inb) / len(conf) * abs(c - a)
    return total


@pytest.mark.parametrize("scaling", ["probs", "logprobs"])
def test_calibration_fit_matches_a_brute_force_grid(scaling):
    lp, pos = _overconfident_tokens(300)
    grid = torch.logspace(-2, 1, 16)
    by_hand = []
    for tau in grid.tolist():
        lp64 = lp.double()
        x = lp64.exp() if scaling == "probs" else lp64
        by_hand.append(_ece_by_hand(torch.softmax(x / tau, -1), pos))
    assert [token_calibration_ece(lp, pos, t, scaling) for t in grid.tolist()] == pytest.approx(by_hand, abs=1e-5)
    best = grid[min(range(len(grid)), key=lambda i: (round(by_hand[i], 6), i))]
    assert fit_token_calibration(lp, pos, scaling, grid) == pytest.approx(float(best))


def test_fitted_temperature_calibrates_an_overconfident_teacher():
    lp, pos = _overconfident_tokens()
    raw = token_calibration_ece(lp, pos, 1.0, "logprobs")  # the teacher's own top-k, renormalised
    assert raw > 0.2
    for scaling in ("probs", "logprobs"):
        tau = fit_token_calibration(lp, pos, scaling)
        assert tau in CALIBRATION_GRID.tolist()
        assert token_calibration_ece(lp, pos, tau, scaling) < 0.05 < raw
        conf = first_token_targets(lp, tau, scaling).exp().max(-1).values.mean().item()
        assert conf == pytest.approx(0.7, abs=0.03)  # the confidence sits at the accuracy


# ------------------------------------------------------------------------------------------- method


@pytest.fixture(scope="module")
def data():
    return build_arithmetic(ArithmeticParams(num_train=32, num_val=8, num_test=8, eval_size=4))


@pytest.fixture(scope="module")
def teacher(data):
    return tiny_causal_lm(None, 24, 1, 2, data.tokenizer, seed=1)


def _student(data):
    return tiny_causal_lm(None, 16, 1, 2, data.tokenizer, seed=0)


def test_teacher_topk_on_the_validation_split(data, teacher):
    lp, pos = teacher_topk_on(teacher, data.val, data.vocab, 4, batch_size=3)
    rows_lp, rows_pos = [], []
    for e in data.val.examples:  # one sequence at a time
        with torch.no_grad():
            out = teacher(input_ids=torch.tensor([e.input_ids])).logits[0].float()
        for i in range(len(e.labels) - 1):
            if e.labels[i + 1] == -100:
                continue
            top, ids = torch.log_softmax(out[i], -1).topk(4)
            rows_lp.append(top)
            hit = (ids == e.labels[i + 1]).nonzero()
            rows_pos.append(int(hit[0, 0]) if len(hit) else 4)
    torch.testing.assert_close(lp, torch.stack(rows_lp), rtol=1e-5, atol=1e-6)
    assert pos.tolist() == rows_pos


def test_method_fits_tau_on_val_and_trains_on_it(data, teacher):
    d = LMFIRST(_student(data), teacher, LMFIRSTParams(top_k=4), data.task_info(False))
    lp, pos = teacher_topk_on(teacher, data.val, data.vocab, 4)
    tau = fit_token_calibration(lp, pos, "probs")
    assert d.calibration_temperature.item() == pytest.approx(tau)
    assert "calibration_temperature" in d.state_dict()  # checkpointed
    batch = data.train.__getitems__([0, 1, 2])
    step = d.training_step(batch)
    with torch.no_grad():
        s = d.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        z = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ids, tlp = _topk(z, 4)
    ref = first_token_loss(s, ids, tlp, batch["labels"], tau, "probs")
    assert step.losses["student"].item() == pytest.approx(ref.item(), rel=1e-5)
    assert step.metrics["calibration_temperature"].item() == pytest.approx(tau)
    # fused: the same loss without the full logits
    fused = LMFIRST(_student(data), teacher, LMFIRSTParams(top_k=4, fused=True, chunk_size=5), data.task_info(False))
    assert fused.training_step(batch).losses["student"].item() == pytest.approx(ref.item(), rel=1e-5)
    # student_norm reaches the loss, fused or not
    full = first_token_loss(s, ids, tlp, batch["labels"], tau, "probs", None, "full")
    assert abs(full.item() - ref.item()) > 0.1 * ref.item()
    for fz in (False, True):
        d2 = LMFIRST(_student(data), teacher, LMFIRSTParams(top_k=4, student_norm="full", fused=fz, chunk_size=5),
                     data.task_info(False))
        assert d2.training_step(batch).losses["student"].item() == pytest.approx(full.item(), rel=1e-5)


def test_method_at_k_equal_vocab_and_tau_one_is_lm_forward_kl(data, teacher):
    p = LMFIRSTParams(top_k=data.vocab, scaling="logprobs", calibration_temperature=1.0)
    d = LMFIRST(_student(data), teacher, p, data.task_info(False))
    batch = data.train.__getitems__([3, 4])
    got = d.training_step(batch).losses["student"]
    with torch.no_grad():
        s = d.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        z = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert got.item() == pytest.approx(token_divergence(s, z, batch["labels"], "forward_kl").item(), rel=1e-5)


def test_method_from_a_teacher_cache(tmp_path, data, teacher):
    cache = TeacherCache.open(write_cache(teacher, data, tmp_path / "c", top_k=6, dtype="float16", shard_size=16,
                                          teacher_id="tiny", progress=False), data)
    info = data.task_info(False)
    info.teacher_cache = cache
    batch = data.train.__getitems__([5, 0, 7])
    # the cache's first 4 of 6 entries are the live top-4, rounded to float16 (the official top-k
    # loss is ~1e-5 here, so its float16 rounding error is relatively larger)
    for norm, rel in (("full", 2e-3), ("topk", 1e-2)):
        p = LMFIRSTParams(top_k=4, calibration_temperature=0.3, student_norm=norm)
        d = LMFIRST(_student(data), None, p, info)
        live = LMFIRST(_student(data), teacher, p, data.task_info(False))
        assert d.training_step(batch).losses["student"].item() == pytest.approx(
            live.training_step(batch).losses["student"].item(), rel=rel)
    with pytest.raises(RecipeError, match="calibration_temperature"):
        LMFIRST(_student(data), None, LMFIRSTParams(top_k=4), info)
    with pytest.raises(RecipeError, match="cache's k"):
        LMFIRST(_student(data), None, LMFIRSTParams(top_k=7, calibration_temperature=0.3), info)


def test_params_validate():
    base = {"name": "x", "task": {"name": "arithmetic", "num_train": 8},
            "student": {"arch": "llama", "hidden": 16, "layers": 1, "heads": 2}, "teacher": {"model": "/nonexistent"}}
    r = recipe_from_dict(base | {"method": {"name": "lm_first"}})
    assert r.method.params["top_k"] == 5 and r.method.params["scaling"] == "probs"
    assert r.method.params["calibration_temperature"] is None
    for bad in ({"top_k": 0}, {"calibration_temperature": 0.0}, {"scaling": "linear"}):
        with pytest.raises(RecipeError):
            recipe_from_dict(base | {"method": {"name": "lm_first", **bad}})


def test_recipe_loads():
    from pathlib import Path

    import distill

    path = Path(distill.__file__).parent / "recipes" / "arithmetic-first.yaml"
    import yaml

    r = recipe_from_dict(yaml.safe_load(path.read_text()))
    assert r.method.name == "lm_first" and r.teacher.recipe == "arithmetic-teacher"
    lm_kd = recipe_from_dict(yaml.safe_load((path.parent / "arithmetic-lm_kd.yaml").read_text()))
    assert r.task == lm_kd.task and r.student == lm_kd.student


def test_end_to_end_tiny_arithmetic(tmp_path):
    task = {"name": "arithmetic", "num_train": 32, "num_val": 8, "num_test": 8, "eval_size": 4}
    train = {"epochs": 1, "max_steps": 3, "batch_size": 8, "lr": 0.003, "progress": False, "trackers": "none",
             "log_every": 1}
    teacher = {"name": "t", "seed": 0, "task": task, "method": {"name": "sft"},
               "student": {"arch": "llama", "hidden": 16, "layers": 1, "heads": 2}, "train": train}
    recipe = {"name": "first", "seed": 0, "task": task, "teacher": {"recipe": teacher},
              "student": {"arch": "llama", "hidden": 16, "layers": 1, "heads": 2},
              "method": {"name": "lm_first", "top_k": 3}, "train": train}
    res = run_recipe(recipe_from_dict(recipe), out=tmp_path / "runs")
    rows = [r for r in res.history if "train/kd" in r]
    assert len(rows) == 3 and all(r["train/kd"] > 0 for r in rows)
    taus = {r["train/calibration_temperature"] for r in rows}
    assert len(taus) == 1
    tau = taus.pop()
    assert min(abs(tau - g) / g for g in CALIBRATION_GRID.tolist()) < 1e-6  # a value of the fit's grid
    assert math.isfinite(res.metrics["test/perplexity"])
    assert (res.run_dir / "student" / "model.safetensors").is_file()
