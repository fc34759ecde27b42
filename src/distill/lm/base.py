"""The base of every language-model method (``methods/``).

Losses are sums over supervised tokens divided by the optimizer step's token count (``num_items``,
set by the engine from :meth:`LMDistiller.count_items`), so gradient accumulation and several
processes train exactly as one big batch (``docs/conventions.md``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from distill.core.distiller import Distiller, TaskInfo
from distill.core.registry import Params
from distill.lm.losses import IGNORE_INDEX
from distill.lm.models import hidden_and_head, token_logits


class LMDistiller(Distiller):
    """Student and teacher are causal LMs; batches are ``input_ids``/``attention_mask``/``labels``/``index``.

    ``info.data`` is the task's ``LMTaskData`` (tokenizer, prompts, verifier). ``tokens_trained`` counts
    the (non-padding) tokens of every trained batch, for the training throughput."""

    uses_unlabeled = False
    tokens_seen: Tensor

    def __init__(self, student: nn.Module, teacher: nn.Module | None, params: Params, info: TaskInfo) -> None:
        super().__init__(student, teacher, params, info)
        self.vocab = info.num_classes
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long))
        n = getattr(params, "max_new_tokens", None)
        if n is not None and hasattr(info.data, "check_generation"):  # the task's own length is checked already
            for who, model in (("student", student), ("teacher", teacher)):
                if model is not None:
                    info.data.check_generation(model, who, n, "method.max_new_tokens")

    @property
    def data(self) -> Any:
        return self.info.data

    @property
    def tokens_trained(self) -> int:
        return int(self.tokens_seen)

    def count_items(self, batch: dict[str, Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def seen(self, batch: dict[str, Tensor]) -> None:
        if not self.replaying:
            self.tokens_seen += batch["attention_mask"].sum()

    def student_logits(self, batch: dict[str, Tensor]) -> Tensor:
        return token_logits(self.student, batch, self.vocab)

    def student_hidden(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        return hidden_and_head(self.student, batch, self.vocab)

    def teacher_token_logits(self, batch: dict[str, Tensor]) -> Tensor:
        """The frozen teacher's logits under inference mode, cloned so autograd may save them."""
        assert self.teacher is not None
        with torch.inference_mode():
            out = token_logits(self.teacher, batch, self.vocab)
        return out.clone()
