"""``tgeo``: TGeo-KD, a learned sample-wise knowledge fusion ratio (Hu et al., ICLR 2024, S08)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn
from torch.func import functional_call

from distill.core.distiller import Distiller, Step, TaskInfo
from distill.core.registry import METHODS, Params
from distill.errors import RecipeError
from distill.core.steps import StepRecords, gather_rows
from distill.logits.losses import fusion_kd_loss


class TGeoParams(Params):
    temperature: float = Field(4.0, gt=0)
    hidden: int = Field(64, ge=1, description="hidden width of the ratio network")
    lookahead_lr: float = Field(0.01, gt=0, description="SGD step of the virtual (look-ahead) student update")
    val_batch_size: int = Field(128, ge=1, description="validation samples per outer (ratio) step")


def geometry_features(student_probs: Tensor, teacher_probs: Tensor, onehot: Tensor, class_mean: Tensor) -> Tensor:
    """TGeo-KD's relations (S08) among the student prediction S, teacher prediction T,
    ground truth G (intra-sample) and the teacher's mean prediction T̄ over the sample's class
    (inter-sample): the six edge vectors S−T, S−G, T−G, S−T̄, T−T̄, G−T̄ and their Euclidean lengths.
    Inputs ``[batch, C]``; returns ``[batch, 6·C + 6]``.
    """
    pts = (student_probs, teacher_probs, onehot, class_mean)
    edges = [pts[i] - pts[j] for i, j in ((0, 1), (0, 2), (1, 2), (0, 3), (1, 3), (2, 3))]
    return torch.cat(edges + [torch.stack([e.norm(dim=-1) for e in edges], dim=-1)], dim=-1)


@METHODS.register(
    "tgeo", "TGeo-KD: per-sample KD/CE fusion ratio from S/T/G geometry, learned bilevel on validation data (S08)",
    TGeoParams,
)
class TGeoKD(Distiller):
    """TGeo-KD (S08): ``L = mean_i α_i · T²·KL(t_i ‖ s_i) + (1 − α_i) · CE(s_i, y_i)`` (the paper's
    convex KD/CE combination with a per-sample fusion ratio, ``fusion_kd_loss``), with
    ``α_i = σ(f_ω(r_i))`` from an MLP ``f_ω`` over the geometry ``r_i`` of ``geometry_features``
    (student and teacher probabilities at T = 1, inputs detached). Transfer-set samples have no
    label and take the KD term alone.

    Bilevel training of ω (the paper's "bilevel-optimization manner"), done as Meta-Weight-Net's
    one-step look-ahead (Shu et al. 2019), in one engine step. The ratio network is its own
    parameter group ``"ratio"``; ``training_step`` (1) builds a virtual student
    ``θ' = θ − lookahead_lr · ∇_θ L(θ, α(ω))`` with ``torch.func.functional_call`` on detached
    copies of θ (``create_graph=True``, so θ' depends on ω; ``lookahead_loss``); (2) returns the
    student's CE on a validation batch at θ' as the ``"ratio"`` loss, whose gradient reaches only ω
    (θ's copies are temporaries), so the engine's ratio optimizer takes the outer step; (3) returns
    ``L(θ, sg(α))`` as the ``"student"`` loss. The validation batch is drawn from ``info.val`` with
    torch's global RNG (seeded, checkpointed).

    Deviations: the student step uses α(ω_t), not α(ω_{t+1}) re-evaluated after the outer step
    (one pass per step instead of three); the look-ahead is plain SGD whatever the engine's
    optimizer (Adam on ω is invariant to its scale). No official code is public and only the
    abstract was at hand: the feature set (edge vectors plus their lengths), the MLP (one hidden
    layer, ReLU, ``hidden`` units, zero-initialised output so α starts at 0.5), T = 1 for the
    geometry and the validation CE as the outer objective are this library's reading of the method.

    T̄ (class-mean teacher prediction) is exact running sums, not an EMA: buffers ``class_sum``
    ``[C, C]`` and ``class_count`` ``[C]`` (float64, checkpointed) accumulate the frozen teacher's
    probabilities of every labeled sample of every optimizer step (gathered from all processes in
    ``on_optimizer_step``, a SAM replay not counted twice), so after one epoch T̄ is the global class
    average the paper uses. Features also count the current micro-batch, so T̄ is never empty.
    """

    params: TGeoParams

    def __init__(self, student: nn.Module, teacher: nn.Module | None, params: TGeoParams, info: TaskInfo) -> None:
        super().__init__(student, teacher, params, info)
        if info.val is None or len(info.val) == 0:
            raise RecipeError("method tgeo learns its fusion ratio on validation data: set task.num_val > 0")
        c = info.num_classes
        self.ratio_net = nn.Sequential(nn.Linear(6 * c + 6, params.hidden), nn.ReLU(), nn.Linear(params.hidden, 1))
        nn.init.zeros_(self.ratio_net[-1].weight)  # start at α = 0.5 for every sample
        nn.init.zeros_(self.ratio_net[-1].bias)
        self.register_buffer("class_sum", torch.zeros(c, c, dtype=torch.float64))
        self.register_buffer("class_count", torch.zeros(c, dtype=torch.float64))
        self._records = StepRecords()  # (index, [label, teacher probs]) of this step's micro-batches

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {**super().param_groups(), "ratio": list(self.ratio_net.parameters())}

    def class_mean(self, teacher_probs: Tensor, target: Tensor) -> Tensor:
        """T̄ ``[C, C]`` from the buffers plus the labeled rows of the current batch."""
        lab = target >= 0
        total = self.class_sum.index_add(0, target[lab], teacher_probs[lab].double())
        count = self.class_count.index_add(0, target[lab], torch.ones_like(target[lab], dtype=torch.float64))
        return total / count.clamp(min=1)[:, None]

    def ratio(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor) -> Tensor:
        """α ``[batch]`` (placeholders where ``target`` is −1; ``fusion_kd_loss`` ignores them)."""
        y = target.clamp(min=0)
        t_probs = F.softmax(teacher_logits.float(), -1)
        mean = self.class_mean(t_probs, target).float()
        feats = geometry_features(
            F.softmax(student_logits.detach().float(), -1), t_probs, F.one_hot(y, self.info.num_classes).float(),
            mean[y],
        )
        return torch.sigmoid(self.ratio_net(feats)).squeeze(-1)

    def on_optimizer_step(self) -> None:
        records = self._records.take()
        if not records:
            return
        _, rows = gather_rows(torch.cat([r[0] for r in records]), torch.cat([r[1] for r in records]))
        y, probs = rows[:, 0].long(), rows[:, 1:]
        lab = y >= 0
        self.class_sum.index_add_(0, y[lab], probs[lab])
        self.class_count.index_add_(0, y[lab], torch.ones_like(y[lab], dtype=torch.float64))

    def _val_batch(self, device: torch.device) -> tuple[Tensor, Tensor]:
        val = self.info.val
        idx = torch.randint(len(val), (min(self.params.val_batch_size, len(val)),))
        return val.x[idx].to(device), val.y[idx].to(device)

    def lookahead_loss(self, x: Tensor, t: Tensor, y: Tensor, alpha: Tensor, x_val: Tensor, y_val: Tensor) -> Tensor:
        """The outer objective ``CE(f(x_val; θ'), y_val)`` at the virtual student
        ``θ' = θ − lookahead_lr · ∇_θ fusion_kd_loss(f(x; θ), t, y, α)``, differentiable in α (and so
        in ω) but not in the student's parameters, which enter as detached copies."""
        theta = {k: v.detach().requires_grad_() for k, v in self.student.named_parameters()}
        buffers = dict(self.student.named_buffers())
        s = functional_call(self.student, (theta, buffers), (x,))
        inner = fusion_kd_loss(s, t, y, alpha, self.params.temperature)
        grads = torch.autograd.grad(inner, list(theta.values()), create_graph=True, allow_unused=True)
        fast = {k: v if g is None else v - self.params.lookahead_lr * g for (k, v), g in zip(theta.items(), grads)}
        return F.cross_entropy(functional_call(self.student, (fast, buffers), (x_val,)).float(), y_val)

    def training_step(self, batch: dict[str, Tensor]) -> Step:
        p, x, y = self.params, batch["x"], batch["y"]
        t = self.teacher_logits(x, batch["index"])
        labeled = y >= 0
        if not self.replaying:
            self._records.add(batch["index"], torch.cat([y[:, None].double(), F.softmax(t.double(), -1)], dim=1))
        s = self.student(x)
        alpha = self.ratio(s, t, y)
        val_loss = self.lookahead_loss(x, t, y, alpha, *self._val_batch(x.device))
        loss = fusion_kd_loss(s, t, y, alpha.detach(), p.temperature)
        a = alpha.detach()[labeled]
        return Step(
            {"student": loss, "ratio": val_loss},
            {"alpha": a.mean() if len(a) else 1.0, "val_ce_lookahead": val_loss.detach()},
        )
