"""``redi``: Reinforcement Distillation (REDI, S10; Xu et al. 2025, arXiv 2505.24850, "Harnessing Negative
Signals: Reinforcement Distillation from Teacher Data for LLM Reasoning").

Two stages on the teacher's traces, one method:

1. **Stage 1** (the first ``stage1_steps`` optimizer steps): SFT on the verified-correct teacher traces
   (rejection-sampling SFT): ``Σ −log π(y_t | x, y_<t)`` over the positives' completion tokens divided by
   the step's token count (our SFT convention; the official stage 1 is TRL's ``SFTTrainer``, a token mean).
2. **Stage 2**: the REDI objective (the paper's Eq. for ``L_REDI``) on (positive, negative) pairs of
   the same prompt, length-normalised and reference-free:

   ``L_REDI(x, y_w, y_l) = −log π(y_w | x) / |y_w|  +  α · log π(y_l | x) / |y_l|``

   with ``log π(y | x)`` the sum over completion tokens (``docs/conventions.md``) and ``|y|`` the number
   of completion tokens (``eos`` included); α (``alpha``, default 0.8, the paper's recommended
   asymmetric weight) < 1 damps the negative gradient, which the paper finds is what keeps training
   stable without a KL term. The loss is the sum over the step's pairs divided by their count.
   With ``alpha: 0`` it is exactly length-normalised SFT on the positives (the issue's special case).

Traces: at ``on_train_start`` the teacher samples ``num_traces`` completions of every training prompt
(``rollout(..., num_samples=num_traces)``, full vocabulary at ``temperature``), and the task's verifier
marks each correct or not, once (the paper distils a fixed offline set). A prompt's pairs are its
first ``max_pairs`` positives matched with its first ``max_pairs`` negatives, in sampling order; prompts
without both contribute no pair (as the official pair builder: first correct with first incorrect,
prompts lacking either skipped). The engine iterates prompt indices; :meth:`prepare_batches` replaces
each micro-batch by its prompts' positives (stage 1) or pairs (stage 2).

Matched to the official code (``Tim-Siu/reinforcement-distillation``, ``trl/trainer/dpo2_trainer.py``,
``loss_type: reinforce`` with ``reinforce_chosen_coef: 1.0``, ``reinforce_rejected_coef: 0.8``,
``reference_free: true``); deviations: the reduction over the optimizer step (sum over pairs / the
step's pair count, where TRL averages each micro-batch), the optional negative re-weighting
``use_neg_weighting`` (off in the released recipe) is not implemented, and the teacher's traces are
sampled here from a live teacher instead of read from a dataset (OpenR1-Math).

A step whose micro-batches hold no positive (stage 1) or no pair (stage 2) trains on nothing: the loss
is a zero that still depends on the student (so the engine's backward runs), and the optimizer steps
with zero gradients.

Logged: ``train/stage`` (1 or 2); stage 1: ``train/ce`` and ``train/positives`` (sequences in the step);
stage 2: ``train/pairs`` (in the step), ``train/pos_logp`` and ``train/neg_logp`` (the step's mean
length-normalised log-prob of the positives and of the negatives); always ``train/trace_accuracy``
(the fraction of the teacher's traces the verifier accepted).

With several processes every process samples the traces of all prompts with the same torch RNG state,
so they agree (as ``seq_kd``). Resume: the traces are not checkpointed but resampled identically at
``on_train_start`` (the RNG state there is the run's start state; the checkpoint's is restored later).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from distill.core.distiller import Step, TaskInfo
from distill.core.registry import METHODS, Params
from distill.errors import RecipeError
from distill.lm.base import LMDistiller
from distill.lm.losses import sequence_logprob, token_cross_entropy
from distill.lm.policy import verifier_rewards
from distill.lm.rollout import rollout
from distill.lm.data.task import require_prompts
from distill.lm.data.text import IGNORE_INDEX, Example, collate


class REDIParams(Params):
    alpha: float = Field(0.8, ge=0, description="weight α of the negative term (the paper: 0.8; 0 is length-normalised SFT)")
    num_traces: int = Field(4, ge=1, description="teacher samples per training prompt, verified once at the start")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the teacher's traces")
    stage1_steps: int | None = Field(None, ge=0, description="optimizer steps of stage 1 (SFT on positives); "
                                     "default: stage1_fraction of the run")
    stage1_fraction: float = Field(0.5, ge=0, le=1, description="share of the run in stage 1 when stage1_steps is unset")
    max_pairs: int = Field(1, ge=1, description="(positive, negative) pairs per prompt in stage 2")
    max_new_tokens: int | None = Field(None, ge=1, description="trace length; default the task's")
    gen_batch_size: int = Field(64, ge=1, description="prompts per generate call")


def redi_loss(pos_logp: Tensor, pos_len: Tensor, neg_logp: Tensor, neg_len: Tensor, alpha: float,
              num_items: float | Tensor | None = None) -> Tensor:
    """The REDI objective (S10) summed over pairs: ``Σ_i −pos_logp_i/pos_len_i + α·neg_logp_i/neg_len_i``
    divided by ``num_items`` (default: the number of pairs). All inputs ``[pairs]``: sequence log-probs
    (sums over completion tokens) and completion lengths (clamped to ≥ 1, as the official code)."""
    per = -pos_logp / pos_len.clamp(min=1) + alpha * neg_logp / neg_len.clamp(min=1)
    if num_items is None:
        return per.mean()
    return per.sum() / (num_items.to(per.dtype) if isinstance(num_items, Tensor) else num_items)


@METHODS.register("redi", "Reinforcement Distillation (REDI, S10): SFT on verified teacher traces, then the "
                  "reference-free length-normalised objective on positive and (α-weighted) negative traces",
                  REDIParams)
class REDI(LMDistiller):
    params: REDIParams
    steps_done: Tensor

    def __init__(self, student: nn.Module, teacher: nn.Module | None, params: REDIParams, info: TaskInfo) -> None:
        super().__init__(student, teacher, params, info)
        train = require_prompts(info, "redi")
        if self.data.verify is None or train.references is None:
            raise RecipeError("method 'redi' verifies the teacher's traces and needs a task with a verifier "
                              "(e.g. arithmetic)")
        self.prompts, self.references = train.prompts, train.references
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))  # checkpointed: picks the stage
        # per prompt: completion ids of the verified-correct and of the rejected traces, in sampling order
        self.positives: list[list[list[int]]] | None = None  # not checkpointed: resampled identically on resume
        self.negatives: list[list[list[int]]] | None = None
        self.trace_accuracy = float("nan")

    # --- traces -----------------------------------------------------------------------------------
    def on_train_start(self, total_steps: int, total_epochs: int) -> None:
        super().on_train_start(total_steps, total_epochs)
        self.generate_traces()  # here, at the run's RNG start state: identical on resume (see seq_kd)

    def generate_traces(self) -> None:
        """Sample ``num_traces`` teacher completions per training prompt and split them by the verifier."""
        if self.positives is not None:
            return
        assert self.teacher is not None
        p, tok, k = self.params, self.data.tokenizer, self.params.num_traces
        with torch.no_grad():
            r = rollout(self.teacher, self.prompts, max_new_tokens=p.max_new_tokens or self.data.max_new_tokens,
                        eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, temperature=p.temperature,
                        num_samples=k, batch_size=p.gen_batch_size)
        # rollout repeats each prompt num_samples times, consecutively: trace j is prompt j // k's
        rewards = verifier_rewards(r.texts(tok), [ref for ref in self.references for _ in range(k)], self.data.verify)
        self.positives = [[] for _ in self.prompts]
        self.negatives = [[] for _ in self.prompts]
        for j, (completion, ok) in enumerate(zip(r.completions, rewards.tolist())):
            (self.positives if ok > 0 else self.negatives)[j // k].append(completion)
        self.trace_accuracy = sum(map(len, self.positives)) / max(len(r.completions), 1)

    @property
    def stage1_steps(self) -> int:
        p = self.params
        return p.stage1_steps if p.stage1_steps is not None else round(p.stage1_fraction * self.total_steps)

    @property
    def stage(self) -> int:
        return 1 if int(self.steps_done) < self.stage1_steps else 2

    def on_optimizer_step(self) -> None:
        self.steps_done += 1

    # --- batches ----------------------------------------------------------------------------------
    def prepare_batches(self, batches: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        self.generate_traces()
        stage = self.stage
        return [self.stage1_batch(b) if stage == 1 else self.pair_batch(b) for b in batches]

    def _collate(self, rows: list[tuple[int, list[int]]], like: dict[str, Tensor]) -> dict[str, Tensor]:
        """``(prompt index, completion)`` rows as prompt + completion with only the completion supervised,
        right-padded; ``index`` is each row's prompt. No rows: the micro-batch itself with every label
        masked (a forward that trains nothing)."""
        device = like["input_ids"].device
        if not rows:
            out = dict(like)
            out["labels"] = torch.full_like(like["labels"], IGNORE_INDEX)
            return out
        examples = [Example(self.prompts[i] + c, [IGNORE_INDEX] * len(self.prompts[i]) + c) for i, c in rows]
        out = {k: v.to(device) for k, v in collate(examples, self.data.tokenizer.pad_token_id).items()}
        out["index"] = torch.tensor([i for i, _ in rows], dtype=torch.long, device=device)
        return out

    def stage1_batch(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Every verified-correct trace of the micro-batch's prompts."""
        assert self.positives is not None
        rows = [(i, c) for i in batch["index"].tolist() for c in self.positives[i]]
        out = self._collate(rows, batch)
        out["stage"] = torch.tensor(1, device=out["input_ids"].device)
        out["num_seqs"] = torch.tensor(len(rows), device=out["input_ids"].device)
        return out

    def pair_batch(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The micro-batch's pairs: rows ``[positives..., negatives...]``, pair ``j`` = rows ``j`` and ``P + j``."""
        assert self.positives is not None and self.negatives is not None
        pos, neg = [], []
        for i in batch["index"].tolist():
            m = min(len(self.positives[i]), len(self.negatives[i]), self.params.max_pairs)
            pos += [(i, c) for c in self.positives[i][:m]]
            neg += [(i, c) for c in self.negatives[i][:m]]
        out = self._collate(pos + neg, batch)
        out["stage"] = torch.tensor(2, device=out["input_ids"].device)
        out["num_seqs"] = torch.tensor(len(pos), device=out["input_ids"].device)  # pairs
        return out

    def count_items(self, batch: dict[str, Tensor]) -> int:
        """Stage 1: supervised tokens; stage 2: pairs (the units the two losses average over)."""
        if "stage" in batch and int(batch["stage"]) == 2:
            return int(batch["num_seqs"])
        return super().count_items(batch)

    # --- loss -------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor]) -> Step:
        self.seen(batch)
        n = batch.get("num_items")
        if n is not None:
            n = n.clamp(min=1)  # a step with nothing to train on gives 0, not 0/0
        logits = self.student_logits(batch)
        metrics: dict[str, Tensor | float] = {"trace_accuracy": self.trace_accuracy}
        if int(batch.get("stage", 1)) == 1:
            loss = token_cross_entropy(logits, batch["labels"], n)
            metrics.update(stage=1.0, ce=loss.detach(), positives=float(batch.get("num_seqs", logits.shape[0])))
            return Step({"student": loss}, metrics, summed=("ce", "positives"))
        pairs = int(batch["num_seqs"])
        labels = batch["labels"]
        logp = sequence_logprob(logits, labels)
        length = (labels[:, 1:] != IGNORE_INDEX).sum(-1).to(logp.dtype)
        if pairs == 0:  # nothing to compare: a zero that keeps the graph
            loss = logp.sum() * 0.0
            metrics.update(stage=2.0, pairs=0.0, pos_logp=0.0, neg_logp=0.0)
            return Step({"student": loss}, metrics, summed=("pairs", "pos_logp", "neg_logp"))
        denom = n if n is not None else torch.tensor(float(pairs))
        loss = redi_loss(logp[:pairs], length[:pairs], logp[pairs:], length[pairs:], self.params.alpha, denom)
        with torch.no_grad():
            norm = logp / length.clamp(min=1)
            metrics.update(stage=2.0, pairs=float(pairs), pos_logp=norm[:pairs].sum() / denom,
                           neg_logp=norm[pairs:].sum() / denom)
        return Step({"student": loss}, metrics, summed=("pairs", "pos_logp", "neg_logp"))
