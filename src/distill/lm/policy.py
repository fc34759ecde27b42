"""The policy-gradient machinery shared by the RL-style language-model methods (``grpo``, ``gopd``, ``rlad``).

GRPO is DeepSeekMath's Group Relative Policy Optimization (Shao et al. 2024, arXiv 2402.03300, Eq. 3 with
the KL estimator of Eq. 4 and the outcome-supervision advantage of §4.1.2), written with TRL's conventions
(``trl.GRPOTrainer``, ``trl/trainer/grpo_trainer.py`` and ``grpo_config.py`` of TRL v1.9.0, commit
``35def3ee``, 2026-07-21; the trainer is unchanged on main up to ``f2cd5771``, 2026-07-24). Its
``GRPOConfig`` defaults, which ours follow: ``loss_type="dapo"``, ``scale_rewards="group"``, ``beta=0``
(our ``kl_coef``), ``temperature=1``, ``epsilon=0.2`` (``epsilon_high`` = ``epsilon``),
``num_iterations=1`` (ours: ``group_size`` 4, TRL's ``num_generations`` 8; the generation length is the
task's, TRL's ``max_completion_length`` 256 in v1.9.0, 512 on main since 2026-07-23). Conventions
(``docs/conventions.md``, "Sequence and policy objectives"):

- **Samples.** ``G`` completions per prompt from :func:`distill.lm.rollout.rollout` (``num_samples=G``,
  full vocabulary at ``temperature``), collated right-padded with only the completion supervised; each
  row keeps its prompt's dataset ``index`` and its ``group`` (the prompt's position in the micro-batch:
  all G samples of a prompt are in one micro-batch, so a group never spans micro-batches).
- **Log-probs** of the sampled tokens come from :func:`distill.lm.losses.token_logprobs` at the sampling
  temperature (TRL divides the logits by it too), ``[N, seq-1]``: position ``i`` scores ``labels[:, i+1]``,
  masked positions hold 0. Every per-token tensor of a batch (``sample_logprobs``, ``old_logprobs``,
  ``ref_logprobs``, ``teacher_logprobs``, per-token advantages) has exactly these positions.
- **Rewards** 1/0 from the task's verifier; **advantages** per sequence ``(r − mean_group) / (std + 1e-4)``
  (:func:`group_advantages`) with TRL's ``scale_rewards``: ``std`` the group's (``"group"``, default), that
  of all the step's rewards on all processes (``"batch"``; the mean stays the group's, as TRL), or no
  division (``"none"``, Dr. GRPO). The std is the *sample* one (Bessel's N − 1), as TRL (``nanstd``
  applies Bessel's correction; older TRL used ``tensor.std``, unbiased by default) and verl
  (``torch.std``); a group of one has advantage 0.
- **Objective** per token ``−min(ρ·A, clip(ρ, 1 − ε_low, 1 + ε_high)·A)`` with ``ρ = exp(log π − log π_anchor)``
  (``anchor`` = the old policy for GRPO; RLAD's mixes in the teacher) plus ``β·k3`` with
  ``k3 = exp(ref − log π) − (ref − log π) − 1`` (Eq. 4; TRL's ``per_token_kl``), reduced as TRL's
  ``loss_type`` (:func:`reduce_policy_loss`): ``dapo`` (default) sums over the completion tokens of the
  whole optimizer step and divides by their count ``num_items``; ``grpo`` averages each sequence's tokens,
  then the sequences (Eq. 3's ``1/G Σ_i 1/|o_i| Σ_t``); ``dr_grpo`` divides the token sum by sequences ×
  ``max_new_tokens``; ``bnpo`` is ``dapo`` here (below). The step's sequence count ``num_seqs`` (all
  micro-batches and processes) plays ``num_items``'s part for ``grpo`` / ``dr_grpo``, so for every loss
  type gradient accumulation and several processes equal one big batch. Deviations: TRL's ``grpo`` and
  ``dr_grpo`` average the micro-batches (equal only when they have equal row counts, as TRL's always
  do), and its ``bnpo`` divides each micro-batch by its own token count, so its value depends on the
  accumulation and process split; its one-big-batch value is ``dapo``'s, which ours gives.
- **Old policy.** With μ = ``num_iterations`` = 1 the old log-probs are the current ones detached (TRL
  does the same when it skips ``old_per_token_logps``), so ρ = 1 in value and the gradient is the plain
  policy gradient ``−A·∇log π``. With μ > 1 the rollouts of one step are reused for μ consecutive optimizer
  steps; the old log-probs are those of the first of them, i.e. of the sampling weights (TRL computes
  ``old_per_token_logps`` with a forward pass at generation time; ours is the same forward, taken at the
  first use and kept in the batch), so clipping acts from the second step on. The generation's own
  log-probs are kept as ``sample_logprobs`` (they agree with the forward pass to float rounding).
  Deviation: the engine's prompts of the μ − 1 reuse steps are skipped (TRL repeats the same prompts
  with its ``RepeatSampler`` instead), so an epoch spends 1/μ of its prompts.

The pure functions below are what other methods reuse; :class:`PolicyDistiller` is the shared method
base (sampling, rewards, reference model, rollout reuse, the loss).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from distill.core.distiller import Step, TaskInfo
from distill.core.registry import Params
from distill.errors import MissingFileError, RecipeError
from distill.lm.base import LMDistiller
from distill.lm.losses import _reduce, token_logprobs
from distill.lm.models import token_logits
from distill.lm.rollout import Rollouts, rollout
from distill.lm.data.task import require_prompts

ADV_EPS = 1e-4  # TRL's and DeepSeekMath's guard in (r − mean) / (std + eps)


# ------------------------------------------------------------------------------------------- sampling


def align_token_values(values: Sequence[Sequence[float]], prompt_lengths: Sequence[int], seq: int) -> Tensor:
    """``[N, seq-1]`` float32: completion ``r``'s per-token ``values`` placed at the positions of
    :func:`~distill.lm.losses.token_logprobs` (completion token ``j`` of a prompt of length ``P`` sits at
    input position ``P + j``, so it is scored at position ``P + j − 1``); zeros elsewhere."""
    out = torch.zeros(len(values), seq - 1)
    for r, (v, n) in enumerate(zip(values, prompt_lengths)):
        if len(v):
            out[r, n - 1 : n - 1 + len(v)] = torch.tensor(v, dtype=torch.float32)
    return out


def sample_groups(model: nn.Module, prompts: Sequence[Sequence[int]], index: Tensor, tokenizer: Any, *,
                  group_size: int, max_new_tokens: int, temperature: float = 1.0,
                  batch_size: int = 64) -> tuple[dict[str, Tensor], Rollouts]:
    """``group_size`` sampled completions of each prompt, as a training batch and the raw rollouts.

    ``prompts[k]`` (ids with bos) has dataset index ``index[k]``. The batch, on ``index``'s device, has
    ``N = len(prompts)·G`` rows, each prompt's G samples consecutive: ``input_ids``/``attention_mask``/
    ``labels`` (prompt + completion, only the completion supervised, right-padded), ``index`` ``[N]``
    (the prompt's dataset index), ``group`` ``[N]`` (``k``, the prompt's position here) and
    ``sample_logprobs`` ``[N, seq-1]`` (the generation's log-probs at ``temperature``, aligned with
    ``token_logprobs``). No autograd; ``model`` keeps its train/eval mode."""
    with torch.no_grad():
        r = rollout(model, prompts, max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_token_id,
                    pad_id=tokenizer.pad_token_id, temperature=temperature, num_samples=group_size,
                    batch_size=batch_size)
    device = index.device
    out = {k: v.to(device) for k, v in r.batch(tokenizer.pad_token_id).items()}
    out["index"] = index.repeat_interleave(group_size)
    out["group"] = torch.arange(len(prompts), device=device).repeat_interleave(group_size)
    out["sample_logprobs"] = align_token_values(r.logprobs, [len(p) for p in r.prompts],
                                                out["input_ids"].shape[1]).to(device)
    return out, r


def verifier_rewards(texts: Sequence[str], references: Sequence[Any], verify: Callable[[str, Any], bool]) -> Tensor:
    """``[N]`` float32: 1 where ``verify(text, reference)`` accepts the completion, else 0."""
    if len(texts) != len(references):
        raise ValueError(f"{len(texts)} completions for {len(references)} references")
    return torch.tensor([1.0 if verify(t, ref) else 0.0 for t, ref in zip(texts, references)])


# ----------------------------------------------------------------------------------------- advantages


ScaleRewards = Literal["group", "batch", "none"]
LossType = Literal["dapo", "grpo", "bnpo", "dr_grpo"]
LOSS_TYPES: tuple[str, ...] = ("dapo", "grpo", "bnpo", "dr_grpo")


def group_advantages(rewards: Tensor, groups: Tensor, *, eps: float = ADV_EPS, unbiased: bool = True,
                     scale: ScaleRewards | bool = "group", batch_std: Tensor | float | None = None) -> Tensor:
    """GRPO's outcome advantages (DeepSeekMath §4.1.2): ``(r − mean_g) / (std + eps)`` per sequence, the mean
    over the sequences that share a ``groups`` id (any ids, any order). ``scale`` is TRL's ``scale_rewards``:
    ``"group"`` (default; ``True``) divides by the group's std, ``"batch"`` by the std of all the step's
    rewards (``batch_std``, the caller's step-wide value, else the std of ``rewards``), ``"none"``
    (``False``; Dr. GRPO) keeps ``r − mean_g``. ``unbiased`` (default, as TRL's ``nanstd`` and verl): the
    sample std (N − 1); ``False``: the population std. A group of one gets 0. ``rewards``, ``groups``: ``[N]``."""
    if rewards.shape != groups.shape or rewards.dim() != 1:
        raise ValueError(f"rewards {list(rewards.shape)} and groups {list(groups.shape)} must both be [N]")
    scale = {True: "group", False: "none"}.get(scale, scale)  # type: ignore[arg-type]  # TRL's bool aliases
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"unknown reward scaling '{scale}'; use 'group', 'batch' or 'none'")
    _, inv, counts = torch.unique(groups, return_inverse=True, return_counts=True)
    r = rewards.to(torch.float64)  # exact group sums of 0/1 rewards; the result is cast back
    n = counts.to(r)
    mean = torch.zeros_like(n).index_add_(0, inv, r) / n
    dev = r - mean[inv]  # exactly 0 in a group of one
    if scale == "none":
        return dev.to(rewards.dtype)
    if scale == "batch":
        std = reward_std(r, unbiased=unbiased) if batch_std is None else torch.as_tensor(batch_std, dtype=r.dtype)
        return (dev / (std.to(r.device) + eps)).to(rewards.dtype)
    ss = torch.zeros_like(n).index_add_(0, inv, dev * dev)
    std = (ss / ((n - 1).clamp(min=1) if unbiased else n)).sqrt()
    return (dev / (std[inv] + eps)).to(rewards.dtype)


def _all_sum(t: Tensor) -> Tensor:
    """``t`` summed over the processes of a ``torch.distributed`` run (itself in a single process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = t.clone()
        torch.distributed.all_reduce(t)
    return t


def reward_std(rewards: Tensor | Sequence[Tensor], *, unbiased: bool = True, all_processes: bool = False) -> Tensor:
    """The std of all the given rewards (float64 scalar), e.g. the ``[N]`` tensors of a step's micro-batches
    and, with ``all_processes`` in a ``torch.distributed`` run, of every process's (TRL gathers the rewards
    before scaling them; a collective call). Sample std (TRL's ``nanstd``) when ``unbiased``; 0 for one reward."""
    reduce = _all_sum if all_processes else (lambda t: t)
    parts = [rewards] if isinstance(rewards, Tensor) else list(rewards)
    r = torch.cat([x.reshape(-1).to(torch.float64) for x in parts])
    n, total = reduce(torch.stack([r.new_tensor(float(r.numel())), r.sum()])).unbind()
    if float(n) < 2:
        return r.new_zeros(())
    ss = reduce((r - total / n).square().sum())  # two passes: no cancellation
    var = ss / ((n - 1) if unbiased else n)
    return var.sqrt()


# ---------------------------------------------------------------------------------------------- losses


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token ``exp(ref − logp) − (ref − logp) − 1`` (DeepSeekMath Eq. 4, Schulman's k3; TRL's
    ``per_token_kl``): an unbiased, non-negative estimate of ``KL(π ‖ π_ref)`` on samples of π. The
    gradient flows through ``logp``; ``ref_logp`` is a fixed target."""
    d = ref_logp.detach() - logp
    return torch.exp(d) - d - 1


def clipped_surrogate(logp: Tensor, anchor_logp: Tensor, advantages: Tensor, epsilon_low: float = 0.2,
                      epsilon_high: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """PPO's clipped objective per token, as a loss: ``−min(ρ·A, clip(ρ, 1 − ε_low, 1 + ε_high)·A)`` with
    ``ρ = exp(logp − anchor_logp)`` (the anchor is a fixed target: the old policy in PPO/GRPO).

    ``logp``/``anchor_logp``: ``[N, T]``; ``advantages``: ``[N]`` (per sequence) or ``[N, T]`` (per token).
    Returns ``(loss [N, T], clipped [N, T] bool, ρ [N, T])`` where ``clipped`` marks the tokens whose clipped
    branch is the minimum and flat (zero gradient): ``ρ < 1 − ε_low`` with ``A < 0`` or ``ρ > 1 + ε_high``
    with ``A > 0`` (TRL's ``is_region_clipped``). ``epsilon_high`` defaults to ``epsilon_low``."""
    eh = epsilon_low if epsilon_high is None else epsilon_high
    adv = advantages.unsqueeze(-1) if advantages.dim() == logp.dim() - 1 else advantages
    adv = adv.detach().to(logp.dtype)
    ratio = torch.exp(logp - anchor_logp.detach())
    loss = -torch.minimum(ratio * adv, ratio.clamp(1 - epsilon_low, 1 + eh) * adv)
    clipped = ((ratio < 1 - epsilon_low) & (adv < 0)) | ((ratio > 1 + eh) & (adv > 0))
    return loss, clipped, ratio


def token_mean(values: Tensor, mask: Tensor, num_items: float | Tensor | None = None) -> Tensor:
    """``Σ values[mask] / num_items`` (the step's token count), or over this batch's ``mask`` count when
    ``num_items`` is None; masked positions contribute exactly 0 (even inf/NaN there)."""
    return _reduce(torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum(),
                   int(mask.sum()), num_items)


def reduce_policy_loss(per_token: Tensor, mask: Tensor, loss_type: LossType = "dapo", *,
                       num_items: float | Tensor | None = None, num_seqs: float | Tensor | None = None,
                       max_len: int | None = None) -> Tensor:
    """The per-token loss ``[N, T]`` reduced over the tokens of ``mask`` as TRL's ``loss_type``
    (``GRPOTrainer._compute_loss``), in the optimizer step's big batch:

    - ``dapo`` (default): ``Σ_tokens / num_items``, the step's token count (TRL: the generation batch's
      token count over all processes).
    - ``grpo``: each sequence's token mean, then the mean over sequences, ``Σ_i (Σ_t / |o_i|) / num_seqs``
      (DeepSeekMath Eq. 3; ``|o_i|`` clamped to 1).
    - ``dr_grpo``: ``Σ_tokens / (num_seqs · max_len)`` (Dr. GRPO's constant; TRL's ``max_completion_length``).
    - ``bnpo``: ``Σ_tokens / num_items``, as ``dapo``. TRL divides by the *local micro-batch's* token count
      and averages the micro-batches, so its value depends on the accumulation and process split; in one
      batch on one process it is the token mean, which is what the step's big batch gives here.

    ``num_items`` / ``num_seqs``: the step's token / sequence counts (all micro-batches and processes), so the
    micro-batch losses sum to the big batch's; None: this batch's (``mask.sum()`` / ``N``), i.e. TRL's value
    for one micro-batch without accumulation. ``max_len`` defaults to ``T``. Masked positions contribute 0."""
    if loss_type in ("dapo", "bnpo"):
        return token_mean(per_token, mask, num_items)
    vals = torch.where(mask, per_token, torch.zeros((), dtype=per_token.dtype, device=per_token.device))
    if loss_type == "grpo":
        per_seq = vals.sum(-1) / mask.sum(-1).clamp(min=1).to(vals.dtype)
        return _reduce(per_seq.sum(), mask.shape[0], num_seqs)
    if loss_type == "dr_grpo":
        return _reduce(vals.sum(), mask.shape[0], num_seqs) / (mask.shape[-1] if max_len is None else max_len)
    raise ValueError(f"unknown loss_type '{loss_type}'; use one of {', '.join(LOSS_TYPES)}")


@dataclass
class PolicyLoss:
    """What :func:`clipped_policy_loss` returns: ``loss`` (scalar, differentiable) and, detached, this
    batch's share of the step totals (each a sum over its tokens divided by ``num_items``, whatever the
    ``loss_type``, as TRL logs token means): the fraction of tokens clipped, the mean ratio ρ and the mean
    k3 KL to the reference (None without one)."""

    loss: Tensor
    clip_fraction: Tensor
    ratio: Tensor
    kl: Tensor | None = None


def clipped_policy_loss(logp: Tensor, anchor_logp: Tensor, advantages: Tensor, mask: Tensor, *,
                        loss_type: LossType = "dapo", max_len: int | None = None,
                        num_items: float | Tensor | None = None, num_seqs: float | Tensor | None = None,
                        epsilon_low: float = 0.2, epsilon_high: float | None = None,
                        ref_logp: Tensor | None = None, kl_coef: float = 0.0) -> PolicyLoss:
    """The step loss: per token ``−min(ρA, clip(ρ)A) + kl_coef·k3`` (module docstring) over the tokens of
    ``mask`` (``[N, T]``, from ``token_logprobs``), reduced as ``loss_type`` by :func:`reduce_policy_loss`
    (``num_items``: the step's token count, ``num_seqs``: its sequence count, ``max_len``: ``dr_grpo``'s
    constant). ``ref_logp`` gives the KL term (and the ``kl`` metric even when ``kl_coef`` is 0)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type '{loss_type}'; use one of {', '.join(LOSS_TYPES)}")
    per_token, clipped, ratio = clipped_surrogate(logp, anchor_logp, advantages, epsilon_low, epsilon_high)
    kl = None
    if ref_logp is not None:
        kl_tok = k3_kl(logp, ref_logp)
        if kl_coef:
            per_token = per_token + kl_coef * kl_tok
        kl = token_mean(kl_tok.detach(), mask, num_items)
    loss = reduce_policy_loss(per_token, mask, loss_type, num_items=num_items, num_seqs=num_seqs, max_len=max_len)
    return PolicyLoss(loss, token_mean(clipped.float(), mask, num_items), token_mean(ratio.detach(), mask, num_items),
                      kl)


def old_logprobs(batch: dict[str, Tensor], logp: Tensor, keep: bool) -> Tensor:
    """The old policy's log-probs: the batch's ``old_logprobs``, else ``logp`` detached (this is the first
    use of the rollouts, at the sampling weights), stored in the batch when ``keep`` (rollouts that will be
    reused for further optimizer steps)."""
    old = batch.get("old_logprobs")
    if old is None:
        old = logp.detach()
        if keep:
            batch["old_logprobs"] = old
    return old


# ------------------------------------------------------------------------------------- rollout reuse


class RolloutBuffer:
    """The rollouts of one optimizer step, handed out again for the next ``reuses − 1`` steps (μ)."""

    def __init__(self, reuses: int) -> None:
        self.reuses = reuses
        self.batches: list[dict[str, Tensor]] | None = None
        self.used = 0

    def take(self) -> list[dict[str, Tensor]] | None:
        """The stored batches (the same dicts) if they have uses left, else None: sample anew."""
        if self.batches is not None and self.used < self.reuses:
            self.used += 1
            return self.batches
        return None

    def put(self, batches: list[dict[str, Tensor]]) -> None:
        """Record freshly sampled batches (their first use); kept only when they will be reused."""
        self.batches, self.used = (batches, 1) if self.reuses > 1 else (None, 0)

    def state(self) -> dict[str, Any]:
        """JSON-serialisable (float32 round-trips exactly through JSON's doubles)."""
        if self.batches is None:
            return {"used": 0, "batches": None}
        return {"used": self.used, "batches": [{k: {"dtype": str(v.dtype).removeprefix("torch."),
                                                    "shape": list(v.shape),
                                                    "data": v.detach().cpu().reshape(-1).tolist()}
                                                for k, v in b.items() if k not in ("num_items", "num_seqs")}
                                               for b in self.batches]}

    def load(self, state: dict[str, Any], device: torch.device) -> None:
        self.used = int(state.get("used", 0))
        rows = state.get("batches")
        self.batches = None if rows is None else [
            {k: torch.tensor(v["data"], dtype=getattr(torch, v["dtype"]), device=device).reshape(v["shape"])
             for k, v in b.items()} for b in rows]


# -------------------------------------------------------------------------------------------- methods


def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen copy of ``model`` (e.g. the student's initial weights as the KL reference)."""
    return copy.deepcopy(model).eval().requires_grad_(False)


def reference_folder(path: str | Path) -> Path:
    """The model folder ``path`` names: itself, or a finished run folder's ``student/`` (a recipe's
    ``method.reference`` is already absolute: ``PathField``)."""
    folder = Path(path).expanduser()
    if (folder / "student" / "config.json").is_file():
        folder = folder / "student"
    if not (folder / "config.json").is_file():
        raise MissingFileError(f"method.reference: {folder} is not a model folder (with config.json) or a run "
                               "folder; give the path of a saved model")
    return folder


def load_reference(data: Any, path: str | Path) -> nn.Module:
    """A frozen model from a model or run folder, checked against the task's tokenizer."""
    return data.load_model(reference_folder(path)).eval().requires_grad_(False)


class PolicyParams(Params):
    group_size: int = Field(4, ge=1, description="completions sampled per prompt (G)")
    epsilon: float = Field(0.2, gt=0, lt=1, description="PPO clip ε (the lower bound's when epsilon_high is set)")
    epsilon_high: float | None = Field(None, gt=0, description="upper clip ε (DAPO's clip-higher); default epsilon")
    kl_coef: float = Field(0.0, ge=0, description="β of the per-token k3 KL to the reference model")
    temperature: float = Field(1.0, gt=0, description="sampling temperature; log-probs are taken at it too")
    max_new_tokens: int | None = Field(None, ge=1, description="generation length; default the task's")
    num_iterations: int = Field(1, ge=1, description="μ: optimizer steps on each rollout (clipping acts when > 1)")
    gen_batch_size: int = Field(64, ge=1, description="sequences per generate call")
    loss_type: LossType = Field("dapo", description="TRL's loss_type: dapo (token mean over the step), grpo "
                                "(per-sequence mean, then over sequences), dr_grpo (÷ sequences·max_new_tokens), "
                                "bnpo (= dapo in one big batch)")
    scale_rewards: ScaleRewards = Field("group", description="TRL's scale_rewards: divide the advantages by the "
                                        "group's std (group), the step's (batch), or not at all (none)")


class PolicyDistiller(LMDistiller):
    """Shared base of the policy-gradient methods: on-policy group sampling in ``prepare_batches`` (every
    μ-th optimizer step; the others reuse the rollouts), verifier rewards and group advantages
    (``uses_verifier``), the fixed log-probs of a frozen reference model (``self.ref``, when
    :meth:`make_reference` gives one) and the clipped loss.

    ``train/reward`` (the step's mean verifier reward) is logged whenever the task has a verifier, also
    for methods that do not train on it (``uses_verifier = False``).

    Subclasses set ``method`` (the registry name, for messages) and may override :meth:`make_reference`,
    :meth:`score` (more fixed per-token tensors, e.g. the teacher's log-probs), :meth:`anchor_logprobs`
    (the ratio's denominator, default the old policy), :meth:`advantages` (default the batch's
    per-sequence ``advantages``) and :meth:`extra_metrics`.
    """

    method: ClassVar[str] = "policy"
    needs_teacher = False
    uses_verifier: ClassVar[bool] = True
    params: PolicyParams

    def __init__(self, student: nn.Module, teacher: nn.Module | None, params: PolicyParams, info: TaskInfo) -> None:
        super().__init__(student, teacher, params, info)
        train = require_prompts(info, self.method)
        self.prompts, self.references = train.prompts, train.references
        # rewards are computed (and logged) whenever the task can verify; only uses_verifier trains on them
        self.rewarded = getattr(self.data, "verify", None) is not None and self.references is not None
        if self.uses_verifier and not self.rewarded:
            raise RecipeError(f"method '{self.method}' rewards completions with the task's verifier; use a task "
                              "that has one (arithmetic)")
        if not self.uses_verifier and params.scale_rewards != "group":  # (recipes store every default)
            raise RecipeError(f"method '{self.method}' has no verifier advantages to scale; "
                              "remove method.scale_rewards")
        self.ref = self.make_reference(student)  # a submodule: moved with the distiller, frozen
        self.buffer = RolloutBuffer(params.num_iterations)

    # --- hooks ----------------------------------------------------------------------------------
    def make_reference(self, student: nn.Module) -> nn.Module | None:
        """The frozen reference model: the student's initial weights when the KL term is on."""
        return frozen_copy(student) if self.params.kl_coef > 0 else None

    def score(self, batch: dict[str, Tensor]) -> None:
        """Add the method's fixed per-token tensors to a freshly sampled batch (in place)."""

    def anchor_logprobs(self, batch: dict[str, Tensor], old: Tensor) -> Tensor:
        return old

    def advantages(self, batch: dict[str, Tensor], old: Tensor) -> Tensor:
        return batch["advantages"]

    def extra_metrics(self, batch: dict[str, Tensor], old: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """Metrics that are shares of a step total (logged summed over micro-batches)."""
        return {}

    # --- the engine's calls ---------------------------------------------------------------------
    @property
    def max_new_tokens(self) -> int:
        return self.params.max_new_tokens or self.data.max_new_tokens

    def train(self, mode: bool = True) -> "PolicyDistiller":
        super().train(mode)
        if getattr(self, "ref", None) is not None:
            self.ref.eval()
        return self

    def frozen_logprobs(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """A frozen model's log-probs of the batch's tokens at the sampling temperature, ``[N, seq-1]``."""
        with torch.inference_mode():
            lp, _ = token_logprobs(token_logits(model, batch, self.vocab), batch["labels"], self.params.temperature)
        return lp.clone()

    def sample(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The micro-batch's prompts replaced by G student samples each, with rewards and the fixed log-probs
        of the reference (and whatever :meth:`score` adds)."""
        p, tok = self.params, self.data.tokenizer
        idx = batch["index"]
        out, r = sample_groups(self.student, [self.prompts[int(i)] for i in idx], idx, tok, group_size=p.group_size,
                               max_new_tokens=self.max_new_tokens, temperature=p.temperature,
                               batch_size=p.gen_batch_size)
        if self.rewarded:
            refs = [self.references[int(i)] for i in out["index"]]
            out["reward"] = verifier_rewards(r.texts(tok), refs, self.data.verify).to(idx.device)
        if self.ref is not None:
            out["ref_logprobs"] = self.frozen_logprobs(self.ref, out)
        self.score(out)
        return out

    def prepare_batches(self, batches: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        """The step's rollouts (sampled, or reused while μ allows) with their advantages (``uses_verifier``:
        ``scale_rewards="batch"`` needs every micro-batch's rewards) and ``num_seqs``, the step's sequence
        count over all processes (the ``grpo`` / ``dr_grpo`` reductions)."""
        out = self.buffer.take()
        if out is None:
            out = [self.sample(b) for b in batches]
            if self.rewarded:  # the step's mean reward, logged by every micro-batch
                mean = torch.cat([b["reward"] for b in out]).mean()
                for b in out:
                    b["reward_mean"] = mean
            if self.uses_verifier:
                scale = self.params.scale_rewards
                std = reward_std([b["reward"] for b in out], all_processes=True) if scale == "batch" else None
                for b in out:
                    b["advantages"] = group_advantages(b["reward"], b["group"], scale=scale, batch_std=std)
            self.buffer.put(out)
        rows = _all_sum(torch.tensor(float(sum(len(b["group"]) for b in out)), device=out[0]["group"].device))
        for b in out:
            b["num_seqs"] = rows
        return out

    def training_step(self, batch: dict[str, Tensor]) -> Step:
        self.seen(batch)
        p = self.params
        logp, mask = token_logprobs(self.student_logits(batch), batch["labels"], p.temperature)
        old = old_logprobs(batch, logp, keep=p.num_iterations > 1)
        out = clipped_policy_loss(logp, self.anchor_logprobs(batch, old), self.advantages(batch, old), mask,
                                  loss_type=p.loss_type, max_len=self.max_new_tokens, num_items=batch.get("num_items"),
                                  num_seqs=batch.get("num_seqs"), epsilon_low=p.epsilon, epsilon_high=p.epsilon_high,
                                  ref_logp=batch.get("ref_logprobs"), kl_coef=p.kl_coef)
        shares: dict[str, Tensor] = {"clip_frac": out.clip_fraction, "ratio": out.ratio}
        if out.kl is not None:
            shares["kl"] = out.kl
        shares.update(self.extra_metrics(batch, old, mask))
        metrics: dict[str, Tensor | float] = dict(shares)
        if "reward_mean" in batch:
            metrics["reward"] = batch["reward_mean"]
        return Step({"student": out.loss}, metrics, summed=tuple(shares))

    # --- resume -----------------------------------------------------------------------------------
    def state_extra(self) -> dict[str, Any]:
        return {"rollouts": self.buffer.state()} if self.params.num_iterations > 1 else {}

    def load_state_extra(self, state: dict[str, Any]) -> None:
        if "rollouts" in state:
            self.buffer.load(state["rollouts"], self.tokens_seen.device)
