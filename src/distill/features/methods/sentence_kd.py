"""``sentence_kd`` (a sentence encoder distilled into a shallower one: token hint + pooled-embedding cosine)
and ``simcse`` (the same student trained alone, unsupervised SimCSE), for the ``sentences`` task.

``sentence_kd``'s objective on the last hidden states ``h_s, h_t [B, L, D]`` of student and teacher::

    loss = token_weight · (1/|M|) Σ_{(b,i)∈M} ℓ(h_s[b,i], h_t[b,i])
           + pooled_weight · (1/B) Σ_b (1 − cos(e_s[b], e_t[b]))

``M`` the real (unpadded) tokens, ``ℓ`` FitNets' hint (Romero et al. 2015, arXiv 1412.6550, Eq. 3: the
squared error, here averaged over the D features; ``token_loss: mse``) or ``1 − cos`` (``cosine``), and
``e = normalize(mean-pool(h))`` the sentence embedding the ``sentences`` task defines (all-MiniLM-L6-v2's:
mean pooling with the attention mask, L2 normalisation). Ours, not one paper's: the combination, both
weights 1 (not tuned), the token loss on the last layer only (student and teacher share the hidden size,
so no projector). It is the objective of issue 13's MiniLM showcase (``features/tools/minilm.py``). A frozen
teacher's hidden states are computed the first time each training sentence is seen and reused (the
teacher is in eval mode: the same targets every epoch; not checkpointed, recomputed after a resume).

``simcse``: unsupervised SimCSE (Gao et al. 2021, arXiv 2104.08821, §3): each sentence encoded twice
with independent dropout masks, ``z_i`` and ``z_i⁺``, and ``−log(e^{sim(z_i, z_i⁺)/τ} / Σ_j e^{sim(z_i,
z_j⁺)/τ})`` averaged over the batch, ``sim`` the cosine, τ 0.05 (the paper's). Official code
princeton-nlp/SimCSE, ``simcse/models.py :: cl_forward`` (the two views are one forward of the duplicated
batch there; two forwards here, the same distribution). Ours: mean pooling (the paper pools [CLS], with an
MLP in training) so the control is the same encoder as the distilled student; no teacher.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from distill.core.distiller import Distiller, Step, TaskInfo
from distill.core.registry import METHODS, Params
from distill.errors import MismatchError, RecipeError
from distill.features.hf_encoder import mean_pool, model_inputs, sentence_embedding
from distill.features.losses import cosine_loss, hint_loss, info_nce


def sentence_kd_terms(student: Tensor, teacher: Tensor, mask: Tensor,
                      token_loss: Literal["mse", "cosine"] = "mse") -> tuple[Tensor, Tensor]:
    """``(token, pooled)``: the per-token feature loss over the real tokens of ``[B, L, D]`` hidden states
    (``mse``: FitNets' hint, the squared error averaged over features; ``cosine``: ``1 − cos``; padding
    contributes nothing) and ``1 − cos`` between the two sentence embeddings, averaged over the batch."""
    if token_loss not in ("mse", "cosine"):
        raise RecipeError(f"token loss kind must be 'mse' or 'cosine', not {token_loss!r}")
    token = (hint_loss if token_loss == "mse" else cosine_loss)(student, teacher, mask)
    pooled = cosine_loss(sentence_embedding(student, mask), sentence_embedding(teacher, mask))
    return token, pooled


def sentence_kd_loss(student: Tensor, teacher: Tensor, mask: Tensor, token_weight: float = 1.0,
                     pooled_weight: float = 1.0, token_loss: Literal["mse", "cosine"] = "mse") -> Tensor:
    """``token_weight · token + pooled_weight · pooled`` (``sentence_kd_terms``)."""
    token, pooled = sentence_kd_terms(student, teacher, mask, token_loss)
    return token_weight * token + pooled_weight * pooled


def simcse_loss(z1: Tensor, z2: Tensor, temperature: float = 0.05) -> Tensor:
    """Unsupervised SimCSE (Gao et al. 2021, §3): cross-entropy of picking ``z2[i]`` for ``z1[i]`` among all
    ``z2`` of the batch, similarities cosine / temperature, in float32."""
    return info_nce(z1, z2, temperature)


class TeacherHidden:
    """A frozen teacher's last hidden states per training sentence (its real tokens), computed on first use."""

    def __init__(self) -> None:
        self.rows: dict[int, Tensor] = {}

    def __call__(self, teacher: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """``[B, L, D]`` for the batch (zero at padding, which every loss masks)."""
        index, mask = batch["index"].tolist(), batch["attention_mask"]
        missing = [j for j, i in enumerate(index) if i not in self.rows]
        if missing:
            sub = {k: v[missing] for k, v in model_inputs(batch).items()}
            with torch.inference_mode():
                hidden = teacher(**sub).last_hidden_state
            for j, h, n in zip(missing, hidden, sub["attention_mask"].sum(-1).tolist()):
                self.rows[index[j]] = h[:n].clone()
        first = self.rows[index[0]]
        out = first.new_zeros(len(index), mask.shape[1], first.shape[-1])
        for j, i in enumerate(index):
            h = self.rows[i]
            out[j, :len(h)] = h
        return out


class SentenceKDParams(Params):
    token_weight: float = Field(1.0, ge=0, description="weight of the per-token loss on the last hidden states")
    pooled_weight: float = Field(1.0, ge=0, description="weight of 1 - cos between the sentence embeddings")
    token_loss: Literal["mse", "cosine"] = Field("mse", description="mse: FitNets' hint; cosine: 1 - cos per token")
    cache_teacher: bool = Field(True, description="reuse a frozen teacher's hidden states of a sentence after "
                                "its first batch (the same values; no teacher forward after the first epoch)")


@METHODS.register("sentence_kd", "sentence-encoder KD: token hint on the last hidden states + pooled-embedding "
                  "cosine (issue 13's MiniLM showcase)", SentenceKDParams)
class SentenceKD(Distiller):
    """The module docstring's objective; student and teacher HF encoders with one hidden size and tokenizer."""

    params: SentenceKDParams

    def __init__(self, student: nn.Module, teacher: nn.Module | None, params: SentenceKDParams, info: TaskInfo) -> None:
        super().__init__(student, teacher, params, info)
        assert teacher is not None
        ds, dt = student.config.hidden_size, teacher.config.hidden_size
        if ds != dt:
            raise MismatchError(f"sentence_kd compares hidden states directly: the student's width {ds} must equal "
                                f"the teacher's {dt}")
        self._hidden = TeacherHidden() if params.cache_teacher else None

    def teacher_hidden(self, batch: dict[str, Tensor]) -> Tensor:
        assert self.teacher is not None
        if self._hidden is not None and not self.teacher_trainable:
            return self._hidden(self.teacher, batch)
        with torch.inference_mode():
            out = self.teacher(**model_inputs(batch)).last_hidden_state
        return out.clone()

    def training_step(self, batch: dict[str, Tensor]) -> Step:
        p = self.params
        mask = batch["attention_mask"]
        s = self.student(**model_inputs(batch)).last_hidden_state
        token, pooled = sentence_kd_terms(s, self.teacher_hidden(batch), mask, p.token_loss)
        loss = p.token_weight * token + p.pooled_weight * pooled
        return Step({"student": loss}, {"token": token.detach(), "pooled": pooled.detach()})


class SimCSEParams(Params):
    temperature: float = Field(0.05, gt=0, description="τ of the contrastive softmax (the paper's 0.05)")


@METHODS.register("simcse", "unsupervised SimCSE: the student alone, dropout views as positives (Gao et al. 2021)",
                  SimCSEParams)
class SimCSE(Distiller):
    """Unsupervised SimCSE (module docstring); needs no teacher. Dropout must be on: the engine trains in
    train mode, and an encoder with zero dropout would see two identical views."""

    needs_teacher = False
    params: SimCSEParams

    def training_step(self, batch: dict[str, Tensor]) -> Step:
        mask, inputs = batch["attention_mask"], model_inputs(batch)
        z1 = mean_pool(self.student(**inputs).last_hidden_state, mask)
        z2 = mean_pool(self.student(**inputs).last_hidden_state, mask)  # another dropout mask
        return Step({"student": simcse_loss(z1, z2, self.params.temperature)})
