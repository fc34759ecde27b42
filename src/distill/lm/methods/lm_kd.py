"""``lm_kd``: off-policy token-level KD on the dataset's sequences, from a live teacher or a teacher cache.

``loss = kd_weight · D(p_T ‖ q_S) + ce_weight · CE(y, q_S)`` per supervised token, with ``D`` any
divergence of ``distill.lm.losses`` (forward KL is Hinton et al. 2015's word-level KD as used for
LMs, B3 in the catalogue; ``jsd`` with β is GKD's Eq. 1 (Agarwal et al. 2024) on fixed data; reverse
and skew KL as DistiLLM). Both terms are sums over tokens divided by the optimizer step's token count.

With ``teacher: {cache: DIR}`` the teacher is the cached top-k (``sparse_token_divergence``, tail
bucket or renormalized). ``fused: true`` computes the divergence (and the CE) chunk by chunk from the
student's hidden states and lm_head, never holding the full ``[tokens, vocab]`` logits.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from distill.core.distiller import Step
from distill.core.registry import METHODS, Params
from distill.lm import losses as L
from distill.lm.base import LMDistiller

Kind = Literal["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]


class LMKDParams(Params):
    kind: Kind = Field("forward_kl", description="token divergence (docs/conventions.md)")
    beta: float = Field(0.5, ge=0, le=1, description="generalized JSD's β (TRL convention: 0 forward, 1 reverse KL)")
    skew: float = Field(0.1, ge=0, lt=1, description="DistiLLM's α for the skew KLs")
    temperature: float = Field(1.0, gt=0)
    kd_weight: float = Field(1.0, ge=0)
    ce_weight: float = Field(0.0, ge=0, description="weight of next-token CE on the labels")
    tail: Literal["bucket", "renormalize"] = Field("bucket", description="top-k teacher (cache): the remaining mass")
    fused: bool = Field(False, description="chunked loss from hidden states: memory O(chunk·vocab)")
    chunk_size: int = Field(1024, ge=1)


def fused_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, num_items: Tensor | None,
                        chunk_size: int) -> Tensor:
    """Next-token CE without the full logits: forward KL to a one-hot top-1 "teacher" renormalized over
    its one id is exactly ``−log q(y)`` (``fused_sparse_token_divergence`` with k = 1)."""
    ids = torch.cat([labels[:, 1:], labels[:, -1:]], dim=1).clamp(min=0).unsqueeze(-1)
    return L.fused_sparse_token_divergence(hidden, weight, ids, torch.zeros(ids.shape, device=hidden.device),
                                           labels, "forward_kl", "renormalize", 1.0, num_items, chunk_size)


@METHODS.register("lm_kd", "token-level KD on dataset sequences (forward/reverse KL, JSD, skew KL, TVD), live or "
                  "cached teacher", LMKDParams)
class LMKD(LMDistiller):
    supports_cache = True
    params: LMKDParams

    def divergence(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """The KD term and, when asked for, the CE term of one batch."""
        p, n, labels = self.params, batch.get("num_items"), batch["labels"]
        kw = dict(kind=p.kind, temperature=p.temperature, num_items=n, beta=p.beta, skew=p.skew)
        cache = self.info.teacher_cache
        sparse = cache.lookup(batch["index"], labels) if cache is not None else None
        if p.fused:
            hidden, weight = self.student_hidden(batch)
            if sparse is not None:
                kd = L.fused_sparse_token_divergence(hidden, weight, *sparse, labels, tail=p.tail,
                                                     chunk_size=p.chunk_size, **kw)
            else:
                kd = L.fused_token_divergence(hidden, weight, self.teacher_token_logits(batch), labels,
                                              chunk_size=p.chunk_size, **kw)
            ce = fused_cross_entropy(hidden, weight, labels, n, p.chunk_size) if p.ce_weight else None
            return kd, ce
        s = self.student_logits(batch)
        if sparse is not None:
            kd = L.sparse_token_divergence(s, *sparse, labels, tail=p.tail, **kw)
        else:
            kd = L.token_divergence(s, self.teacher_token_logits(batch), labels, **kw)
        return kd, (L.token_cross_entropy(s, labels, n) if p.ce_weight else None)

    def training_step(self, batch: dict[str, Tensor]) -> Step:
        self.seen(batch)
        kd, ce = self.divergence(batch)
        loss = self.params.kd_weight * kd
        metrics = {"kd": kd.detach()}
        if ce is not None:
            loss = loss + self.params.ce_weight * ce
            metrics["ce"] = ce.detach()
        return Step({"student": loss}, metrics, summed=("kd", "ce"))
