"""``g2sd``: Generic-to-Specific Distillation of masked autoencoders (S45, G2SD), a two-stage recipe.

Official code: pengzhiliang/G2SD, ``G2SD/engine_distill.py :: train_one_epoch`` (generic stage),
``G2SD/models_mae.py :: MaskedAutoencoderViT.forward`` (student decoder + ``decoderfeature_pred``),
``G2SD/engine_finetune_dis.py :: train_one_epoch`` and ``models_vit.py`` (specific stage, DeiT-style
distillation head; ``NKD_loss.py`` is the ``--enable_nkd`` alternative, off by default).
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from distill.core.distiller import Step, TaskInfo
from distill.core.registry import METHODS, Params
from distill.errors import RecipeError
from distill.features.base import FeatureDistiller
from distill.features.methods.dmae import MAEDecoder, VisibleViT, check_vit_pair, random_masking, vit_layers
from distill.features.models import ViTClassifier
from distill.features.tap import FeatureTap
from distill.logits.methods.kd import labeled_ce


# --- pure pieces ---------------------------------------------------------------------------------
def g2sd_feature_loss(pred: Tensor, teacher: Tensor, beta: float = 2.0) -> Tensor:
    """The generic-stage term, official ``engine_distill.train_one_epoch``: ``F.smooth_l1_loss(pred,
    LayerNorm(teacher), beta=2.0)``, the LayerNorm without affine parameters (eps 1e-6) over the last
    dimension, a mean over every element; the teacher side is detached."""
    target = F.layer_norm(teacher.detach().float(), teacher.shape[-1:], eps=1e-6)
    return F.smooth_l1_loss(pred.float(), target, beta=beta)


def g2sd_specific_loss(cls_logits: Tensor, dist_logits: Tensor, teacher_logits: Tensor,
                       batch: dict[str, Tensor]) -> Tensor:
    """The specific-stage loss, official ``engine_finetune_dis.train_one_epoch`` (``enable_nkd`` off):
    ``(CE(cls, y) + CE(dist, argmax teacher)) / 2``: labels on the class head, the teacher's hard
    prediction on the distillation head. CE on labels covers labeled samples only (``labeled_ce``)."""
    hard = F.cross_entropy(dist_logits.float(), teacher_logits.argmax(-1))
    return (labeled_ce(cls_logits, batch) + hard) / 2


def feature_mlp(d_in: int, d_out: int) -> nn.Sequential:
    """The official ``Mlp(d_in, d_out, d_out)``: Linear → GELU → Linear, hidden width ``d_out``."""
    return nn.Sequential(nn.Linear(d_in, d_out), nn.GELU(), nn.Linear(d_out, d_out))


def feature_decoder(d_in: int, dim: int, depth: int, heads: int, num_patches: int, d_teacher: int) -> MAEDecoder:
    """The student's MAE decoder whose last hidden state (no final norm, official ``forward_decoder``)
    goes through ``decoderfeature_pred`` (``feature_mlp``) to the teacher's width: DMAE's decoder with
    its norm dropped and its pixel head replaced."""
    dec = MAEDecoder(d_in, dim, depth, heads, num_patches, 1)
    dec.norm = nn.Identity()
    dec.pred = feature_mlp(dim, d_teacher)
    return dec


# --- the method ----------------------------------------------------------------------------------
class G2SDParams(Params):
    stage: str = Field("generic", pattern="^(generic|specific)$",
                       description="generic: the student's decoder predicts the teacher's features; specific: prediction distillation")
    mask_ratio: float = Field(0.75, ge=0, lt=1, description="generic: fraction of patches removed (official 0.75)")
    teacher_layer: int = Field(-1, description="generic: the teacher block whose hidden state is the target (ours: encoder block; default last)")
    supervise: str = Field("all", pattern="^(all|masked)$", description="generic: patch tokens supervised (official supervise_all=True: all)")
    beta: float = Field(2.0, gt=0, description="smooth-L1 beta (official 2.0)")
    encoder_weight: float = Field(0.0, ge=0, description="generic: encoder-feature term (official weight 0)")
    decoder_dim: int = Field(32, ge=1)
    decoder_depth: int = Field(2, ge=1)
    decoder_heads: int = Field(4, ge=1)
    dist_head: bool = Field(True, description="specific: a separate distillation head (official head_dist); false: the class head takes both terms")


@METHODS.register("g2sd", "G2SD: generic (decoder predicts the teacher's features) then specific (hard-label) distillation, a two-stage recipe (S45)", G2SDParams)
class G2SD(FeatureDistiller):
    """S45 G2SD, one stage per run; a staged recipe chains them (``digits-g2sd``)::

        generic:  loss = smooth_l1_β(mlp(decoder(student(visible), ids_restore)), LN(teacher_k(x)))
                         [+ encoder_weight · smooth_l1_β(mlp(student(visible)), LN(teacher_last(visible)))]
        specific: loss = (CE(head(s), y) + CE(head_dist(s), argmax teacher(x))) / 2

    Generic (official ``engine_distill``): per step one random mask (``mask_ratio``); the student
    encodes ``[CLS] + visible patches`` (DMAE's ``VisibleViT``), its decoder (DMAE's ``MAEDecoder``,
    mask tokens at the removed positions, no final norm) and ``feature_mlp`` predict the teacher's
    features at every patch (``supervise: all``, official ``supervise_all``) or the removed ones only.
    No label and no logit is used. The decoder is a projector: trained, checkpointed, not exported, so
    the next stage starts from the encoder (and its untrained head) only, as the official discards it.

    Specific (official ``engine_finetune_dis``): the label on the class head, the teacher's top-1 class
    on the distillation head, averaged.

    Ours: (1) the official teacher is an MAE with its own decoder, and the target is the hidden state of
    its 4th decoder block on the same visible patches; a supervised ViT teacher has no decoder, so the
    target is the teacher's block ``teacher_layer`` run on the full, unmasked image (the features a
    decoder would reconstruct), the teacher stopped there; the [CLS] position is not supervised.
    (2) One teacher for both stages (the official uses the pre-trained MAE, then the fine-tuned one).
    (3) No distillation token: ``head_dist`` reads the same [CLS] state as the class head and is a
    projector, so the exported classifier predicts with ``head`` alone (the official DeiT-style token
    averages both heads at test time).
    """

    params: G2SDParams

    def __init__(self, student: nn.Module, teacher: nn.Module | None, params: G2SDParams, info: TaskInfo) -> None:
        super().__init__(student, teacher, params, info)
        if params.stage == "specific":
            if params.dist_head:
                self.projectors["head_dist"] = nn.Linear(student.head.in_features, info.num_classes)
            return
        check_vit_pair("g2sd (generic stage)", student, teacher)
        assert isinstance(teacher, ViTClassifier) and isinstance(student, ViTClassifier)
        s_cfg, t_cfg = student.vit.config, teacher.vit.config
        nt = len(vit_layers(teacher))
        if not -nt <= params.teacher_layer < nt:
            raise RecipeError(f"g2sd: teacher_layer {params.teacher_layer} out of range; the teacher has {nt} blocks")
        self.teacher_layer = teacher.feature_layers()[params.teacher_layer]
        self.last_teacher_layer = teacher.feature_layers()[-1]
        _, h, w = student.pixel_shape
        ph, pw = s_cfg.patch_size if isinstance(s_cfg.patch_size, (tuple, list)) else (s_cfg.patch_size,) * 2
        self.num_patches = (h // int(ph)) * (w // int(pw))
        if int(self.num_patches * (1 - params.mask_ratio)) < 1:
            raise RecipeError(f"g2sd: mask_ratio {params.mask_ratio} leaves no visible patch of {self.num_patches}")
        ds, dt = s_cfg.hidden_size, t_cfg.hidden_size
        self.projectors["decoder"] = feature_decoder(ds, params.decoder_dim, params.decoder_depth, params.decoder_heads,
                                                     self.num_patches, dt)
        if params.encoder_weight > 0:
            self.projectors["encoder_pred"] = feature_mlp(ds, dt)

    def training_step(self, batch: dict[str, Tensor]) -> Step:
        return self.generic_step(batch) if self.params.stage == "generic" else self.specific_step(batch)

    def generic_step(self, batch: dict[str, Tensor]) -> Step:
        p, x = self.params, batch["x"]
        ids_keep, mask, ids_restore = random_masking(x.shape[0], self.num_patches, p.mask_ratio, x.device)
        target = self.teacher_features(FeatureTap(self.teacher, [self.teacher_layer], stop_after=True), x)[self.teacher_layer]
        latent = VisibleViT(self.student)(x, ids_keep)
        pred = self.projectors["decoder"](latent, ids_restore)  # [n, L, D_t], patches in image order
        target = target[:, 1:]  # [CLS] dropped
        if p.supervise == "masked":
            pred, target = pred[mask.bool()], target[mask.bool()]
        feat = g2sd_feature_loss(pred, target, p.beta)
        loss, metrics = feat, {"feature": feat.detach()}
        if p.encoder_weight > 0:  # official loss_feature: the teacher on the same visible tokens, before its final norm
            t_tap = FeatureTap(self.teacher, [self.last_teacher_layer], stop_after=True)
            t_enc = self.teacher_features(t_tap, x, ids_keep, runner=VisibleViT(self.teacher))[self.last_teacher_layer]
            enc = g2sd_feature_loss(self.projectors["encoder_pred"](latent), t_enc, p.beta)
            loss = loss + p.encoder_weight * enc
            metrics["encoder"] = enc.detach()
        return Step({"student": loss}, metrics)

    def specific_step(self, batch: dict[str, Tensor]) -> Step:
        x = batch["x"]
        emb = self.student.embed(x)
        cls_logits = self.student.head(emb)
        dist_logits = self.projectors["head_dist"](emb) if self.params.dist_head else cls_logits
        t = self.teacher_logits(x, batch["index"])
        loss = g2sd_specific_loss(cls_logits, dist_logits, t, batch)
        return Step({"student": loss}, {"ce": labeled_ce(cls_logits, batch).detach(),
                                        "teacher_agree": (dist_logits.argmax(-1) == t.argmax(-1)).float().mean().detach()})
