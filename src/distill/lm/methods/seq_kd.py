"""``seq_kd``: sequence-level knowledge distillation (Kim & Rush 2016, arXiv 1606.07947).

Word-level KD matches the teacher's next-token distributions; sequence-level KD (Sec. 3.2) matches its
distribution over whole sequences, approximated by its mode: ``L_SEQ-KD ≈ −log q_S(ŷ | x)`` with
``ŷ`` the teacher's decoded output for prompt ``x`` (their Eq. for ``L_SEQ-KD`` after approximating
``p_T(t | s) ≈ 1{t = ŷ}``). So the student is fine-tuned (next-token CE) on the teacher's completions
instead of the dataset's.

``ŷ`` is generated once, for every training prompt, when training starts (the paper decodes the
training set once, then trains), with ``distill.lm.rollout.rollout``:

- ``greedy: true`` (default): greedy decoding, i.e. beam search with beam size 1. Deviation: the
  paper uses beam search (K = 5); greedy is the cheaper approximation of the teacher's mode.
- ``greedy: false``: one sample per prompt at ``temperature`` (full vocabulary), as TRL's
  ``GKDTrainer(seq_kd=True, lmbda=0)`` does, except that TRL resamples every step and we sample once.

A completion ends at (and includes) the teacher's first ``eos``, supervised like the dataset's ``eos``;
one cut at ``max_new_tokens`` has no ``eos``. The loss is ``Σ −log q_S`` over the completion tokens
divided by the optimizer step's supervised-token count (``num_items``, counted on the replaced batches).

With several processes every process generates the completions of all training prompts (the
engine's batch-to-process assignment changes every epoch); greedy decoding makes them identical, and
sampled ones are identical too because every process seeds the torch RNG alike.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from distill.core.distiller import Step, TaskInfo
from distill.core.registry import METHODS, Params
from distill.lm.base import LMDistiller
from distill.lm.losses import token_cross_entropy
from distill.lm.rollout import Rollouts, completion_examples, rollout
from distill.lm.data.task import require_prompts
from distill.lm.data.text import collate


class SeqKDParams(Params):
    greedy: bool = Field(True, description="greedy teacher completions (beam size 1); false: one sample each")
    temperature: float = Field(1.0, gt=0, description="sampling temperature when greedy is false")
    max_new_tokens: int | None = Field(None, ge=1, description="generation length; default the task's")
    gen_batch_size: int = Field(64, ge=1, description="prompts per generate call")


@METHODS.register("seq_kd", "sequence-level KD (Kim & Rush 2016): SFT on the teacher's greedy (or sampled) "
                  "completions of the training prompts", SeqKDParams)
class SeqKD(LMDistiller):
    params: SeqKDParams

    def __init__(self, student: nn.Module, teacher: nn.Module | None, params: SeqKDParams, info: TaskInfo) -> None:
        super().__init__(student, teacher, params, info)
        self.prompts = require_prompts(info, "seq_kd").prompts
        self.targets: Rollouts | None = None  # not checkpointed: regenerated (identically) on resume

    def on_train_start(self, total_steps: int, total_epochs: int) -> None:
        super().on_train_start(total_steps, total_epochs)
        # here, not lazily at the first step: the RNG state at this point is the same in a resumed
        # run (the checkpoint's RNG is restored later), so sampled targets are reproduced too
        self.generate_targets()

    def generate_targets(self) -> Rollouts:
        """The teacher's completion of every training prompt (once)."""
        if self.targets is None:
            assert self.teacher is not None
            p, tok = self.params, self.data.tokenizer
            with torch.no_grad():
                self.targets = rollout(self.teacher, self.prompts, max_new_tokens=p.max_new_tokens or self.data.max_new_tokens,
                                       eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, temperature=p.temperature,
                                       greedy=p.greedy, batch_size=p.gen_batch_size)
        return self.targets

    def prepare_batches(self, batches: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        return [self.target_batch(b) for b in batches]

    def target_batch(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The micro-batch's examples as prompt + teacher completion (only the completion supervised)."""
        targets = self.generate_targets()
        idx = batch["index"].tolist()
        examples = completion_examples([self.prompts[i] for i in idx], [targets.completions[i] for i in idx])
        device = batch["input_ids"].device
        out = {k: v.to(device) for k, v in collate(examples, self.data.tokenizer.pad_token_id).items()}
        out["index"] = batch["index"]
        return out

    def training_step(self, batch: dict[str, Tensor]) -> Step:
        self.seen(batch)
        loss = token_cross_entropy(self.student_logits(batch), batch["labels"], batch.get("num_items"))
        return Step({"student": loss}, {"ce": loss.detach()}, summed=("ce",))
