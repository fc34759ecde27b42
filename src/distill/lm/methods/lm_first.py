"""``lm_first``: FIRST for language models (S03, Shum et al. 2024, "FIRST: Teach A Reliable Large
Language Model Through Efficient Trustworthy Distillation"; official SHUMKASHUN/FIRST ``distill.py``).

Per supervised token (position ``i`` predicting token ``i + 1``):

1. *Concentrated knowledge*: the teacher's top-k next-token log-probs ``ℓ_1 ≥ … ≥ ℓ_k`` (temperature 1;
   the paper and the official data generation keep k = 5) from a live teacher (``topk`` of its
   log-softmax) or a teacher cache (``TeacherCache.lookup``, its first k entries).
2. *Trustworthy maximization*: the top-k re-normalised at a calibration temperature τ into the target
   ``q_T`` (``first_token_targets``). ``scaling="probs"`` (default, the official ``use_norm="softmax"``
   and the classifier ``first``'s ``first_targets``): ``q_T = softmax(p_topk / τ)``, a softmax over
   the *probabilities* ``p = exp(ℓ)``. ``scaling="logprobs"``: ``q_T = softmax(ℓ_topk / τ)``, i.e. the
   teacher tempered by τ (ordinary temperature scaling) and renormalised over its top k; with k = V
   and τ = 1 this is the teacher itself, so the loss is token-level forward KL.
3. The student is trained with the official forward KL ``Σ_j q_T,j · (log q_T,j − log q_S,j)`` over the
   k ids, summed over supervised tokens and divided by the optimizer step's token count
   (``first_token_loss``; ``fused_first_token_loss`` with ``fused: true``; both are
   ``distill.logits.losses.first_divergence``, shared with the classifier ``first``). ``q_S``:
   ``student_norm="topk"`` (default, official ``distill.py`` l. 268-271 and 292): the student's
   full-vocabulary softmax gathered at the k ids and normalised over them by the same map as the
   target at temperature 1 (official ``--student_temp`` default 1): a softmax of its top-k
   probabilities for ``scaling="probs"``, its log-probs minus their logsumexp over the k for
   ``"logprobs"``. ``student_norm="full"`` (ours): the gathered full-vocabulary log-softmax itself, so
   student mass outside the top k is penalised (the sparse-teacher convention of
   ``docs/conventions.md``); on random logits its loss is 50-100x the official one, and for a student
   trained from scratch it avoids ``topk``'s vanishing gradient (both in the classifier ``first``'s docstring).

τ is fitted once, at construction, on the *validation* split at token level: the grid value of
``distill.core.metrics.CALIBRATION_GRID`` that minimises the 15-bin ECE (``distill.core.metrics.ece``)
of ``q_T`` over the val split's supervised tokens, with the confidence ``max_j q_T,j`` and the
prediction counted correct when the teacher's top-1 token is the next token
(``fit_token_calibration``). It lives in the buffer ``calibration_temperature`` (checkpointed).

Deviations, all shared with the classifier ``first`` where they apply:

- The official code takes τ as an argument (``--teacher_temp``, default 1; its example script even
  uses ``use_norm=linear`` with the "other token" bucket and no temperature) and publishes no code
  that fits it; fitting τ on held-out data for minimal ECE is our reading of "trustworthy
  maximization" (the paper's criterion is calibration, measured by ECE). NLL is not offered: a
  next token outside the top k has probability 0 under ``q_T``.
- The official repository is inconsistent with itself (commit c2c7c76): (a) ``data_processing/generate.py``
  l. 19, 28, 37 stores *log*-probs (``log_softmax``) under the key ``top_log_probs``, while
  ``TeacherDataset.py`` l. 21, 30 reads ``top_token_prob`` and ``distill.py`` l. 261, 287 treats the
  values as probabilities (``teacher_top_prob``, ``1 − sum``); fed ``generate.py``'s output, the
  teacher would be normalised as log-probs (our ``scaling="logprobs"``) but the student, gathered from
  ``F.softmax`` at l. 268-271, as probabilities. Our ``topk`` applies the same map to both. (b) The
  "other token" branch (l. 286-290) concatenates *probabilities* (top-k and ``1 − Σ``) and passes them
  to ``F.kl_div(..., log_target=True)`` (l. 310, 318) as if they were log-probs. (c) The published run
  script ``example_run.sh`` l. 13-14 uses ``--use_other_token yes --use_norm linear``: the other-token
  branch, so neither the softmax normalisation nor any temperature is applied, unlike the paper's
  calibrated softmax. (d) ``label_smoothing`` (l. 296-300) shifts log-probs, not probabilities, and
  only when ``--use_label_smoothing yes`` (default ``no``; not offered here).
- Official reduction: per-sequence token sum, mean over the per-device batch; ours: sum over
  supervised tokens / the optimizer step's token count (conventions).
- The official "other token" mode (top-k plus a tail bucket, uncalibrated) is ``lm_kd`` with a
  teacher cache and ``tail: bucket``; it is not repeated here.
- A teacher cache holds only the training split, so ``lm_first`` from a cache cannot fit τ: give
  ``method.calibration_temperature`` (e.g. the value a live-teacher run logged as
  ``train/calibration_temperature``).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from distill.core.distiller import Step, TaskInfo
from distill.core.metrics import CALIBRATION_GRID, ece
from distill.core.registry import METHODS, Params
from distill.errors import RecipeError
from distill.lm import losses as L
from distill.lm.base import LMDistiller
from distill.lm.methods.lm_kd import fused_cross_entropy
from distill.lm.losses import _valid_rows
from distill.lm.models import token_logits
from distill.logits.losses import FirstScaling, StudentNorm, first_divergence, first_normalize

Scaling = FirstScaling

# the calibrated target ``q_T`` as log-probs from the teacher's top-k log-probs (shared with the classifier)
first_token_targets = first_normalize


def first_token_loss(student_logits: Tensor, teacher_ids: Tensor, teacher_logprobs: Tensor, labels: Tensor,
                     calibration_temperature: float, scaling: Scaling = "probs",
                     num_items: float | Tensor | None = None, student_norm: StudentNorm = "topk") -> Tensor:
    """FIRST's token loss: ``Σ_j q_T,j · (log q_T,j − log q_S,j)`` per supervised token
    (``distill.logits.losses.first_divergence``), summed over tokens and divided by ``num_items`` (or
    this batch's supervised tokens); ``q_T`` = ``first_token_targets(teacher_logprobs, τ, scaling)``,
    ``q_S`` the student normalised over the k ids (``student_norm``, module docstring). Shapes:
    ``student_logits [B, T, V]``, ``teacher_ids``/``teacher_logprobs [B, T, k]`` (the teacher's top-k at
    temperature 1, aligned with the logits), ``labels [B, T]``."""
    batch, seq, vocab = student_logits.shape
    L._check_sparse(teacher_ids, teacher_logprobs, batch, seq, vocab)
    L._check_labels(labels, batch, seq, "logits")
    rows = _valid_rows(labels, seq)
    k = teacher_ids.shape[-1]
    target = first_token_targets(teacher_logprobs.detach(), calibration_temperature, scaling)
    per = first_divergence(student_logits.reshape(batch * seq, vocab).index_select(0, rows),
                           teacher_ids.reshape(batch * seq, k).index_select(0, rows),
                           target.reshape(batch * seq, k).index_select(0, rows), student_norm, scaling)
    return L._reduce(per.sum(), rows.numel(), num_items)


def fused_first_token_loss(hidden: Tensor, weight: Tensor, teacher_ids: Tensor, teacher_logprobs: Tensor,
                           labels: Tensor, calibration_temperature: float, scaling: Scaling = "probs",
                           num_items: float | Tensor | None = None, student_norm: StudentNorm = "topk",
                           chunk_size: int = 1024) -> Tensor:
    """``first_token_loss(hidden @ weight.T, ...)`` without the full ``[tokens, vocab]`` logits:
    ``student_norm="full"`` is ``fused_sparse_token_divergence`` (forward KL, ``tail="renormalize"``);
    ``"topk"`` runs ``first_divergence`` over ``chunk_size`` tokens at a time under activation
    checkpointing, so only one chunk's logits exist at a time, in the forward and in the backward."""
    target = first_token_targets(teacher_logprobs.detach(), calibration_temperature, scaling)
    if student_norm == "full":
        return L.fused_sparse_token_divergence(hidden, weight, teacher_ids, target, labels, "forward_kl",
                                               "renormalize", 1.0, num_items, chunk_size)
    batch, seq, hid = hidden.shape
    L._check_sparse(teacher_ids, teacher_logprobs, batch, seq, weight.shape[0])
    L._check_labels(labels, batch, seq, "hidden states")
    rows = _valid_rows(labels, seq)
    k = teacher_ids.shape[-1]
    h = hidden.reshape(batch * seq, hid).index_select(0, rows)
    ids = teacher_ids.reshape(batch * seq, k).index_select(0, rows)
    lt = target.reshape(batch * seq, k).index_select(0, rows)

    def chunk(h_c: Tensor, w: Tensor, ids_c: Tensor, lt_c: Tensor) -> Tensor:
        return first_divergence(h_c.to(w.dtype) @ w.T, ids_c, lt_c, student_norm, scaling).sum()

    total = torch.zeros((), dtype=torch.promote_types(weight.dtype, torch.float32), device=hidden.device)
    for lo in range(0, rows.numel(), chunk_size):
        hi = lo + chunk_size
        total = total + checkpoint(chunk, h[lo:hi], weight, ids[lo:hi], lt[lo:hi], use_reentrant=False)
    return L._reduce(total, rows.numel(), num_items)


@torch.inference_mode()
def teacher_topk_on(teacher: nn.Module, split: Any, vocab: int, top_k: int,
                    batch_size: int = 64) -> tuple[Tensor, Tensor]:
    """The teacher's top-k next-token log-probs ``[N, k]`` (descending) at every supervised position of
    ``split`` (a ``TokenDataset``), and where the next token sits among them ``[N]`` (``top_k`` when it
    is not in the top k). Rows in the losses' order (``losses._valid_rows``), on the CPU."""
    device = next(teacher.parameters()).device
    was = teacher.training
    teacher.eval()
    lps, pos = [], []
    try:
        for batch in split.batches(batch_size):
            labels = batch["labels"]
            rows = _valid_rows(labels, labels.shape[1])
            if rows.numel() == 0:
                continue
            logits = token_logits(teacher, {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}, vocab)
            lp = torch.log_softmax(logits.reshape(-1, vocab).index_select(0, rows.to(device)).float(), dim=-1)
            top, ids = lp.topk(top_k, dim=-1)
            nxt = labels.reshape(-1)[rows + 1]  # row b·seq + i predicts labels[b, i + 1]
            hit = ids.cpu() == nxt[:, None]
            pos.append(torch.where(hit.any(-1), hit.float().argmax(-1), torch.full_like(nxt, top_k)))
            lps.append(top.cpu())
    finally:
        teacher.train(was)
    if not lps:
        raise RecipeError("method 'lm_first' fits its calibration temperature on the validation split, which has "
                          "no supervised token")
    return torch.cat(lps), torch.cat(pos)


def token_calibration_ece(topk_logprobs: Tensor, next_pos: Tensor, calibration_temperature: float,
                          scaling: Scaling = "probs") -> float:
    """15-bin ECE of the calibrated top-k targets over tokens: confidence ``max q_T``, correct when the
    target's argmax (the teacher's top-1) is the next token (``next_pos`` as from ``teacher_topk_on``)."""
    return ece(first_token_targets(topk_logprobs, calibration_temperature, scaling), next_pos)


def fit_token_calibration(topk_logprobs: Tensor, next_pos: Tensor, scaling: Scaling = "probs",
                          grid: Tensor = CALIBRATION_GRID) -> float:
    """The ``grid`` temperature with the lowest token-level ECE (``token_calibration_ece``); the first
    (smallest) on ties. A grid search, as ECE is piecewise constant in τ."""
    scores = torch.tensor([token_calibration_ece(topk_logprobs, next_pos, float(t), scaling) for t in grid])
    return float(grid[int(scores.argmin())])


class LMFIRSTParams(Params):
    top_k: int = Field(5, ge=1, description="teacher tokens kept per position (the paper's concentrated knowledge: 5)")
    scaling: Scaling = Field("probs", description="probs: softmax(p_topk/τ) (official use_norm=softmax); "
                                                  "logprobs: softmax(log p_topk/τ) (temperature scaling)")
    calibration_temperature: float | None = Field(
        None, gt=0, description="τ; None fits it on the validation split for minimal token ECE (live teacher only)")
    student_norm: StudentNorm = Field(
        "topk", description="topk: the student renormalised over the teacher's top-k as the target (official); "
                            "full: its full-vocabulary log-softmax at those ids (mass outside penalised)")
    kd_weight: float = Field(1.0, ge=0)
    ce_weight: float = Field(0.0, ge=0, description="next-token CE on the labels (the paper has none)")
    fused: bool = Field(False, description="chunked loss from hidden states: memory O(chunk·vocab)")
    chunk_size: int = Field(1024, ge=1)
    calibration_batch_size: int = Field(64, ge=1, description="validation batch size of the τ fit")


@METHODS.register("lm_first", "FIRST for LMs: top-k teacher tokens re-normalised at a temperature fitted for "
                  "min token ECE on val (S03)", LMFIRSTParams)
class LMFIRST(LMDistiller):
    """``kd_weight · KL(q_T ‖ q_S)`` over the teacher's top-k tokens (+ ``ce_weight · CE``), per supervised
    token / the step's token count; ``q_T`` from ``first_token_targets`` at the buffer
    ``calibration_temperature`` (module docstring)."""

    supports_cache = True
    params: LMFIRSTParams
    calibration_temperature: Tensor

    def __init__(self, student: nn.Module, teacher: nn.Module | None, params: LMFIRSTParams, info: TaskInfo) -> None:
        super().__init__(student, teacher, params, info)
        p, cache = params, info.teacher_cache
        if p.top_k > self.vocab:
            raise RecipeError(f"method.top_k {p.top_k} exceeds the vocabulary ({self.vocab} tokens)")
        if cache is not None and p.top_k > cache.k:
            raise RecipeError(f"method.top_k {p.top_k} exceeds the teacher cache's k ({cache.k}); lower top_k or "
                              f"re-run `distill cache-teacher` with --top-k {p.top_k}")
        tau = p.calibration_temperature
        if tau is None:
            if teacher is None:
                raise RecipeError("method 'lm_first' from a teacher cache cannot fit its calibration temperature (the "
                                  "cache holds only the training split): set method.calibration_temperature, e.g. the "
                                  "train/calibration_temperature a run with a live teacher logged")
            if info.val is None or len(info.val) == 0:
                raise RecipeError("method 'lm_first' fits its calibration temperature on the validation split, "
                                  "which is empty: give the task validation examples or set "
                                  "method.calibration_temperature")
            lp, pos = teacher_topk_on(teacher, info.val, self.vocab, p.top_k, p.calibration_batch_size)
            tau = fit_token_calibration(lp, pos, p.scaling)
        self.register_buffer("calibration_temperature", torch.tensor(float(tau)))

    def teacher_topk(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The teacher's top-k ids ``[B, T, k]`` and log-probs ``[B, T, k]`` (descending, temperature 1)."""
        k, cache = self.params.top_k, self.info.teacher_cache
        if cache is not None:
            ids, lp = cache.lookup(batch["index"], batch["labels"])
            return ids[..., :k], lp[..., :k]  # stored in descending order
        lp, ids = torch.log_softmax(self.teacher_token_logits(batch).float(), dim=-1).topk(k, dim=-1)
        return ids, lp

    def training_step(self, batch: dict[str, Tensor]) -> Step:
        self.seen(batch)
        p, n, labels = self.params, batch.get("num_items"), batch["labels"]
        tau = float(self.calibration_temperature)
        ids, lp = self.teacher_topk(batch)
        ce = None
        if p.fused:
            hidden, weight = self.student_hidden(batch)
            kd = fused_first_token_loss(hidden, weight, ids, lp, labels, tau, p.scaling, n, p.student_norm,
                                        p.chunk_size)
            if p.ce_weight:
                ce = fused_cross_entropy(hidden, weight, labels, n, p.chunk_size)
        else:
            s = self.student_logits(batch)
            kd = first_token_loss(s, ids, lp, labels, tau, p.scaling, n, p.student_norm)
            if p.ce_weight:
                ce = L.token_cross_entropy(s, labels, n)
        loss = p.kd_weight * kd
        metrics: dict[str, Tensor | float] = {"kd": kd.detach(), "calibration_temperature": self.calibration_temperature}
        if ce is not None:
            loss = loss + p.ce_weight * ce
            metrics["ce"] = ce.detach()
        return Step({"student": loss}, metrics, summed=("kd", "ce"))

