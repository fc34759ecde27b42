"""Token-level divergences for causal language models: tensors in, scalar out.

Shapes: logits ``[batch, seq, vocab]``, ``labels`` ``[batch, seq]`` input-aligned exactly as passed to
an HF model. Conventions (``docs/conventions.md``, "Language-model token losses"):

- Causal shift, applied here: the logits at position ``i`` are scored against the token at ``i + 1``
  (``logits[:, :-1]`` pair with ``labels[:, 1:]``); the last position is never scored. A position whose
  next label is ``-100`` (prompt, padding) is never computed: it contributes exactly zero and gets a
  zero gradient.
- Reduction: sum over the vocabulary, sum over valid tokens, divided by ``num_items`` = the valid-token
  count of the whole optimizer step (all gradient-accumulation micro-batches and processes), or by
  this batch's valid-token count when ``num_items`` is None. Summing micro-batch losses computed with
  the step's ``num_items`` gives the loss of the single big batch.
- ``temperature`` divides teacher and student logits; no T² factor.
- Math in float32 (float64 stays float64) whatever the input dtype; finite for logits of magnitude 1e4.
- The teacher is a fixed target: it receives no gradient (pass detached teacher tensors).

Divergences (``kind``), with teacher ``p`` and student ``q`` over the vocabulary:

- ``forward_kl``: ``KL(p ‖ q)``; ``reverse_kl``: ``KL(q ‖ p)``.
- ``jsd``: generalized JSD in TRL's convention (GKD, Agarwal et al. 2024, Eq. 1;
  ``GKDTrainer.generalized_jsd_loss`` in ``trl/experimental/gkd``, TRL v1.9.0): ``m = β·p + (1−β)·q``,
  ``JSD_β = β·KL(p ‖ m) + (1−β)·KL(q ‖ m)``; β = 0 is forward KL and β = 1 reverse KL (special-cased,
  as both terms vanish in the limit).
- ``skew_forward_kl``: ``KL(p ‖ α·p + (1−α)·q)``; ``skew_reverse_kl``: ``KL(q ‖ (1−α)·p + α·q)`` with
  α = ``skew`` (DistiLLM, Ko et al. 2024, Eqs. 3–4; official jongwooko/distillm ``distillm/losses.py``,
  ``skewed_forward_kl`` mixes ``lam·teacher + (1−lam)·student``, ``skewed_reverse_kl`` mixes
  ``(1−lam)·teacher + lam·student``, ``lam`` = 0.1 by default). Deviation: the official
  ``skewed_forward_kl`` returns the cross-entropy ``−Σ p·log m``; we return the KL, which differs by
  the teacher's entropy (a constant: same gradient, and 0 when student = teacher).
- ``tvd``: ``0.5·Σ|p − q|`` (DistiLLM's ``tv_distance``).

All functions share one per-chunk routine that returns each row's loss and ``d loss / d logits`` in
closed form (``_chunk_loss_grad``); the unfused functions wrap it in an autograd function over the
valid rows, the fused ones call it chunk by chunk over the lm_head projection, so both compute the
same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.errors import MismatchError

KINDS = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")
TAILS = ("bucket", "renormalize")
IGNORE_INDEX = -100

__all__ = [
    "KINDS",
    "TAILS",
    "fused_sparse_token_divergence",
    "fused_token_divergence",
    "sequence_logprob",
    "sparse_token_divergence",
    "token_cross_entropy",
    "token_logprobs",
    "token_divergence",
    "token_taid_loss",
]


# ----------------------------------------------------------------------------------------------------
# per-chunk math: one place for every formula and its gradient


@dataclass(frozen=True)
class _Spec:
    kind: str
    beta: float
    skew: float
    temperature: float
    tail: str | None = None  # None: dense teacher; "bucket" / "renormalize": sparse top-k teacher


def _spec(kind: str, beta: float, skew: float, temperature: float, tail: str | None = None) -> _Spec:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta (generalized JSD) must lie in [0, 1], not {beta}")
    if not 0.0 <= skew <= 1.0:
        raise ValueError(f"skew (DistiLLM's alpha) must lie in [0, 1], not {skew}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, not {temperature}")
    if tail is not None and tail not in TAILS:
        raise ValueError(f"tail must be one of {', '.join(TAILS)}, not {tail!r}")
    if kind == "jsd" and beta == 0.0:
        kind = "forward_kl"  # TRL's special cases: the limits of JSD_β
    elif kind == "jsd" and beta == 1.0:
        kind = "reverse_kl"
    return _Spec(kind, float(beta), float(skew), float(temperature), tail)


def _work_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _log(c: float) -> float:
    return math.log(c) if c > 0 else float("-inf")


def _mul0_(w: Tensor, x: Tensor) -> Tensor:
    """``w · x`` with exactly 0 where ``w == 0`` (no ``0·inf`` / ``0·nan``), written into ``x`` (a temporary)."""
    return x.mul_(w).masked_fill_(w == 0, 0.0)


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 − exp(x))`` for ``x ≤ 0``, stable at both ends (Mächler 2012); ``x ≥ 0`` gives −inf."""
    x = x.clamp(max=0.0)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _log_mix(log_a: Tensor, wa: float, log_b: Tensor, wb: float) -> Tensor:
    """``log(wa·a + wb·b)`` from log-masses (a weight of 0 drops its term exactly)."""
    x, y = log_a + _log(wa), log_b + _log(wb)
    return torch.logaddexp(x, y, out=x)


def _bucket_divergence(log_p: Tensor, log_q: Tensor, spec: _Spec) -> tuple[Tensor, Tensor]:
    """Per-row divergence between teacher ``p`` and student ``q`` given as log-masses over the last
    dimension ``[n, K]`` (vocabulary entries, or top-k entries plus a tail bucket), and
    ``G = ∂loss/∂log q`` ``[n, K]`` with ``p`` held fixed and ``q`` treated as a free (possibly
    unnormalized) measure. Entries with zero mass on the weighting side contribute exactly 0.
    Neither input is modified; temporaries are reused in place to keep the peak memory of a chunk low.
    """
    kind = spec.kind
    if kind == "forward_kl":  # Σ p·(log p − log q);  G = −p
        p = log_p.exp()
        loss = _mul0_(p, log_p - log_q).sum(-1)
        return loss, p.neg_()
    if kind == "reverse_kl":  # Σ q·(log q − log p);  G = q·(log q − log p + 1)
        q = log_q.exp()
        g = _mul0_(q, log_q - log_p)
        loss = g.sum(-1)
        return loss, g.add_(q)
    if kind == "jsd":  # 0 < β < 1; ∂/∂q of β·KL(p‖m) + (1−β)·KL(q‖m) is (1−β)·(log q − log m)
        b = spec.beta
        log_m = _log_mix(log_p, b, log_q, 1 - b)
        loss = b * _mul0_(log_p.exp(), log_p - log_m).sum(-1)
        g = _mul0_(log_q.exp(), torch.sub(log_q, log_m, out=log_m))
        return loss + (1 - b) * g.sum(-1), g.mul_(1 - b)
    if kind == "skew_forward_kl":  # m = α·p + (1−α)·q; Σ p·(log p − log m);  G = −(1−α)·p·q/m
        a = spec.skew
        log_m = _log_mix(log_p, a, log_q, 1 - a)
        p = log_p.exp()
        loss = _mul0_(p, log_p - log_m).sum(-1)
        r = torch.sub(log_q, log_m, out=log_m).add_(_log(1 - a)).exp_()  # (1−α)·q/m ≤ 1
        return loss, _mul0_(p, r).neg_()
    if kind == "skew_reverse_kl":  # m = (1−α)·p + α·q; Σ q·(log q − log m);  G = q·(log q − log m + 1 − α·q/m)
        a = spec.skew
        dq = torch.sub(log_q, _log_mix(log_p, 1 - a, log_q, a))
        q = log_q.exp()
        g = _mul0_(q, dq.clone())
        loss = g.sum(-1)
        aq_m = dq.add_(_log(a)).exp_()  # α·q/m ≤ 1
        return loss, g.add_(_mul0_(q, aq_m.neg_().add_(1.0)))
    if kind == "tvd":  # 0.5·Σ|p − q|; subgradient 0 where p = q, as autograd's |·|
        q = log_q.exp()
        d = torch.sub(q, log_p.exp())
        loss = 0.5 * d.abs().sum(-1)
        return loss, d.sign_().mul_(q).mul_(0.5)
    raise AssertionError(kind)


def _chunk_loss_grad(
    student_logits: Tensor, teacher: tuple[Tensor, ...], spec: _Spec, need_grad: bool, owned: bool = False
) -> tuple[Tensor, Tensor | None]:
    """Loss per row ``[n]`` and ``d(Σ loss)/d student_logits`` ``[n, V]`` (None unless ``need_grad``),
    for a chunk of student logits ``[n, V]`` against the teacher rows of the same tokens: dense
    ``(teacher_logits [n, V],)`` or sparse ``(teacher_ids [n, k], teacher_logprobs [n, k])``.
    The teacher tensors are temporaries of the caller and may be overwritten; so may the student
    logits when ``owned``.

    Chain rule through the student's log-softmax ``s = logits / T``: ``d log q_b / d s_j = δ_bj − q_j``
    for a vocabulary entry, and for the tail bucket ``log q_tail = logsumexp(s ∉ top-k) − logsumexp(s)``:
    ``d log q_tail / d s_j = [j ∉ top-k]·q_j / q_tail − q_j`` (the student's distribution conditioned
    on the tail, which is bounded, so a vanishing tail costs no precision).
    """
    wd = _work_dtype(student_logits)
    tau = spec.temperature
    if tau != 1.0:
        s = student_logits.to(wd) / tau
    else:
        s = student_logits.to(wd, copy=not owned)
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    if spec.tail is None:
        (t_logits,) = teacher
        log_p = t_logits.to(wd)
        if tau != 1.0:
            log_p.div_(tau)
        log_p.sub_(torch.logsumexp(log_p, dim=-1, keepdim=True))
        log_q_full = s.sub_(lse)
        loss, g = _bucket_divergence(log_p, log_q_full, spec)
        del log_p
        if not need_grad:
            return loss, None
        q = log_q_full.exp_()  # log_q_full is not needed any more
        grad = g.sub_(q.mul_(g.sum(-1, keepdim=True)))
        return loss, grad.div_(tau) if tau != 1.0 else grad

    ids, t_lp = teacher
    ids = ids.long()
    k = ids.shape[-1]
    lt = t_lp.to(wd)
    s_out = None
    if spec.tail == "bucket" and k < s.shape[-1]:  # k = V: no token lies outside, so there is no tail
        s_out = s.scatter(-1, ids, float("-inf"))  # the student's logits outside the teacher's top-k
        lse_out = torch.logsumexp(s_out, dim=-1, keepdim=True)
        log_q_full = s.sub_(lse)
        log_q = torch.cat([log_q_full.gather(-1, ids), lse_out - lse], dim=-1)
        # a teacher tail that rounds to 0 (Σ p_topk ≥ 1 in the stored precision) is floored at the smallest
        # normal float, so reverse-type divergences stay finite when the student keeps some tail mass
        lt_tail = _log1mexp(torch.logsumexp(lt, dim=-1, keepdim=True)).clamp(min=math.log(torch.finfo(wd).tiny))
        lt = torch.cat([lt, lt_tail], dim=-1)
    else:
        log_q_full = s.sub_(lse)
        log_q = log_q_full.gather(-1, ids)
    # bucket: renormalizes away rounding of the stored log-probs (the tail is tempered as one token);
    # renormalize: the teacher over its top-k
    log_p = F.log_softmax(lt / tau if tau != 1.0 else lt, dim=-1)
    loss, g = _bucket_divergence(log_p, log_q, spec)
    if not need_grad:
        return loss, None
    grad = log_q_full.exp_().mul_(-g.sum(-1, keepdim=True))
    grad.scatter_add_(-1, ids, g[:, :k])
    if s_out is not None:
        r = s_out.sub_(lse_out).exp_()  # q conditioned on the tail; nan where the tail is empty
        r.masked_fill_(torch.isneginf(lse_out), 0.0)
        grad.add_(_mul0_(g[:, k:], r))
    return loss, grad.div_(tau) if tau != 1.0 else grad


# ----------------------------------------------------------------------------------------------------
# autograd wrappers


class _RowsDivergence(torch.autograd.Function):
    """Σ loss over rows of student logits ``[N, V]``; the gradient comes from ``_chunk_loss_grad``."""

    @staticmethod
    def forward(ctx, s_rows: Tensor, teacher: tuple[Tensor, ...], spec: _Spec, need_grad: bool) -> Tensor:
        loss, grad = _chunk_loss_grad(s_rows, teacher, spec, need_grad)
        if grad is not None:
            ctx.save_for_backward(grad.to(s_rows.dtype))
        return loss.sum()

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None


class _FusedDivergence(torch.autograd.Function):
    """Σ loss over rows of ``hidden @ weight.T``, chunk by chunk: only ``[chunk, V]`` logits and their
    gradient exist at a time. The forward also computes the gradients w.r.t. the hidden rows and the
    weight (accumulated in float32); the backward only scales them by ``grad_output``."""

    @staticmethod
    def forward(
        ctx,
        h_rows: Tensor,
        weight: Tensor,
        teacher_rows: Callable[[int, int], tuple[Tensor, ...]],
        spec: _Spec,
        chunk_size: int,
        need_h: bool,
        need_w: bool,
    ) -> Tensor:
        n = h_rows.shape[0]
        wd = _work_dtype(weight)
        total = torch.zeros((), dtype=wd, device=h_rows.device)
        grad_h = torch.zeros_like(h_rows) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=wd, device=weight.device) if need_w else None
        for lo in range(0, n, chunk_size):
            hi = min(n, lo + chunk_size)
            h = h_rows[lo:hi].to(weight.dtype)
            logits = h @ weight.T
            loss, dlogits = _chunk_loss_grad(logits, teacher_rows(lo, hi), spec, need_h or need_w, owned=True)
            del logits
            total += loss.sum()
            if grad_h is not None:
                grad_h[lo:hi] = (dlogits.to(weight.dtype) @ weight).to(grad_h.dtype)
            if grad_w is not None:
                grad_w.addmm_(dlogits.T, h.to(wd))
            del dlogits
        ctx.save_for_backward(grad_h, None if grad_w is None else grad_w.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        gh = None if grad_h is None else grad_h * grad_output.to(grad_h.dtype)
        gw = None if grad_w is None else grad_w * grad_output.to(grad_w.dtype)
        return gh, gw, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------
# shapes, shift, reduction


def _valid_rows(labels: Tensor, seq: int) -> Tensor:
    """Indices into the flattened ``[batch·seq]`` positions whose next label is not −100 (causal shift)."""
    valid = labels[:, 1:] != IGNORE_INDEX
    b, t = valid.nonzero(as_tuple=True)
    return b * seq + t


def _reduce(total: Tensor, n_valid: int, num_items: float | Tensor | None) -> Tensor:
    if num_items is None:
        return total / max(n_valid, 1)
    if isinstance(num_items, Tensor):
        num_items = num_items.to(device=total.device, dtype=total.dtype)
    return total / num_items


def _check_labels(labels: Tensor, batch: int, seq: int, what: str) -> None:
    if labels.shape != (batch, seq):
        raise ValueError(f"labels must be [batch, seq] = [{batch}, {seq}] like the {what}, not {list(labels.shape)}")


def _check_sparse(teacher_ids: Tensor, teacher_logprobs: Tensor, batch: int, seq: int, vocab: int) -> None:
    if teacher_ids.dim() != 3 or teacher_ids.shape[:2] != (batch, seq):
        raise ValueError(f"teacher_ids must be [batch, seq, k] with batch, seq = {batch}, {seq}, "
                         f"not {list(teacher_ids.shape)}")
    if teacher_logprobs.shape != teacher_ids.shape:
        raise ValueError(f"teacher_logprobs {list(teacher_logprobs.shape)} must have the shape of "
                         f"teacher_ids {list(teacher_ids.shape)}")
    if teacher_ids.shape[-1] > vocab:
        raise MismatchError(f"the teacher's top-k ({teacher_ids.shape[-1]}) exceeds the student's vocabulary "
                            f"({vocab}): teacher and student must share a tokenizer")


def _check_vocab(student_vocab: int, teacher_vocab: int) -> None:
    if student_vocab != teacher_vocab:
        raise MismatchError(
            f"student vocabulary {student_vocab} != teacher vocabulary {teacher_vocab}: teacher and student must "
            "share a tokenizer; cut padded embedding rows to the tokenizer's length before the loss"
        )


# ----------------------------------------------------------------------------------------------------
# public losses


def token_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    kind: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
    temperature: float = 1.0,
    num_items: float | Tensor | None = None,
) -> Tensor:
    """Token-level divergence between teacher and student next-token distributions (module docstring).

    ``student_logits``, ``teacher_logits``: ``[batch, seq, vocab]``; ``labels``: ``[batch, seq]``,
    input-aligned (the causal shift is applied here; ``-100`` is masked). ``kind`` in ``KINDS``;
    ``beta`` is the generalized JSD's β (TRL's convention: β = 0 forward KL, β = 1 reverse KL);
    ``skew`` is DistiLLM's α for the skew KLs. Returns a scalar: Σ over vocabulary and valid tokens,
    divided by ``num_items`` (valid tokens of the whole optimizer step) or by this batch's valid tokens.
    Only the student gets a gradient.
    """
    spec = _spec(kind, beta, skew, temperature)
    if student_logits.dim() != 3:
        raise ValueError(f"student_logits must be [batch, seq, vocab], not {list(student_logits.shape)}")
    batch, seq, vocab = student_logits.shape
    if teacher_logits.shape[:2] != (batch, seq):
        raise ValueError(f"teacher_logits {list(teacher_logits.shape)} must match student_logits {[batch, seq, vocab]}")
    _check_vocab(vocab, teacher_logits.shape[-1])
    _check_labels(labels, batch, seq, "logits")
    rows = _valid_rows(labels, seq)
    s = student_logits.reshape(batch * seq, vocab).index_select(0, rows)
    t = teacher_logits.detach().reshape(batch * seq, vocab).index_select(0, rows)
    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    return _reduce(_RowsDivergence.apply(s, (t,), spec, need_grad), rows.numel(), num_items)


def sparse_token_divergence(
    student_logits: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    labels: Tensor,
    kind: str = "forward_kl",
    tail: str = "bucket",
    temperature: float = 1.0,
    num_items: float | Tensor | None = None,
    *,
    beta: float = 0.5,
    skew: float = 0.1,
) -> Tensor:
    """``token_divergence`` against a top-k teacher: ``teacher_ids`` ``[batch, seq, k]`` (distinct token
    ids per position) and their log-probabilities ``teacher_logprobs`` ``[batch, seq, k]`` (at
    temperature 1, as a teacher cache stores them), aligned with the logits (position ``i`` predicts
    token ``i + 1``).

    The student's full-vocabulary log-softmax is gathered at the teacher's ids. ``tail="bucket"``
    (default) adds one more entry to both distributions: the teacher's remaining mass
    ``1 − Σ p_topk`` (computed as ``log1mexp(logsumexp(log p_topk))``) and the student's
    ``1 − Σ q_ids`` (computed as ``logsumexp(s ∉ ids) − logsumexp(s)``, exact however small). A teacher
    tail that rounds to zero (e.g. fp16 log-probs summing to ≥ 1) is floored at the smallest normal
    float (``finfo.tiny``), so reverse KL stays finite; with k = V there is no tail bucket.
    ``tail="renormalize"`` drops the tail and renormalizes the teacher over its top-k; the student
    keeps its gathered full-vocabulary log-probs, so for ``forward_kl`` the student's mass outside the
    top-k is penalised, while for the other kinds (whose formulas then apply to the sub-normalized
    student measure) it is not seen at all — prefer ``bucket`` for those.

    ``temperature`` divides the student's logits and the teacher's log-probs, which are then
    renormalized over the k (+ 1) entries: exact for the top-k part, while the tail bucket is
    tempered as if it were one token (the cache does not know how its mass is spread). With k = V
    (and either tail) this equals ``token_divergence``. ``beta``/``skew`` as there (keyword-only).
    """
    spec = _spec(kind, beta, skew, temperature, tail)
    if student_logits.dim() != 3:
        raise ValueError(f"student_logits must be [batch, seq, vocab], not {list(student_logits.shape)}")
    batch, seq, vocab = student_logits.shape
    _check_sparse(teacher_ids, teacher_logprobs, batch, seq, vocab)
    _check_labels(labels, batch, seq, "logits")
    rows = _valid_rows(labels, seq)
    k = teacher_ids.shape[-1]
    s = student_logits.reshape(batch * seq, vocab).index_select(0, rows)
    ids = teacher_ids.reshape(batch * seq, k).index_select(0, rows)
    lp = teacher_logprobs.detach().reshape(batch * seq, k).index_select(0, rows)
    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    return _reduce(_RowsDivergence.apply(s, (ids, lp), spec, need_grad), rows.numel(), num_items)


def _fused(
    student_hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    teacher: tuple[Tensor, ...],
    spec: _Spec,
    num_items: float | Tensor | None,
    chunk_size: int,
) -> Tensor:
    if student_hidden.dim() != 3:
        raise ValueError(f"student_hidden must be [batch, seq, hidden], not {list(student_hidden.shape)}")
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != student_hidden.shape[-1]:
        raise ValueError(f"lm_head_weight must be [vocab, hidden={student_hidden.shape[-1]}], "
                         f"not {list(lm_head_weight.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, not {chunk_size}")
    batch, seq, hid = student_hidden.shape
    _check_labels(labels, batch, seq, "hidden states")
    rows = _valid_rows(labels, seq)
    h_rows = student_hidden.reshape(batch * seq, hid).index_select(0, rows)
    flat = tuple(x.detach().reshape(batch * seq, *x.shape[2:]) for x in teacher)

    def teacher_rows(lo: int, hi: int) -> tuple[Tensor, ...]:
        idx = rows[lo:hi]
        return tuple(x.index_select(0, idx) for x in flat)

    grad_on = torch.is_grad_enabled()
    total = _FusedDivergence.apply(h_rows, lm_head_weight, teacher_rows, spec, int(chunk_size),
                                   grad_on and h_rows.requires_grad, grad_on and lm_head_weight.requires_grad)
    return _reduce(total, rows.numel(), num_items)


def fused_token_divergence(
    student_hidden: Tensor,
    lm_head_weight: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    kind: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
    temperature: float = 1.0,
    num_items: float | Tensor | None = None,
    chunk_size: int = 1024,
) -> Tensor:
    """``token_divergence(student_hidden @ lm_head_weight.T, teacher_logits, labels, ...)`` without ever
    holding the full ``[batch·seq, vocab]`` student logits or their gradient: the valid tokens are
    processed ``chunk_size`` at a time, and each chunk's gradient w.r.t. its hidden states and the
    (accumulated, float32) gradient w.r.t. the weight are computed in the forward pass and only scaled
    by the incoming gradient in the backward (the chunked "fused linear + loss" of Liger Kernel's
    fused linear cross-entropy / JSD).

    ``student_hidden``: ``[batch, seq, hidden]`` (the final hidden states, after the last norm);
    ``lm_head_weight``: ``[vocab, hidden]`` (no bias); ``teacher_logits``: ``[batch, seq, vocab]``, a
    full tensor from the teacher's forward (only the student side is chunked). Extra memory is
    ``O(chunk_size·vocab)`` plus one float32 ``[vocab, hidden]`` weight gradient. Matmuls run in the
    weight's dtype, the loss in float32. Same value and gradients as the unfused loss to float tolerance.
    """
    spec = _spec(kind, beta, skew, temperature)
    if teacher_logits.dim() != 3 or teacher_logits.shape[:2] != student_hidden.shape[:2]:
        raise ValueError(f"teacher_logits {list(teacher_logits.shape)} must be [batch, seq, vocab] with the "
                         f"batch and seq of student_hidden {list(student_hidden.shape)}")
    _check_vocab(lm_head_weight.shape[0], teacher_logits.shape[-1])
    return _fused(student_hidden, lm_head_weight, labels, (teacher_logits,), spec, num_items, chunk_size)


def fused_sparse_token_divergence(
    student_hidden: Tensor,
    lm_head_weight: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    labels: Tensor,
    kind: str = "forward_kl",
    tail: str = "bucket",
    temperature: float = 1.0,
    num_items: float | Tensor | None = None,
    chunk_size: int = 1024,
    *,
    beta: float = 0.5,
    skew: float = 0.1,
) -> Tensor:
    """``sparse_token_divergence(student_hidden @ lm_head_weight.T, teacher_ids, teacher_logprobs, labels, ...)``
    chunked over valid tokens as ``fused_token_divergence`` (shapes and conventions of both)."""
    spec = _spec(kind, beta, skew, temperature, tail)
    if student_hidden.dim() != 3:
        raise ValueError(f"student_hidden must be [batch, seq, hidden], not {list(student_hidden.shape)}")
    batch, seq, _ = student_hidden.shape
    _check_sparse(teacher_ids, teacher_logprobs, batch, seq, lm_head_weight.shape[0])
    return _fused(student_hidden, lm_head_weight, labels, (teacher_ids, teacher_logprobs), spec, num_items,
                  chunk_size)


def token_cross_entropy(logits: Tensor, labels: Tensor, num_items: float | Tensor | None = None) -> Tensor:
    """Next-token cross-entropy with the conventions above (causal shift, ``-100`` masked, sum over
    valid tokens divided by ``num_items`` or this batch's valid-token count). ``logits``:
    ``[batch, seq, vocab]``; ``labels``: ``[batch, seq]`` input-aligned."""
    batch, seq, vocab = logits.shape
    _check_labels(labels, batch, seq, "logits")
    target = labels[:, 1:].reshape(-1)
    total = F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), target, ignore_index=IGNORE_INDEX,
                            reduction="sum")
    return _reduce(total, int((target != IGNORE_INDEX).sum()), num_items)


def token_taid_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    t: float | Tensor,
    num_items: float | Tensor | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """TAID's token loss for causal LMs (S60, Shing et al. 2025, §3, the interpolated target; official
    SakanaAI/TAID ``src/distil_losses/taid.py``, ``TAID.compute_loss``): per supervised token the
    cross-entropy ``−Σ_v p_t,v · log q_v`` to the interpolated target

        ``p_t = softmax(((1 − t)·sg(s) + t·z) / T)``,   ``q = softmax(s / T)``,

    with ``s``/``z`` the student's/teacher's logits at that position and ``sg`` stop-gradient: the
    whole target is detached, so the gradient flows only through the student's log-softmax and equals
    that of ``KL(p_t ‖ q)``, ``(q − p_t) / T`` per token. ``t = 1`` is forward KL to the teacher plus the
    teacher's entropy; ``t = 0`` has zero gradient.

    Conventions of this module: causal shift, ``-100`` masked (never computed), sum over vocabulary and
    valid tokens divided by ``num_items`` (the optimizer step's valid tokens) or this batch's count,
    float32 math. ``t``: a float or a 0-d tensor (``TAIDSchedule.t``). Deviations from the official
    code: its per-micro-batch masked mean becomes our step-level ``num_items`` reduction (equal without
    gradient accumulation on one process); ``temperature`` (default 1 = the official code, which has
    none) divides both logits, no T² factor. The official ``inf`` masking of student logits is covered
    by writing 0 wherever ``p_t = 0``.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, not {temperature}")
    if student_logits.dim() != 3:
        raise ValueError(f"student_logits must be [batch, seq, vocab], not {list(student_logits.shape)}")
    batch, seq, vocab = student_logits.shape
    if teacher_logits.shape[:2] != (batch, seq):
        raise ValueError(f"teacher_logits {list(teacher_logits.shape)} must match student_logits {[batch, seq, vocab]}")
    _check_vocab(vocab, teacher_logits.shape[-1])
    _check_labels(labels, batch, seq, "logits")
    if isinstance(t, Tensor):
        if t.numel() != 1:
            raise ValueError(f"t must be a scalar, not a tensor of shape {list(t.shape)}")
        t = t.detach().reshape(())
    rows = _valid_rows(labels, seq)
    wd = _work_dtype(student_logits)
    s = student_logits.reshape(batch * seq, vocab).index_select(0, rows).to(wd)
    z = teacher_logits.detach().reshape(batch * seq, vocab).index_select(0, rows).to(wd)
    if isinstance(t, Tensor):
        t = t.to(device=s.device, dtype=wd)
    p_t = F.softmax(((1 - t) * s.detach() + t * z) / temperature, dim=-1)
    log_q = F.log_softmax(s / temperature if temperature != 1.0 else s, dim=-1)
    total = -(p_t * log_q).masked_fill(p_t == 0, 0.0).sum()  # p_t = 0 (e.g. a -inf logit): exactly 0
    return _reduce(total, rows.numel(), num_items)


def token_logprobs(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Log-probabilities of the label tokens under ``logits / temperature`` with the causal shift:
    ``(logp [batch, seq-1], mask [batch, seq-1])`` where ``logp[:, i] = log softmax(logits[:, i])[labels[:, i+1]]``
    and ``mask`` marks labels that are not ``-100`` (masked positions hold 0). In float32; the
    gradient flows to ``logits``. The building block of sequence-level and policy objectives
    (``docs/conventions.md``, "Sequence and policy objectives")."""
    batch, seq, _ = logits.shape
    _check_labels(labels, batch, seq, "logits")
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    lp = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    lp = lp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return lp.masked_fill(~mask, 0.0), mask


def sequence_logprob(logits: Tensor, labels: Tensor, normalize: bool = False, temperature: float = 1.0) -> Tensor:
    """``[batch]``: the sum over each sequence's supervised tokens of their log-probabilities (the
    conventions' sequence log-prob), or their mean with ``normalize=True`` (length-normalised; a
    sequence with no supervised token gives 0)."""
    lp, mask = token_logprobs(logits, labels, temperature)
    total = lp.sum(-1)
    return total / mask.sum(-1).clamp(min=1) if normalize else total
