"""Distillation-source analysis (``distill.lm.tools.traces``, S51 and S19 DED): statistics of hand-made trace
sets against direct computations, perplexity against a forward pass per trace, the ranking rule, the
diverse SFT selection and its JSONL round trip through the ``jsonl`` task, sampling, and the command."""

from __future__ import annotations

import csv
import itertools
import json
import math
import random

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from distill.cli import app
from distill.lm.data import arithmetic as ar
from distill.lm.data.tasks import ArithmeticParams, JsonlParams, build_arithmetic, build_jsonl
from distill.lm.data.text import tiny_causal_lm
from distill.lm.tools.traces import (
    TraceSet,
    distinct_n,
    edit_distance,
    rank_teachers,
    read_traces,
    sample_traces,
    score_traces,
    select_diverse,
    trace_records,
    trace_stats,
    verify_traces,
    write_jsonl,
)

TOK = ar.CharTokenizer()
EOS = TOK.eos_token_id


@pytest.fixture(scope="module")
def data():
    return build_arithmetic(ArithmeticParams(num_train=32, num_val=8, num_test=8, max_digits=2, eval_size=4))


def _levenshtein(a, b) -> int:
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i, j in itertools.product(range(1, len(a) + 1), range(1, len(b) + 1)):
        d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
    return d[-1][-1]


def test_edit_distance_matches_the_textbook_recursion():
    rng = random.Random(0)
    for _ in range(200):
        a = [rng.randrange(4) for _ in range(rng.randrange(0, 12))]
        b = [rng.randrange(4) for _ in range(rng.randrange(0, 12))]
        assert edit_distance(a, b) == _levenshtein(a, b) == edit_distance(b, a)
    assert edit_distance([1, 2, 3], [1, 2, 3]) == 0 and edit_distance([], [5, 5]) == 2


def _handmade(data) -> TraceSet:
    """Two prompts: p0 with its true trace twice, a wrong answer and an unfinished trace; p1 with its true
    trace and a wrong one."""
    p0, p1 = data.train.references[0], data.train.references[1]
    good0, good1 = TOK.encode(p0.completion), TOK.encode(p1.completion)
    wrong0 = TOK.encode(p0.completion[:-1] + ("1" if p0.completion[-1] != "1" else "2"))
    wrong1 = TOK.encode(f"#{p1.answer + 1}")
    completions = [good0 + [EOS], good0 + [EOS], wrong0 + [EOS], good0[:5], good1 + [EOS], wrong1 + [EOS]]
    return TraceSet("hand", "", EOS, [data.train.prompts[0], data.train.prompts[1]], [p0.prompt, p1.prompt], [p0, p1],
                    [0, 0, 0, 0, 1, 1], completions, [TOK.decode(c) for c in completions],
                    [True, True, True, False, True, True])


def test_trace_statistics_against_direct_computation(data):
    ts = _handmade(data)
    verify_traces(ts, data.verify)
    assert ts.correct == [True, True, False, False, True, False]  # the unfinished trace is never correct
    row = trace_stats(ts, ngrams=(1, 2, 3))
    contents = [c[:-1] if c[-1] == EOS else c for c in ts.completions]
    lengths = [len(c) for c in contents]
    assert ts.lengths == lengths
    mean = sum(lengths) / 6
    std = math.sqrt(sum((x - mean) ** 2 for x in lengths) / 6)
    assert row["len_mean"] == pytest.approx(mean) and row["len_std"] == pytest.approx(std)
    assert row["len_cv"] == pytest.approx(std / mean) and row["tokens"] == sum(lengths)
    s = sorted(lengths)  # numpy's linear quantile: position q * (n - 1)
    for q, key in ((0.1, "len_p10"), (0.5, "len_p50"), (0.9, "len_p90")):
        pos = q * 5
        lo = int(pos)
        want = s[lo] + (pos - lo) * (s[min(lo + 1, 5)] - s[lo])
        assert row[key] == pytest.approx(want)
    assert (row["len_min"], row["len_max"]) == (min(lengths), max(lengths))
    assert row["accuracy"] == pytest.approx(3 / 6) and row["coverage"] == 1.0
    assert row["finished"] == pytest.approx(5 / 6)
    for n in (1, 2, 3):
        grams = [tuple(c[i : i + n]) for c in contents for i in range(len(c) - n + 1)]
        assert row[f"distinct_{n}"] == pytest.approx(len(set(grams)) / len(grams))
    g0 = [contents[i] for i in range(4)]
    d0 = np.mean([_levenshtein(a, b) / max(len(a), len(b)) for a, b in itertools.combinations(g0, 2)])
    d1 = _levenshtein(contents[4], contents[5]) / max(len(contents[4]), len(contents[5]))
    assert row["pairwise_diversity"] == pytest.approx((d0 + d1) / 2)
    assert row["unique_rate"] == pytest.approx((3 / 4 + 2 / 2) / 2)
    assert row["correct_distinct"] == pytest.approx((1 + 1) / 2)  # the duplicate counts once
    assert math.isnan(row["student_nll"])  # no student scored yet
    assert distinct_n([[1, 2], [3]], 3) == 0.0


def test_perplexity_under_the_student_equals_a_forward_pass_per_trace(data):
    ts = _handmade(data)
    verify_traces(ts, data.verify)
    student = tiny_causal_lm(None, 16, 1, 2, data.tokenizer, seed=0)
    score_traces(ts, student, data.vocab, TOK.pad_token_id, batch_size=4)  # two batches, padded
    total = total_correct = 0.0
    n = n_correct = 0
    for i, (g, c) in enumerate(zip(ts.group, ts.completions)):
        p = ts.prompts[g]
        with torch.no_grad():
            lp = torch.log_softmax(student(input_ids=torch.tensor([p + c])).logits[0].double(), -1)
        nll = -sum(float(lp[len(p) - 1 + j, t]) for j, t in enumerate(c))  # eos included when produced
        assert ts.nll[i] == pytest.approx(nll, rel=1e-5) and ts.nll_tokens[i] == len(c)
        total, n = total + nll, n + len(c)
        if ts.correct[i]:
            total_correct, n_correct = total_correct + nll, n_correct + len(c)
    row = trace_stats(ts)
    assert row["student_nll"] == pytest.approx(total / n, rel=1e-5)
    assert row["student_ppl"] == pytest.approx(math.exp(total / n), rel=1e-5)
    assert row["student_nll_correct"] == pytest.approx(total_correct / n_correct, rel=1e-5)


def test_ranking_rule():
    nan = math.nan
    rows = [
        {"teacher": "a", "accuracy": 0.9, "student_nll_correct": 0.5, "len_cv": 0.2, "pairwise_diversity": 0.1},
        {"teacher": "b", "accuracy": 0.8, "student_nll_correct": 0.3, "len_cv": 0.4, "pairwise_diversity": 0.3},
        {"teacher": "c", "accuracy": 0.9, "student_nll_correct": nan, "len_cv": 0.1, "pairwise_diversity": 0.2},
        {"teacher": "z", "accuracy": 0.0, "student_nll_correct": nan, "len_cv": 0.9, "pairwise_diversity": 0.9},
    ]
    ranked = rank_teachers(rows)
    # ranks per criterion (1 best, ties share, NaN last):
    # accuracy a 1.5 b 3 c 1.5 z 4; nll b 1 a 2 c 3.5 z 3.5; len_cv z 1 b 2 a 3 c 4; diversity z 1 b 2 c 3 a 4
    want = {"a": (1.5 + 2 + 3 + 4) / 4, "b": (3 + 1 + 2 + 2) / 4, "c": (1.5 + 3.5 + 4 + 3) / 4,
            "z": (4 + 3.5 + 1 + 1) / 4}
    assert {r["teacher"]: r["score"] for r in ranked} == pytest.approx(want)
    assert [r["teacher"] for r in ranked] == ["b", "a", "c", "z"]  # z has no correct trace: last
    assert [r["rank"] for r in ranked] == [1, 2, 3, 4]
    no_student = rank_teachers([{**r, "student_nll_correct": nan} for r in rows[:2]])  # criterion skipped
    assert no_student[0]["teacher"] == "b" and no_student[0]["score"] == pytest.approx((2 + 1 + 1) / 3)


def test_diverse_selection_keeps_correct_distinct_traces(data):
    p = data.train.references[0]
    good = TOK.encode(p.completion)
    variants = [good, good, TOK.encode(p.completion.replace("\n", "\n ", 1)), TOK.encode(" " * 9 + p.completion)]
    completions = [v + [EOS] for v in variants] + [TOK.encode("#0") + [EOS]]
    ts = TraceSet("t", "", EOS, [data.train.prompts[0]], [p.prompt], [p], [0] * 5, completions,
                  [TOK.decode(c) for c in completions], [True] * 5)
    verify_traces(ts, data.verify)
    assert ts.correct == [True, True, True, True, p.answer == 0]
    ts.nll, ts.nll_tokens = [5.0, 5.0, 1.0, 9.0, 0.0], [len(c) for c in completions]
    recs = select_diverse([ts], k=2)
    # first the most likely per token (the one-space variant), then the farthest from it (nine spaces)
    assert [r["completion"] for r in recs] == [ts.texts[2], ts.texts[3]]
    assert [r["completion"] for r in select_diverse([ts], k=5)][:3] == [ts.texts[2], ts.texts[3], ts.texts[0]]
    assert len(select_diverse([ts], k=5)) == 3  # duplicates and the wrong trace dropped


def test_sft_jsonl_round_trip_through_the_jsonl_task(tmp_path, data):
    refs = data.train.references[:6]
    completions = [TOK.encode(q.completion) + [EOS] for q in refs]
    ts = TraceSet("t", "", EOS, [data.train.prompts[i] for i in range(6)], [q.prompt for q in refs], list(refs),
                  list(range(6)), completions, [TOK.decode(c) for c in completions], [True] * 6)
    verify_traces(ts, data.verify)
    write_jsonl(tmp_path / "sft.jsonl", select_diverse([ts], k=2))
    data.tokenizer.save_pretrained(tmp_path / "tok")
    path = str(tmp_path / "sft.jsonl")
    task = build_jsonl(JsonlParams(train=path, val=path, test=path, tokenizer=str(tmp_path / "tok")))
    assert len(task.train) == 6
    want = {tuple(prompt + c): (prompt, c, q) for prompt, c, q in zip(ts.prompts, completions, refs)}
    for ex, reference in zip(task.train.examples, task.train.references):  # the task shuffles its records
        prompt, c, q = want.pop(tuple(ex.input_ids))  # [bos] prompt completion [eos]: the very ids sampled
        assert ex.labels == [-100] * len(prompt) + c
        assert task.verify(q.completion, reference)
    assert not want
    # the per-teacher trace files read back as the same traces
    write_jsonl(tmp_path / "t.jsonl", trace_records(ts))
    back = read_traces(tmp_path / "t.jsonl", data, "t")
    verify_traces(back, data.verify)
    assert back.completions == ts.completions and back.prompts == ts.prompts and back.correct == ts.correct
    assert trace_stats(back) == pytest.approx(trace_stats(ts), nan_ok=True)


def test_sampling_groups_samples_per_prompt_and_is_seeded(data):
    model = tiny_causal_lm(None, 16, 1, 2, data.tokenizer, seed=0)
    state = torch.random.get_rng_state()
    a = sample_traces(model, data, "m", num_prompts=3, samples=2, max_new_tokens=6, seed=5)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is left alone
    b = sample_traces(model, data, "m", num_prompts=3, samples=2, max_new_tokens=6, seed=5)
    assert a.group == [0, 0, 1, 1, 2, 2] and a.prompts == data.train.prompts[:3]
    assert a.completions == b.completions and all(len(c) <= 6 for c in a.completions)
    assert a.finished == [bool(c) and c[-1] == EOS for c in a.completions]


def test_cli_analyze_traces(tmp_path, data):
    tok = data.tokenizer
    for name, seed in (("t1", 0), ("student", 1)):
        m = tiny_causal_lm(None, 16, 1, 2, tok, seed=seed)
        m.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    # a perfect "teacher" as a trace file: each training prompt's true trace, twice
    refs = data.train.references[:4]
    write_jsonl(tmp_path / "gold.jsonl",
                [{"prompt": q.prompt, "completion": q.completion} for q in refs for _ in range(2)])
    task = ["--task", "arithmetic", "--set", "num_train=32", "--set", "num_val=8", "--set", "num_test=8",
            "--set", "max_digits=2"]
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["analyze-traces", *task, "--teacher", str(tmp_path / "t1"), "--teacher",
                                   str(tmp_path / "gold.jsonl"), "--student", str(tmp_path / "student"),
                                   "--samples", "2", "--prompts", "4", "--max-new-tokens", "8", "--out", str(out),
                                   "--sft-k", "2"])
    assert res.exit_code == 0, res.output
    for f in ("traces_report.md", "traces.csv", "traces.png", "sft.jsonl", "traces/t1.jsonl", "traces/gold.jsonl"):
        assert (out / f).is_file(), f
    with open(out / "traces.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["teacher"] == "gold" and float(rows[0]["accuracy"]) == 1.0
    assert float(rows[0]["correct_distinct"]) == 1.0 and float(rows[0]["unique_rate"]) == 0.5
    sft = [json.loads(line) for line in (out / "sft.jsonl").read_text().splitlines()]
    assert [r["completion"] for r in sft] == [q.completion for q in refs]  # de-duplicated: one per prompt
    assert "Selected teacher: **gold**" in (out / "traces_report.md").read_text()
    for args, message in ((["--teacher", str(tmp_path / "nope")], "does not exist"),
                          (["--teacher", str(tmp_path / "t1"), "--sft-k", "1", "--sft-from", "x"], "--sft-from"),
                          (["--teacher", str(tmp_path / "t1"), "--set", "num_trian=3"], "num_trian")):
        bad = CliRunner().invoke(app, ["analyze-traces", *task, "--out", str(tmp_path / "bad"), *args])
        assert bad.exit_code == 2 and message in bad.output, (args, bad.output)
