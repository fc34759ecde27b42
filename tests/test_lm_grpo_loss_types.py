"""TRL's ``loss_type`` and ``scale_rewards`` (``trl/trainer/grpo_trainer.py`` at v1.9.0): each reduction of
:func:`distill.lm.policy.clipped_policy_loss` against explicit loops over rows and tokens, its micro-batch
sum against the big batch, the reward scalings against hand-computed advantages, and the methods
(``grpo``, ``gopd``) threading the settings (``num_seqs``, ``max_len``, the step-wide reward std, the clip
bounds and the KL weight) into their loss."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from distill.core.recipe import recipe_from_dict
from distill.errors import RecipeError
from distill.lm.data.text import IGNORE_INDEX
from distill.lm.methods.gopd import GOPD, GOPDParams
from distill.lm.methods.grpo import GRPO, GRPOParams
from distill.lm.policy import clipped_policy_loss, group_advantages, reward_std
from policy_helpers import grads as _grads, parity_task, prepare as _prepare, row_logprobs as _row_logprobs
from policy_helpers import tiny_lm as _lm


@pytest.fixture(scope="module")
def parity():
    return parity_task()


MAX_NEW = 10
LOSS_TYPES = ["dapo", "grpo", "bnpo", "dr_grpo"]


def _tensors(seed: int = 0, n: int = 5, t: int = 6):
    """Log-probs, an anchor far enough for both clip bounds to act, a reference, per-sequence advantages of
    both signs and a mask whose rows have different lengths (row 3 has no token: TRL's clamp(min=1))."""
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(n, t, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    anchor = logp.detach() + 0.4 * torch.randn(n, t, generator=g, dtype=torch.float64)
    ref = logp.detach() + 0.5 * torch.randn(n, t, generator=g, dtype=torch.float64)
    adv = torch.tensor([1.3, -0.7, 0.4, 2.0, -1.1], dtype=torch.float64)[:n]
    lengths = [6, 2, 4, 0, 5][:n]
    mask = torch.tensor([[j < lengths[i] for j in range(t)] for i in range(n)])
    return logp, anchor, ref, adv, mask


def _loop_token_loss(logp, anchor, ref, adv, i, t, eps_low, eps_high, beta):
    """One token's loss, written out: −min(ρA, clip(ρ, 1 − ε_low, 1 + ε_high)A) + β·(e^d − d − 1), d = ref − logp
    (a float64 scalar with autograd through ``logp``)."""
    rho = torch.exp(logp[i, t] - float(anchor[i, t]))
    a = float(adv[i])
    clipped = min(max(rho.item(), 1 - eps_low), 1 + eps_high)
    # the clipped branch is a constant: its gradient is 0
    surrogate = -(rho * a) if rho.item() * a <= clipped * a else rho * 0 - clipped * a
    d = float(ref[i, t]) - logp[i, t]
    return surrogate + beta * (torch.exp(d) - d - 1)


def _loop_loss(loss_type, logp, anchor, ref, adv, mask, eps_low=0.2, eps_high=0.28, beta=0.05, max_len=None):
    """TRL's ``_compute_loss`` reductions, by explicit loops over rows and tokens (one micro-batch)."""
    n, t_len = mask.shape
    rows = []
    for i in range(n):
        toks = [_loop_token_loss(logp, anchor, ref, adv, i, t, eps_low, eps_high, beta)
                for t in range(t_len) if mask[i, t]]
        rows.append(toks)
    total = sum((x for toks in rows for x in toks), torch.zeros((), dtype=torch.float64))
    count = sum(len(toks) for toks in rows)
    if loss_type in ("dapo", "bnpo"):
        return total / count
    if loss_type == "grpo":
        return sum((sum(toks, torch.zeros((), dtype=torch.float64)) / max(len(toks), 1) for toks in rows),
                   torch.zeros((), dtype=torch.float64)) / n
    assert loss_type == "dr_grpo"
    return total / (n * (t_len if max_len is None else max_len))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_each_loss_type_against_explicit_loops(loss_type):
    logp, anchor, ref, adv, mask = _tensors()
    out = clipped_policy_loss(logp, anchor, adv, mask, loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28,
                              ref_logp=ref, kl_coef=0.05)
    out.loss.backward()
    got_grad, logp.grad = logp.grad.clone(), None
    expect = _loop_loss(loss_type, logp, anchor, ref, adv, mask)
    expect.backward()
    torch.testing.assert_close(out.loss, expect.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_grad, logp.grad, rtol=1e-10, atol=1e-12)
    # the metrics are token means whatever the loss type (as TRL logs them)
    rho = torch.exp(logp.detach() - anchor)
    a = adv.unsqueeze(1).expand_as(rho)
    flat = ((rho < 0.8) & (a < 0)) | ((rho > 1.28) & (a > 0))
    assert 0 < int(flat[mask].sum()) < int(mask.sum())  # both clip bounds are exercised below
    assert bool(((rho < 0.8) & (a < 0))[mask].any()) and bool(((rho > 1.28) & (a > 0))[mask].any())
    assert math.isclose(float(out.clip_fraction), int(flat[mask].sum()) / int(mask.sum()), rel_tol=1e-6)
    assert math.isclose(float(out.ratio), float(rho[mask].mean()), rel_tol=1e-12)


def test_dr_grpo_max_len_and_the_loss_types_differ():
    logp, anchor, ref, adv, mask = _tensors()
    kw = dict(epsilon_low=0.2, epsilon_high=0.28, ref_logp=ref, kl_coef=0.05)
    got = clipped_policy_loss(logp, anchor, adv, mask, loss_type="dr_grpo", max_len=11, **kw).loss
    torch.testing.assert_close(got, _loop_loss("dr_grpo", logp, anchor, ref, adv, mask, max_len=11).detach())
    values = {lt: float(clipped_policy_loss(logp, anchor, adv, mask, loss_type=lt, **kw).loss) for lt in LOSS_TYPES}
    assert values["bnpo"] == values["dapo"]  # in one batch (module docstring of distill.lm.policy)
    distinct = [values[k] for k in ("dapo", "grpo", "dr_grpo")]
    assert min(abs(x - y) for i, x in enumerate(distinct) for y in distinct[i + 1:]) > 1e-3
    with pytest.raises(ValueError, match="loss_type"):
        clipped_policy_loss(logp, anchor, adv, mask, loss_type="sapo")


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_micro_batches_sum_to_the_big_batch(loss_type):
    """Uneven micro-batches (rows 0-1 and 2-4, each padded only to its own length) with the step's counts
    sum to the big batch's loss and gradient; without them grpo/dr_grpo (per-batch means) would not."""
    logp, anchor, ref, adv, mask = _tensors(seed=1)
    kw = dict(loss_type=loss_type, max_len=8, epsilon_low=0.2, epsilon_high=0.28, kl_coef=0.05)
    big = clipped_policy_loss(logp, anchor, adv, mask, ref_logp=ref, **kw)
    big.loss.backward()
    g_big, logp.grad = logp.grad.clone(), None
    num_items, num_seqs = mask.sum(), torch.tensor(5.0)
    parts, naive = [], []
    for rows in (slice(0, 2), slice(2, 5)):
        width = int(mask[rows].any(0).nonzero().max()) + 1  # this micro-batch's own padded length
        args = (logp[rows, :width], anchor[rows, :width], adv[rows], mask[rows, :width])
        parts.append(clipped_policy_loss(*args, ref_logp=ref[rows, :width], num_items=num_items,
                                         num_seqs=num_seqs, **kw))
        naive.append(clipped_policy_loss(*args, ref_logp=ref[rows, :width], **kw).loss.detach())
    assert parts[0].loss.shape == () and logp[0:2].shape != logp[2:5].shape
    total = sum(p.loss for p in parts)
    total.backward()
    torch.testing.assert_close(total, big.loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(logp.grad, g_big, rtol=1e-12, atol=1e-14)
    for f in ("clip_fraction", "ratio", "kl"):
        torch.testing.assert_close(sum(getattr(p, f) for p in parts), getattr(big, f))
    # the control: TRL's per-micro-batch value averaged over the micro-batches is another number here
    assert abs(float(sum(naive)) / 2 - float(big.loss)) > 1e-3


# ------------------------------------------------------------------------------------- scale_rewards


def test_scale_rewards_by_hand():
    # two groups of 4 (ids interleaved) and a group of one
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0])
    groups = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1, 2])
    # group 0: 1, 0, 0, 0 → mean 1/4, sample std sqrt((9/16 + 3/16)/3) = 1/2
    # group 1: 1, 1, 1, 1 → mean 1, std 0; group 2 alone: mean 1
    dev = [0.75, 0.0, -0.25, 0.0, -0.25, 0.0, -0.25, 0.0, 0.0]
    torch.testing.assert_close(group_advantages(rewards, groups, scale="none"), torch.tensor(dev))
    torch.testing.assert_close(group_advantages(rewards, groups, scale=False), torch.tensor(dev))
    group = [d / (0.5 + 1e-4) if g == 0 else 0.0 for d, g in zip(dev, groups.tolist())]
    torch.testing.assert_close(group_advantages(rewards, groups), torch.tensor(group))
    torch.testing.assert_close(group_advantages(rewards, groups, scale=True), torch.tensor(group))
    # batch: all 9 rewards (six 1s, three 0s): mean 2/3, sample variance (6·(1/3)² + 3·(2/3)²)/8 = 1/4
    batch_std = math.sqrt((6 * (1 / 3) ** 2 + 3 * (2 / 3) ** 2) / 8)
    assert math.isclose(batch_std, statistics.stdev(rewards.tolist()), rel_tol=1e-12)
    batch = [d / (batch_std + 1e-4) for d in dev]
    torch.testing.assert_close(group_advantages(rewards, groups, scale="batch"), torch.tensor(batch))
    # the step-wide std is the caller's when given (micro-batches: all of the step's rewards)
    torch.testing.assert_close(group_advantages(rewards, groups, scale="batch", batch_std=0.25),
                               torch.tensor([d / 0.2501 for d in dev]))
    parts = [rewards[:4], rewards[4:]]
    assert math.isclose(float(reward_std(parts)), batch_std, rel_tol=1e-12)
    assert math.isclose(float(reward_std(parts, unbiased=False)), statistics.pstdev(rewards.tolist()), rel_tol=1e-12)
    assert float(reward_std(torch.tensor([3.0]))) == 0.0
    with pytest.raises(ValueError, match="scaling"):
        group_advantages(rewards, groups, scale="max")


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_scale_rewards_over_the_step(parity, scale):
    method = GRPO(_lm(parity.tokenizer, 0), None, GRPOParams(group_size=4, max_new_tokens=MAX_NEW,
                                                              scale_rewards=scale), parity.task_info(False))
    batches = _prepare(method, parity, [[0, 3, 5], [7, 9]], seed=2)
    every = [float(r) for b in batches for r in b["reward"]]
    assert statistics.stdev(every) > 0
    for b in batches:
        assert float(b["num_seqs"]) == 20
        for i in range(len(b["reward"])):
            members = [float(r) for r, g in zip(b["reward"], b["group"]) if g == b["group"][i]]
            dev = float(b["reward"][i]) - statistics.fmean(members)
            std = {"group": statistics.stdev(members), "batch": statistics.stdev(every), "none": None}[scale]
            expect = dev if std is None else dev / (std + 1e-4)
            assert math.isclose(float(b["advantages"][i]), expect, rel_tol=1e-6, abs_tol=1e-7), (scale, i)
    # the batch std is the step's, not a micro-batch's
    if scale == "batch":
        local = statistics.stdev([float(r) for r in batches[1]["reward"]])
        assert abs(local - statistics.stdev(every)) > 1e-3


def test_scale_rewards_is_for_verifier_methods_and_recipes_check_the_values(parity):
    tok = parity.tokenizer
    with pytest.raises(RecipeError, match="scale_rewards"):
        GOPD(_lm(tok, 0), _lm(tok, 1), GOPDParams(scale_rewards="batch"), parity.task_info(False))
    GOPD(_lm(tok, 0), _lm(tok, 1), GOPDParams(loss_type="grpo"), parity.task_info(False))
    task = {"name": "arithmetic", "num_train": 8, "num_val": 4, "num_test": 4}
    for bad in ({"loss_type": "sapo"}, {"scale_rewards": "max"}):
        with pytest.raises(RecipeError):
            recipe_from_dict({"name": "x", "task": task, "student": {"arch": "llama", "hidden": 16, "layers": 1,
                                                                     "heads": 2}, "method": {"name": "grpo", **bad}})


# ------------------------------------------------------------------------------------------ methods


def _per_row(batch, key):
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    return [batch[key][r][mask[r]].double() for r in range(mask.shape[0])]


def _reduce_rows(loss_type, rows, num_tokens, num_seqs):
    """The step's loss from per-row lists of per-token losses: TRL's reductions over the big batch."""
    if loss_type in ("dapo", "bnpo"):
        return sum(r.sum() for r in rows) / num_tokens
    if loss_type == "grpo":
        return sum(r.sum() / len(r) for r in rows) / num_seqs
    return sum(r.sum() for r in rows) / (num_seqs * MAX_NEW)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_grpo_second_use_with_clip_bounds_and_kl_against_a_loop(parity, loss_type):
    """μ = 2: the rollouts' second use, after the policy moved, over two uneven micro-batches (12 and 8 rows):
    loss and gradient against a loop with clip(ρ, 1 − 0.1, 1 + 0.3), β = 0.2 and the loss type's reduction
    (dr_grpo's constant is max_new_tokens)."""
    tok = parity.tokenizer
    student = _lm(tok, 0)
    method = GRPO(student, None, GRPOParams(group_size=4, max_new_tokens=MAX_NEW, num_iterations=2, epsilon=0.1,
                                            epsilon_high=0.3, kl_coef=0.2, loss_type=loss_type),
                  parity.task_info(False))
    batches = _prepare(method, parity, [[0, 3, 5], [7, 9]], seed=4)
    for b in batches:
        method.training_step(b)  # first use: stores the old log-probs
    method.zero_grad(set_to_none=True)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.3 * torch.randn_like(p))
    again = method.prepare_batches([parity.train.__getitems__([1, 2])])
    assert again is batches
    total = 0.0
    for b in batches:
        step = method.training_step(b)
        step.losses["student"].backward()
        total += float(step.losses["student"])
    grads = _grads(student)
    rows, n_tok, n_seq, low, high = [], float(batches[0]["num_items"]), 20, 0, 0
    for b in batches:
        assert float(b["num_seqs"]) == n_seq
        for r, (lp, old, ref) in enumerate(zip(_row_logprobs(student, b), _per_row(b, "old_logprobs"),
                                              _per_row(b, "ref_logprobs"))):
            a = float(b["advantages"][r])
            rho = torch.exp(lp - old)
            surr = -torch.minimum(rho * a, rho.clamp(0.9, 1.3) * a)
            d = ref - lp
            rows.append(surr + 0.2 * (d.exp() - d - 1))
            low += int(((rho < 0.9) & (a < 0)).sum())
            high += int(((rho > 1.3) & (a > 0)).sum())
    assert low > 0 and high > 0  # both bounds act
    expect = _reduce_rows(loss_type, rows, n_tok, n_seq)
    assert math.isclose(total, float(expect), rel_tol=1e-5, abs_tol=1e-7)
    expect.backward()
    loop = _grads(student)
    assert grads.keys() == loop.keys() and grads
    for k in grads:
        torch.testing.assert_close(grads[k], loop[k], rtol=1e-4, atol=1e-7, msg=k)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo"])
def test_gopd_extrapolation_with_a_loss_type_against_a_loop(parity, loss_type):
    """gopd (λ = 1.5, initial-student reference) with TRL's per-sequence reductions: per token
    A = λ·(log π_T − log π_ref) − (log π_old − log π_ref), ρ = 1 at the first use."""
    tok = parity.tokenizer
    student, teacher = _lm(tok, 0), _lm(tok, 1)
    method = GOPD(student, teacher, GOPDParams(lmbda=1.5, group_size=2, max_new_tokens=MAX_NEW, loss_type=loss_type),
                  parity.task_info(False))
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batches = _prepare(method, parity, [[3, 5, 7], [1]], seed=6)
    total = 0.0
    for b in batches:
        step = method.training_step(b)
        step.losses["student"].backward()
        total += float(step.losses["student"])
    grads = _grads(student)
    rows = []
    for b in batches:
        for lp, lt, lr in zip(_row_logprobs(student, b), _row_logprobs(teacher, b), _row_logprobs(method.ref, b)):
            lam_adv = [1.5 * (float(t) - float(r)) - (float(s) - float(r)) for s, t, r in zip(lp, lt, lr)]
            adv = torch.tensor(lam_adv, dtype=torch.float64)
            rows.append(-adv * torch.exp(lp - lp.detach()))
    expect = _reduce_rows(loss_type, rows, float(batches[0]["num_items"]), 8)
    assert math.isclose(total, float(expect), rel_tol=1e-5, abs_tol=1e-7)
    expect.backward()
    loop = _grads(student)
    assert grads.keys() == loop.keys() and grads
    for k in grads:
        torch.testing.assert_close(grads[k], loop[k], rtol=1e-4, atol=1e-7, msg=k)
