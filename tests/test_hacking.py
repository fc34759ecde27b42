"""Teacher hacking harness (S21, ``distill.lm.tools.hacking``): the proxy/golden distances against a direct KL
loop on tiny models, the power-law fit and the detection signal against direct computations on
synthetic curves, the data each regime claims to train on, and a quick end-to-end run (API and CLI)."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from distill.cli import app
from distill.errors import RecipeError
from distill.lm.tools.hacking import (
    REGIMES,
    HackingConfig,
    SyntheticVocab,
    build_oracle,
    convergence_deviation,
    distance,
    fit_power_law,
    hacking_label,
    make_source,
    run_hacking,
    write_outputs,
)
from distill.lm.data.text import IGNORE_INDEX, Example, collate, tiny_causal_lm

VOCAB = SyntheticVocab(6)
V = len(VOCAB)


def _peaked(token: int, seed: int) -> torch.nn.Module:
    """A tiny LM that emits ``token`` with probability ~1 whatever the context (head bias)."""
    m = tiny_causal_lm(None, 8, 1, 2, VOCAB, seed=seed)
    head = m.get_output_embeddings()
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.fill_(-30.0)
        biased.bias[token] = 30.0
    m.set_output_embeddings(biased)
    return m


def _random(seed: int) -> torch.nn.Module:
    """A random tiny LM over the ordinary tokens (never ``eos``: completions have their full length)."""
    return build_oracle(VOCAB, 8, 1, 2, init_scale=1.0, sharpness=1.0, seed=seed)


# ------------------------------------------------------------------------------------------- metrics


def _direct_kl(ref: torch.Tensor, stu: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over positions i whose next label is supervised of Σ_v p(v)·(log p(v) − log q(v))."""
    total, n = 0.0, 0
    for b in range(labels.shape[0]):
        for i in range(labels.shape[1] - 1):
            if int(labels[b, i + 1]) == IGNORE_INDEX:
                continue
            p = torch.softmax(ref[b, i].double(), -1)
            q = torch.softmax(stu[b, i].double(), -1)
            total += float(sum(p[v] * (math.log(p[v]) - math.log(q[v])) for v in range(ref.shape[-1])))
            n += 1
    return total / n


def test_distance_is_the_mean_token_kl_to_the_reference():
    oracle = build_oracle(VOCAB, 16, 1, 2, init_scale=3.0, sharpness=4.0, seed=0)
    student = tiny_causal_lm(None, 8, 1, 2, VOCAB, seed=1)
    bos = VOCAB.bos_token_id
    examples = [Example([bos, 0, 1, 2, 3], [IGNORE_INDEX, IGNORE_INDEX, 1, 2, 3]),
                Example([bos, 4, 5, 0], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 0]),
                Example([bos, 1, 1, 1, 1, 1], [IGNORE_INDEX, 1, 1, 1, 1, 1])]
    batch = collate(examples, VOCAB.pad_token_id)
    with torch.no_grad():
        ref = oracle(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[..., :V].float()
        stu = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[..., :V].float()
    got = distance(student, batch, ref, V)
    assert got == pytest.approx(_direct_kl(ref, stu, batch["labels"]), rel=1e-5)
    assert distance(oracle, batch, ref, V) == pytest.approx(0.0, abs=1e-6)  # the oracle is at distance 0 from itself
    assert student.training  # distance leaves the model's mode as it was


def test_oracle_never_emits_special_tokens():
    oracle = build_oracle(VOCAB, 16, 1, 2, init_scale=3.0, sharpness=4.0, seed=0)
    batch = collate([Example([VOCAB.bos_token_id, 0, 1, 2], [IGNORE_INDEX] * 4)], VOCAB.pad_token_id)
    with torch.no_grad():
        p = torch.softmax(oracle(input_ids=batch["input_ids"]).logits.float(), -1)
    assert float(p[..., VOCAB.size:].sum(-1).max()) < 1e-9


# --------------------------------------------------------------------------------- convergence law


def test_fit_power_law_matches_numpy_polyfit():
    t = np.arange(1, 60)
    v = 2.5 * t ** -0.7 * np.exp(0.05 * np.sin(t))  # not exactly a power law
    law = fit_power_law(t.tolist(), v.tolist())
    slope, intercept = np.polyfit(np.log(t), np.log(v), 1)
    assert law.b == pytest.approx(-slope, rel=1e-9)
    assert law.log_a == pytest.approx(intercept, rel=1e-9)
    assert law(7.0) == pytest.approx(math.exp(intercept) * 7.0 ** slope, rel=1e-9)


def _direct_deviation(t: np.ndarray, v: np.ndarray, fit_range, tol: float, smooth: int):
    """The detection rule written out with numpy: fit on the window, residuals, running median, onset."""
    last = t[-1]
    w = (t >= fit_range[0] * last) & (t <= fit_range[1] * last)
    slope, intercept = np.polyfit(np.log(t[w]), np.log(v[w]), 1)
    raw = np.log(v) - (intercept + slope * np.log(t))
    h = smooth // 2
    res = np.array([np.median(raw[max(0, i - h): i + h + 1]) for i in range(len(raw))])
    end = t[w][-1]
    onset = None
    for i in range(len(t) - 1, -1, -1):
        if t[i] <= end or res[i] <= tol:
            break
        onset = int(t[i])
    return -slope, res, onset


def test_power_law_curves_are_not_flagged():
    t = np.arange(0, 301)
    proxy = 2.0 * np.maximum(t, 1) ** -0.5
    golden = 3.0 * np.maximum(t, 1) ** -0.3
    dp = convergence_deviation(t.tolist(), proxy.tolist())
    dg = convergence_deviation(t.tolist(), golden.tolist())
    assert dp.fit.b == pytest.approx(0.5, abs=1e-9) and dp.fit(1.0) == pytest.approx(2.0, rel=1e-9)
    assert not dp.flagged and not dg.flagged
    assert max(abs(r) for r in dp.residuals) < 1e-9
    label = hacking_label(t[1:].tolist(), proxy[1:].tolist(), golden[1:].tolist())
    assert label["hacking"] is False and label["golden_min_step"] == 300 and label["golden_rise"] == 0.0


def test_golden_turning_up_while_proxy_keeps_falling_is_flagged():
    t = np.arange(0, 401)
    ts = np.maximum(t, 1).astype(float)
    proxy = 0.2 + 2.0 * ts ** -0.7  # keeps falling, slower than its early power law (stagnates)
    golden = 0.5 + 3.0 * ts ** -0.8 + 0.002 * ts  # turns up
    assert np.all(np.diff(proxy[1:]) < 0)
    fit_range, tol, smooth = (0.05, 0.3), 0.1, 5
    dp = convergence_deviation(t.tolist(), proxy.tolist(), fit_range, tol, smooth)
    b, res, onset = _direct_deviation(t[1:], proxy[1:], fit_range, tol, smooth)
    assert dp.fit.b == pytest.approx(b, rel=1e-9)
    assert np.allclose(dp.residuals, res, atol=1e-12)
    assert dp.flagged and dp.onset == onset and dp.onset > dp.fit_end
    assert dp.max_residual == pytest.approx(res[t[1:] > dp.fit_end].max(), rel=1e-9)
    assert convergence_deviation(t.tolist(), golden.tolist(), fit_range, tol, smooth).flagged
    label = hacking_label(t[1:].tolist(), proxy[1:].tolist(), golden[1:].tolist(), margin=0.05, smooth=1)
    i = int(np.argmin(golden[1:]))
    assert label["hacking"] is True
    assert label["golden_min_step"] == int(t[1:][i])
    assert label["golden_rise"] == pytest.approx(golden[-1] / golden[1:][i] - 1, rel=1e-9)
    assert label["proxy_drop_after"] == pytest.approx(1 - proxy[-1] / proxy[1:][i], rel=1e-9)


def test_hacking_label_needs_the_proxy_to_keep_improving():
    t = list(range(1, 101))
    golden = [1.0 / s + 0.01 * s for s in t]  # U-shaped
    rising_proxy = [0.5 + 0.01 * s for s in t]  # overfitting: the proxy worsens too
    assert hacking_label(t, rising_proxy, golden, smooth=1)["hacking"] is False
    assert hacking_label(t, [1.0 / s for s in t], golden, smooth=1)["hacking"] is True


def test_faster_than_the_law_is_not_a_deviation():
    t = np.arange(1, 201).astype(float)
    v = 2.0 * t ** -0.5 * np.where(t > 100, np.exp(-(t - 100) / 20), 1.0)  # drops below the law
    assert not convergence_deviation(t.tolist(), v.tolist()).flagged


# ------------------------------------------------------------------------------------------ regimes


def _cfg(**kw) -> HackingConfig:
    return HackingConfig.quick(vocab=VOCAB.size, **kw)


def test_offline_data_is_fixed_across_steps():
    cfg = _cfg(batch_size=3)
    prompts = [[VOCAB.bos_token_id, i] for i in range(5)]
    teacher = _random(seed=3)
    torch.manual_seed(0)
    src = make_source("offline", prompts, teacher, cfg, VOCAB)
    dataset = [tuple(e.input_ids) for e in src.dataset]
    assert len(dataset) == len(prompts)
    assert [list(d[:2]) for d in dataset] == prompts  # one completion per prompt, in order
    assert all(len(d) == 2 + cfg.completion_len for d in dataset)
    student = tiny_causal_lm(None, 8, 1, 2, VOCAB, seed=4)
    drawn = [tuple(e.input_ids) for step in range(1, 8) for e in src.batch(step, student)]
    assert set(drawn) <= set(dataset)  # every step draws from the same fixed dataset
    assert set(drawn[:5]) == set(dataset)  # the first epoch goes through all of it
    assert [tuple(e.input_ids) for e in src.dataset] == dataset  # and the dataset never changes


def test_more_generations_means_more_completions_per_prompt():
    cfg = _cfg(generations=3)
    prompts = [[VOCAB.bos_token_id, i] for i in range(4)]
    teacher = _random(seed=3)
    torch.manual_seed(0)
    one = make_source("offline", prompts, teacher, cfg, VOCAB).dataset
    many = make_source("multi_gen", prompts, teacher, cfg, VOCAB).dataset
    assert len(one) == len(prompts) and len(many) == cfg.generations * len(prompts)
    for k, p in enumerate(prompts):  # each prompt's generations are consecutive
        assert all(e.input_ids[:2] == p for e in many[k * cfg.generations: (k + 1) * cfg.generations])
    assert len({tuple(e.input_ids) for e in many}) > len(prompts)  # distinct completions of the same prompts


def test_online_data_changes_every_step_and_comes_from_the_named_model():
    cfg = _cfg(batch_size=4, completion_len=8)
    prompts = [[VOCAB.bos_token_id, i] for i in range(4)]
    random_model = _random(seed=5)
    torch.manual_seed(0)
    src = make_source("online_student", prompts, random_model, cfg, VOCAB)
    a = [tuple(e.input_ids) for e in src.batch(1, random_model)]
    b = [tuple(e.input_ids) for e in src.batch(2, random_model)]
    assert {s[:2] for s in a} == {tuple(p) for p in prompts}  # an epoch over the prompt pool
    assert not set(a) & set(b)  # fresh completions: nothing repeats (8 tokens from 6 ids)
    # the source model: online_student completes with the student, online_teacher with the teacher
    teacher, student = _peaked(2, seed=6), _peaked(4, seed=7)
    for regime, token in (("online_student", 4), ("online_teacher", 2)):
        src = make_source(regime, prompts, teacher, cfg, VOCAB)
        for e in src.batch(1, student):
            assert e.input_ids[2:] == [token] * cfg.completion_len
            assert e.labels[:2] == [IGNORE_INDEX] * 2 and e.labels[2:] == e.input_ids[2:]


def test_config_errors_say_what_to_fix():
    with pytest.raises(RecipeError, match="regimes"):
        HackingConfig(regimes=("offline", "nope"))
    with pytest.raises(RecipeError, match="steps"):
        HackingConfig(steps=3)
    with pytest.raises(RecipeError, match="fit_range"):
        HackingConfig(fit_range=(0.5, 0.2))
    with pytest.raises(RecipeError, match="heads"):
        HackingConfig(student_hidden=15)
    assert set(HackingConfig().regimes) == set(REGIMES)


# --------------------------------------------------------------------------------------- end to end


def test_quick_run_records_every_regime_and_writes_outputs(tmp_path):
    cfg = HackingConfig.quick()
    res = run_hacking(cfg)
    assert list(res.curves) == list(cfg.regimes)
    for c in res.curves.values():
        assert c.steps[0] == 0 and c.steps[-1] == cfg.steps and len(c.proxy) == len(c.golden) == len(c.steps)
        assert c.proxy[0] == pytest.approx(res.init_proxy) and c.golden[0] == pytest.approx(res.init_golden)
        assert c.train_steps == list(range(1, cfg.steps + 1)) and len(c.train_loss) == cfg.steps
        assert c.sequences_seen == cfg.steps * cfg.batch_size
        assert c.proxy_deviation is not None and c.golden_deviation is not None
    n = {k: c.distinct_sequences for k, c in res.curves.items()}
    assert n["offline"] <= cfg.num_prompts and n["multi_gen"] <= cfg.num_prompts * cfg.generations
    assert n["online_student"] > cfg.num_prompts and n["online_teacher"] > cfg.num_prompts
    again = run_hacking(cfg)  # deterministic on CPU
    assert again.curves["offline"].golden == res.curves["offline"].golden
    assert again.curves["online_student"].proxy == res.curves["online_student"].proxy
    paths = write_outputs(res, tmp_path)
    assert paths["png"].stat().st_size > 0
    rows = list(csv.DictReader(open(paths["csv"])))
    assert len(rows) == sum(len(c.steps) for c in res.curves.values())
    assert {r["regime"] for r in rows} == set(cfg.regimes)
    md = paths["md"].read_text()
    assert all(f"| {r} |" in md for r in cfg.regimes)


def test_cli_hacking_quick_and_errors(tmp_path):
    runner = CliRunner()
    out = tmp_path / "h"
    r = runner.invoke(app, ["hacking", "--quick", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert all((out / f).is_file() for f in ("hacking.png", "hacking.csv", "hacking.md"))
    bad = runner.invoke(app, ["hacking", "--quick", "--steps", "3", "--out", str(out)])
    assert bad.exit_code == 2 and "steps" in bad.output
