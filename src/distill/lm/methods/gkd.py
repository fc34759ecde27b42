"""``gkd``: on-policy distillation with the generalized JSD (GKD, Agarwal et al. 2024, arXiv 2306.13649; B5 in
the catalogue).

Algorithm 1 of the paper: with probability λ (``lmbda``) a batch is replaced by the student's own
samples ``y ~ q_S(· | x)`` for the batch's prompts (on-policy), otherwise it keeps the dataset's
sequences (supervised KD; with ``seq_kd: true`` the teacher's samples instead); the loss is the
token-level generalized JSD_β (Eq. 1) between teacher and student on those tokens:

``loss = Σ_{completion tokens} JSD_β(p_T(· | x, y_<t) ‖ q_S(· | x, y_<t)) / num_items``.

No gradient flows through the sampling (the paper and TRL treat the samples as data).

Matched to TRL's ``GKDTrainer`` (``trl/experimental/gkd/gkd_trainer.py`` of TRL v1.9.0, commit ``35def3ee``,
2026-07-21; ``trl/trainer/gkd_trainer.py`` was removed on 2026-02-10; ``GKDConfig`` defaults ``lmbda`` 0.5,
``beta`` 0.5, ``temperature`` 0.9, ``max_new_tokens`` 128):

- The λ coin is tossed once per *micro-batch*, as TRL's ``training_step`` does (the HF Trainer calls
  it once per gradient-accumulation micro-batch), and a micro-batch is on-policy when ``u < λ``
  (TRL: ``random.random() <= lmbda``; identical but for the measure-zero ``u == λ``). The uniform is
  drawn from the torch RNG (seeded by the run, checkpointed), not Python's ``random``; λ = 0 and
  λ = 1 draw nothing, so λ = 0 reproduces ``lm_kd`` with ``kind: jsd`` bitwise, RNG stream included.
- Sampling: ``do_sample``, full vocabulary (``top_k = 0``, no top-p) at ``temperature``. With
  ``seq_kd`` the teacher is sampled with the same settings (TRL uses one generation config for both).
  The teacher's sequences are generated only for the off-policy micro-batches, as TRL v1.9.0's
  ``training_step`` does (older TRL generated them every step and overwrote them on on-policy ones).
- The loss temperature: TRL calls ``generalized_jsd_loss`` without a temperature (T = 1), and its Liger
  path matches that (no temperature scaling); ``loss_temperature`` (default 1) makes that choice
  explicit. TRL's default sampling temperature is 0.9; ours is 1, sampling the student's own
  distribution unmodified as Algorithm 1 writes it (``y ~ p_S(· | x)``).
- Masks: prompts are masked and every generated token up to and including the first ``eos`` is
  supervised, as TRL's ``generate_on_policy_outputs`` (v1.9.0) does; sequences are re-collated
  right-padded (TRL keeps the left-padded prompt block and masks it with the prompt's attention mask).
- Reduction: the sum over the optimizer step's supervised tokens divided by their count (``num_items``,
  our convention, counted on the batches actually trained). TRL v1.9.0 also divides by the Trainer's
  ``num_items_in_batch`` (TRL issue #4719), but that count is taken on the dataset's batches before an
  on-policy micro-batch replaces them, so the two differ on on-policy steps (older TRL took each
  micro-batch's token mean).

Logged: ``train/loss`` (the JSD) and ``train/on_policy``, the fraction of the step's micro-batches that
were the student's samples.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from distill.core.distiller import Step, TaskInfo
from distill.core.registry import METHODS, Params
from distill.lm import losses as L
from distill.lm.base import LMDistiller
from distill.lm.rollout import rollout
from distill.lm.data.task import require_prompts


class GKDParams(Params):
    lmbda: float = Field(0.5, ge=0, le=1, description="probability that a micro-batch is the student's own samples")
    beta: float = Field(0.5, ge=0, le=1, description="generalized JSD's β (TRL convention: 0 forward, 1 reverse KL)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the generated sequences")
    loss_temperature: float = Field(1.0, gt=0, description="temperature of the JSD (TRL's default loss: 1)")
    max_new_tokens: int | None = Field(None, ge=1, description="generation length; default the task's")
    seq_kd: bool = Field(False, description="off-policy micro-batches are teacher samples instead of the dataset's")
    gen_batch_size: int = Field(64, ge=1, description="prompts per generate call")


def generate_batch(model: nn.Module, batch: dict[str, Tensor], prompts: list[list[int]], data, *,
                   max_new_tokens: int, temperature: float, greedy: bool, batch_size: int) -> dict[str, Tensor]:
    """The micro-batch ``batch`` replaced by ``model``'s completions of its prompts (looked up by
    ``index``): prompt + completion, only the completion supervised, right-padded, ``index`` kept.
    Generation records no autograd and leaves ``model`` in the mode it was in."""
    idx = batch["index"]
    tok = data.tokenizer
    with torch.no_grad():
        r = rollout(model, [prompts[int(i)] for i in idx], max_new_tokens=max_new_tokens, eos_id=tok.eos_token_id,
                    pad_id=tok.pad_token_id, temperature=temperature, greedy=greedy, batch_size=batch_size)
    device = batch["input_ids"].device
    out = {k: v.to(device) for k, v in r.batch(tok.pad_token_id).items()}
    out["index"] = idx
    return out


@METHODS.register("gkd", "on-policy KD (GKD): with probability λ the student's own samples, else dataset (or "
                  "teacher) sequences; generalized JSD_β on those tokens", GKDParams)
class GKD(LMDistiller):
    params: GKDParams

    def __init__(self, student: nn.Module, teacher: nn.Module | None, params: GKDParams, info: TaskInfo) -> None:
        super().__init__(student, teacher, params, info)
        self.prompts = require_prompts(info, "gkd").prompts

    @property
    def max_new_tokens(self) -> int:
        return self.params.max_new_tokens or self.data.max_new_tokens

    def _generate(self, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return generate_batch(model, batch, self.prompts, self.data, max_new_tokens=self.max_new_tokens,
                              temperature=self.params.temperature, greedy=False, batch_size=self.params.gen_batch_size)

    def on_policy_coin(self) -> bool:
        """One Bernoulli(λ) draw per micro-batch (TRL), from the torch RNG; none when λ is 0 or 1."""
        lmbda = self.params.lmbda
        if lmbda <= 0.0 or lmbda >= 1.0:
            return lmbda >= 1.0
        return bool(torch.rand(()).item() < lmbda)

    def prepare_batches(self, batches: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        out = []
        for b in batches:
            on = self.on_policy_coin()
            if on:
                nb = self._generate(self.student, b)
            elif self.params.seq_kd:
                assert self.teacher is not None
                nb = self._generate(self.teacher, b)
            else:
                nb = dict(b)
            nb["on_policy"] = torch.tensor(float(on), device=nb["input_ids"].device)
            out.append(nb)
        return out

    def training_step(self, batch: dict[str, Tensor]) -> Step:
        self.seen(batch)
        p = self.params
        s = self.student_logits(batch)
        t = self.teacher_token_logits(batch)
        loss = L.token_divergence(s, t, batch["labels"], kind="jsd", beta=p.beta, temperature=p.loss_temperature,
                                  num_items=batch.get("num_items"))
        # the loss is the JSD itself (logged as train/loss); metrics are averaged over micro-batches,
        # so on_policy is the fraction of the step's micro-batches that were the student's samples
        metrics: dict[str, Tensor | float] = {}
        if "on_policy" in batch:  # absent when a caller skips prepare_batches
            metrics["on_policy"] = batch["on_policy"]
        return Step({"student": loss}, metrics)
