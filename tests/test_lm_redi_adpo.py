"""``redi`` (S10 REDI) and ``adpo`` (S06 ADPO): the losses against independently written formulas on
hand-built sequence log-probs, the special cases (REDI with α = 0 is length-normalised SFT; ADPO's DPO
and KD cases), the traces and batches the methods build, the EMA anchor, and tiny end-to-end runs."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from distill.core.recipe import recipe_from_dict
from distill.core.runner import run_recipe
from distill.errors import Interrupted, RecipeError
from distill.lm.methods.adpo import ADPO, ADPOParams, adpo_loss, best_target, reward_target
from distill.lm.methods.redi import REDI, REDIParams, redi_loss
from distill.lm.rollout import rollout
from distill.lm.data.tasks import ArithmeticParams, build_arithmetic
from distill.lm.data.text import IGNORE_INDEX, tiny_causal_lm

MAX_NEW = 10


@pytest.fixture(scope="module")
def data():
    return build_arithmetic(ArithmeticParams(num_train=32, num_val=8, num_test=8, eval_size=4))


def _model(tok, seed: int, scale: float = 1.0):
    m = tiny_causal_lm(None, 16, 1, 2, tok, seed=seed)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(scale)
    return m


def _seq_logp(model, prompt: list[int], completion: list[int], temperature: float = 1.0):
    """``Σ_j log p(c_j | prompt, c_<j)`` at ``temperature`` (of logits / T) from one unpadded forward pass
    (differentiable)."""
    logits = model(input_ids=torch.tensor([prompt + completion])).logits[0].double()
    lp = torch.log_softmax(logits / temperature, -1)
    return sum(lp[len(prompt) - 1 + j, t] for j, t in enumerate(completion))


def _with_items(method, batches):
    n = torch.tensor(float(sum(method.count_items(b) for b in batches)))
    for b in batches:
        b["num_items"] = n
    return batches


def _grads(model) -> list[torch.Tensor]:
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


# ---------------------------------------------------------------------------------------------- REDI


def test_redi_loss_against_direct_formula():
    pos = torch.tensor([-3.0, -7.5, -0.4])
    neg = torch.tensor([-9.0, -2.0, -6.0])
    plen, nlen = torch.tensor([3.0, 5.0, 2.0]), torch.tensor([4.0, 1.0, 6.0])
    alpha = 0.8
    direct = sum(-p / a + alpha * n / b for p, a, n, b in zip(pos.tolist(), plen.tolist(), neg.tolist(), nlen.tolist()))
    assert math.isclose(float(redi_loss(pos, plen, neg, nlen, alpha)), direct / 3, rel_tol=1e-6)
    assert math.isclose(float(redi_loss(pos, plen, neg, nlen, alpha, torch.tensor(7.0))), direct / 7, rel_tol=1e-6)
    # α = 0: the negatives play no part
    assert math.isclose(float(redi_loss(pos, plen, neg * 5, nlen, 0.0)), sum(-p / a for p, a in zip(
        pos.tolist(), plen.tolist())) / 3, rel_tol=1e-6)


def test_redi_defaults_are_the_papers():
    """The paper's recommended asymmetric weight α = 0.8 (the official recipe's ``reinforce_rejected_coef``)."""
    assert REDIParams().alpha == 0.8


def _redi(data, alpha: float, **kw) -> REDI:
    tok = data.tokenizer
    # a peaked student (scaled weights): per-token log-probs vary, so a token mean and a sequence mean differ
    method = REDI(_model(tok, 0, scale=3.0), _model(tok, 1), REDIParams(alpha=alpha, **kw), data.task_info(False))
    # hand-made traces: the dataset's completion is "correct", two corruptions of it are "wrong"
    method.positives, method.negatives = [], []
    for ex, prompt in zip(data.train.examples, data.train.prompts):
        c = ex.input_ids[len(prompt):]
        method.positives.append([c, c[:-2] + c[-1:]] if len(method.positives) % 3 == 0 else [c])
        method.negatives.append([] if len(method.negatives) % 4 == 1 else [c[1:], c[::-1]])
    method.trace_accuracy = 0.5
    return method


@pytest.mark.parametrize("alpha", [0.0, 0.8])
def test_redi_stage2_against_direct_formula_value_and_gradient(data, alpha):
    """Stage 2 with α = 0 is length-normalised SFT on the positives (the issue's special case); with
    α = 0.8 the REDI loss; both as a per-sequence loop of unpadded forward passes, gradients included."""
    method = _redi(data, alpha, stage1_steps=0, max_pairs=2)
    method.on_train_start(10, 1)  # traces already set: nothing sampled
    idx = [0, 1, 3, 2]  # prompt 1 has no negative: no pair; prompts 0 and 3 two pairs, prompt 2 one
    micro = [data.train.__getitems__(idx[:2]), data.train.__getitems__(idx[2:])]
    batches = _with_items(method, method.prepare_batches(micro))
    pairs = [(i, method.positives[i][j], method.negatives[i][j]) for i in idx
             for j in range(min(len(method.positives[i]), len(method.negatives[i]), 2))]
    assert float(batches[0]["num_items"]) == len(pairs) == 5
    student = method.student
    student.zero_grad()
    total = 0.0
    metrics = []
    for b in batches:
        step = method.training_step(b)
        step.losses["student"].backward()
        total += float(step.losses["student"].detach())
        metrics.append(step.metrics)
    got = _grads(student)
    student.zero_grad()
    ref = 0
    for i, w, lose in pairs:
        p = data.train.prompts[i]
        ref = ref - _seq_logp(student, p, w) / len(w) + alpha * _seq_logp(student, p, lose) / len(lose)
    ref = ref / len(pairs)
    ref.backward()
    assert math.isclose(total, float(ref.detach()), rel_tol=1e-5, abs_tol=1e-6)
    for g, e in zip(got, _grads(student)):
        torch.testing.assert_close(g.double(), e.double(), rtol=1e-4, atol=1e-6)
    assert all(m["stage"] == 2.0 for m in metrics) and sum(m["pairs"] for m in metrics) == 5


def test_redi_alpha0_is_not_token_level_sft(data):
    """Length normalisation: per sequence mean, then mean over sequences (differs from a token mean)."""
    method = _redi(data, 0.0, stage1_steps=0)
    (b,) = _with_items(method, method.prepare_batches([data.train.__getitems__([0, 2, 3])]))
    loss = float(method.training_step(b).losses["student"].detach())
    rows = [(i, method.positives[i][0]) for i in (0, 2, 3)]
    lps = [float(_seq_logp(method.student, data.train.prompts[i], c)) for i, c in rows]
    assert math.isclose(loss, sum(-lp / len(c) for lp, (_, c) in zip(lps, rows)) / 3, rel_tol=1e-5)
    assert not math.isclose(loss, -sum(lps) / sum(len(c) for _, c in rows), rel_tol=1e-3)


def test_redi_stage1_is_sft_on_all_positives_then_stage2(data):
    method = _redi(data, 0.8, stage1_steps=1)
    method.on_train_start(5, 1)
    assert method.stage == 1
    idx = [0, 2]
    (b,) = _with_items(method, method.prepare_batches([data.train.__getitems__(idx)]))
    rows = [(i, c) for i in idx for c in method.positives[i]]
    assert len(rows) == 3 and b["index"].tolist() == [0, 0, 2]
    for r, (i, c) in enumerate(rows):
        p = data.train.prompts[i]
        n = len(p) + len(c)
        assert b["input_ids"][r, :n].tolist() == p + c
        assert b["labels"][r].tolist() == [IGNORE_INDEX] * len(p) + c + [IGNORE_INDEX] * (b["labels"].shape[1] - n)
    loss = float(method.training_step(b).losses["student"].detach())
    nll = -sum(float(_seq_logp(method.student, data.train.prompts[i], c)) for i, c in rows)
    assert math.isclose(loss, nll / sum(len(c) for _, c in rows), rel_tol=1e-5)  # token-mean SFT
    method.on_optimizer_step()
    assert method.stage == 2
    (b2,) = method.prepare_batches([data.train.__getitems__(idx)])
    assert int(b2["stage"]) == 2 and int(b2["num_seqs"]) == 2


def test_redi_default_stage1_fraction(data):
    method = _redi(data, 0.8, stage1_fraction=0.3)
    method.on_train_start(10, 1)
    assert method.stage1_steps == 3


def test_redi_step_without_pairs_trains_nothing(data):
    method = _redi(data, 0.8, stage1_steps=0)
    (b,) = _with_items(method, method.prepare_batches([data.train.__getitems__([1])]))  # prompt 1: no negative
    assert float(b["num_items"]) == 0
    step = method.training_step(b)
    assert float(step.losses["student"]) == 0.0 and step.losses["student"].requires_grad
    step.losses["student"].backward()
    assert all(p.grad is None or not p.grad.any() for p in method.student.parameters())


def test_redi_samples_and_verifies_teacher_traces(data):
    """``num_traces`` teacher samples per prompt, split by the verifier (a stand-in that accepts even
    lengths, so both kinds occur), equal to one ``rollout`` call under the same seed."""
    tok = data.tokenizer
    fake = dataclasses.replace(data, verify=lambda text, ref: len(text) % 2 == 0)
    teacher = _model(tok, 1, scale=2.0)
    method = REDI(_model(tok, 0), teacher, REDIParams(num_traces=3, temperature=1.3, max_new_tokens=MAX_NEW),
                  fake.task_info(False))
    torch.manual_seed(4)
    method.on_train_start(4, 1)
    torch.manual_seed(4)
    r = rollout(teacher, data.train.prompts, max_new_tokens=MAX_NEW, eos_id=tok.eos_token_id,
                pad_id=tok.pad_token_id, temperature=1.3, num_samples=3)
    texts = r.texts(tok)
    for i in range(len(data.train)):
        cs = [(c, t) for c, t in zip(r.completions[3 * i : 3 * i + 3], texts[3 * i : 3 * i + 3])]
        assert method.positives[i] == [c for c, t in cs if len(t) % 2 == 0]
        assert method.negatives[i] == [c for c, t in cs if len(t) % 2 == 1]
    n_pos = sum(map(len, method.positives))
    assert 0 < n_pos < 3 * len(data.train) and method.trace_accuracy == n_pos / (3 * len(data.train))


def test_redi_needs_a_verifier(data):
    tok = data.tokenizer
    with pytest.raises(RecipeError, match="verifier"):
        REDI(_model(tok, 0), _model(tok, 1), REDIParams(), dataclasses.replace(data, verify=None).task_info(False))


# ---------------------------------------------------------------------------------------------- ADPO


def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def test_adpo_loss_k3_against_direct_formula():
    logp = [[-3.0, -5.0, -1.5], [-10.0, -2.0, -4.0]]
    ref = [[-2.5, -6.0, -2.0], [-9.0, -2.5, -3.0]]
    q = [[0.7, 0.3, 0.0], [0.2, 0.5, 0.3]]
    tau = 0.7
    direct = 0.0
    for lg, rg, qg in zip(logp, ref, q):
        p = _softmax([(a - b) / tau for a, b in zip(lg, rg)])
        direct += sum(qi * math.log(qi / pi) for qi, pi in zip(qg, p) if qi > 0)
    got = adpo_loss(torch.tensor(logp), torch.tensor(ref), torch.tensor(q), tau)
    assert math.isclose(float(got), direct / 2, rel_tol=1e-6)
    assert math.isclose(float(adpo_loss(torch.tensor(logp), torch.tensor(ref), torch.tensor(q), tau, 5.0)),
                        direct / 5, rel_tol=1e-6)


def test_adpo_dpo_case_value_and_gradient():
    """K = 2, q one-hot on the preferred completion: DPO, −log σ(((ℓ_w − ℓ_w^ref) − (ℓ_l − ℓ_l^ref))/τ)."""
    lw, ll, rw, rl, tau = -4.0, -3.0, -4.5, -2.0, 0.5
    logp = torch.tensor([[lw, ll], [ll, lw]], requires_grad=True)  # second group: the winner comes second
    ref = torch.tensor([[rw, rl], [rl, rw]])
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    loss = adpo_loss(logp, ref, q, tau)
    x = ((lw - rw) - (ll - rl)) / tau
    dpo = math.log(1 + math.exp(-x))  # −log σ(x)
    assert math.isclose(float(loss), dpo, rel_tol=1e-6)
    loss.backward()
    s = 1 / (1 + math.exp(x))  # σ(−x): DPO's gradient weight
    expect = [[-s / tau / 2, s / tau / 2], [s / tau / 2, -s / tau / 2]]  # mean over the two groups
    torch.testing.assert_close(logp.grad, torch.tensor(expect), rtol=1e-5, atol=1e-7)


def test_adpo_on_policy_anchor_gradient_is_reinforce():
    """Anchor = the policy detached: value KL(q ‖ uniform), gradient (1/τ)(1/K − q_i) per completion."""
    logp = torch.tensor([[-3.0, -1.0, -7.0]], requires_grad=True)
    q = torch.tensor([[0.5, 0.5, 0.0]])
    tau = 2.0
    loss = adpo_loss(logp, logp.detach(), q, tau)
    assert math.isclose(float(loss), 0.5 * math.log(0.5 * 3) * 2, rel_tol=1e-6)
    loss.backward()
    torch.testing.assert_close(logp.grad, (1 / 3 - q) / tau)


def test_adpo_targets():
    r = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 1.0]])
    q = reward_target(r, beta_reward=0.5)
    for row, qrow in zip(r.tolist(), q.tolist()):
        mean = sum(row) / 3
        std = math.sqrt(sum((x - mean) ** 2 for x in row) / 2)  # unbiased
        expect = _softmax([(x - mean) / (std + 1e-4) / 0.5 for x in row])
        assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(qrow, expect))
    # the official default (ADPOConfig.beta_reward 0.5): one right of three gives q ≈ (0.948, 0.026, 0.026)
    q0 = reward_target(torch.tensor([[1.0, 0.0, 0.0]]))[0].tolist()
    a_hi, a_lo = (1 - 1 / 3) / (math.sqrt(1 / 3) + 1e-4), (0 - 1 / 3) / (math.sqrt(1 / 3) + 1e-4)
    z = math.exp(2 * a_hi) + 2 * math.exp(2 * a_lo)
    assert q0 == pytest.approx([math.exp(2 * a_hi) / z] + [math.exp(2 * a_lo) / z] * 2, rel=1e-5)
    torch.testing.assert_close(best_target(r), torch.tensor([[1.0, 0, 0], [1 / 3, 1 / 3, 1 / 3], [0, 0.5, 0.5]]))


def _adpo(data, **kw) -> ADPO:
    tok = data.tokenizer
    return ADPO(_model(tok, 0), _model(tok, 1, scale=2.0), ADPOParams(max_new_tokens=MAX_NEW, **kw), data.task_info(False))


def test_adpo_samples_k_completions_per_prompt(data):
    tok = data.tokenizer
    method = _adpo(data, num_samples=3, temperature=1.2)
    idx = [4, 1]
    torch.manual_seed(2)
    (b,) = method.prepare_batches([data.train.__getitems__(idx)])
    torch.manual_seed(2)
    r = rollout(method.student, [data.train.prompts[i] for i in idx], max_new_tokens=MAX_NEW,
                eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, temperature=1.2, num_samples=3)
    ref = r.batch(tok.pad_token_id)
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(b[key], ref[key])
    assert b["index"].tolist() == [4, 4, 4, 1, 1, 1] and method.count_items(b) == 2
    expect = [float(data.verify(t, data.train.references[i])) for t, i in zip(r.texts(tok), [4, 4, 4, 1, 1, 1])]
    assert b["rewards"].tolist() == expect


def _hand_batch(data, rows: list[tuple[int, list[int]]], rewards: list[float], k: int):
    from distill.lm.data.text import Example, collate

    ex = [Example(data.train.prompts[i] + c, [IGNORE_INDEX] * len(data.train.prompts[i]) + c) for i, c in rows]
    b = collate(ex, data.tokenizer.pad_token_id)
    b["index"] = torch.tensor([i for i, _ in rows])
    b["groups"] = torch.tensor(len(rows) // k)
    b["rewards"] = torch.tensor(rewards)
    return b


def _completion(data, i: int) -> list[int]:
    return data.train.examples[i].input_ids[len(data.train.prompts[i]):]


def test_adpo_method_dpo_case(data):
    """The method with K = 2, ``target: correct`` (one right, one wrong) and the fixed anchor (the student
    at construction) is DPO with β = 1/τ against the initial student as the reference."""
    method = _adpo(data, num_samples=2, target="correct", anchor="fixed", tau=0.5)
    reference = copy.deepcopy(method.student)
    with torch.no_grad():  # move the student away from its anchor
        for p in method.student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    c0, c3 = _completion(data, 0), _completion(data, 3)
    rows = [(0, c0), (0, c0[1:]), (3, c3[::-1]), (3, c3)]
    b = _hand_batch(data, rows, [1.0, 0.0, 0.0, 1.0], 2)
    loss = method.training_step(b).losses["student"]
    expect = 0.0
    for (i, w), (_, lose) in ((rows[0], rows[1]), (rows[3], rows[2])):
        p = data.train.prompts[i]
        with torch.no_grad():
            x = ((_seq_logp(method.student, p, w) - _seq_logp(reference, p, w))
                 - (_seq_logp(method.student, p, lose) - _seq_logp(reference, p, lose))) / 0.5
        expect += -math.log(1 / (1 + math.exp(-float(x))))
    assert math.isclose(float(loss), expect / 2, rel_tol=1e-4)


def test_adpo_method_kd_case(data):
    """``target: teacher``, ``anchor: none``, τ = 1: forward KL from the teacher to the student, both
    renormalised on each prompt's list, both at the sampling temperature (1.4 here)."""
    method = _adpo(data, num_samples=3, target="teacher", anchor="none", temperature=1.4)
    rows = [(i, c) for i in (2, 5) for c in (_completion(data, i), _completion(data, i)[2:], _completion(data, 7))]
    b = _hand_batch(data, rows, [0.0] * 6, 3)
    loss = method.training_step(b).losses["student"]
    expect = 0.0
    with torch.no_grad():
        for g in range(2):
            group = rows[3 * g : 3 * g + 3]
            pt = _softmax([float(_seq_logp(method.teacher, data.train.prompts[i], c, 1.4)) for i, c in group])
            ps = _softmax([float(_seq_logp(method.student, data.train.prompts[i], c, 1.4)) for i, c in group])
            expect += sum(a * math.log(a / s) for a, s in zip(pt, ps))
    assert math.isclose(float(loss), expect / 2, rel_tol=1e-4)


def test_adpo_defaults_are_the_official_trainers():
    """``wk222/TRL-ADPO``: ADPOConfig.beta_reward 0.5, tau 1.0, GRPOConfig.temperature 1.0, on-policy anchor."""
    p = ADPOParams()
    assert (p.beta_reward, p.tau, p.temperature, p.anchor, p.target) == (0.5, 1.0, 1.0, "on_policy", "reward")


def _group_q(rewards: list[float], beta: float) -> list[float]:
    """The official q: softmax of (r − mean)/(unbiased std + 1e-4) / beta_reward, by hand."""
    mean = sum(rewards) / len(rewards)
    std = math.sqrt(sum((x - mean) ** 2 for x in rewards) / (len(rewards) - 1))
    return _softmax([(x - mean) / (std + 1e-4) / beta for x in rewards])


def test_adpo_method_reward_target_fixed_anchor_at_the_sampling_temperature(data):
    """K = 3 per prompt, q from rewards at the default beta_reward 0.5, the fixed anchor, τ = 0.7, sampling
    temperature 1.5: the step's value and gradient equal ``Σ_g Σ_i q_i log(q_i / p_i) / G`` with
    ``p = softmax((ℓ − ℓ^ref)/τ)`` and every ℓ a sum of log_softmax(logits / 1.5), written out per sequence."""
    T, tau = 1.5, 0.7
    method = _adpo(data, num_samples=3, anchor="fixed", tau=tau, temperature=T)
    reference = copy.deepcopy(method.student)
    with torch.no_grad():  # move the student away from its anchor
        for p in method.student.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    c0, c5 = _completion(data, 0), _completion(data, 5)
    rows = [(0, c0), (0, c0[1:]), (0, c0[::-1]), (5, c5[2:]), (5, c5), (5, _completion(data, 7))]
    rewards = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    b = _hand_batch(data, rows, rewards, 3)
    b["num_items"] = torch.tensor(2.0)
    method.student.zero_grad()
    step = method.training_step(b)
    step.losses["student"].backward()
    got = _grads(method.student)
    method.student.zero_grad()
    expect = 0.0
    for g in range(2):
        group = rows[3 * g : 3 * g + 3]
        q = _group_q(rewards[3 * g : 3 * g + 3], 0.5)
        u = [(_seq_logp(method.student, data.train.prompts[i], c, T)
              - _seq_logp(reference, data.train.prompts[i], c, T).detach()) / tau for i, c in group]
        log_z = torch.logsumexp(torch.stack(u), 0)
        expect = expect + sum(qi * (math.log(qi) - (ui - log_z)) for qi, ui in zip(q, u)) / 2
    assert math.isclose(float(step.losses["student"]), float(expect.detach()), rel_tol=1e-4)
    expect.backward()
    for a, e in zip(got, _grads(method.student)):
        torch.testing.assert_close(a.double(), e.double(), rtol=1e-3, atol=1e-6)


def test_adpo_default_on_policy_step_is_reinforce_with_the_official_q(data):
    """The default configuration (on-policy anchor, beta_reward 0.5) at temperature 1.3 and τ = 2: value
    ``KL(q ‖ uniform)`` per prompt and gradient ``Σ_i (1/K − q_i)/τ · ∇ℓ_i / G``, ℓ at logits / 1.3."""
    T, tau = 1.3, 2.0
    method = _adpo(data, num_samples=3, tau=tau, temperature=T)
    c2 = _completion(data, 2)
    rows = [(2, c2), (2, c2[1:]), (2, c2[::-1])]
    rewards = [0.0, 1.0, 0.0]
    b = _hand_batch(data, rows, rewards, 3)
    method.student.zero_grad()
    step = method.training_step(b)
    step.losses["student"].backward()
    got = _grads(method.student)
    method.student.zero_grad()
    q = _group_q(rewards, 0.5)
    assert math.isclose(float(step.losses["student"]), sum(x * math.log(3 * x) for x in q), rel_tol=1e-5)
    surrogate = sum((1 / 3 - qi) / tau * _seq_logp(method.student, data.train.prompts[i], c, T)
                    for qi, (i, c) in zip(q, rows))
    surrogate.backward()
    for a, e in zip(got, _grads(method.student)):
        torch.testing.assert_close(a.double(), e.double(), rtol=1e-3, atol=1e-6)


def test_adpo_ema_anchor_update(data):
    d = 0.9
    method = _adpo(data, anchor="ema", ema_decay=d)
    assert all(not p.requires_grad for p in method.anchor.parameters())
    groups = method.param_groups()["student"]
    assert {id(p) for p in groups} == {id(p) for p in method.student.parameters()}  # the anchor is not trained
    assert any(k.startswith("anchor.") for k in method.state_dict())  # checkpointed
    before = [p.detach().clone() for p in method.anchor.parameters()]
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(torch.randn_like(p))
    method.on_optimizer_step()
    for a, a0, s in zip(method.anchor.parameters(), before, method.student.parameters()):
        torch.testing.assert_close(a, d * a0 + (1 - d) * s)
    fixed = _adpo(data, anchor="fixed")
    before = [p.detach().clone() for p in fixed.anchor.parameters()]
    with torch.no_grad():
        for p in fixed.student.parameters():
            p.add_(1.0)
    fixed.on_optimizer_step()
    assert all(torch.equal(a, b) for a, b in zip(fixed.anchor.parameters(), before))
    method.train()
    assert method.student.training and not method.anchor.training


def test_adpo_reward_target_needs_a_verifier(data):
    tok = data.tokenizer
    info = dataclasses.replace(data, verify=None).task_info(False)
    with pytest.raises(RecipeError, match="verifier"):
        ADPO(_model(tok, 0), _model(tok, 1), ADPOParams(target="reward"), info)
    ADPO(_model(tok, 0), _model(tok, 1), ADPOParams(target="teacher"), info)  # teacher scores need none


# ---------------------------------------------------------------------------------------------- runs


TASK = {"name": "arithmetic", "num_train": 48, "num_val": 8, "num_test": 8, "max_digits": 2, "eval_size": 4}
TRAIN = {"batch_size": 8, "lr": 0.003, "progress": False, "trackers": "none", "log_every": 1}
TEACHER = {"name": "tiny-lm-teacher", "seed": 0, "task": TASK, "method": "sft", "train": {**TRAIN, "epochs": 1},
           "student": {"arch": "llama", "hidden": 32, "layers": 1, "heads": 2}}
INIT = {"name": "tiny-lm-sft", "seed": 0, "task": TASK, "method": "sft", "train": {**TRAIN, "max_steps": 2},
        "student": {"arch": "llama", "hidden": 16, "layers": 1, "heads": 2}}


def _recipe(name: str, method: dict, **train) -> dict:
    return {"name": name, "seed": 0, "task": TASK, "init": {"recipe": INIT}, "teacher": {"recipe": TEACHER},
            "method": method, "train": {**TRAIN, "max_steps": 2, **train}}


def _run(name: str, method: dict, runs, **train):
    return run_recipe(recipe_from_dict(_recipe(name, method, **train)), out=runs)


def test_redi_and_adpo_end_to_end(tmp_runs):
    redi = _run("tiny-redi", {"name": "redi", "num_traces": 2, "stage1_steps": 1, "max_new_tokens": 24}, tmp_runs)
    adpo = _run("tiny-adpo", {"name": "adpo", "num_samples": 2, "anchor": "ema", "max_new_tokens": 24}, tmp_runs,
                grad_accum=2)
    for res in (redi, adpo):
        m = json.loads((res.run_dir / "metrics.json").read_text())
        assert 0.0 <= m["test/exact_match"] <= 1.0 and m["test/token_kl"] >= 0.0
        assert (res.run_dir / "student" / "config.json").is_file()
    rows = [r for r in redi.history if "train/loss" in r]
    assert [r["train/stage"] for r in rows] == [1.0, 2.0]
    assert all(math.isfinite(r["train/loss"]) for r in rows)
    rows = [r for r in adpo.history if "train/loss" in r]
    assert len(rows) == 2 and all(math.isfinite(r["train/loss"]) and r["train/loss"] >= 0 for r in rows)
    assert all(0.0 <= r["train/reward"] <= 1.0 for r in rows)


@pytest.mark.slow
@pytest.mark.parametrize("method", [{"name": "redi", "num_traces": 2, "stage1_steps": 1, "temperature": 1.5},
                                    {"name": "adpo", "num_samples": 2, "anchor": "ema", "ema_decay": 0.5}])
def test_resume_is_bitwise(tmp_runs, method):
    """REDI's traces are resampled identically and its stage counter is checkpointed; ADPO's EMA anchor
    is checkpointed: an interrupted and resumed run equals a straight one, anchor included."""
    data = _recipe("resume", {**method, "max_new_tokens": 24}, max_steps=3)
    straight = run_recipe(recipe_from_dict(data), out=tmp_runs / "a", refs_out=tmp_runs)
    with pytest.raises(Interrupted):
        run_recipe(recipe_from_dict(data), out=tmp_runs / "b", stop_at_step=2, refs_out=tmp_runs)
    resumed = run_recipe(recipe_from_dict(data), out=tmp_runs / "b", resume=True, refs_out=tmp_runs)
    for name in ("student/model.safetensors", "checkpoints/latest/model.safetensors"):
        wa = load_file(str(straight.run_dir / name))
        wb = load_file(str(resumed.run_dir / name))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
    ckpt = load_file(str(straight.run_dir / "checkpoints/latest/model.safetensors"))
    if method["name"] == "adpo":
        assert any(k.startswith("anchor.") for k in ckpt)
    else:
        assert int(ckpt["steps_done"]) == 3
