"""``lelp``: Learning Embedding Linear Projections (S49, Loo, Iliopoulos, Hu & Vee 2024).

For binary and few-class tasks, where the teacher's class probabilities carry little information,
LELP splits every class into pseudo-subclasses found by linear projections of the teacher's
penultimate embeddings, and distills the teacher's distribution over those subclasses.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from distill.core.distiller import Distiller, Step, TaskInfo
from distill.core.registry import ARCHS, METHODS, Params
from distill.errors import MismatchError, RecipeError
from distill.logits.methods.kd import labeled_ce
from distill.logits.losses import kd_loss
from distill.tasks.models import build_model


class LELPParams(Params):
    num_directions: int = Field(4, ge=1, description="directions per class; each is split into 2 pseudo-subclasses")
    directions: Literal["pca", "random"] = Field(
        "pca",
        description="PCA of the class's teacher embeddings (the paper) or random directions (ablation)",
    )
    temperature: float = Field(4.0, gt=0, description="divides teacher and student subclass logits")
    ce_weight: float = Field(0.1, ge=0, description="CE of the student's class logits on labeled samples")
    kd_weight: float = Field(0.9, ge=0, description="T²·KL between teacher and student subclass distributions")


def null_space_projector(head_weight: Tensor) -> Tensor:
    """``I − Q Qᵀ`` ``[d, d]`` with ``Q`` an orthonormal basis of the row space of the teacher's head
    weight ``[classes, d]``: moving an embedding along the projected directions changes no logit."""
    w = head_weight.detach().double()
    _, s, vh = torch.linalg.svd(w, full_matrices=False)
    q = vh[s > s.max() * 1e-6]
    return torch.eye(w.shape[1], dtype=torch.float64) - q.T @ q


def fit_subclass_directions(
    embeddings: Tensor,
    labels: Tensor,
    head_weight: Tensor,
    num_classes: int,
    num_directions: int,
    kind: str = "pca",
) -> tuple[Tensor, Tensor, Tensor]:
    """Per class ``c``: centre its samples' teacher embeddings ``[n_c, d]`` at the class mean ``μ_c``,
    project them onto the null space of the teacher's head (``null_space_projector``) and take the
    top ``num_directions`` principal directions ``u_{c,k}`` (or random orthonormal directions in
    that null space, ``kind="random"``, from the global RNG), with the std ``σ_{c,k}`` of the
    projections. Returns ``directions [C, m, d]``, ``centers [C, d]``, ``scales [C, m]`` (float32).
    """
    proj = null_space_projector(head_weight)
    d = proj.shape[0]
    null_dim = round(torch.trace(proj).item())  # d − rank of the head
    if null_dim < num_directions:
        raise RecipeError(f"method.num_directions: {num_directions} exceeds the {null_dim} dimensions of the "
                          "teacher's embedding that its head ignores; lower it")
    dirs, centers, scales = [], [], []
    for c in range(num_classes):
        e = embeddings[labels == c].double()
        if len(e) <= num_directions:
            raise RecipeError(f"class {c} has {len(e)} labeled training samples; lelp needs more than "
                              f"method.num_directions = {num_directions}")
        mu = e.mean(0)
        h = (e - mu) @ proj
        if kind == "pca":
            u = torch.linalg.svd(h, full_matrices=False).Vh[:num_directions]
        else:
            u = torch.linalg.qr(proj @ torch.randn(d, num_directions, dtype=torch.float64)).Q.T
        dirs.append(u)
        centers.append(mu)
        scales.append((h @ u.T).std(0).clamp_min(1e-6))
    return torch.stack(dirs).float(), torch.stack(centers).float(), torch.stack(scales).float()


def subclass_logits(
    class_logits: Tensor, embeddings: Tensor, directions: Tensor, centers: Tensor, scales: Tensor
) -> Tensor:
    """The teacher's pseudo-subclass logits ``[batch, C · 2m]`` (class-major: class c's 2m subclasses
    are contiguous). With ``s_{c,k} = ⟨u_{c,k}, h − μ_c⟩ / σ_{c,k}``, each direction is split at the
    class mean into a positive and a negative half, and
    ``z_{c,(k,±)} = z_c + log_softmax_{(k,±)}(±s_{c,k})``,
    so the subclass probabilities of a class sum to the teacher's class probability.
    """
    along = torch.einsum("bd,cmd->bcm", embeddings.float(), directions)
    s = (along - torch.einsum("cd,cmd->cm", centers, directions)) / scales
    halves = torch.stack([s, -s], dim=-1).flatten(2)  # [B, C, 2m]
    return (class_logits.float()[..., None] + F.log_softmax(halves, dim=-1)).flatten(1)


def aggregate_subclasses(logits: Tensor, num_classes: int) -> Tensor:
    """Class logits ``[batch, C]`` from subclass logits ``[batch, C · K]``: the log of the summed
    subclass probabilities, up to a constant (``logsumexp`` over each class's K subclasses)."""
    return torch.logsumexp(logits.float().reshape(len(logits), num_classes, -1), dim=-1)


class SubclassClassifier(nn.Module):
    """A classifier with a head of ``classes × subclasses`` outputs.

    ``forward(x)`` gives class logits (``aggregate_subclasses``), so the engine's evaluation and the
    saved student see an ordinary classifier; ``subclass_logits(x)`` gives the wide output. Wraps a
    model with ``embed(x)`` and a Linear ``head`` (every default architecture), whose head it replaces.
    """

    def __init__(self, base: nn.Module, num_classes: int, subclasses: int) -> None:
        super().__init__()
        head = getattr(base, "head", None)
        if not callable(getattr(base, "embed", None)) or not isinstance(head, nn.Linear):
            raise MismatchError("lelp needs a student with embed(x) and a Linear head (as the default architectures)")
        base.head = nn.Linear(head.in_features, num_classes * subclasses)
        self.base, self.num_classes = base, num_classes

    def embed(self, x: Tensor) -> Tensor:
        return self.base.embed(x)

    def subclass_logits(self, x: Tensor) -> Tensor:
        return self.base.head(self.base.embed(x))

    def forward(self, x: Tensor) -> Tensor:
        return aggregate_subclasses(self.subclass_logits(x), self.num_classes)


class SubclassArchParams(Params):
    base: dict = Field(description="the wrapped arch: {name, params}")
    subclasses: int = Field(ge=1)


@ARCHS.register("subclass", "a base arch with a classes × subclasses head, predicting by logsumexp (LELP, S49)",
                SubclassArchParams)
def subclass_arch(p: SubclassArchParams, input_shape: tuple[int, ...], num_classes: int) -> SubclassClassifier:
    base = build_model(p.base["name"], p.base["params"], input_shape, num_classes)
    return SubclassClassifier(base, num_classes, p.subclasses)


@torch.no_grad()
def _embed_all(teacher: nn.Module, x: Tensor, batch_size: int = 1024) -> Tensor:
    device = next(teacher.parameters()).device
    parts = [teacher.embed(x[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(parts)


@METHODS.register(
    "lelp", "LELP: distill pseudo-subclasses from linear projections of teacher embeddings (S49)", LELPParams
)
class LELP(Distiller):
    """``ce_weight · CE(agg(s), y) + kd_weight · T² · KL(softmax(z_sub/T) ‖ softmax(s_sub/T))`` (S49).

    At construction the subclass directions are fitted on the teacher's embeddings of the labeled
    training samples (``fit_subclass_directions``: per class, PCA after projecting onto the null
    space of the teacher's head, as the paper's first step) and kept as buffers. The student's head
    is widened to ``C · 2m`` outputs (``SubclassClassifier``); its subclass logits are distilled
    from the teacher's (``subclass_logits``) on every sample, transfer set included, and its class
    logits (``aggregate_subclasses``) get CE on labeled samples and are what it predicts with.

    The paper's full text and code were not available here; choices of this implementation: each
    principal direction is split at the class mean into two halves (so 2m subclasses per class), the
    projections are standardised per direction, and the split is a softmax added to the teacher's
    class logit, so the teacher's class probabilities are exactly preserved. Defaults T = 4,
    ce_weight 0.1, kd_weight 0.9 are the library's KD defaults, not the paper's.
    The saved student is the wide model, as the registered arch ``subclass`` (its base arch and the
    number of subclasses), so ``distill.load_student`` rebuilds it.
    """

    params: LELPParams

    def __init__(self, student: nn.Module, teacher: nn.Module | None, params: LELPParams, info: TaskInfo) -> None:
        assert teacher is not None
        if not callable(getattr(teacher, "embed", None)) or not isinstance(getattr(teacher, "head", None), nn.Linear):
            raise MismatchError("lelp needs a teacher with embed(x) and a Linear head (as the default architectures)")
        wide = SubclassClassifier(student, info.num_classes, 2 * params.num_directions)
        super().__init__(wide, teacher, params, info)
        labeled = info.train.y >= 0
        emb = _embed_all(teacher, info.train.x[labeled])
        dirs, centers, scales = fit_subclass_directions(
            emb, info.train.y[labeled], teacher.head.weight, info.num_classes, params.num_directions, params.directions)
        self.register_buffer("directions", dirs)
        self.register_buffer("centers", centers)
        self.register_buffer("scales", scales)

    def export_spec(self, spec: dict | None) -> dict | None:
        if spec is None:
            return None
        return {"name": "subclass", "params": {"base": spec, "subclasses": 2 * self.params.num_directions}}

    def teacher_subclass_logits(self, x: Tensor) -> Tensor:
        with torch.inference_mode():
            h = self.teacher.embed(x)
            out = subclass_logits(self.teacher.head(h), h, self.directions, self.centers, self.scales)
        return out.clone()

    def training_step(self, batch: dict[str, Tensor]) -> Step:
        p = self.params
        s_sub = self.student.subclass_logits(batch["x"])
        t_sub = self.teacher_subclass_logits(batch["x"])
        ce = labeled_ce(aggregate_subclasses(s_sub, self.info.num_classes), batch)
        kd = kd_loss(s_sub, t_sub, p.temperature)
        return Step({"student": p.ce_weight * ce + p.kd_weight * kd}, {"ce": ce.detach(), "kd": kd.detach()})
