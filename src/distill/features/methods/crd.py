"""``crd``: contrastive representation distillation (Tian, Krishnan & Isola 2020, "Contrastive
Representation Distillation").

Official code: HobbitLong/RepDistiller ``crd/criterion.py :: CRDLoss, ContrastLoss, Embed`` and
``crd/memory.py :: ContrastMemory``; negatives from ``dataset/cifar100.py :: CIFAR100InstanceSample``
(``mode='exact'``); ``train_student.py`` defaults ``feat_dim 128, nce_k 16384, nce_t 0.07, nce_m 0.5``,
``--distill crd -a 0 -b 0.8`` (CRD) and ``-a 1 -b 0.8`` (CRD+KD).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from distill.core.distiller import Step, TaskInfo
from distill.core.registry import METHODS
from distill.errors import RecipeError
from distill.features.losses import nce_contrast_loss
from distill.features.classic import ClassicDistiller, ClassicParams


class Embed(nn.Module):
    """The official ``Embed``: Linear to ``feat_dim``, then L2 normalisation."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.linear(x.flatten(1)), dim=1)


def negative_table(labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Per class ``c`` (row ``c``) the dataset indices of the labeled samples of every other class, and for
    unlabeled samples (row ``num_classes``) every index (also a class with no other labeled class); rows
    padded with -1. Returns ``(table [C + 1, n], lengths [C + 1])``."""
    n = len(labels)
    rows = [torch.nonzero((labels != c) & (labels >= 0), as_tuple=True)[0] for c in range(num_classes)]
    rows = [r if len(r) else torch.arange(n) for r in rows] + [torch.arange(n)]
    table = torch.full((num_classes + 1, n), -1, dtype=torch.long)
    for c, r in enumerate(rows):
        table[c, : len(r)] = r
    return table, torch.tensor([len(r) for r in rows])


def sample_negatives(table: Tensor, lengths: Tensor, rows: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """``k`` negatives per sample from its row of ``table``: without replacement when the row holds at
    least ``k`` (``np.random.choice(..., replace=False)`` of the official dataset), else with replacement."""
    length = lengths[rows]
    if bool((length >= k).all()):
        noise = torch.rand(len(rows), table.shape[1], generator=generator, device=table.device)
        noise = noise.masked_fill(torch.arange(table.shape[1], device=table.device)[None, :] >= length[:, None], 2.0)
        pick = noise.topk(k, dim=1, largest=False).indices
    else:
        u = torch.rand(len(rows), k, generator=generator, device=table.device)
        pick = (u * length[:, None]).long().clamp_max(length[:, None] - 1)
    return torch.gather(table[rows], 1, pick)


def critic(bank: Tensor, v: Tensor, idx: Tensor) -> Tensor:
    """``⟨bank[idx[i, j]], v[i]⟩`` ``[b, 1 + k]``: the official gathers the ``[b, 1 + k, d]`` rows and
    multiplies (``torch.bmm``); when the bank has fewer rows than that, scoring every row
    (``v @ bankᵀ``) and gathering the scores is the same number for far less memory traffic."""
    if bank.shape[0] <= idx.numel():
        return torch.gather(v @ bank.T.clone(), 1, idx)  # a copy: autograd keeps it, the bank is updated in place
    return torch.bmm(bank[idx], v.unsqueeze(-1)).squeeze(-1)


class CRDParams(ClassicParams):
    crd_weight: float = Field(0.8, ge=0, description="β of the CRD term (RepDistiller -b 0.8)")
    feat_dim: int = Field(128, ge=1, description="width of the contrastive embedding (official feat_dim)")
    nce_k: int = Field(16384, ge=1, description="negatives per positive (official nce_k), capped at the dataset size − 1")
    nce_t: float = Field(0.07, gt=0, description="temperature τ of the critic exp(⟨t, s⟩/τ) (official nce_t)")
    nce_m: float = Field(0.5, ge=0, le=1, description="momentum of the memory-bank update (official nce_m)")


@METHODS.register("crd", "contrastive representation distillation: memory bank of negatives, NCE, k 16384, τ 0.07 (Tian2020)", CRDParams)
class CRD(ClassicDistiller):
    """Contrastive representation distillation (Tian et al. 2020, §3.1-3.4, the NCE objective Eq. 18)::

        loss = ce_weight·CE + kd_weight·KD + crd_weight · (L_NCE(student anchor) + L_NCE(teacher anchor))

    Student and teacher penultimate embeddings go through a Linear + L2 norm each (``Embed``, 128-d).
    Two memory banks (``memory_s``, ``memory_t``: one row per training sample, buffers) hold the
    embeddings of the whole training set. For a batch, each sample's positive is its own row (its
    ``index``) and its ``k`` negatives rows of other classes (the official ``exact`` mode; unlabeled
    transfer samples, ours: any row). Scores ``exp(⟨memory_t[j], s⟩ / τ) / Z_s`` (student anchor) and
    ``exp(⟨memory_s[j], t⟩ / τ) / Z_t`` (teacher anchor), ``Z`` fixed from the first batch as
    ``mean(score) · n`` (official ``ContrastMemory``); ``nce_contrast_loss`` of each. Then the banks'
    rows of the batch move to ``normalise(m · row + (1 − m) · embedding)``.

    The banks and both ``Z`` are buffers in the distiller's ``state_dict``, so they are checkpointed
    and a resumed run continues with the same bank. ``k`` is capped at ``num_train − 1``; negatives are
    drawn with replacement only when a class's complement holds fewer than ``k`` rows (as the official
    dataset). The bank is not updated during SAM's second pass (the same batch again).
    """

    layer_pick = None
    params: CRDParams

    def __init__(self, student: nn.Module, teacher: nn.Module | None, params: CRDParams, info: TaskInfo) -> None:
        super().__init__(student, teacher, params, info)
        n = info.num_train
        if n < 2:
            raise RecipeError("crd: the training set needs at least 2 samples (negatives come from it)")
        self.n_data, self.k = n, min(params.nce_k, n - 1)
        d_s, d_t = self.embed_dims()
        self.projectors["embed_s"] = Embed(d_s, params.feat_dim)
        self.projectors["embed_t"] = Embed(d_t, params.feat_dim)
        stdv = 1.0 / math.sqrt(params.feat_dim / 3)
        self.register_buffer("memory_s", torch.rand(n, params.feat_dim) * 2 * stdv - stdv)  # official memory_v1
        self.register_buffer("memory_t", torch.rand(n, params.feat_dim) * 2 * stdv - stdv)  # official memory_v2
        self.register_buffer("z", torch.full((2,), -1.0))  # Z_s, Z_t; < 0: not set yet
        labels = info.train.y if info.train is not None else torch.full((n,), -1, dtype=torch.long)
        table, lengths = negative_table(labels.long(), info.num_classes)
        self.register_buffer("neg_table", table, persistent=False)  # rebuilt from the labels, not saved
        self.register_buffer("neg_lengths", lengths, persistent=False)

    def contrast(self, v_s: Tensor, v_t: Tensor, index: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Scores ``[b, 1 + k]`` for the student anchor and the teacher anchor, and the rows sampled."""
        rows = torch.where(y >= 0, y, torch.full_like(y, self.neg_table.shape[0] - 1))
        idx = torch.cat([index[:, None], sample_negatives(self.neg_table, self.neg_lengths, rows, self.k)], dim=1)
        tau = self.params.nce_t
        out_s = torch.exp(critic(self.memory_t, v_s, idx) / tau)
        out_t = torch.exp(critic(self.memory_s, v_t, idx) / tau)
        if self.z[0] < 0:  # the official sets Z once, from the first batch
            self.z.copy_(torch.stack([out_s.mean(), out_t.mean()]).detach() * self.n_data)
        return out_s / self.z[0], out_t / self.z[1], idx

    @torch.no_grad()
    def update_memory(self, v_s: Tensor, v_t: Tensor, index: Tensor) -> None:
        m = self.params.nce_m
        for bank, v in ((self.memory_s, v_s), (self.memory_t, v_t)):
            bank.index_copy_(0, index, F.normalize(bank[index] * m + v.detach() * (1 - m), dim=1))

    def training_step(self, batch: dict[str, Tensor]) -> Step:
        s, t = self.forwards(batch["x"])
        v_s, v_t = self.projectors["embed_s"](s.embed), self.projectors["embed_t"](t.embed)
        index = batch["index"].long()
        out_s, out_t, _ = self.contrast(v_s, v_t, index, batch["y"])
        crd_s, crd_t = nce_contrast_loss(out_s, self.n_data), nce_contrast_loss(out_t, self.n_data)
        if not self.replaying:
            self.update_memory(v_s, v_t, index)
        crd = crd_s + crd_t
        return self.step(s, t, batch, self.params.crd_weight * crd, {"crd": crd, "crd_student": crd_s, "crd_teacher": crd_t})
