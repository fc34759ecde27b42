"""Rollouts, ``gkd`` (on-policy GKD, Agarwal et al. 2024) and ``seq_kd`` (Kim & Rush 2016): generation
against step-by-step decoding, log-probs against a fresh forward pass, the batches the methods train on
and their losses against independently written formulas, and tiny end-to-end runs from recipes."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from distill.core.recipe import recipe_from_dict
from distill.core.runner import run_recipe
from distill.errors import Interrupted, RecipeError
from distill.lm.methods.gkd import GKD, GKDParams
from distill.lm.methods.lm_kd import LMKD, LMKDParams
from distill.lm.rollout import rollout
from distill.lm.methods.seq_kd import SeqKD, SeqKDParams
from distill.lm.data.tasks import ArithmeticParams, build_arithmetic
from distill.lm.data.text import IGNORE_INDEX, tiny_causal_lm

MAX_NEW = 12


@pytest.fixture(scope="module")
def data():
    return build_arithmetic(ArithmeticParams(num_train=16, num_val=4, num_test=4))


def _model(tok, seed: int, scale: float = 1.0):
    """A tiny Llama; ``scale`` multiplies every weight so greedy decoding is decisive (no near-ties) and varied."""
    m = tiny_causal_lm(None, 32, 2, 2, tok, seed=seed)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(scale)
    return m


@torch.no_grad()
def _greedy_by_hand(model, prompt: list[int], max_new: int, eos: int | None) -> list[int]:
    """Argmax decoding one token at a time, no padding, no KV cache, no ``generate``."""
    ids, out = list(prompt), []
    for _ in range(max_new):
        nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        out.append(nxt)
        ids.append(nxt)
        if nxt == eos:
            break
    return out


@torch.no_grad()
def _completion_logprobs(model, prompt: list[int], completion: list[int], temperature: float) -> list[float]:
    ids = torch.tensor([prompt + completion])
    lp = torch.log_softmax(model(input_ids=ids).logits[0].double() / temperature, -1)
    n = len(prompt)
    return [float(lp[n - 1 + j, t]) for j, t in enumerate(completion)]


def _roll(model, prompts, tok, **kw):
    kw.setdefault("max_new_tokens", MAX_NEW)
    kw.setdefault("eos_id", tok.eos_token_id)
    return rollout(model, prompts, pad_id=tok.pad_token_id, **kw)


# ---------------------------------------------------------------------------------------------- rollout


def test_greedy_rollout_equals_stepwise_argmax_and_logprobs(data):
    tok, prompts = data.tokenizer, data.train.prompts[:6]  # prompts of several lengths: left padding
    assert len({len(p) for p in prompts}) > 1
    model = _model(tok, 0, scale=10.0)
    r = _roll(model, prompts, tok, greedy=True, temperature=0.7, batch_size=4)  # two generate calls
    for p, c, lp, fin in zip(prompts, r.completions, r.logprobs, r.finished):
        assert c == _greedy_by_hand(model, p, MAX_NEW, tok.eos_token_id)
        assert fin == (c[-1] == tok.eos_token_id)
        # greedy decodes the argmax; the log-probs are still at the temperature
        torch.testing.assert_close(torch.tensor(lp, dtype=torch.float64),
                                   torch.tensor(_completion_logprobs(model, p, c, 0.7), dtype=torch.float64), rtol=0, atol=2e-4)
    assert r.prompts == prompts and r.num_tokens == sum(len(c) for c in r.completions)


def test_rollout_trims_at_first_eos(data):
    tok, prompts = data.tokenizer, data.train.prompts[:6]
    model = _model(tok, 0, scale=10.0)
    free = [_greedy_by_hand(model, p, MAX_NEW, None) for p in prompts]
    # pretend the token at position 3 of the first decode is eos: generation must stop at its first use
    eos = free[0][3]
    r = _roll(model, prompts, tok, eos_id=eos, greedy=True)
    for seq, c, lp, fin in zip(free, r.completions, r.logprobs, r.finished):
        if eos in seq:
            assert c == seq[: seq.index(eos) + 1] and fin
        else:
            assert c == seq and not fin
        assert len(lp) == len(c)
    assert r.completions[0] == free[0][: free[0].index(eos) + 1] and len(r.completions[0]) <= 4
    assert any(not f for f in r.finished) or all(eos in s for s in free)


def test_sampled_logprobs_num_samples_and_seed(data):
    tok, prompts = data.tokenizer, data.train.prompts[:3]
    model = _model(tok, 1)
    torch.manual_seed(5)
    a = _roll(model, prompts, tok, temperature=1.3, num_samples=3)
    torch.manual_seed(5)
    b = _roll(model, prompts, tok, temperature=1.3, num_samples=3)
    torch.manual_seed(6)
    c = _roll(model, prompts, tok, temperature=1.3, num_samples=3)
    assert a.completions == b.completions and a.logprobs == b.logprobs  # reproducible under the seed
    assert a.completions != c.completions
    assert a.prompts == [p for p in prompts for _ in range(3)]  # each prompt repeated consecutively
    assert len({tuple(x) for x in a.completions[:3]}) > 1  # the repeats are independent samples
    for p, comp, lp in zip(a.prompts, a.completions, a.logprobs):
        torch.testing.assert_close(torch.tensor(lp, dtype=torch.float64),
                                   torch.tensor(_completion_logprobs(model, p, comp, 1.3), dtype=torch.float64), rtol=0, atol=2e-4)
    g = _roll(model, prompts, tok, greedy=True, num_samples=2)
    assert g.completions[0] == g.completions[1] and g.completions[2] == g.completions[3]


def test_rollout_batch_supervises_only_completions(data):
    tok, prompts = data.tokenizer, data.train.prompts[:4]
    r = _roll(_model(tok, 0, scale=10.0), prompts, tok, greedy=True)
    b = r.batch(tok.pad_token_id)
    for row, (p, c) in enumerate(zip(r.prompts, r.completions)):
        n = len(p) + len(c)
        assert b["input_ids"][row, :n].tolist() == p + c and (b["input_ids"][row, n:] == tok.pad_token_id).all()
        assert b["labels"][row].tolist() == [IGNORE_INDEX] * len(p) + c + [IGNORE_INDEX] * (b["labels"].shape[1] - n)
        assert b["attention_mask"][row].sum() == n


# -------------------------------------------------------------------------------------------------- gkd


def _jsd_by_hand(s, t, labels, beta: float, temperature: float = 1.0):
    """TRL's generalized JSD (Eq. 1): m = β·p + (1−β)·q, β·KL(p‖m) + (1−β)·KL(q‖m), mean over
    supervised next tokens; written from log-softmaxes in float64."""
    ls = torch.log_softmax(s[:, :-1].double() / temperature, -1)
    lt = torch.log_softmax(t[:, :-1].double() / temperature, -1)
    if beta == 0:
        per = (lt.exp() * (lt - ls)).sum(-1)
    elif beta == 1:
        per = (ls.exp() * (ls - lt)).sum(-1)
    else:
        m = torch.logsumexp(torch.stack([lt + math.log(beta), ls + math.log(1 - beta)]), 0)
        per = beta * (lt.exp() * (lt - m)).sum(-1) + (1 - beta) * (ls.exp() * (ls - m)).sum(-1)
    mask = labels[:, 1:] != IGNORE_INDEX
    return per[mask].sum() / mask.sum()


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _with_items(method, batches):
    n = torch.tensor(float(sum(method.count_items(b) for b in batches)))
    for b in batches:
        b["num_items"] = n
    return batches


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_gkd_lmbda0_equals_lm_kd_jsd(data, beta):
    tok = data.tokenizer
    student, teacher = _model(tok, 0), _model(tok, 1, scale=3.0)
    info = data.task_info(False)
    gkd = GKD(student, teacher, GKDParams(lmbda=0.0, beta=beta), info)
    kd = LMKD(student, teacher, LMKDParams(kind="jsd", beta=beta), info)
    batches = [data.train.__getitems__([0, 3, 5]), data.train.__getitems__([7, 9])]
    state = torch.get_rng_state()
    g = _with_items(gkd, gkd.prepare_batches([dict(b) for b in batches]))
    assert torch.equal(torch.get_rng_state(), state)  # λ = 0 draws nothing: lm_kd's RNG stream
    k = _with_items(kd, kd.prepare_batches([dict(b) for b in batches]))
    for gb, kb in zip(g, k):
        for key in ("input_ids", "attention_mask", "labels", "index"):
            assert torch.equal(gb[key], kb[key])  # the dataset's sequences
        lg, lk = gkd.training_step(gb), kd.training_step(kb)
        assert torch.equal(lg.losses["student"], lk.losses["student"])
        assert float(lg.metrics["on_policy"]) == 0.0
        expect = _jsd_by_hand(_logits(student, gb), _logits(teacher, gb), gb["labels"], beta) * \
            int((gb["labels"][:, 1:] != IGNORE_INDEX).sum()) / float(gb["num_items"])
        torch.testing.assert_close(lg.losses["student"].double(), expect, rtol=1e-5, atol=1e-6)


def test_gkd_lmbda1_trains_on_student_samples(data):
    tok = data.tokenizer
    student, teacher = _model(tok, 0, scale=2.0), _model(tok, 1, scale=3.0)
    gkd = GKD(student, teacher, GKDParams(lmbda=1.0, beta=0.4, temperature=1.5, max_new_tokens=MAX_NEW),
              data.task_info(False))
    idx = [2, 4, 11]
    prompts = [data.train.prompts[i] for i in idx]
    seen = []
    generate = student.generate

    def spy(*a, **kw):  # generation runs without autograd, in eval mode
        seen.append((torch.is_grad_enabled(), student.training))
        return generate(*a, **kw)

    student.generate = spy
    student.train()
    torch.manual_seed(3)
    (b,) = _with_items(gkd, gkd.prepare_batches([data.train.__getitems__(idx)]))
    assert seen == [(False, False)] and student.training  # put back in train mode
    assert all(p.grad is None for p in student.parameters())
    torch.manual_seed(3)
    ref = rollout(generate.__self__, prompts, max_new_tokens=MAX_NEW, eos_id=tok.eos_token_id,
                  pad_id=tok.pad_token_id, temperature=1.5)
    assert b["index"].tolist() == idx and float(b["on_policy"]) == 1.0
    for row, (p, c) in enumerate(zip(prompts, ref.completions)):
        n = len(p) + len(c)
        assert b["input_ids"][row, :n].tolist() == p + c  # prompt + the student's own sample
        assert b["labels"][row, : len(p)].eq(IGNORE_INDEX).all()  # prompt masked
        assert b["labels"][row, len(p) : n].tolist() == c  # every generated token supervised
        assert b["labels"][row, n:].eq(IGNORE_INDEX).all() and b["attention_mask"][row].sum() == n
    assert b["labels"].tolist() != data.train.__getitems__(idx)["labels"].tolist()
    step = gkd.training_step(b)
    expect = _jsd_by_hand(_logits(student, b), _logits(teacher, b), b["labels"], 0.4)
    torch.testing.assert_close(step.losses["student"].double(), expect, rtol=1e-5, atol=1e-6)
    step.losses["student"].backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    assert all(p.grad is None for p in teacher.parameters())


def test_gkd_seq_kd_uses_teacher_samples(data):
    tok = data.tokenizer
    student, teacher = _model(tok, 0), _model(tok, 1, scale=3.0)
    gkd = GKD(student, teacher, GKDParams(lmbda=0.0, seq_kd=True, temperature=0.8, max_new_tokens=MAX_NEW),
              data.task_info(False))
    idx = [1, 6]
    torch.manual_seed(9)
    (b,) = gkd.prepare_batches([data.train.__getitems__(idx)])
    torch.manual_seed(9)
    ref = rollout(teacher, [data.train.prompts[i] for i in idx], max_new_tokens=MAX_NEW, eos_id=tok.eos_token_id,
                  pad_id=tok.pad_token_id, temperature=0.8).batch(tok.pad_token_id)
    for k in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(b[k], ref[k])
    assert float(b["on_policy"]) == 0.0


def test_gkd_decides_per_micro_batch(data):
    tok = data.tokenizer
    gkd = GKD(_model(tok, 0), _model(tok, 1, scale=3.0), GKDParams(lmbda=0.5, max_new_tokens=4),
              data.task_info(False))
    micro = [data.train.__getitems__([i, i + 8]) for i in range(8)]
    torch.manual_seed(0)
    out = gkd.prepare_batches([dict(b) for b in micro])
    flags = [float(b["on_policy"]) for b in out]
    assert 0 < sum(flags) < len(flags)  # one coin per micro-batch, not one per step
    for b, m, f in zip(out, micro, flags):
        same = b["input_ids"].shape == m["input_ids"].shape and torch.equal(b["input_ids"], m["input_ids"])
        assert same == (f == 0.0)  # off-policy micro-batches keep the dataset's sequences
        assert torch.equal(b["index"], m["index"])
    steps = [gkd.training_step(b).metrics["on_policy"] for b in _with_items(gkd, out)]
    assert [float(s) for s in steps] == flags


def test_methods_need_prompts(data):
    from distill.lm.data.task import TokenDataset

    info = data.task_info(False)
    info.train = TokenDataset(data.train.examples, data.train.pad_id)  # a text-only task: no prompts
    tok = data.tokenizer
    for cls, params in ((GKD, GKDParams()), (SeqKD, SeqKDParams())):
        with pytest.raises(RecipeError, match="prompt"):
            cls(_model(tok, 0), _model(tok, 1), params, info)


# ----------------------------------------------------------------------------------------------- seq_kd


def test_seq_kd_trains_on_teacher_greedy_completions(data):
    tok = data.tokenizer
    student, teacher = _model(tok, 0), _model(tok, 1, scale=10.0)
    method = SeqKD(student, teacher, SeqKDParams(max_new_tokens=MAX_NEW), data.task_info(False))
    method.on_train_start(10, 1)
    expected = [_greedy_by_hand(teacher, p, MAX_NEW, tok.eos_token_id) for p in data.train.prompts]
    assert method.targets.completions == expected
    idx = [5, 0, 13]
    batches = _with_items(method, method.prepare_batches([data.train.__getitems__(idx)]))
    (b,) = batches
    width = max(len(data.train.prompts[i]) + len(expected[i]) for i in idx)
    assert b["input_ids"].shape == (3, width) and b["index"].tolist() == idx
    total, count = 0.0, 0
    logits = _logits(student, b).double()
    for row, i in enumerate(idx):
        p, c = data.train.prompts[i], expected[i]
        n = len(p) + len(c)
        assert b["input_ids"][row].tolist() == p + c + [tok.pad_token_id] * (width - n)
        assert b["labels"][row].tolist() == [IGNORE_INDEX] * len(p) + c + [IGNORE_INDEX] * (width - n)
        lp = torch.log_softmax(logits[row], -1)
        total -= sum(float(lp[len(p) - 1 + j, t]) for j, t in enumerate(c))
        count += len(c)
    assert float(b["num_items"]) == count
    loss = method.training_step(b).losses["student"]
    assert math.isclose(float(loss.detach()), total / count, rel_tol=1e-5)


# ---------------------------------------------------------------------------------------------- runs


TASK = {"name": "arithmetic", "num_train": 96, "num_val": 16, "num_test": 16, "max_digits": 2, "eval_size": 8}
TRAIN = {"batch_size": 16, "lr": 0.003, "progress": False, "trackers": "none", "log_every": 1}
TEACHER = {"name": "tiny-lm-teacher", "seed": 0, "task": TASK, "student": {"arch": "llama", "hidden": 32, "layers": 1,
           "heads": 2}, "method": "sft", "train": {**TRAIN, "epochs": 1}}


def _student_recipe(name: str, method: dict, teacher: dict | None = None, **train) -> dict:
    return {"name": name, "seed": 0, "task": TASK, "teacher": teacher or {"recipe": TEACHER}, "method": method,
            "student": {"arch": "llama", "hidden": 16, "layers": 1, "heads": 2},
            "train": {**TRAIN, "epochs": 1, **train}}


def _student_run(name: str, method: dict, runs, **train):
    return run_recipe(recipe_from_dict(_student_recipe(name, method, **train)), out=runs)


def test_gkd_and_seq_kd_end_to_end(tmp_runs):
    g = _student_run("tiny-gkd", {"name": "gkd", "lmbda": 1.0, "beta": 0.5}, tmp_runs, max_steps=2, grad_accum=2)
    s = _student_run("tiny-seq-kd", {"name": "seq_kd"}, tmp_runs, max_steps=3)
    for res in (g, s):
        m = json.loads((res.run_dir / "metrics.json").read_text())
        assert 0.0 <= m["test/exact_match"] <= 1.0 and m["test/token_kl"] >= 0.0
        assert (res.run_dir / "student" / "config.json").is_file()
        assert m["time/train_tokens_per_s"] > 0
    train_rows = [r for r in g.history if "train/loss" in r]
    assert len(train_rows) == 2 and all(r["train/on_policy"] == 1.0 for r in train_rows)
    assert all(math.isfinite(r["train/loss"]) and r["train/loss"] >= 0 for r in train_rows)
    assert len(list((tmp_runs / "_teachers").iterdir())) == 1  # the teacher recipe trained once


@pytest.mark.slow
@pytest.mark.parametrize("method", [{"name": "gkd", "lmbda": 0.5, "seq_kd": True, "temperature": 0.9},
                                    {"name": "seq_kd", "greedy": False, "temperature": 1.2}])
def test_sampled_runs_resume_bitwise(tmp_runs, method):
    """Samples come from the run's torch RNG (checkpointed): an interrupted and resumed run trains on the
    same sequences as a straight one, so the students are bitwise equal."""
    teacher = run_recipe(recipe_from_dict(TEACHER), out=tmp_runs / "t").run_dir
    data = _student_recipe("resume", method, {"run": str(teacher)}, max_steps=3, grad_accum=2)
    straight = run_recipe(recipe_from_dict(data), out=tmp_runs / "a")
    with pytest.raises(Interrupted):
        run_recipe(recipe_from_dict(data), out=tmp_runs / "b", stop_at_step=1)
    resumed = run_recipe(recipe_from_dict(data), out=tmp_runs / "b", resume=True)
    wa = load_file(str(straight.run_dir / "student" / "model.safetensors"))
    wb = load_file(str(resumed.run_dir / "student" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    if method["name"] == "gkd":
        fractions = [r["train/on_policy"] for r in straight.history if "train/on_policy" in r]
        assert fractions == [r["train/on_policy"] for r in resumed.history if "train/on_policy" in r]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the vllm backend needs a GPU")
def test_vllm_backend_matches_hf_greedy(tmp_path):  # pragma: no cover - runs on GPU machines only
    pytest.importorskip("vllm")
    from distill.lm.data.arithmetic import CharTokenizer
    from distill.lm.rollout import rollout
    from distill.lm.data.text import tiny_causal_lm

    tok = CharTokenizer()
    model = tiny_causal_lm(None, 32, 1, 2, tok, seed=0)
    model.save_pretrained(tmp_path / "m")
    prompts = [[tok.bos_token_id] + tok.encode("12+34\n"), [tok.bos_token_id] + tok.encode("7*8\n")]
    kw = dict(max_new_tokens=8, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, greedy=True)
    hf = rollout(model, prompts, **kw)
    vl = rollout(str(tmp_path / "m"), prompts, backend="vllm", **kw)
    assert hf.completions == vl.completions
