"""``sft``: next-token cross-entropy on the task's completions, no teacher (the LM baseline; trains teachers)."""

from __future__ import annotations

from torch import Tensor

from distill.core.distiller import Step
from distill.core.registry import METHODS, Params
from distill.lm.base import LMDistiller
from distill.lm.losses import token_cross_entropy


class SFTParams(Params):
    pass


@METHODS.register("sft", "next-token cross-entropy on the task's completions (no teacher): LM baseline, teachers",
                  SFTParams)
class SFT(LMDistiller):
    """Supervised fine-tuning: ``Σ −log q(y_{i+1} | y_≤i)`` over supervised tokens / the step's token count."""

    needs_teacher = False

    def training_step(self, batch: dict[str, Tensor]) -> Step:
        self.seen(batch)
        loss = token_cross_entropy(self.student_logits(batch), batch["labels"], batch.get("num_items"))
        return Step({"student": loss}, {"ce": loss.detach()}, summed=("ce",))
