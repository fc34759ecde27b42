"""``lm_swing``: Swing distillation for language models (S44, Li et al. 2022), per token: a temperature by
the token's privacy sensitivity and Laplace noise on the teacher's soft targets. A declared
reconstruction; the classifier form and what is ours are in ``distill.logits.methods.swing``."""

from __future__ import annotations

from pydantic import Field, model_validator
from torch import Tensor, nn

from distill.core.distiller import Step, TaskInfo
from distill.core.registry import METHODS, Params
from distill.lm.base import LMDistiller
from distill.core.functional import kl_rows
from distill.lm.losses import _check_labels, _reduce, _valid_rows, token_cross_entropy
from distill.logits.methods.swing import WithNoiseSeed, keyed_laplace, swing_targets, swing_temperatures


class LMSwingParams(Params):
    t_min: float = Field(1.0, gt=0, description="temperature of a token the teacher is least sure of")
    t_max: float = Field(4.0, gt=0, description="temperature of a token the teacher is sure of (most sensitive)")
    noise_scale: float = Field(
        1e-4, ge=0, description="b of the Laplace noise per vocabulary entry; clipping adds about V·b/2 of mass"
    )
    ce_weight: float = Field(0.0, ge=0, description="weight of next-token CE on the labels")

    @model_validator(mode="after")
    def _ordered(self) -> "LMSwingParams":
        if self.t_min > self.t_max:
            raise ValueError(f"t_min ({self.t_min}) must not exceed t_max ({self.t_max})")
        return self


def token_swing_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    noise: Tensor,
    t_min: float = 1.0,
    t_max: float = 4.0,
    num_items: float | Tensor | None = None,
) -> Tensor:
    """Swing's token loss: per supervised token, ``T² · KL(q̃ ‖ softmax(s / T))`` with the token's
    temperature ``T`` (``swing_temperatures`` of the teacher's logits there) and noisy target ``q̃``
    (``swing_targets`` with ``noise`` ``[batch, seq, vocab]`` at that position). Conventions of
    ``distill.lm.losses``: causal shift (position i predicts label i + 1), ``-100`` masked, sum over
    tokens divided by ``num_items`` or this batch's valid-token count, float32."""
    batch, seq, vocab = student_logits.shape
    _check_labels(labels, batch, seq, "logits")
    if teacher_logits.shape != student_logits.shape or noise.shape != student_logits.shape:
        raise ValueError(f"teacher_logits {list(teacher_logits.shape)} and noise {list(noise.shape)} must be "
                         f"[batch, seq, vocab] = {[batch, seq, vocab]}")
    rows = _valid_rows(labels, seq)
    s = student_logits.reshape(-1, vocab).index_select(0, rows).float()
    z = teacher_logits.detach().reshape(-1, vocab).index_select(0, rows).float()
    temps = swing_temperatures(z, t_min, t_max)
    target = swing_targets(z, temps, noise.reshape(-1, vocab).index_select(0, rows))
    log_s = (s / temps[:, None]).log_softmax(-1)
    total = (kl_rows(target.log(), log_s) * temps**2).sum()
    return _reduce(total, rows.numel(), num_items)


@METHODS.register("lm_swing", "Swing distillation for LMs: per-token temperature by privacy sensitivity + noisy "
                  "soft targets (S44)", LMSwingParams)
class LMSwing(WithNoiseSeed, LMDistiller):
    """``token_swing_loss + ce_weight · CE`` against a live teacher. The noise of a sequence is drawn once
    (``keyed_laplace`` by its dataset index, ``[seq, vocab]``), so every epoch sees the same noisy
    targets. Ours, beyond the classifier form's choices: the token's sensitivity is the teacher's
    top-1 probability at that position (the paper's per-token estimate of private information is not
    known here; a canary's memorised digits are positions the teacher is sure of), and the defaults (T from 1 to 4, b = 1e-4)."""

    params: LMSwingParams

    def __init__(self, student: nn.Module, teacher: nn.Module | None, params: LMSwingParams, info: TaskInfo) -> None:
        super().__init__(student, teacher, params, info)
        self.init_noise_seed()

    def training_step(self, batch: dict[str, Tensor]) -> Step:
        self.seen(batch)
        p, labels, n = self.params, batch["labels"], batch.get("num_items")
        s, t = self.student_logits(batch), self.teacher_token_logits(batch)
        noise = keyed_laplace(batch["index"], tuple(t.shape[1:]), p.noise_scale, int(self.noise_seed)).to(t.device)
        kd = token_swing_loss(s, t, labels, noise, p.t_min, p.t_max, n)
        loss, metrics = kd, {"kd": kd.detach()}
        if p.ce_weight:
            ce = token_cross_entropy(s, labels, n)
            loss, metrics["ce"] = loss + p.ce_weight * ce, ce.detach()
        return Step({"student": loss}, metrics, summed=tuple(metrics))
