"""Token-level LM divergences against direct formulas (float64), TRL's generalized-JSD convention, the
causal shift, masking, num_items, the sparse teacher and the fused (chunked) form."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distill.errors import MismatchError
from distill.lm.losses import (
    KINDS,
    fused_sparse_token_divergence,
    fused_token_divergence,
    sparse_token_divergence,
    token_divergence,
)

B, T, V, H = 2, 7, 11, 5


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _data(seed: int = 0, dtype=torch.float64, scale: float = 2.0):
    g = _gen(seed)
    s = (scale * torch.randn(B, T, V, generator=g)).to(dtype)
    t = (scale * torch.randn(B, T, V, generator=g)).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = -100  # a prompt
    labels[1, -2:] = -100  # padding
    return s, t, labels


def _kl(a, b):  # KL(a ‖ b) per row from probabilities, the textbook formula
    return (a * (a.log() - b.log())).sum(-1)


def _reference(s, t, labels, kind, beta=0.5, skew=0.1, temperature=1.0, num_items=None):
    """Direct formulas, written independently of the library: shift, mask, per-token divergence."""
    s, t, y = s[:, :-1] / temperature, t[:, :-1] / temperature, labels[:, 1:]
    p, q = F.softmax(t, -1), F.softmax(s, -1)
    if kind == "forward_kl":
        d = _kl(p, q)
    elif kind == "reverse_kl":
        d = _kl(q, p)
    elif kind == "jsd":
        m = beta * p + (1 - beta) * q
        d = beta * _kl(p, m) + (1 - beta) * _kl(q, m)
    elif kind == "skew_forward_kl":
        d = _kl(p, skew * p + (1 - skew) * q)
    elif kind == "skew_reverse_kl":
        d = _kl(q, (1 - skew) * p + skew * q)
    elif kind == "tvd":
        d = 0.5 * (p - q).abs().sum(-1)
    valid = y != -100
    total = (d * valid).sum()
    return total / (valid.sum() if num_items is None else num_items)


def _trl_generalized_jsd(student_logits, teacher_logits, labels, beta, temperature=1.0):
    """TRL's ``GKDTrainer.generalized_jsd_loss`` (reduction "batchmean"), rewritten from its source:
    it takes already-shifted logits/labels."""
    s_lp = F.log_softmax(student_logits / temperature, -1)
    t_lp = F.log_softmax(teacher_logits / temperature, -1)
    if beta == 0:
        jsd = F.kl_div(s_lp, t_lp, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(t_lp, s_lp, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=s_lp.dtype)
        mix = torch.logsumexp(torch.stack([s_lp + torch.log1p(-b), t_lp + torch.log(b)]), dim=0)
        jsd = b * F.kl_div(mix, t_lp, reduction="none", log_target=True) + (1 - b) * F.kl_div(
            mix, s_lp, reduction="none", log_target=True)
    mask = labels != -100
    return jsd[mask].sum() / mask.sum().clamp_min(1)


KIND_ARGS = [("forward_kl", {}), ("reverse_kl", {}), ("jsd", {"beta": 0.5}), ("jsd", {"beta": 0.2}),
             ("skew_forward_kl", {"skew": 0.1}), ("skew_forward_kl", {"skew": 0.4}),
             ("skew_reverse_kl", {"skew": 0.1}), ("skew_reverse_kl", {"skew": 0.4}), ("tvd", {})]


@pytest.mark.parametrize("kind,kw", KIND_ARGS)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_value_and_gradient_match_direct_formula(kind, kw, temperature):
    s, t, labels = _data(1)
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    ours = token_divergence(s1, t, labels, kind=kind, temperature=temperature, **kw)
    ref = _reference(s2, t, labels, kind, temperature=temperature, **kw)
    assert ours.dtype == torch.float64
    assert ours.item() == pytest.approx(ref.item(), rel=1e-10, abs=1e-12)
    ours.backward()
    ref.backward()
    assert torch.allclose(s1.grad, s2.grad, rtol=1e-8, atol=1e-12)


def test_by_hand_single_token():
    # one scored token, V = 2: teacher [0.8, 0.2], student [0.5, 0.5]
    t = torch.log(torch.tensor([[[0.8, 0.2], [0.5, 0.5]]], dtype=torch.float64))
    s = torch.zeros(1, 2, 2, dtype=torch.float64)
    y = torch.tensor([[-100, 1]])
    fkl = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)
    rkl = 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)
    m = [0.9 * 0.8 + 0.1 * 0.5, 0.9 * 0.2 + 0.1 * 0.5]  # skew forward α = 0.9
    sfkl = 0.8 * math.log(0.8 / m[0]) + 0.2 * math.log(0.2 / m[1])
    assert token_divergence(s, t, y).item() == pytest.approx(fkl, rel=1e-12)
    assert token_divergence(s, t, y, kind="reverse_kl").item() == pytest.approx(rkl, rel=1e-12)
    assert token_divergence(s, t, y, kind="skew_forward_kl", skew=0.9).item() == pytest.approx(sfkl, rel=1e-12)
    assert token_divergence(s, t, y, kind="tvd").item() == pytest.approx(0.3, rel=1e-12)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_jsd_follows_trl_convention(beta):
    s, t, labels = _data(2)
    ours = token_divergence(s, t, labels, kind="jsd", beta=beta, temperature=1.5)
    trl = _trl_generalized_jsd(s[:, :-1], t[:, :-1], labels[:, 1:], beta, temperature=1.5)
    assert ours.item() == pytest.approx(trl.item(), rel=1e-10)
    if beta == 0.0:
        assert ours.item() == pytest.approx(token_divergence(s, t, labels, temperature=1.5).item(), rel=1e-12)
    if beta == 1.0:
        rev = token_divergence(s, t, labels, kind="reverse_kl", temperature=1.5)
        assert ours.item() == pytest.approx(rev.item(), rel=1e-12)


def test_skew_limits():
    s, t, labels = _data(3)
    fkl = token_divergence(s, t, labels).item()
    rkl = token_divergence(s, t, labels, kind="reverse_kl").item()
    assert token_divergence(s, t, labels, kind="skew_forward_kl", skew=0.0).item() == pytest.approx(fkl, rel=1e-12)
    assert token_divergence(s, t, labels, kind="skew_reverse_kl", skew=0.0).item() == pytest.approx(rkl, rel=1e-12)
    for kind in ("skew_forward_kl", "skew_reverse_kl"):  # α = 1: the mixture is the distribution itself
        x = s.clone().requires_grad_()
        loss = token_divergence(x, t, labels, kind=kind, skew=1.0)
        loss.backward()
        assert loss.item() == pytest.approx(0.0, abs=1e-12)
        assert x.grad.abs().max().item() < 1e-12


@pytest.mark.parametrize("kind", KINDS)
def test_zero_when_student_equals_teacher(kind):
    s, _, labels = _data(4)
    assert token_divergence(s, s.clone(), labels, kind=kind).item() == pytest.approx(0.0, abs=1e-12)


def test_causal_shift():
    # a single valid label at position 3: only the logits at position 2 are scored
    s, t, _ = _data(5)
    labels = torch.full((B, T), -100)
    labels[0, 3] = 7
    ours = token_divergence(s, t, labels)
    direct = _kl(F.softmax(t[0, 2], -1), F.softmax(s[0, 2], -1))
    assert ours.item() == pytest.approx(direct.item(), rel=1e-12)
    labels[0, 0] = 5  # the first label is never predicted: nothing changes
    assert token_divergence(s, t, labels).item() == pytest.approx(direct.item(), rel=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_masked_positions_add_exactly_zero(kind):
    s, t, labels = _data(6)
    x = s.clone().requires_grad_()
    loss = token_divergence(x, t, labels, kind=kind)
    loss.backward()
    scored = torch.zeros(B, T, dtype=torch.bool)
    scored[:, :-1] = labels[:, 1:] != -100
    assert (x.grad[~scored] == 0).all() and (x.grad[scored] != 0).any()
    s2, t2 = s.clone(), t.clone()  # garbage (even inf/nan) at masked positions changes nothing
    s2[~scored] = torch.randn(int((~scored).sum()), V, dtype=s.dtype) * 1e4
    t2[~scored] = float("nan")
    assert torch.equal(token_divergence(s2, t2, labels, kind=kind), loss.detach())
    # no valid token at all: 0, not nan
    empty = torch.full((B, T), -100)
    assert token_divergence(s, t, empty, kind=kind).item() == 0.0


@pytest.mark.parametrize("kind", ["forward_kl", "jsd", "skew_reverse_kl"])
def test_num_items_micro_batches_sum_to_big_batch(kind):
    s, t, labels = _data(7)
    x = s.clone().requires_grad_()
    big = token_divergence(x, t, labels, kind=kind)
    big.backward()
    n = int((labels[:, 1:] != -100).sum())
    y = s.clone().requires_grad_()
    parts = [token_divergence(y[i:i + 1], t[i:i + 1], labels[i:i + 1], kind=kind, num_items=n) for i in range(B)]
    total = sum(parts)
    total.backward()
    assert total.item() == pytest.approx(big.item(), rel=1e-12)
    assert torch.allclose(x.grad, y.grad, rtol=1e-10, atol=1e-14)
    # without num_items each micro-batch is its own mean: not the same
    own = sum(token_divergence(s[i:i + 1], t[i:i + 1], labels[i:i + 1], kind=kind) for i in range(B))
    assert own.item() != pytest.approx(big.item(), rel=1e-3)
    # a tensor num_items works too
    assert token_divergence(s, t, labels, kind=kind, num_items=torch.tensor(n)).item() == pytest.approx(big.item())


def _topk(t, k, temperature=1.0):
    lp = F.log_softmax(t, -1)
    vals, ids = lp.topk(k, dim=-1)
    return ids, vals


@pytest.mark.parametrize("kind,kw", KIND_ARGS)
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_sparse_with_k_equal_vocab_is_dense(kind, kw, tail):
    s, t, labels = _data(8)
    ids, lp = _topk(t, V)
    perm = torch.randperm(V, generator=_gen(0))  # order of the top-k entries does not matter
    ids, lp = ids[..., perm], lp[..., perm]
    x1, x2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    dense = token_divergence(x1, t, labels, kind=kind, temperature=1.7, **kw)
    sparse = sparse_token_divergence(x2, ids, lp, labels, kind=kind, tail=tail, temperature=1.7, **kw)
    assert sparse.item() == pytest.approx(dense.item(), rel=1e-9, abs=1e-12)
    dense.backward()
    sparse.backward()
    assert torch.isfinite(x2.grad).all()
    assert torch.allclose(x1.grad, x2.grad, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("kind,kw", KIND_ARGS)
def test_sparse_tail_bucket_by_hand(kind, kw):
    s, t, labels = _data(9)
    k = 3
    ids, lp = _topk(t, k)
    x = s.clone().requires_grad_()
    ours = sparse_token_divergence(x, ids, lp, labels, kind=kind, tail="bucket", **kw)
    # by hand: distributions over k + 1 entries, tails as 1 − Σ
    y = s.clone().requires_grad_()
    q_all = F.softmax(y, -1)
    q_k = q_all.gather(-1, ids)
    q = torch.cat([q_k, 1 - q_k.sum(-1, keepdim=True)], -1)
    p_k = lp.exp()
    p = torch.cat([p_k, 1 - p_k.sum(-1, keepdim=True)], -1)
    ref = _reference_on_probs(p, q, labels, kind, **kw)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-9)
    ours.backward()
    ref.backward()
    assert torch.allclose(x.grad, y.grad, rtol=1e-7, atol=1e-12)


def _reference_on_probs(p, q, labels, kind, beta=0.5, skew=0.1):
    """Divergence between given (unshifted [B, T, K]) distributions, shifted and masked."""
    p, q, y = p[:, :-1], q[:, :-1], labels[:, 1:]
    d = {
        "forward_kl": lambda: _kl(p, q),
        "reverse_kl": lambda: _kl(q, p),
        "jsd": lambda: beta * _kl(p, beta * p + (1 - beta) * q) + (1 - beta) * _kl(q, beta * p + (1 - beta) * q),
        "skew_forward_kl": lambda: _kl(p, skew * p + (1 - skew) * q),
        "skew_reverse_kl": lambda: _kl(q, (1 - skew) * p + skew * q),
        "tvd": lambda: 0.5 * (p - q).abs().sum(-1),
    }[kind]()
    valid = y != -100
    return (d * valid).sum() / valid.sum()


def test_sparse_renormalize_by_hand():
    s, t, labels = _data(10)
    k = 4
    ids, lp = _topk(t, k)
    x = s.clone().requires_grad_()
    ours = sparse_token_divergence(x, ids, lp, labels, tail="renormalize")
    y = s.clone().requires_grad_()
    p = lp.exp() / lp.exp().sum(-1, keepdim=True)  # the teacher renormalized over its top-k
    log_q = F.log_softmax(y, -1).gather(-1, ids)  # the student's full-vocabulary log-probs at those ids
    d = (p * (p.log() - log_q)).sum(-1)[:, :-1]
    valid = labels[:, 1:] != -100
    ref = (d * valid).sum() / valid.sum()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-10)
    ours.backward()
    ref.backward()
    assert torch.allclose(x.grad, y.grad, rtol=1e-8, atol=1e-12)
    # the bucket form differs (it also scores the tail)
    assert sparse_token_divergence(s, ids, lp, labels).item() != pytest.approx(ours.item(), rel=1e-3)


def test_sparse_tail_is_stable_when_student_tail_is_tiny():
    # float32: the student's tail mass is 2·e^-40 / (2 + 2·e^-40) ≈ 4e-18, which 1 − Σq rounds to 0 (log: −inf);
    # the teacher keeps 1e-3 in its tail, so a naive tail makes forward KL infinite
    labels = torch.tensor([[0, 1]])
    x = torch.tensor([[[40.0, 40.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]], requires_grad=True)
    ids = torch.tensor([[[0, 1], [0, 1]]])
    lp = torch.log(torch.tensor([[[0.4995, 0.4995], [0.5, 0.5]]]))
    loss = sparse_token_divergence(x, ids, lp, labels)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    log_q_tail = math.log(2) - 40 - math.log(2 + 2 * math.exp(-40))
    log_q_top = math.log(2 / (2 + 2 * math.exp(-40)) / 2)
    fkl = 2 * 0.4995 * (math.log(0.4995) - log_q_top) + 1e-3 * (math.log(1e-3) - log_q_tail)
    assert loss.item() == pytest.approx(fkl, rel=1e-4)
    # d/ds of the tail term pushes the two tail logits up equally, the top-k ones down
    assert x.grad[0, 0, 2] < 0 and x.grad[0, 0, 2] == x.grad[0, 0, 3] and x.grad[0, 0, 0] > 0


def _fused_data(seed, n_tok_seq=(3, 9), vocab=13, hid=6, dtype=torch.float64):
    g = _gen(seed)
    b, t = n_tok_seq
    h = torch.randn(b, t, hid, generator=g, dtype=dtype)
    w = torch.randn(vocab, hid, generator=g, dtype=dtype) / math.sqrt(hid) * 3
    tl = torch.randn(b, t, vocab, generator=g, dtype=dtype) * 2
    labels = torch.randint(0, vocab, (b, t), generator=g)
    labels[0, :4] = -100
    labels[2, -3:] = -100
    return h, w, tl, labels


@pytest.mark.parametrize("kind,kw", KIND_ARGS)
@pytest.mark.parametrize("chunk_size", [1, 5, 1024])
def test_fused_equals_unfused(kind, kw, chunk_size):
    h, w, tl, labels = _fused_data(11)  # 3·8 shifted positions, 17 valid: 5 does not divide it
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = token_divergence(h1 @ w1.T, tl, labels, kind=kind, temperature=1.3, **kw)
    ours = fused_token_divergence(h2, w2, tl, labels, kind=kind, temperature=1.3, chunk_size=chunk_size, **kw)
    (2.5 * ref).backward()  # a non-unit incoming gradient
    (2.5 * ours).backward()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-10)
    assert torch.allclose(h1.grad, h2.grad, rtol=1e-8, atol=1e-12)
    assert torch.allclose(w1.grad, w2.grad, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("kind,kw", [("forward_kl", {}), ("jsd", {"beta": 0.5}), ("skew_reverse_kl", {}),
                                     ("tvd", {})])
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_fused_sparse_equals_unfused(kind, kw, tail):
    h, w, tl, labels = _fused_data(12)
    ids, lp = _topk(tl, 4)
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = sparse_token_divergence(h1 @ w1.T, ids, lp, labels, kind=kind, tail=tail, temperature=0.8, **kw)
    ours = fused_sparse_token_divergence(h2, w2, ids, lp, labels, kind=kind, tail=tail, temperature=0.8,
                                         chunk_size=4, **kw)
    ref.backward()
    ours.backward()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-10)
    assert torch.allclose(h1.grad, h2.grad, rtol=1e-8, atol=1e-12)
    assert torch.allclose(w1.grad, w2.grad, rtol=1e-8, atol=1e-12)


def test_fused_float32_frozen_head_and_no_grad():
    h, w, tl, labels = _fused_data(13, dtype=torch.float32)
    h1, h2 = h.clone().requires_grad_(), h.clone().requires_grad_()
    ref = token_divergence(h1 @ w.T, tl, labels, kind="jsd")
    ours = fused_token_divergence(h2, w, tl, labels, kind="jsd", chunk_size=7)  # w needs no grad
    ref.backward()
    ours.backward()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(h1.grad, h2.grad, rtol=1e-4, atol=1e-7)
    assert w.grad is None
    with torch.no_grad():
        assert fused_token_divergence(h, w, tl, labels, kind="jsd").item() == pytest.approx(ref.item(), rel=1e-5)


def test_gradcheck_of_closed_form_gradients():
    # float64 finite differences on the custom autograd functions (dense, sparse bucket, fused)
    g = _gen(14)
    s = torch.randn(1, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(1, 4, 6, generator=g, dtype=torch.float64)
    labels = torch.tensor([[1, -100, 2, 3]])
    ids, lp = _topk(t, 2)
    for kind in ("reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl"):
        assert torch.autograd.gradcheck(lambda x, kind=kind: token_divergence(x, t, labels, kind=kind), (s,))
        assert torch.autograd.gradcheck(lambda x, kind=kind: sparse_token_divergence(x, ids, lp, labels, kind=kind), (s,))
    h = torch.randn(1, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b: fused_token_divergence(a, b, t, labels, kind="jsd", chunk_size=2), (h, w))


@pytest.mark.parametrize("kind", KINDS)
def test_finite_for_huge_logits_and_bf16(kind):
    g = _gen(15)
    s = (torch.randn(B, T, V, generator=g).sign() * 1e4).requires_grad_()
    t = torch.randn(B, T, V, generator=g).sign() * -1e4
    _, _, labels = _data(15)
    loss = token_divergence(s, t, labels, kind=kind)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    ids, lp = _topk(t, 3)
    xs = s.detach().clone().requires_grad_()
    for tail in ("bucket", "renormalize"):
        sp = sparse_token_divergence(xs, ids, lp, labels, kind=kind, tail=tail)
        sp.backward()
        assert torch.isfinite(sp) and torch.isfinite(xs.grad).all()
    # bf16 inputs: computed in float32, close to the float32 result, bf16 gradient
    s32, t32, _ = _data(16, dtype=torch.float32)
    xb = s32.to(torch.bfloat16).requires_grad_()
    lb = token_divergence(xb, t32.to(torch.bfloat16), labels, kind=kind)
    lb.backward()
    ref = token_divergence(s32.to(torch.bfloat16).float(), t32.to(torch.bfloat16).float(), labels, kind=kind)
    assert lb.dtype == torch.float32 and xb.grad.dtype == torch.bfloat16
    assert lb.item() == pytest.approx(ref.item(), rel=1e-5) and torch.isfinite(xb.grad.float()).all()
    h, w, tl, lab = _fused_data(17, dtype=torch.bfloat16)
    h, w = h.requires_grad_(), w.requires_grad_()
    lf = fused_token_divergence(h, w, tl, lab, kind=kind, chunk_size=5)
    lf.backward()
    assert torch.isfinite(lf) and torch.isfinite(h.grad.float()).all() and torch.isfinite(w.grad.float()).all()


def test_temperature_divides_both_and_no_t_squared():
    s, t, labels = _data(18)
    for kind in KINDS:
        a = token_divergence(s, t, labels, kind=kind, temperature=3.0)
        b = token_divergence(s / 3.0, t / 3.0, labels, kind=kind)
        assert a.item() == pytest.approx(b.item(), rel=1e-12)
    assert token_divergence(s, t, labels, temperature=1e6).item() == pytest.approx(0.0, abs=1e-9)


def test_errors():
    s, t, labels = _data(19)
    with pytest.raises(ValueError, match="kind must be one of"):
        token_divergence(s, t, labels, kind="kl")
    with pytest.raises(ValueError, match="beta"):
        token_divergence(s, t, labels, kind="jsd", beta=1.5)
    with pytest.raises(MismatchError, match="share a tokenizer"):
        token_divergence(s, t[..., :-1], labels)
    ids, lp = _topk(t, 2)
    with pytest.raises(ValueError, match="tail must be one of"):
        sparse_token_divergence(s, ids, lp, labels, tail="drop")
