"""Tests that fail when an LM method's objective or its distinguishing piece is broken (issue 12).

Each method's ``training_step`` loss is compared with a value computed here by explicit Python loops
over supervised tokens and the (tiny) vocabulary, the supervised positions being derived from the
task's prompts and sequences (not from the batch's ``labels``), so a broken prompt/padding mask, a
swapped divergence, an ignored β/skew/temperature or a plain KD/CE objective all change the number.
Sampling settings of ``rollout`` are checked against the distribution they claim (empirical
frequencies of many one-token samples), and ``gkd``'s λ by counting ``generate`` calls.
"""

from __future__ import annotations

import math

import pytest
import torch

from distill.lm.data.tasks import ArithmeticParams, build_arithmetic
from distill.lm.data.text import tiny_causal_lm
from distill.lm.methods.gkd import GKD, GKDParams
from distill.lm.methods.lm_kd import LMKD, LMKDParams
from distill.lm.methods.lm_taid import LMTAID, LMTAIDParams
from distill.lm.methods.seq_kd import SeqKD, SeqKDParams
from distill.lm.methods.sft import SFT, SFTParams
from distill.lm.rollout import rollout

MAX_NEW = 6


@pytest.fixture(scope="module")
def data():
    return build_arithmetic(ArithmeticParams(num_train=16, num_val=4, num_test=4, max_digits=1))


def _model(tok, seed: int, scale: float = 1.0, vocab: int | None = None):
    """A tiny Llama; ``scale`` multiplies every weight (larger: more peaked, more varied distributions)."""
    m = tiny_causal_lm(vocab, 16, 1, 2, tok, seed=seed)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(scale)
    return m


# ------------------------------------------------------------------------------------ by-hand helpers


def _softmax(row: list[float], temperature: float = 1.0) -> list[float]:
    z = [x / temperature for x in row]
    top = max(z)
    e = [math.exp(x - top) for x in z]
    total = sum(e)
    return [x / total for x in e]


def _kl(a: list[float], b: list[float]) -> float:
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)


def _divergence(s_row: list[float], t_row: list[float], kind: str, beta: float = 0.5, skew: float = 0.1,
                temperature: float = 1.0) -> float:
    """One token's divergence between teacher ``p`` and student ``q``, written out per vocabulary entry."""
    p, q = _softmax(t_row, temperature), _softmax(s_row, temperature)
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return _kl(p, q)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return _kl(q, p)
    if kind == "jsd":  # GKD Eq. 1 in TRL's convention: m = β·p + (1−β)·q
        m = [beta * x + (1 - beta) * y for x, y in zip(p, q)]
        return beta * _kl(p, m) + (1 - beta) * _kl(q, m)
    if kind == "skew_forward_kl":  # DistiLLM: KL(p ‖ α·p + (1−α)·q)
        return _kl(p, [skew * x + (1 - skew) * y for x, y in zip(p, q)])
    if kind == "skew_reverse_kl":  # DistiLLM: KL(q ‖ (1−α)·p + α·q)
        return _kl(q, [(1 - skew) * x + skew * y for x, y in zip(p, q)])
    if kind == "tvd":
        return 0.5 * sum(abs(x - y) for x, y in zip(p, q))
    raise AssertionError(kind)


def _nll(row: list[float], token: int) -> float:
    return -math.log(_softmax(row)[token])


def _taid_ce(s_row: list[float], t_row: list[float], t: float, temperature: float = 1.0) -> float:
    """−Σ_v p_t,v log q_v with p_t = softmax(((1−t)·s + t·z)/T), q = softmax(s/T)  (S60)."""
    p_t = _softmax([(1 - t) * a + t * b for a, b in zip(s_row, t_row)], temperature)
    q = _softmax(s_row, temperature)
    return -sum(x * math.log(y) for x, y in zip(p_t, q) if x > 0)


@torch.no_grad()
def _logits(model, batch) -> list[list[list[float]]]:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return out.double().tolist()


def _supervised(batch, prompts: list[list[int]]) -> list[tuple[int, int, int]]:
    """``(row, position whose logits predict, token)`` for every completion token of every row: the
    tokens after the row's prompt up to its last attended token (right padding), independent of ``labels``."""
    out = []
    for row, prompt in enumerate(prompts):
        ids = batch["input_ids"][row].tolist()
        n = int(batch["attention_mask"][row].sum())
        assert ids[: len(prompt)] == list(prompt)
        out += [(row, j - 1, ids[j]) for j in range(len(prompt), n)]
    return out


def _with_items(method, batches, extra: int = 0):
    """``num_items`` of the step (its micro-batches' supervised tokens, plus ``extra`` from elsewhere)."""
    n = torch.tensor(float(sum(method.count_items(b) for b in batches) + extra))
    for b in batches:
        b["num_items"] = n
    return batches


def _prompts(data, batch) -> list[list[int]]:
    return [data.train.prompts[int(i)] for i in batch["index"]]


# ------------------------------------------------------------------------------------------------ sft


def test_sft_is_the_completion_tokens_nll_over_num_items(data):
    tok = data.tokenizer
    student = _model(tok, 0, scale=2.0)
    sft = SFT(student, None, SFTParams(), data.task_info(False))
    (b,) = _with_items(sft, [data.train.__getitems__([0, 5, 9])], extra=7)
    loss = sft.training_step(b).losses["student"].item()
    logits = _logits(student, b)
    pos = _supervised(b, _prompts(data, b))
    expect = sum(_nll(logits[r][j], y) for r, j, y in pos) / float(b["num_items"])
    assert loss == pytest.approx(expect, rel=1e-5)
    # what a broken mask would give: every attended token (prompt included) is scored
    everything = sum(_nll(logits[r][j - 1], int(b["input_ids"][r][j]))
                     for r in range(3) for j in range(1, int(b["attention_mask"][r].sum())))
    assert loss != pytest.approx(everything / float(b["num_items"]), rel=1e-3)


# ---------------------------------------------------------------------------------------------- lm_kd


LMKD_CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jsd", {"beta": 0.3}),
    ("jsd", {"beta": 0.0}),
    ("jsd", {"beta": 1.0}),
    ("skew_forward_kl", {"skew": 0.3}),
    ("skew_reverse_kl", {"skew": 0.3}),
    ("tvd", {}),
]


@pytest.mark.parametrize("kind,kw", LMKD_CASES)
def test_lm_kd_each_divergence_by_hand(data, kind, kw):
    tok = data.tokenizer
    student, teacher = _model(tok, 0, scale=2.0), _model(tok, 1, scale=3.0)
    params = LMKDParams(kind=kind, temperature=1.7, kd_weight=0.7, ce_weight=0.4, **kw)
    method = LMKD(student, teacher, params, data.task_info(False))
    (b,) = _with_items(method, [data.train.__getitems__([1, 4, 11])], extra=5)
    step = method.training_step(b)
    s, t = _logits(student, b), _logits(teacher, b)
    pos = _supervised(b, _prompts(data, b))
    n = float(b["num_items"])
    kd = sum(_divergence(s[r][j], t[r][j], kind, temperature=1.7, **kw) for r, j, _ in pos) / n
    ce = sum(_nll(s[r][j], y) for r, j, y in pos) / n  # the CE is at temperature 1
    assert float(step.metrics["kd"]) == pytest.approx(kd, rel=1e-5)
    assert float(step.metrics["ce"]) == pytest.approx(ce, rel=1e-5)
    assert step.losses["student"].item() == pytest.approx(0.7 * kd + 0.4 * ce, rel=1e-5)
    if kind != "forward_kl" and not (kind == "jsd" and kw["beta"] == 0.0):  # not plain forward KL
        fkl = sum(_divergence(s[r][j], t[r][j], "forward_kl", temperature=1.7) for r, j, _ in pos) / n
        assert kd != pytest.approx(fkl, rel=1e-3)


@pytest.mark.parametrize("kind,kw", [("forward_kl", {}), ("jsd", {"beta": 0.3})])
def test_lm_kd_fused_by_hand(data, kind, kw):
    tok = data.tokenizer
    student, teacher = _model(tok, 0, scale=2.0), _model(tok, 1, scale=3.0)
    params = LMKDParams(kind=kind, temperature=0.8, ce_weight=0.5, fused=True, chunk_size=5, **kw)
    method = LMKD(student, teacher, params, data.task_info(False))
    (b,) = _with_items(method, [data.train.__getitems__([2, 7])])
    step = method.training_step(b)
    s, t = _logits(student, b), _logits(teacher, b)
    pos = _supervised(b, _prompts(data, b))
    kd = sum(_divergence(s[r][j], t[r][j], kind, temperature=0.8, **kw) for r, j, _ in pos) / len(pos)
    ce = sum(_nll(s[r][j], y) for r, j, y in pos) / len(pos)
    assert step.losses["student"].item() == pytest.approx(kd + 0.5 * ce, rel=1e-5)


# --------------------------------------------------------------------------------------------- seq_kd


def test_seq_kd_sampled_targets_are_teacher_samples_at_the_temperature(data):
    tok = data.tokenizer
    teacher = _model(tok, 1, scale=3.0)
    info = data.task_info(False)
    method = SeqKD(_model(tok, 0), teacher, SeqKDParams(greedy=False, temperature=1.6, max_new_tokens=MAX_NEW,
                                                        gen_batch_size=5), info)
    torch.manual_seed(4)
    method.on_train_start(10, 1)
    kw = dict(max_new_tokens=MAX_NEW, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, batch_size=5)
    torch.manual_seed(4)
    at_t = rollout(teacher, data.train.prompts, temperature=1.6, **kw).completions
    torch.manual_seed(4)
    at_1 = rollout(teacher, data.train.prompts, temperature=1.0, **kw).completions
    greedy = rollout(teacher, data.train.prompts, greedy=True, **kw).completions
    assert method.targets.completions == at_t
    assert at_t != at_1 and at_t != greedy  # the settings matter for this teacher


def test_seq_kd_loss_sees_the_teachers_completions_not_the_dataset(data):
    tok = data.tokenizer
    student, teacher = _model(tok, 0, scale=2.0), _model(tok, 1, scale=10.0)
    method = SeqKD(student, teacher, SeqKDParams(max_new_tokens=MAX_NEW), data.task_info(False))
    method.on_train_start(10, 1)
    idx = [3, 8, 12]
    dataset = data.train.__getitems__(idx)
    (b,) = _with_items(method, method.prepare_batches([dict(dataset)]))
    loss = method.training_step(b).losses["student"].item()
    # the teacher's greedy completion of each prompt, decoded here token by token
    total, count = 0.0, 0
    for i in idx:
        prompt, ids = data.train.prompts[i], list(data.train.prompts[i])
        for _ in range(MAX_NEW):
            with torch.no_grad():
                nxt = int(teacher(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(nxt)
            if nxt == tok.eos_token_id:
                break
        with torch.no_grad():
            row = student(input_ids=torch.tensor([ids])).logits[0].double().tolist()
        total += sum(_nll(row[j - 1], ids[j]) for j in range(len(prompt), len(ids)))
        count += len(ids) - len(prompt)
    assert loss == pytest.approx(total / count, rel=1e-5)
    # the dataset's targets would give another loss (SFT on the data, not sequence-level KD)
    logits = _logits(student, dataset)
    pos = _supervised(dataset, _prompts(data, dataset))
    assert loss != pytest.approx(sum(_nll(logits[r][j], y) for r, j, y in pos) / len(pos), rel=1e-3)


# ------------------------------------------------------------------------------------------------ gkd


def _count_generate(model) -> list[int]:
    calls = [0]
    generate = model.generate

    def counting(*a, **kw):
        calls[0] += 1
        return generate(*a, **kw)

    model.generate = counting
    return calls


@pytest.mark.parametrize("lmbda,seq_kd", [(0.0, False), (1.0, False), (0.0, True), (0.25, False)])
def test_gkd_lmbda_decides_which_micro_batches_are_generated(data, lmbda, seq_kd):
    tok = data.tokenizer
    student, teacher = _model(tok, 0), _model(tok, 1)
    s_calls, t_calls = _count_generate(student), _count_generate(teacher)
    gkd = GKD(student, teacher, GKDParams(lmbda=lmbda, seq_kd=seq_kd, max_new_tokens=2), data.task_info(False))
    n = 40 if 0 < lmbda < 1 else 6
    micro = [data.train.__getitems__([i % 16, (i + 5) % 16]) for i in range(n)]
    torch.manual_seed(0)
    out = gkd.prepare_batches([dict(b) for b in micro])
    on = [float(b["on_policy"]) for b in out]
    kept = [torch.equal(b["input_ids"], m["input_ids"]) if b["input_ids"].shape == m["input_ids"].shape else False
            for b, m in zip(out, micro)]
    assert s_calls[0] == sum(on)  # one student generate per on-policy micro-batch (gen_batch_size ≥ batch)
    if lmbda == 0.0:
        assert s_calls[0] == 0 and sum(on) == 0
        assert t_calls[0] == (n if seq_kd else 0)  # seq_kd: every off-policy batch is the teacher's samples
        assert all(k == (not seq_kd) for k in kept)
    elif lmbda == 1.0:
        assert s_calls[0] == n and t_calls[0] == 0 and not any(kept)
    else:  # Bernoulli(0.25) per micro-batch: 10 of 40 expected (sd 2.7)
        assert 3 <= sum(on) <= 18 and t_calls[0] == 0
        assert kept == [f == 0.0 for f in on]


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_gkd_loss_is_generalized_jsd_at_the_loss_temperature_by_hand(data, beta):
    tok = data.tokenizer
    student, teacher = _model(tok, 0, scale=2.0), _model(tok, 1, scale=3.0)
    # sampling and loss temperatures differ on purpose: each must be used in its own place
    gkd = GKD(student, teacher, GKDParams(lmbda=1.0, beta=beta, temperature=0.7, loss_temperature=1.8,
                                          max_new_tokens=MAX_NEW), data.task_info(False))
    torch.manual_seed(1)
    (b,) = _with_items(gkd, gkd.prepare_batches([data.train.__getitems__([0, 6, 13])]), extra=3)
    loss = gkd.training_step(b).losses["student"].item()
    s, t = _logits(student, b), _logits(teacher, b)
    pos = _supervised(b, _prompts(data, b))
    assert len(pos) > 3
    n = float(b["num_items"])
    expect = sum(_divergence(s[r][j], t[r][j], "jsd", beta=beta, temperature=1.8) for r, j, _ in pos) / n
    assert loss == pytest.approx(expect, rel=1e-5)
    if beta > 0:  # not plain (forward-KL) KD
        fkl = sum(_divergence(s[r][j], t[r][j], "forward_kl", temperature=1.8) for r, j, _ in pos) / n
        assert loss != pytest.approx(fkl, rel=1e-3)


def test_gkd_samples_the_student_at_the_sampling_temperature(data):
    """4000 on-policy one-token completions of one prompt: their frequencies are the student's
    next-token distribution at ``temperature`` (not at 1, not the teacher's)."""
    tok = data.tokenizer
    student, teacher = _model(tok, 0, scale=5.0), _model(tok, 1, scale=5.0)
    gkd = GKD(student, teacher, GKDParams(lmbda=1.0, temperature=1.7, max_new_tokens=1, gen_batch_size=4000),
              data.task_info(False))
    prompt = data.train.prompts[0]
    torch.manual_seed(2)
    (b,) = gkd.prepare_batches([data.train.__getitems__([0] * 4000)])
    counts = [0] * len(tok)
    for token in b["input_ids"][:, len(prompt)].tolist():
        counts[token] += 1
    freq = [c / 4000 for c in counts]
    with torch.no_grad():
        z_s = student(input_ids=torch.tensor([prompt])).logits[0, -1].double().tolist()
        z_t = teacher(input_ids=torch.tensor([prompt])).logits[0, -1].double().tolist()
    p_s = _softmax(z_s, 1.7)
    assert _tv(p_s, _softmax(z_s)) > 0.15 and _tv(p_s, _softmax(z_t, 1.7)) > 0.15
    assert _tv(freq, p_s) < 0.05
    assert _tv(freq, _softmax(z_s)) > 0.1 and _tv(freq, _softmax(z_t, 1.7)) > 0.1


# -------------------------------------------------------------------------------------------- lm_taid


def _schedule_by_hand(losses: list[float], total_steps: int, t_start: float, t_end: float, alpha: float, beta: float,
                      adaptive: bool = True) -> list[float]:
    """S60 Algorithm 1 (official ``TAID.update_t``): the t in use after each of the given step losses."""
    t, m, prev, out = t_start, 0.0, None, []
    for k, loss in enumerate(losses):
        if prev is not None:
            m = beta * m + (1 - beta) * (prev - loss) / (prev + 1e-15)
            t_lin = t_start + (t_end - t_start) * k / total_steps
            t_new = max(t_lin, t + alpha * (1 / (1 + math.exp(-m))) * (1 - t)) if adaptive else t_lin
            t = min(t_end, t_new)
        prev = loss
        out.append(t)
    return out


TAID_CASES = [  # adaptive: a long linear ramp, so t rises by the adaptive rule; linear: reaches t_end and stays
    (True, dict(total_steps=50, t_start=0.2, t_end=0.9, alpha=0.5, beta=0.5)),
    (False, dict(total_steps=4, t_start=0.2, t_end=0.8, alpha=0.3, beta=0.5)),
]


@pytest.mark.parametrize("adaptive,kw", TAID_CASES)
def test_lm_taid_schedule_and_loss_by_hand(data, adaptive, kw):
    tok = data.tokenizer
    student, teacher = _model(tok, 0, scale=2.0), _model(tok, 1, scale=3.0)
    method = LMTAID(student, teacher, LMTAIDParams(temperature=1.5, adaptive=adaptive, **kw),
                    data.task_info(False))
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    losses, ts = [], []
    t_used = kw["t_start"]
    for step in range(6):  # two micro-batches of varying sizes per optimizer step; the student trains
        first = [(step + i) % 16 for i in range(1 + step % 3)]
        micro = _with_items(method, [data.train.__getitems__(first), data.train.__getitems__([(step + 7) % 16])])
        total = 0.0
        for b in micro:
            out = method.training_step(b)
            s, z = _logits(student, b), _logits(teacher, b)
            pos = _supervised(b, _prompts(data, b))
            by_hand = sum(_taid_ce(s[r][j], z[r][j], t_used, 1.5) for r, j, _ in pos) / float(b["num_items"])
            assert out.losses["student"].item() == pytest.approx(by_hand, rel=1e-5)
            assert float(out.metrics["t"]) == pytest.approx(t_used, rel=1e-6)
            total += by_hand
            out.losses["student"].backward()
        opt.step()
        opt.zero_grad()
        method.on_optimizer_step()
        losses.append(total)  # the step's token-mean loss
        t_used = _schedule_by_hand(losses, **kw, adaptive=adaptive)[-1]
        ts.append(t_used)
        assert method.schedule.t.item() == pytest.approx(t_used, rel=1e-5)
    assert ts[0] == kw["t_start"] and len(set(round(t, 6) for t in ts)) >= 4  # t moves step by step
    if adaptive:  # well above the linear lower bound, below t_end
        assert kw["t_start"] + (kw["t_end"] - kw["t_start"]) * 5 / kw["total_steps"] + 0.2 < ts[-1] < kw["t_end"]
    else:
        assert ts[-1] == pytest.approx(kw["t_end"])  # reaches t_end, capped there


# ----------------------------------------------------------------------------------------- rollouts


def _samples(model, prompt: list[int], n: int, vocab: int, **kw) -> tuple[list[float], list[tuple[int, float]]]:
    """Empirical frequencies of ``n`` one-token samples and the (token, reported log-prob) pairs."""
    r = rollout(model, [prompt], max_new_tokens=1, eos_id=0, pad_id=1, num_samples=n, batch_size=n, **kw)
    counts = [0] * vocab
    for c in r.completions:
        counts[c[0]] += 1
    return [x / n for x in counts], [(c[0], lp[0]) for c, lp in zip(r.completions, r.logprobs)]


def _tv(a: list[float], b: list[float]) -> float:
    return 0.5 * sum(abs(x - y) for x, y in zip(a, b))


class _Ids:  # special ids of a 64-token model (tiny_causal_lm needs them)
    bos_token_id, eos_token_id, pad_token_id = 2, 0, 1


def _next_token_logits(model, prompt: list[int]) -> list[float]:
    with torch.no_grad():
        return model(input_ids=torch.tensor([prompt])).logits[0, -1].double().tolist()


PROMPT = [2, 10, 20, 30, 40]


@pytest.mark.parametrize("temperature", [0.6, 1.8])
def test_rollout_samples_from_the_tempered_full_distribution(temperature):
    model = _model(_Ids, 3, scale=5.0, vocab=64)
    z = _next_token_logits(model, PROMPT)
    p_t, p_1 = _softmax(z, temperature), _softmax(z)
    assert _tv(p_t, p_1) > 0.15  # the temperature visibly changes this distribution
    torch.manual_seed(0)
    freq, pairs = _samples(model, PROMPT, 20000, 64, temperature=temperature)
    assert _tv(freq, p_t) < 0.04 and _tv(freq, p_1) > 0.1
    for token, lp in pairs[:50]:  # reported log-probs: the tempered full distribution
        assert lp == pytest.approx(math.log(p_t[token]), abs=1e-4)


def test_rollout_samples_the_whole_vocabulary_no_default_top_k():
    # a flat distribution over 64 tokens: generate's default top_k = 50 would never sample 14 of them
    model = _model(_Ids, 3, scale=0.3, vocab=64)
    z = _next_token_logits(model, PROMPT)
    p = _softmax(z)
    tail = sorted(range(64), key=lambda v: -z[v])[50:]
    mass = sum(p[v] for v in tail)
    assert mass > 0.15
    torch.manual_seed(0)
    freq, _ = _samples(model, PROMPT, 3000, 64, temperature=1.0)
    assert sum(freq[v] for v in tail) == pytest.approx(mass, abs=0.04)


def test_rollout_top_p_keeps_the_nucleus_of_the_tempered_distribution():
    model = _model(_Ids, 3, scale=5.0, vocab=64)
    z = _next_token_logits(model, PROMPT)
    p_t = _softmax(z, 1.3)
    nucleus, cum = [], 0.0  # the smallest most-likely set with mass ≥ top_p
    for v in sorted(range(64), key=lambda v: -p_t[v]):
        nucleus.append(v)
        cum += p_t[v]
        if cum >= 0.6:
            break
    assert 1 < len(nucleus) < 64
    expect = [p_t[v] / cum if v in nucleus else 0.0 for v in range(64)]
    torch.manual_seed(0)
    freq, pairs = _samples(model, PROMPT, 20000, 64, temperature=1.3, top_p=0.6)
    assert all(freq[v] == 0 for v in range(64) if v not in nucleus)
    assert _tv(freq, expect) < 0.04
    for token, lp in pairs[:50]:  # log-probs before the truncation (the full tempered distribution)
        assert lp == pytest.approx(math.log(p_t[token]), abs=1e-4)


def test_rollout_ignores_the_models_stored_sampling_settings():
    model = _model(_Ids, 3, scale=5.0, vocab=64)
    for k, v in {"top_k": 2, "temperature": 0.2, "repetition_penalty": 5.0, "min_p": 0.3, "top_p": 0.5}.items():
        setattr(model.generation_config, k, v)
    z = _next_token_logits(model, PROMPT)
    torch.manual_seed(0)
    freq, _ = _samples(model, PROMPT, 20000, 64, temperature=1.2)
    assert _tv(freq, _softmax(z, 1.2)) < 0.04
    assert model.generation_config.top_k == 2 and model.generation_config.temperature == 0.2  # put back
