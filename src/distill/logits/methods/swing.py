"""``swing``: Swing distillation, privacy-adaptive temperature + noisy soft targets (Li et al. 2022, S44),
a declared reconstruction; the language-model form is ``lm_swing`` (``distill/lm/methods/swing.py``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from distill.core.distiller import Distiller, Step, TaskInfo
from distill.core.registry import METHODS, Params
from distill.logits.losses import _reduce, kl_rows
from distill.logits.methods.kd import labeled_ce


class SwingParams(Params):
    t_min: float = Field(4.0, gt=0, description="temperature of a sample the teacher is least sure of")
    t_max: float = Field(8.0, gt=0, description="temperature of a sample the teacher is sure of (most sensitive)")
    noise_scale: float = Field(0.02, ge=0, description="b of the Laplace noise added to the soft targets")
    ce_weight: float = Field(0.1, ge=0, description="weight of CE on labeled samples")
    kd_weight: float = Field(0.9, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> "SwingParams":
        if self.t_min > self.t_max:
            raise ValueError(f"t_min ({self.t_min}) must not exceed t_max ({self.t_max})")
        return self


def privacy_sensitivity(teacher_logits: Tensor) -> Tensor:
    """Our proxy of how much private information a sample (or token) carries: the teacher's top-1
    probability at T = 1 rescaled from [1/C, 1] to [0, 1] (a memorised example is one the teacher is
    sure of). ``[...]`` over the leading dimensions of ``[..., C]``."""
    c = teacher_logits.shape[-1]
    top = F.softmax(teacher_logits.float(), dim=-1).amax(-1)
    return ((top - 1 / c) / (1 - 1 / c)).clamp(0, 1)


def swing_temperatures(teacher_logits: Tensor, t_min: float, t_max: float) -> Tensor:
    """``T = t_min + (t_max − t_min) · sensitivity``: the more sensitive, the softer the target."""
    return t_min + (t_max - t_min) * privacy_sensitivity(teacher_logits)


def swing_targets(teacher_logits: Tensor, temperatures: Tensor, noise: Tensor) -> Tensor:
    """Noisy soft targets: ``q = softmax(t / T)`` per row, plus ``noise``, clipped at 0 and renormalised
    (back onto the simplex; a row clipped to all zeros becomes uniform). ``[..., C]``, detached."""
    q = F.softmax(teacher_logits.detach().float() / temperatures[..., None], dim=-1)
    q = (q + noise.float()).clamp(min=0)
    total = q.sum(-1, keepdim=True)
    return torch.where(total > 0, q / total.clamp(min=1e-30), torch.full_like(q, 1 / q.shape[-1]))


def swing_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    noise: Tensor,
    t_min: float = 4.0,
    t_max: float = 8.0,
    reduction: str = "mean",
) -> Tensor:
    """Swing's KD term: ``T_i² · KL(q̃_i ‖ softmax(s_i / T_i))`` with the per-sample temperature
    ``T_i`` of ``swing_temperatures`` and the noisy target ``q̃_i`` of ``swing_targets``, summed over
    classes, mean over the batch. With ``t_min = t_max = T`` and zero noise it is ``kd_loss`` at T."""
    temps = swing_temperatures(teacher_logits, t_min, t_max)
    target = swing_targets(teacher_logits, temps, noise)
    log_s = F.log_softmax(student_logits.float() / temps[:, None], dim=-1)
    return _reduce(kl_rows(target.log(), log_s) * temps**2, reduction)


def laplace(shape: tuple[int, ...], scale: float, generator: torch.Generator) -> Tensor:
    """Laplace(0, ``scale``) noise (float32, CPU) by inverse CDF: ``−b · sign(u) · log(1 − 2|u|)``, ``u ~ U(−½, ½)``."""
    u = torch.rand(shape, generator=generator, dtype=torch.float64) - 0.5
    return (-scale * u.sign() * torch.log1p(-2 * u.abs())).float()


def keyed_laplace(index: Tensor, shape: tuple[int, ...], scale: float, seed: int) -> Tensor:
    """Laplace(0, ``scale``) noise ``[len(index), *shape]`` (float32, CPU), a fixed draw per dataset
    index (a generator seeded by ``seed`` and the index): each sample's noisy target is released once
    and every epoch sees the same one, as a privacy mechanism must (fresh noise each epoch would
    average away over the epochs)."""
    if scale == 0:
        return torch.zeros(len(index), *shape)
    return torch.stack([laplace(shape, scale, torch.Generator().manual_seed(seed * 1_000_003 + int(i)))
                        for i in index.tolist()])


class WithNoiseSeed(nn.Module):
    """A ``noise_seed`` buffer drawn from torch's global RNG at construction (seeded by the recipe's
    seed, so runs differ by seed and a resume restores it from the checkpoint)."""

    noise_seed: Tensor

    def init_noise_seed(self) -> None:
        self.register_buffer("noise_seed", torch.randint(0, 2**31 - 1, (), dtype=torch.long))


@METHODS.register(
    "swing", "Swing distillation: per-sample temperature by privacy sensitivity + Laplace noise on soft targets (S44)",
    SwingParams,
)
class Swing(WithNoiseSeed, Distiller):
    """Swing distillation (S44, Li et al., arXiv 2212.08349):
    ``ce_weight · CE(s, y) + kd_weight · swing_loss(s, t, noise)`` with the per-sample temperature
    ``T_i = t_min + (t_max − t_min) · sensitivity_i`` and Laplace(0, ``noise_scale``) noise on the
    tempered soft targets, drawn once per training sample (``keyed_laplace``).

    What the paper states (abstract; its full text could not be read here): the temperature is set
    per example (per token for LMs) by how likely it is to hold private information, instead of one
    constant, and noise is injected into the soft targets given to the student; canary exposure falls
    by over 80 % against KD at competitive accuracy. Ours: the sensitivity (the teacher's rescaled
    top-1 probability, ``privacy_sensitivity``: a memorised sample is one the teacher is sure of; the
    paper's estimate of how likely a token is to hold private information is not known here), the linear map to [t_min,
    t_max], the Laplace mechanism on probabilities with clip-and-renormalise, one noise draw per
    sample, and the per-sample T² factor. Transfer-set samples have no label: the KD term alone.
    """

    params: SwingParams

    def __init__(self, student: nn.Module, teacher: nn.Module | None, params: SwingParams, info: TaskInfo) -> None:
        super().__init__(student, teacher, params, info)
        self.init_noise_seed()
        self._noise: Tensor | None = None  # [len(train), C], rebuilt from noise_seed (so not checkpointed)

    def noise(self, index: Tensor) -> Tensor:
        """The training samples' noise rows: ``keyed_laplace`` of every index, drawn once (a table)."""
        if self._noise is None:
            n = len(self.info.train) if self.info.train is not None else self.info.num_train
            self._noise = keyed_laplace(torch.arange(n), (self.info.num_classes,), self.params.noise_scale,
                                        int(self.noise_seed))
        return self._noise[index.cpu()]

    def training_step(self, batch: dict[str, Tensor]) -> Step:
        p, x = self.params, batch["x"]
        s = self.student(x)
        t = self.teacher_logits(x, batch["index"])
        noise = self.noise(batch["index"]).to(t.device)
        ce = labeled_ce(s, batch)
        kd = swing_loss(s, t, noise, p.t_min, p.t_max)
        temps = swing_temperatures(t, p.t_min, p.t_max)
        return Step({"student": p.ce_weight * ce + p.kd_weight * kd},
                    {"ce": ce.detach(), "kd": kd.detach(), "temperature": temps.mean()})
