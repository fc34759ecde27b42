"""``rlad`` (S01 RLAD / TRRD): the anchor on hand-built numbers, the method's loss and gradient against an
independently written loop over the paper's ratio ``(π/π_old)^α·(π/π_T)^(1−α)``, the special cases
(α = 1 is ``grpo`` bitwise; α = 0 anchors at the teacher), and the paper's form as the default."""

from __future__ import annotations

import math

import pytest
import torch

from distill.lm.data.text import IGNORE_INDEX
from distill.lm.methods.grpo import GRPO, GRPOParams
from distill.lm.methods.rlad import RLAD, RLADParams, trrd_anchor_logprobs
from policy_helpers import assert_grads_close as _assert_grads_close, grads as _grads, parity_task, prepare as _prepare
from policy_helpers import row_logprobs as _row_logprobs, tiny_lm as _lm


@pytest.fixture(scope="module")
def parity():
    return parity_task()


MAX_NEW = 10


def test_defaults_are_the_papers_form():
    p = RLADParams()
    assert p.anchor == "geometric" and p.alpha == 0.5


def test_anchor_by_hand():
    o = torch.tensor([-1.5, -0.1, -1.0])  # log π_old
    t = torch.tensor([-0.2, -3.0, -1.0])  # log π_T
    for a in (0.25, 0.7):
        geo = trrd_anchor_logprobs(o, t, a, "geometric")
        ari = trrd_anchor_logprobs(o, t, a, "arithmetic")
        for j in range(3):
            po, pt = math.exp(float(o[j])), math.exp(float(t[j]))
            assert math.isclose(math.exp(float(geo[j])), po ** a * pt ** (1 - a), rel_tol=1e-6)  # π_old^α·π_T^(1−α)
            assert math.isclose(math.exp(float(ari[j])), a * po + (1 - a) * pt, rel_tol=1e-6)  # α·π_old + (1−α)·π_T
    # α weighs the old policy: α = 1 is GRPO's anchor, α = 0 the teacher, in both forms
    for kind in ("geometric", "arithmetic"):
        assert trrd_anchor_logprobs(o, t, 1.0, kind) is o and trrd_anchor_logprobs(o, t, 0.0, kind) is t
    with pytest.raises(ValueError, match="anchor"):
        trrd_anchor_logprobs(o, t, 0.5, "prob")  # type: ignore[arg-type]


@pytest.mark.parametrize("extra", [{}, {"kl_coef": 0.2, "num_iterations": 2}])
def test_alpha1_is_grpo(parity, extra):
    tok = parity.tokenizer
    kw = dict(group_size=3, max_new_tokens=MAX_NEW, **extra)
    s1, s2 = _lm(tok, 0), _lm(tok, 0)
    grpo = GRPO(s1, None, GRPOParams(**kw), parity.task_info(False))
    rlad = RLAD(s2, _lm(tok, 1), RLADParams(alpha=1.0, **kw), parity.task_info(False))
    gb = _prepare(grpo, parity, [[0, 2], [4, 6]], seed=3)
    rb = _prepare(rlad, parity, [[0, 2], [4, 6]], seed=3)
    for g, r in zip(gb, rb):
        assert g.keys() == r.keys()  # no teacher pass at α = 1
        for k in g:
            assert torch.equal(g[k], r[k]), k  # the same rollouts, rewards and advantages
        sg, sr = grpo.training_step(g), rlad.training_step(r)
        assert torch.equal(sg.losses["student"], sr.losses["student"])
        sg.losses["student"].backward()
        sr.losses["student"].backward()
        assert float(sr.metrics["anchor_gap"]) == 0.0
    ga, gr = _grads(s1), _grads(s2)
    assert ga.keys() == gr.keys() and all(torch.equal(ga[k], gr[k]) for k in ga)


def _confident_teacher(tok):
    teacher = _lm(tok, 1)
    with torch.no_grad():
        for p in teacher.parameters():
            p.mul_(4.0)  # anchors far from π_old, so some ratios leave [0.8, 1.2]
    return teacher


@pytest.mark.parametrize("anchor,alpha", [("geometric", 0.6), ("arithmetic", 0.6), ("geometric", 0.0)])
def test_loss_and_gradient_against_a_direct_loop(parity, anchor, alpha):
    """The step's loss, clip fraction and gradient equal a loop over the completion tokens of
    ``−min(r·A, clip(r, 0.8, 1.2)·A) / n`` with r the paper's product of ratios (geometric) or the ratio to
    the probability mixture (arithmetic), log-probs at the sampling temperature 1.3, μ = 1 (π_old = sg(π))."""
    tok = parity.tokenizer
    student, teacher = _lm(tok, 0), _confident_teacher(tok)
    method = RLAD(student, teacher, RLADParams(alpha=alpha, anchor=anchor, group_size=4, temperature=1.3,
                                               max_new_tokens=MAX_NEW), parity.task_info(False))
    (b,) = _prepare(method, parity, [[1, 2, 3]], seed=5)
    adv = b["advantages"].tolist()
    assert any(a > 0 for a in adv) and any(a < 0 for a in adv)
    step = method.training_step(b)
    step.losses["student"].backward()
    grads = _grads(student)
    n, expect, clipped, count, gap = float(b["num_items"]), 0.0, 0, 0, 0.0
    for r, (lp, lt) in enumerate(zip(_row_logprobs(student, b, 1.3), _row_logprobs(teacher, b, 1.3))):
        a, old, lt = adv[r], lp.detach(), lt.detach()
        for j in range(len(lp)):
            if anchor == "geometric":
                ratio = (torch.exp(lp[j] - old[j]) ** alpha) * (torch.exp(lp[j] - lt[j]) ** (1 - alpha))
                log_anchor = alpha * float(old[j]) + (1 - alpha) * float(lt[j])
            else:
                mix = alpha * math.exp(float(old[j])) + (1 - alpha) * math.exp(float(lt[j]))
                ratio = torch.exp(lp[j]) / mix
                log_anchor = math.log(mix)
            q = float(ratio.detach())
            expect = expect - torch.minimum(ratio * a, ratio.clamp(0.8, 1.2) * a) / n
            clipped += int((q < 0.8 and a < 0) or (q > 1.2 and a > 0))
            gap += (log_anchor - float(old[j])) / n
            count += 1
    torch.testing.assert_close(step.losses["student"].double(), expect.detach(), rtol=1e-5, atol=1e-7)
    assert clipped > 0 and math.isclose(float(step.metrics["clip_frac"]), clipped / count, rel_tol=1e-6)
    assert math.isclose(float(step.metrics["anchor_gap"]), gap, rel_tol=1e-4, abs_tol=1e-6)
    expect.backward()
    _assert_grads_close(grads, _grads(student))


def test_the_teacher_moves_the_trust_region_against_grpo(parity):
    """Same rollouts: RLAD at α = 0.5 differs from GRPO (whose μ = 1 loss is −mean A·ρ with ρ ≡ 1) and from
    the α-swapped anchor; the teacher's log-probs are at the sampling temperature."""
    tok = parity.tokenizer
    student, teacher = _lm(tok, 0), _confident_teacher(tok)
    kw = dict(group_size=4, temperature=1.3, max_new_tokens=MAX_NEW)
    m5 = RLAD(student, teacher, RLADParams(alpha=0.5, **kw), parity.task_info(False))
    m2 = RLAD(student, teacher, RLADParams(alpha=0.2, **kw), parity.task_info(False))
    m8 = RLAD(student, teacher, RLADParams(alpha=0.8, **kw), parity.task_info(False))
    (b,) = _prepare(m5, parity, [[1, 2, 3]], seed=5)
    lt = torch.cat(_row_logprobs(teacher, b, 1.3))
    mask = b["labels"][:, 1:] != IGNORE_INDEX
    torch.testing.assert_close(b["teacher_logprobs"][mask].double(), lt.detach(), rtol=0, atol=1e-5)
    grpo = GRPO(student, None, GRPOParams(**kw), parity.task_info(False))
    losses = [float(m.training_step(dict(b)).losses["student"]) for m in (m5, m2, m8, grpo)]
    assert len({round(x, 6) for x in losses}) == 4, losses
