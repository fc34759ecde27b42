"""The policy-gradient machinery (``distill.lm.policy``) and ``grpo``, ``gopd`` (S18): group advantages,
clipping and the k3 KL on hand-built numbers; the token mean over the optimizer step; sampled batches
against a fresh forward pass; each method's loss and gradient against an independently written loop; the
special case ``gopd`` at λ = 1 (on-policy reverse-KL distillation); rollout reuse (μ > 1) and its
checkpoint; tiny end-to-end runs from recipes. (``rlad``'s own tests: ``test_lm_rlad.py``; TRL's loss
types and reward scaling: ``test_lm_grpo_loss_types.py``.)"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics

import pytest
import torch
from safetensors.torch import load_file

from distill.core.recipe import recipe_from_dict
from distill.core.runner import run_recipe
from distill.errors import Interrupted, MissingFileError, RecipeError
from distill.lm.methods.gopd import GOPD, GOPDParams, gopd_advantages
from distill.lm.methods.grpo import GRPO, GRPOParams
from distill.lm.losses import token_logprobs
from distill.lm.policy import (
    clipped_policy_loss,
    clipped_surrogate,
    group_advantages,
    k3_kl,
    sample_groups,
    verifier_rewards,
)
from distill.lm.methods.rlad import RLAD, RLADParams
from distill.lm.data.tasks import ArithmeticParams, build_arithmetic
from distill.lm.data.text import IGNORE_INDEX
from policy_helpers import assert_grads_close as _assert_grads_close, grads as _grads, parity_task, prepare as _prepare
from policy_helpers import row_logprobs as _row_logprobs, tiny_lm as _lm


@pytest.fixture(scope="module")
def parity():
    return parity_task()


MAX_NEW = 10


@pytest.fixture(scope="module")
def data():
    return build_arithmetic(ArithmeticParams(num_train=32, num_val=8, num_test=8, eval_size=4))


def _rows(batch, key: str):
    """The per-token tensor ``batch[key]`` ([N, seq-1]) as the same per-row lists as ``_row_logprobs``."""
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    return [batch[key][r][mask[r]].double() for r in range(mask.shape[0])]


# ------------------------------------------------------------------------------------- advantages


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.5])
    groups = torch.tensor([7, 2, 7, 2, 2, 7, 3, 3, 9])  # any ids, interleaved; 3: equal rewards; 9: alone
    got = group_advantages(rewards, groups)
    pop = group_advantages(rewards, groups, unbiased=False)
    raw = group_advantages(rewards, groups, scale="none")
    for i, g in enumerate(groups.tolist()):
        members = [float(r) for r, h in zip(rewards, groups.tolist()) if h == g]
        mean = statistics.fmean(members)
        sample = statistics.stdev(members) if len(members) > 1 else 0.0
        assert math.isclose(float(got[i]), (float(rewards[i]) - mean) / (sample + 1e-4), rel_tol=1e-6, abs_tol=1e-7)
        assert math.isclose(float(pop[i]), (float(rewards[i]) - mean) / (statistics.pstdev(members) + 1e-4),
                            rel_tol=1e-6, abs_tol=1e-7)
        assert math.isclose(float(raw[i]), float(rewards[i]) - mean, abs_tol=1e-7)
    assert got[6] == 0 and got[7] == 0 and got[8] == 0  # no spread, or a group of one: no signal
    # TRL's formula on consecutive groups of G: (r − mean) / (tensor.std(dim=1) + 1e-4), std unbiased
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    trl = (r.view(-1, 4) - r.view(-1, 4).mean(1, keepdim=True)) / (r.view(-1, 4).std(1, keepdim=True) + 1e-4)
    torch.testing.assert_close(group_advantages(r, torch.arange(2).repeat_interleave(4)), trl.reshape(-1))


# ------------------------------------------------------------------------------------------ clipping


def test_clipped_surrogate_values_clipped_tokens_and_gradients():
    ratios = torch.tensor([0.5, 0.9, 1.0, 1.1, 1.25, 1.5])
    anchor = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.5, -0.7])
    for adv, eps_high in ((1.0, None), (-1.0, None), (1.0, 0.28), (-0.5, 0.28)):
        logp = (anchor + ratios.log()).clone().requires_grad_(True)
        loss, clipped, rho = clipped_surrogate(logp.unsqueeze(0), anchor.unsqueeze(0), torch.tensor([adv]), 0.2,
                                               eps_high)
        hi = 0.2 if eps_high is None else eps_high
        loss.sum().backward()
        for j, q in enumerate(ratios.tolist()):
            expect = -min(q * adv, min(max(q, 0.8), 1 + hi) * adv)
            assert math.isclose(float(loss[0, j].detach()), expect, rel_tol=1e-6, abs_tol=1e-7)
            flat = (q < 0.8 and adv < 0) or (q > 1 + hi and adv > 0)
            assert bool(clipped[0, j]) == flat
            # d/dlogp of −ρA is −ρA on the unclipped branch, 0 on the flat clipped one
            assert math.isclose(float(logp.grad[j]), 0.0 if flat else -q * adv, rel_tol=1e-5, abs_tol=1e-7)
            assert math.isclose(float(rho[0, j].detach()), q, rel_tol=1e-6)
    # ε = 0.2 clips 1.25 and 1.5 for A > 0 and 0.5 for A < 0; ε_high = 0.28 frees 1.25
    _, c, _ = clipped_surrogate(anchor + ratios.log(), anchor, torch.ones(6), 0.2)
    assert c.tolist() == [False, False, False, False, True, True]
    _, c, _ = clipped_surrogate(anchor + ratios.log(), anchor, torch.ones(6), 0.2, 0.28)
    assert c.tolist() == [False, False, False, False, False, True]
    # per-token advantages: each token its own sign
    adv = torch.tensor([[-1.0, 1.0, -1.0, 1.0, -1.0, 1.0]])
    _, c, _ = clipped_surrogate((anchor + ratios.log()).unsqueeze(0), anchor.unsqueeze(0), adv, 0.2)
    assert c.tolist() == [[True, False, False, False, False, True]]


def test_k3_kl_values_gradient_and_expectation():
    logp = torch.tensor([-1.0, -2.0, -0.3, -4.0], requires_grad=True)
    ref = torch.tensor([-1.0, -1.0, -2.0, -0.5])
    k = k3_kl(logp, ref)
    for j in range(4):
        q = math.exp(float(ref[j]) - float(logp[j]))
        assert math.isclose(float(k[j]), q - math.log(q) - 1, rel_tol=1e-6, abs_tol=1e-7)
    assert float(k[0]) == 0.0 and (k >= 0).all()
    k.sum().backward()
    torch.testing.assert_close(logp.grad, 1 - (ref - logp.detach()).exp())
    # unbiased: E_{x∼π}[k3(x)] = KL(π ‖ ref), exactly over a small categorical
    pi = torch.log_softmax(torch.tensor([0.3, -1.0, 2.0, 0.1], dtype=torch.float64), 0)
    rf = torch.log_softmax(torch.tensor([1.0, 0.5, -0.2, 0.0], dtype=torch.float64), 0)
    torch.testing.assert_close((pi.exp() * k3_kl(pi, rf)).sum(), (pi.exp() * (pi - rf)).sum())


def test_token_mean_over_the_step_under_accumulation():
    """Micro-batch losses computed with the step's num_items sum to the loss (and gradient) of the big batch."""
    g = torch.Generator().manual_seed(0)
    logp = (-torch.rand(6, 5, generator=g) * 3).requires_grad_(True)
    old = logp.detach() + 0.3 * torch.randn(6, 5, generator=g)
    ref = logp.detach() + 0.5 * torch.randn(6, 5, generator=g)
    adv = torch.randn(6, generator=g)
    mask = torch.rand(6, 5, generator=g) > 0.3
    kw = dict(epsilon_low=0.2, ref_logp=ref, kl_coef=0.05)
    big = clipped_policy_loss(logp, old, adv, mask, **kw)
    big.loss.backward()
    g_big, logp.grad = logp.grad.clone(), None
    n = mask.sum()
    parts = [clipped_policy_loss(logp[s], old[s], adv[s], mask[s], num_items=n, **{**kw, "ref_logp": ref[s]})
             for s in (slice(0, 2), slice(2, 6))]
    sum(p.loss for p in parts).backward()
    torch.testing.assert_close(sum(p.loss for p in parts), big.loss)
    torch.testing.assert_close(logp.grad, g_big)
    for f in ("clip_fraction", "ratio", "kl"):
        torch.testing.assert_close(sum(getattr(p, f) for p in parts), getattr(big, f))
    # the big-batch value, by a direct loop over the valid tokens
    total = 0.0
    for i in range(6):
        for t in range(5):
            if mask[i, t]:
                q = math.exp(float(logp[i, t]) - float(old[i, t]))
                a = float(adv[i])
                d = float(ref[i, t]) - float(logp[i, t])
                total += -min(q * a, min(max(q, 0.8), 1.2) * a) + 0.05 * (math.exp(d) - d - 1)
    assert math.isclose(float(big.loss), total / int(n), rel_tol=1e-5)
    assert float(big.clip_fraction) > 0  # the hand-built ratios leave the trust region somewhere


# ------------------------------------------------------------------------------------------ sampling


def test_sample_groups_rows_logprobs_and_rewards(data):
    tok = data.tokenizer
    model = _lm(tok, 0)
    idx = torch.tensor([5, 2, 9])
    prompts = [data.train.prompts[i] for i in idx.tolist()]
    torch.manual_seed(1)
    b, r = sample_groups(model, prompts, idx, tok, group_size=3, max_new_tokens=MAX_NEW, temperature=1.3)
    assert b["index"].tolist() == [5, 5, 5, 2, 2, 2, 9, 9, 9] and b["group"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    lp, mask = token_logprobs(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                              b["labels"], 1.3)
    for row, (p, c) in enumerate(zip(r.prompts, r.completions)):
        assert p == data.train.prompts[int(b["index"][row])]
        assert b["input_ids"][row, : len(p) + len(c)].tolist() == p + c
        assert b["labels"][row, : len(p)].eq(IGNORE_INDEX).all() and b["labels"][row, len(p) : len(p) + len(c)].tolist() == c
        # the generation's log-probs sit at token_logprobs' positions and agree with a forward pass
        pos = mask[row].nonzero().squeeze(-1)
        assert pos.tolist() == list(range(len(p) - 1, len(p) - 1 + len(c)))
        torch.testing.assert_close(b["sample_logprobs"][row, pos], lp[row, pos].detach(), rtol=0, atol=2e-4)
        assert (b["sample_logprobs"][row][~mask[row]] == 0).all()
    texts = r.texts(tok)
    rewards = verifier_rewards(texts, [data.train.references[i] for i in b["index"].tolist()], data.verify)
    assert rewards.tolist() == [float(data.verify(t, data.train.references[int(i)])) for t, i in zip(texts, b["index"])]


def test_methods_need_a_verifier_and_a_reference_path(data, tmp_path):
    tok = data.tokenizer
    blind = dataclasses.replace(data, verify=None)
    for cls, params in ((GRPO, GRPOParams()), (RLAD, RLADParams())):
        with pytest.raises(RecipeError, match="verifier"):
            cls(_lm(tok, 0), _lm(tok, 1), params, blind.task_info(False))
    GOPD(_lm(tok, 0), _lm(tok, 1), GOPDParams(), blind.task_info(False))  # distillation needs no verifier
    with pytest.raises(MissingFileError, match="reference"):
        GOPD(_lm(tok, 0), _lm(tok, 1), GOPDParams(reference=str(tmp_path / "nope")), data.task_info(False))


# ---------------------------------------------------------------------------------------------- grpo


def test_grpo_loss_and_gradient_against_a_direct_loop(parity):
    tok = parity.tokenizer
    student = _lm(tok, 0)
    method = GRPO(student, None, GRPOParams(group_size=4, kl_coef=0.1, temperature=1.2, max_new_tokens=MAX_NEW),
                  parity.task_info(False))
    with torch.no_grad():  # the reference is the initial student; move the student away from it
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batches = _prepare(method, parity, [[0, 3, 5], [7, 9]])
    rewards = torch.cat([b["reward"] for b in batches])
    assert 0 < float(rewards.mean()) < 1
    total, grads = 0.0, None
    for b in batches:
        step = method.training_step(b)
        step.losses["student"].backward()
        total += float(step.losses["student"])
        assert float(step.metrics["reward"]) == float(rewards.mean()) and float(step.metrics["clip_frac"]) == 0
    grads = _grads(student)
    # independently: advantages per group by hand, ρ = 1 (μ = 1), −A·logπ + β·k3 to the initial student
    expect, n = 0.0, float(batches[0]["num_items"])
    for b in batches:
        rows = _row_logprobs(student, b, 1.2)
        refs = _rows(b, "ref_logprobs")
        for r, (lp, ref) in enumerate(zip(rows, refs)):
            members = [float(x) for x, g in zip(b["reward"], b["group"]) if g == b["group"][r]]
            a = (float(b["reward"][r]) - statistics.fmean(members)) / (statistics.stdev(members) + 1e-4)
            d = ref - lp
            expect = expect + (-a * torch.exp(lp - lp.detach()) + 0.1 * (d.exp() - d - 1)).sum() / n
    assert math.isclose(total, float(expect), rel_tol=1e-5, abs_tol=1e-7)
    expect.backward()
    _assert_grads_close(grads, _grads(student))
    assert method.ref is not None and all(not p.requires_grad for p in method.ref.parameters())


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo", "dr_grpo"])
def test_grpo_micro_batches_sum_to_the_big_batch(parity, loss_type):
    """The engine's reduction: a sampled step split into two uneven micro-batches (same rows, the step's
    ``num_items`` and ``num_seqs``) gives the loss and the gradient of the single batch."""
    tok = parity.tokenizer
    student = _lm(tok, 0)
    method = GRPO(student, None, GRPOParams(max_new_tokens=MAX_NEW, loss_type=loss_type), parity.task_info(False))
    (big,) = _prepare(method, parity, [[1, 4, 6, 8]])
    assert float(big["num_seqs"]) == 16
    whole = method.training_step(big)
    whole.losses["student"].backward()
    g_whole = _grads(student)
    parts = []
    for rows in (slice(0, 4), slice(4, 16)):
        parts.append({k: (v[rows] if v.dim() and k != "num_items" else v) for k, v in big.items()})
    steps = [method.training_step(p) for p in parts]
    sum(s.losses["student"] for s in steps).backward()
    torch.testing.assert_close(sum(s.losses["student"] for s in steps), whole.losses["student"])
    _assert_grads_close(g_whole, _grads(student), rtol=1e-5)


# ---------------------------------------------------------------------------------------------- gopd


def test_gopd_advantage_by_hand():
    t, r, o = torch.tensor([-0.5, -2.0]), torch.tensor([-1.0, -0.2]), torch.tensor([-0.7, -1.1])
    for lam in (0.0, 0.5, 1.0, 1.25):
        got = gopd_advantages(t, r, o, lam)
        for j in range(2):
            expect = lam * (float(t[j]) - float(r[j])) - (float(o[j]) - float(r[j]))
            assert math.isclose(float(got[j]), expect, rel_tol=1e-6, abs_tol=1e-6)
    # λ = 1: the reference cancels (the teacher-minus-student log-prob of on-policy distillation)
    torch.testing.assert_close(gopd_advantages(t, r, o, 1.0), t - o)
    assert torch.equal(gopd_advantages(t, None, o, 1.0), t - o)
    with pytest.raises(ValueError):
        gopd_advantages(t, None, o, 1.25)


def test_gopd_lambda1_is_on_policy_reverse_kl(data):
    """At λ = 1 (reference cancelled, none built) and ρ = 1 the clipped objective's value is the reverse-KL
    estimate Σ (log π_S − log π_T) / n over the sampled tokens, and its gradient is the score-function
    gradient of that estimator with the samples fixed, Σ sg(log π_S − log π_T)·∇log π_S / n."""
    tok = data.tokenizer
    student, teacher = _lm(tok, 0), _lm(tok, 1)
    method = GOPD(student, teacher, GOPDParams(lmbda=1.0, group_size=2, max_new_tokens=MAX_NEW), data.task_info(False))
    assert method.ref is None
    batches = _prepare(method, data, [[0, 1], [2, 3, 4]])
    total, kl = 0.0, 0.0
    for b in batches:
        step = method.training_step(b)
        step.losses["student"].backward()
        total += float(step.losses["student"])
        kl += float(step.metrics["reverse_kl"])
    grads = _grads(student)
    n, value, surrogate = float(batches[0]["num_items"]), 0.0, 0.0
    for b in batches:
        for lp, lt in zip(_row_logprobs(student, b), _row_logprobs(teacher, b)):
            diff = (lp - lt).detach()
            value += float(diff.sum()) / n
            surrogate = surrogate + (diff * lp).sum() / n
    assert math.isclose(total, value, rel_tol=1e-5, abs_tol=1e-7) and math.isclose(kl, value, rel_tol=1e-5, abs_tol=1e-7)
    surrogate.backward()
    _assert_grads_close(grads, _grads(student))


def test_gopd_extrapolation_with_the_initial_student_and_a_reference_folder(data, tmp_path):
    tok = data.tokenizer
    student, teacher = _lm(tok, 0), _lm(tok, 1)
    method = GOPD(student, teacher, GOPDParams(lmbda=1.25, max_new_tokens=MAX_NEW), data.task_info(False))
    init = {k: v.clone() for k, v in student.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert all(torch.equal(v, init[k]) for k, v in method.ref.state_dict().items())  # a frozen copy
    (b,) = _prepare(method, data, [[3, 5, 7]])
    step = method.training_step(b)
    step.losses["student"].backward()
    grads = _grads(student)
    ref_rows = _row_logprobs(method.ref, b)
    expect, n = 0.0, float(b["num_items"])
    for lp, lt, lr in zip(_row_logprobs(student, b), _row_logprobs(teacher, b), ref_rows):
        adv = (1.25 * (lt - lr) - (lp - lr)).detach()
        expect = expect - (adv * torch.exp(lp - lp.detach())).sum() / n
    torch.testing.assert_close(step.losses["student"].double(), expect.detach(), rtol=1e-5, atol=1e-7)
    expect.backward()
    _assert_grads_close(grads, _grads(student))
    # reference: a saved model folder ("reward correction" with the teacher's base) is loaded frozen
    base = _lm(tok, 7)
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(str(tmp_path / "base"))
    m2 = GOPD(_lm(tok, 0), teacher, GOPDParams(lmbda=1.25, reference=str(tmp_path / "base")), data.task_info(False))
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in m2.ref.state_dict().items())
    assert all(not p.requires_grad for p in m2.ref.parameters())


# ------------------------------------------------------------------------------------------- reuse (μ)


def test_rollouts_reused_for_num_iterations_steps(parity):
    tok = parity.tokenizer
    student = _lm(tok, 0)
    method = GRPO(student, None, GRPOParams(group_size=4, num_iterations=2, max_new_tokens=MAX_NEW),
                  parity.task_info(False))
    first = _prepare(method, parity, [[0, 1, 2]], seed=0)
    (b,) = first
    logp0, mask = token_logprobs(method.student_logits(b), b["labels"])
    s0 = method.training_step(b)
    assert "old_logprobs" in b and torch.equal(b["old_logprobs"], logp0.detach())  # kept at first use
    assert float(s0.metrics["clip_frac"]) == 0 and math.isclose(float(s0.metrics["ratio"]), 1.0, rel_tol=1e-6)
    with torch.no_grad():  # an optimizer step that moves the policy a lot
        for p in student.parameters():
            p.add_(0.3 * torch.randn_like(p))
    state = method.state_extra()
    second = method.prepare_batches([parity.train.__getitems__([10, 11, 12])])  # the engine's new prompts
    assert second is first  # the same rollouts (and old log-probs), not new samples
    s1 = method.training_step(b)
    logp1, _ = token_logprobs(method.student_logits(b), b["labels"])
    per, clipped, rho = clipped_surrogate(logp1, logp0, b["advantages"], 0.2)
    n = float(b["num_items"])
    torch.testing.assert_close(s1.losses["student"], per[mask].sum() / n)
    assert float(s1.metrics["clip_frac"]) > 0  # the trust region acts from the second use on
    assert math.isclose(float(s1.metrics["clip_frac"]), int(clipped[mask].sum()) / n, rel_tol=1e-6)
    third = method.prepare_batches([parity.train.__getitems__([10, 11, 12])])
    assert third is not first and third[0]["index"].tolist() == [i for i in (10, 11, 12) for _ in range(4)]
    # the buffer survives a checkpoint: JSON round trip, bitwise
    restored = GRPO(_lm(tok, 0), None, GRPOParams(group_size=4, num_iterations=2), parity.task_info(False))
    restored.load_state_extra(json.loads(json.dumps(state)))
    (rb,) = restored.prepare_batches([parity.train.__getitems__([0])])
    assert rb.keys() == {k for k in b if k != "num_items"}
    assert all(torch.equal(rb[k], b[k]) and rb[k].dtype == b[k].dtype for k in rb)
    assert restored.prepare_batches([parity.train.__getitems__([0])])[0] is not rb  # its second use was the last


# ------------------------------------------------------------------------------------------------ runs


TASK = {"name": "arithmetic", "num_train": 48, "num_val": 8, "num_test": 8, "max_digits": 1, "eval_size": 4}
TRAIN = {"batch_size": 8, "lr": 0.003, "progress": False, "trackers": "none", "log_every": 1}
SFT = {"name": "tiny-sft", "seed": 0, "task": TASK, "student": {"arch": "llama", "hidden": 16, "layers": 1, "heads": 2},
       "method": "sft", "train": {**TRAIN, "epochs": 1}}
TEACHER = {**SFT, "name": "tiny-teacher", "student": {"arch": "llama", "hidden": 32, "layers": 1, "heads": 2}}


def _rl_recipe(name: str, method: dict, **train) -> dict:
    r = {"name": name, "seed": 0, "task": TASK, "init": {"recipe": SFT}, "method": {"max_new_tokens": 12, **method},
         "train": {**TRAIN, "max_steps": 2, "lr": 1e-3, "schedule": "constant", **train}}
    if method["name"] != "grpo":
        r["teacher"] = {"recipe": TEACHER}
    return r


@pytest.mark.slow
def test_each_method_end_to_end(tmp_runs):
    runs = {m["name"] + str(m.get("lmbda", "")): run_recipe(recipe_from_dict(_rl_recipe(f"tiny-{i}", m)), out=tmp_runs)
            for i, m in enumerate([{"name": "grpo", "group_size": 2, "kl_coef": 0.05, "loss_type": "dr_grpo",
                                    "scale_rewards": "batch"},
                                   {"name": "gopd", "lmbda": 1.25},
                                   {"name": "rlad", "group_size": 2, "num_iterations": 2, "loss_type": "grpo"}])}
    for key, res in runs.items():
        m = json.loads((res.run_dir / "metrics.json").read_text())
        assert 0.0 <= m["test/exact_match"] <= 1.0 and (res.run_dir / "student" / "config.json").is_file()
        rows = [r for r in res.history if "train/loss" in r]
        assert len(rows) == 2 and all(math.isfinite(r["train/loss"]) and 0 <= r["train/clip_frac"] <= 1 for r in rows)
        assert all(0 <= r["train/reward"] <= 1 for r in rows)  # gopd logs it too (not in its objective)
    assert all("train/kl" in r for r in runs["grpo"].history if "train/loss" in r)
    assert all("train/reverse_kl" in r for r in runs["gopd1.25"].history if "train/loss" in r)
    assert len(list((tmp_runs / "_teachers").iterdir())) == 2  # the init and the teacher, trained once each


@pytest.mark.slow
def test_reused_rollouts_resume_bitwise(tmp_runs):
    """With μ = 2 an interruption after step 1 leaves rollouts to reuse: they travel in the checkpoint, so the
    resumed run equals the straight one bitwise. (``gopd``: its per-token advantages never all vanish, so
    every step moves the weights.)"""
    data = _rl_recipe("resume", {"name": "gopd", "lmbda": 1.25, "group_size": 2, "num_iterations": 2}, max_steps=3)
    straight = run_recipe(recipe_from_dict(data), out=tmp_runs / "a")
    with pytest.raises(Interrupted):
        run_recipe(recipe_from_dict(data), out=tmp_runs / "b", stop_at_step=1)
    resumed = run_recipe(recipe_from_dict(data), out=tmp_runs / "b", resume=True)
    wa = load_file(str(straight.run_dir / "student" / "model.safetensors"))
    wb = load_file(str(resumed.run_dir / "student" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    init = load_file(str(next((tmp_runs / "a" / "_teachers").glob("tiny-sft-*")) / "student" / "model.safetensors"))
    assert any(not torch.equal(wa[k], init[k]) for k in wa)  # training moved the student
    curve = [(r["step"], r["train/loss"], r["train/clip_frac"]) for r in straight.history if "train/loss" in r]
    assert curve == [(r["step"], r["train/loss"], r["train/clip_frac"]) for r in resumed.history if "train/loss" in r]
    assert curve[0][2] == 0 and curve[1][2] >= 0  # step 2 reuses step 1's rollouts
