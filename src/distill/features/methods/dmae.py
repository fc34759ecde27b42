"""``dmae``: DMAE, masked-input feature distillation (S05, "Masked Autoencoders Enable Efficient
Knowledge Distillers").

Official code: UCSC-VLAA/DMAE, ``models_mae_distill.py :: random_masking_customized,
forward_encoder_student, forward_distillation_loss_embedding, forward_loss`` and
``engine_distill.py :: train_one_epoch``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from distill.core.distiller import Step, TaskInfo
from distill.core.registry import METHODS, Params
from distill.errors import RecipeError
from distill.features.base import FeatureDistiller
from distill.features.models import ViTClassifier
from distill.features.tap import FeatureTap, flop_counter
from distill.logits.methods.kd import labeled_ce


# --- pure pieces ---------------------------------------------------------------------------------
def random_masking(n: int, length: int, ratio: float, device: torch.device | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The official ``random_masking_customized``: per sample, keep the ``int(length · (1 − ratio))``
    patches with the smallest uniform noise. Returns ``ids_keep [n, keep]`` (patch indices, in noise
    order), ``mask [n, length]`` (1 = removed) and ``ids_restore [n, length]``."""
    keep = int(length * (1 - ratio))
    noise = torch.rand(n, length, device=device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(n, length, device=device)
    mask[:, :keep] = 0
    return ids_shuffle[:, :keep], torch.gather(mask, 1, ids_restore), ids_restore


def visible_tokens(tokens: Tensor, ids_keep: Tensor) -> Tensor:
    """``[CLS] + visible patches``: from ``tokens [n, 1 + L, D]`` ([CLS] first, position embeddings
    already added, as the official adds them before masking) keep token 0 and patches ``ids_keep``."""
    patches = torch.gather(tokens[:, 1:], 1, ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    return torch.cat([tokens[:, :1], patches], dim=1)


def dmae_align_loss(student: Tensor, teacher: Tensor, kind: str = "l1", normalize: bool = True) -> Tensor:
    """S05's feature term (the abstract's "distance between the intermediate feature maps"), the official
    ``forward_distillation_loss_embedding`` for one aligned block (no equation number is cited: only the
    abstract is in the seed listing): ``nn.L1Loss``
    (``kind="l1"``) or ``nn.MSELoss`` (``"l2"``), a mean over every element of the ``[n, tokens, D]``
    features of the visible tokens, between the detached teacher features and the (projected) student
    features, both L2-normalised over D when ``normalize`` (the official does so with a projection head)."""
    teacher = teacher.detach().float()
    student = student.float()
    if normalize:
        teacher, student = F.normalize(teacher, dim=-1), F.normalize(student, dim=-1)
    return F.l1_loss(student, teacher) if kind == "l1" else F.mse_loss(student, teacher)


def patchify(pixels: Tensor, patch: tuple[int, int]) -> Tensor:
    """``[n, C, H, W] -> [n, L, ph·pw·C]`` in the patch order of a ViT patch embedding (row-major grid),
    each patch's values ordered (row, column, channel) as the official ``patchify``."""
    n, c, h, w = pixels.shape
    ph, pw = patch
    x = pixels.reshape(n, c, h // ph, ph, w // pw, pw)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(n, (h // ph) * (w // pw), ph * pw * c)


def masked_patch_loss(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """The official ``forward_loss`` (MAE, no ``norm_pix_loss``): per-patch MSE averaged over the
    removed patches only (``mask`` 1)."""
    per_patch = ((pred.float() - target.float()) ** 2).mean(-1)
    return (per_patch * mask).sum() / mask.sum()


# --- modules -------------------------------------------------------------------------------------
def vit_layers(model: ViTClassifier) -> nn.ModuleList:
    return model.vit.layers if hasattr(model.vit, "layers") else model.vit.encoder.layer


class VisibleViT(nn.Module):
    """``model``'s encoder on ``[CLS] + visible patches`` (the official ``forward_encoder_student``):
    embeddings (+ position), ``visible_tokens``, the layers, the final LayerNorm. Built per call and
    never stored, so the wrapped model is not registered twice."""

    def __init__(self, model: ViTClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, ids_keep: Tensor) -> Tensor:
        m = self.model
        h = visible_tokens(m.vit.embeddings(x.reshape(x.shape[0], *m.pixel_shape)), ids_keep)
        for layer in vit_layers(m):
            out = layer(h)
            h = out[0] if isinstance(out, tuple) else out  # transformers 4 layers return tuples
        return m.vit.layernorm(h)


class MAEDecoder(nn.Module):
    """The MAE decoder (official ``forward_decoder``): embed, mask tokens at the removed positions
    (unshuffled with ``ids_restore``), position embeddings, pre-norm transformer blocks, LayerNorm,
    a Linear to patch pixels; [CLS] dropped. Ours: learned position embeddings (the official uses fixed
    sin-cos), and a small width/depth."""

    def __init__(self, d_in: int, dim: int, depth: int, heads: int, num_patches: int, patch_dim: int) -> None:
        super().__init__()
        self.embed = nn.Linear(d_in, dim)
        self.mask_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, num_patches + 1, dim) * 0.02)
        heads = heads if dim % heads == 0 else 1
        self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu",
                                                               batch_first=True, norm_first=True) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, patch_dim)

    def forward(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        x = self.embed(latent)
        n, length = ids_restore.shape
        tokens = torch.cat([x[:, 1:], self.mask_token.expand(n, length + 1 - x.shape[1], -1)], dim=1)
        tokens = torch.gather(tokens, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :1], tokens], dim=1) + self.pos
        for b in self.blocks:
            x = b(x)
        return self.pred(self.norm(x))[:, 1:]


# --- the method ----------------------------------------------------------------------------------
def check_vit_pair(method: str, student: nn.Module, teacher: nn.Module | None) -> None:
    """Masked-token methods (DMAE, G2SD's generic stage) need two ``vit`` models on the same patch grid:
    a one-line ``RecipeError`` otherwise."""
    for role, m in (("student", student), ("teacher", teacher)):
        if not isinstance(m, ViTClassifier):
            raise RecipeError(f"{method}: the {role} must be the 'vit' arch (masking drops patch tokens), not {type(m).__name__}")
    assert isinstance(teacher, ViTClassifier) and isinstance(student, ViTClassifier)
    s_cfg, t_cfg = student.vit.config, teacher.vit.config
    if (tuple(student.pixel_shape), s_cfg.patch_size) != (tuple(teacher.pixel_shape), t_cfg.patch_size):
        raise RecipeError(f"{method}: student and teacher need the same patch grid (patch {s_cfg.patch_size} vs {t_cfg.patch_size})")


class DMAEParams(Params):
    mask_ratio: float = Field(0.75, ge=0, lt=1, description="fraction of patches removed (teacher and student see the same visible ones)")
    student_layers: list[int] | None = Field(None, description="student blocks aligned (official aligned_blks_indices); default the block at 3/4 depth")
    teacher_layers: list[int] | None = Field(None, description="teacher blocks aligned (official teacher_aligned_blks_indices); default the block at 3/4 depth")
    loss: str = Field("l1", pattern="^(l1|l2)$", description="official embedding_distillation_func")
    projection: bool = Field(True, description="Linear projection head + L2 normalisation (official fc-1layer)")
    distill_weight: float = Field(1.0, ge=0)
    pixel_weight: float = Field(1.0, ge=0, description="MAE pixel loss on the removed patches (student decoder); 0 skips the decoder")
    decoder_dim: int = Field(32, ge=1)
    decoder_depth: int = Field(1, ge=1)
    ce_weight: float = Field(1.0, ge=0, description="CE on the unmasked input (ours: fine-tuning folded into the same steps)")


def _three_quarters(n: int) -> int:
    """The block at 3/4 depth (the official base ← large run aligns block 8 of 12 with 17 of 24)."""
    return max(math.ceil(0.75 * n) - 1, 0)


@METHODS.register("dmae", "DMAE: feature distillation on the visible patches at 75% masking, teacher run to the aligned block (S05)", DMAEParams)
class DMAE(FeatureDistiller):
    """S05 DMAE, the official ``train_one_epoch`` + ``MaskedAutoencoderViT.forward``::

        loss = pixel_weight · MAE(decoder(student(visible)), removed patches)
               + distill_weight · Σ_aligned ‖norm(teacher_k(visible)) − norm(head(student_j(visible)))‖₁
               + ce_weight · CE(student(x), y)

    Per step one random mask (``mask_ratio`` of the patches removed) is drawn; teacher and student both
    run on ``[CLS] + the visible patches`` only (the student reuses the teacher's ``ids_keep``). The
    teacher runs only up to its deepest aligned block (``FeatureTap(stop_after=True)``: the official
    truncates the teacher; at 75 % masking and 3/4 depth it costs about a fifth of a full forward);
    ``teacher_flops_saved`` (logged) is the fraction of a full teacher forward on the unmasked input
    that this saves, ``teacher_flops_saved_depth`` the part due to stopping alone (both measured once
    with ``torch.utils.flop_counter``). Projection heads and the decoder are projectors (own group,
    checkpointed, not exported). Both models must be our ``vit`` on the same patch grid.

    Ours: the paper pre-trains then fine-tunes; here CE on the unmasked input is added in the same
    steps (``ce_weight``) so one recipe gives a classifier; the decoder's size and learned positions.
    """

    params: DMAEParams

    def __init__(self, student: nn.Module, teacher: nn.Module | None, params: DMAEParams, info: TaskInfo) -> None:
        super().__init__(student, teacher, params, info)
        check_vit_pair("dmae", student, teacher)
        assert isinstance(teacher, ViTClassifier) and isinstance(student, ViTClassifier)
        s_cfg, t_cfg = student.vit.config, teacher.vit.config
        ns, nt = len(vit_layers(student)), len(vit_layers(teacher))
        s_idx = params.student_layers if params.student_layers is not None else [_three_quarters(ns)]
        t_idx = params.teacher_layers if params.teacher_layers is not None else [_three_quarters(nt)]
        if len(s_idx) != len(t_idx) or not s_idx:
            raise RecipeError(f"dmae: student_layers {s_idx} and teacher_layers {t_idx} must pair one to one")
        for name, idx, n in (("student", s_idx, ns), ("teacher", t_idx, nt)):
            if any(not 0 <= i < n for i in idx):
                raise RecipeError(f"dmae: {name}_layers {idx} out of range; the {name} has {n} blocks")
        self.student_layers = [student.feature_layers()[i] for i in s_idx]
        self.teacher_layers = [teacher.feature_layers()[i] for i in t_idx]
        ds, dt = s_cfg.hidden_size, t_cfg.hidden_size
        if not params.projection and ds != dt:
            raise RecipeError(f"dmae: without a projection the widths must match (student {ds}, teacher {dt})")
        for name in self.student_layers:
            self.add_projector(name, "linear" if params.projection else "identity", (ds,), (dt,))
        c, h, w = student.pixel_shape
        ph, pw = (s_cfg.patch_size if isinstance(s_cfg.patch_size, (tuple, list)) else (s_cfg.patch_size,) * 2)
        self.patch = (int(ph), int(pw))
        self.num_patches = (h // self.patch[0]) * (w // self.patch[1])
        if int(self.num_patches * (1 - params.mask_ratio)) < 1:
            raise RecipeError(f"dmae: mask_ratio {params.mask_ratio} leaves no visible patch of {self.num_patches}")
        if params.pixel_weight > 0:
            self.projectors["decoder"] = MAEDecoder(ds, params.decoder_dim, params.decoder_depth, 4, self.num_patches,
                                                    self.patch[0] * self.patch[1] * c)
        self._flops: dict[str, float] | None = None  # measured once, on the first step

    def teacher_tap(self) -> FeatureTap:
        assert self.teacher is not None
        return FeatureTap(self.teacher, self.teacher_layers, stop_after=True)

    def measure_flops(self, x: Tensor, ids_keep: Tensor) -> dict[str, float]:
        """Teacher FLOPs per sample: full forward on ``x``, on the visible tokens, and stopped there."""
        assert self.teacher is not None
        prof = self.teacher_tap().profile(VisibleViT(self.teacher), x, ids_keep, flops=True)
        with torch.no_grad(), flop_counter() as fc:
            self.teacher(x)
        full = fc.get_total_flops()
        n = x.shape[0]
        return {"teacher_flops_full": full / n, "teacher_flops_visible": (prof.flops_full or 0) / n,
                "teacher_flops_used": (prof.flops_partial or 0) / n,
                "teacher_flops_saved": 1.0 - (prof.flops_partial or 0) / full,
                "teacher_flops_saved_depth": prof.flops_saved or 0.0}

    def training_step(self, batch: dict[str, Tensor]) -> Step:
        p, x = self.params, batch["x"]
        ids_keep, mask, ids_restore = random_masking(x.shape[0], self.num_patches, p.mask_ratio, x.device)
        if self._flops is None:
            self._flops = self.measure_flops(x, ids_keep)
        t_feats = self.teacher_features(self.teacher_tap(), x, ids_keep, runner=VisibleViT(self.teacher))
        with FeatureTap(self.student, self.student_layers) as tap:
            latent = VisibleViT(self.student)(x, ids_keep)
            s_feats = tap.features()
        align = [dmae_align_loss(self.projector(s)(f), t_feats[t], p.loss, p.projection)
                 for s, f, t in zip(self.student_layers, s_feats, self.teacher_layers)]
        distill = torch.stack(align).sum()
        loss = p.distill_weight * distill
        metrics: dict[str, Tensor | float] = {"align": distill.detach(), **self._flops}
        if p.pixel_weight > 0:
            c, h, w = self.student.pixel_shape
            target = patchify(x.reshape(x.shape[0], c, h, w), self.patch)
            pixel = masked_patch_loss(self.projectors["decoder"](latent, ids_restore), target, mask)
            loss = loss + p.pixel_weight * pixel
            metrics["pixel"] = pixel.detach()
        if p.ce_weight > 0:
            ce = labeled_ce(self.student(x), batch)
            loss = loss + p.ce_weight * ce
            metrics["ce"] = ce.detach()
        return Step({"student": loss}, metrics)
