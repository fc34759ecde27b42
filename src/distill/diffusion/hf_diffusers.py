"""The diffusers bridge (optional extra ``distill[diffusers]``): diffusers UNets as denoisers, and export.

``DiffusersDenoiser`` wraps a ``UNet2DModel`` (class labels through ``num_class_embeds``) or a
``UNet2DConditionModel`` (labels through a small label embedding, or ``encode(cond)``, as
``encoder_hidden_states``) so that it is called like every denoiser of this family,
``model(x_t, t, cond=None, w=None) -> prediction`` with t ∈ [0, 1], and carries ``model.diffusion``
derived from the diffusers scheduler's config:

- DDPM-family schedulers (``DDPMScheduler`` -> sampler ``sde``, ``DDIMScheduler`` -> ``ddim``,
  ``EulerDiscreteScheduler`` -> ``euler``, ``LCMScheduler`` -> ``consistency``; ``prediction_type``
  epsilon / v_prediction / sample -> eps / v / x0) are presented in our ``vp_cosine`` time. The
  scheduler's discrete ᾱ_i (``alphas_cumprod``) is matched by noise level: t maps to the fractional
  index i whose log-SNR log(ᾱ_i / (1 − ᾱ_i)) equals vp_cosine's at t (linear interpolation in
  log-SNR between indices), so the UNet always sees the noise level it was trained on. For
  ``squaredcos_cap_v2`` betas ᾱ_i = ᾱ_cos((i + 1)/T) (the betas telescope), so this is
  i = t·T − 1 (our choice instead of t·(T − 1), which is off by up to one index); other beta
  schedules (linear, scaled_linear, trained betas) work through the same map.
- ``FlowMatchEulerDiscreteScheduler``: ``flow`` schedule, ``velocity`` prediction (diffusers' flow
  models predict ε − x₀), timestep = t·T (σ = t; a ``shift`` only moves the sampling grid).

``load_diffusers_unet(folder)`` reads a pipeline folder (``model_index.json`` + ``unet/`` +
``scheduler/``) or a UNet folder (``config.json`` with ``_class_name``); the ``diffusers`` model format
(``FORMATS``) claims both. ``save_pipeline`` writes a ``DDIMPipeline``/``DDPMPipeline`` folder whose
scheduler samples on the student's grid (``timestep_spacing="trailing"``: at N steps the indices are
those of t = 1, 1 − 1/N, …, 1/N, which are our ``time_grid(N)``). diffusers is imported lazily: this
module registers its format without it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distill.core.refs import ModelFormat
from distill.core.registry import FORMATS
from distill.diffusion.models import diffusion_spec
from distill.diffusion.schedules import Schedule
from distill.errors import DistillError, MismatchError, MissingFileError, ModelError

FORMAT = "diffusers"
SIDECAR = "distill.json"  # what save_pipeline adds to a pipeline folder: the student's diffusion settings
UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")
# DDPM-family schedulers (same betas / alphas_cumprod semantics) -> our sampler of the same kind
VP_SAMPLERS = {"DDPMScheduler": "sde", "DDIMScheduler": "ddim", "EulerDiscreteScheduler": "euler",
               "EulerAncestralDiscreteScheduler": "sde", "LCMScheduler": "consistency"}
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
TO_DIFFUSERS = {v: k for k, v in PREDICTIONS.items()}


def _diffusers() -> Any:
    try:
        import diffusers
    except ImportError:
        raise DistillError("the diffusers bridge needs diffusers: pip install 'distill[diffusers]'") from None
    logging.getLogger("diffusers").setLevel(logging.ERROR)  # from_config's "ignored keys" notes
    return diffusers


def _config_of(scheduler: Any) -> dict[str, Any]:
    cfg = scheduler if isinstance(scheduler, dict) else getattr(scheduler, "config", None)
    if cfg is None:
        raise ModelError(f"{type(scheduler).__name__} is neither a diffusers scheduler nor its config dict")
    cfg = dict(cfg)
    if not cfg.get("_class_name") and not isinstance(scheduler, dict):
        cfg["_class_name"] = type(scheduler).__name__
    return cfg


def spec_from_scheduler(scheduler: Any, steps: int | None = None, guidance: float = 1.0,
                        sampler: str | None = None) -> dict[str, Any]:
    """``model.diffusion`` (schedule, prediction, sampler, steps, guidance) of a diffusers scheduler."""
    cfg = _config_of(scheduler)
    name = cfg.get("_class_name")
    if name in FLOW_SCHEDULERS:
        return {"schedule": "flow", "prediction": "velocity", "sampler": sampler or "euler", "steps": int(steps or 50),
                "guidance": float(guidance)}
    if name not in VP_SAMPLERS:
        raise DistillError(f"scheduler {name} is not supported: one of {', '.join([*VP_SAMPLERS, *FLOW_SCHEDULERS])}")
    kind = cfg.get("prediction_type", "epsilon")
    if kind not in PREDICTIONS:
        raise DistillError(f"prediction_type '{kind}' is not supported: epsilon, v_prediction or sample")
    if cfg.get("timestep_type", "discrete") != "discrete":
        raise DistillError(f"{name} with timestep_type '{cfg['timestep_type']}' is not supported: discrete timesteps only")
    return {"schedule": "vp_cosine", "prediction": PREDICTIONS[kind], "sampler": sampler or VP_SAMPLERS[name],
            "steps": int(steps or 50), "guidance": float(guidance)}


def scheduler_logsnr(scheduler: Any) -> Tensor:
    """log(ᾱ_i / (1 − ᾱ_i)) of a DDPM-family scheduler's discrete steps (float64, decreasing in i)."""
    cfg = _config_of(scheduler)
    sched = scheduler if not isinstance(scheduler, dict) else getattr(_diffusers(), cfg["_class_name"]).from_config(cfg)
    ac = sched.alphas_cumprod.double().clamp(1e-20, 1 - 1e-12)
    return ac.log() - (1 - ac).log()


def continuous_to_index(t: Tensor, logsnr: Tensor) -> Tensor:
    """The fractional timestep index whose ᾱ matches vp_cosine's ᾱ(t): linear in log-SNR between the
    scheduler's indices, clamped to [0, T − 1]."""
    a, s = Schedule("vp_cosine").alpha_sigma(t.double())
    lam = 2 * (a.clamp_min(1e-10).log() - s.clamp_min(1e-10).log())
    neg = -logsnr.to(lam.device)  # increasing in the index
    q = (-lam).clamp(float(neg[0]), float(neg[-1]))
    hi = torch.searchsorted(neg, q).clamp(1, len(neg) - 1)
    lo = hi - 1
    frac = ((q - neg[lo]) / (neg[hi] - neg[lo]).clamp_min(1e-12)).clamp(0, 1)
    return lo.double() + frac


class DiffusersDenoiser(nn.Module):
    """A diffusers UNet as a denoiser ``model(x_t, t, cond=None, w=None) -> prediction``.

    ``num_classes``: the real classes of a class-conditional model; label ``num_classes`` is the null
    label of classifier-free guidance. For a ``UNet2DModel`` it defaults to ``num_class_embeds`` (no
    null embedding: no CFG); give ``num_class_embeds − 1`` when its last embedding is the null label.
    For a ``UNet2DConditionModel`` without ``encode``, a label embedding of ``num_classes + 1`` rows gives
    ``encoder_hidden_states`` [B, 1, cross_attention_dim]; ``encode(cond)`` replaces it. ``w`` is ignored
    (diffusers' UNet2D models take no guidance-scale input)."""

    def __init__(self, unet: nn.Module, scheduler: Any, num_classes: int | None = None,
                 encode: Callable[[Tensor | None], Tensor] | None = None, steps: int | None = None,
                 guidance: float = 1.0, sampler: str | None = None) -> None:
        super().__init__()
        kind = type(unet).__name__
        if kind not in UNET_CLASSES:
            raise ModelError(f"DiffusersDenoiser wraps {' or '.join(UNET_CLASSES)}, not {kind}")
        self.unet, self.encode, self.kind = unet, encode, kind
        self.scheduler_config = _config_of(scheduler)
        self.diffusion = spec_from_scheduler(self.scheduler_config, steps, guidance, sampler)
        self.num_train_timesteps = int(self.scheduler_config.get("num_train_timesteps", 1000))
        if self.diffusion["schedule"] == "vp_cosine":
            self.register_buffer("logsnr", scheduler_logsnr(scheduler), persistent=False)
        else:
            self.logsnr = None
        cfg = unet.config
        self.label = None
        if kind == "UNet2DModel":
            embeds = cfg.num_class_embeds if getattr(unet, "class_embedding", None) is not None else None
            if embeds is None and num_classes:
                raise MismatchError(f"this UNet2DModel has no class embedding (num_class_embeds None) but "
                                    f"num_classes={num_classes}")
            self.num_classes = int(num_classes if num_classes is not None else (embeds or 0))
            if embeds is not None and self.num_classes not in (embeds, embeds - 1):
                raise MismatchError(f"num_classes={self.num_classes} for a UNet with num_class_embeds={embeds}: "
                                    f"give {embeds} (no null label) or {embeds - 1} (the last is the null label)")
            self.class_embeds = embeds
        else:
            if encode is None and not num_classes:
                raise ModelError("a UNet2DConditionModel needs encode(cond) -> encoder_hidden_states or num_classes "
                                 "(a label embedding is then learned)")
            self.num_classes = int(num_classes or 0)
            self.class_embeds = None
            if encode is None:
                self.label = nn.Embedding(self.num_classes + 1, cfg.cross_attention_dim)  # + the null label
        size = cfg.sample_size if isinstance(cfg.sample_size, (list, tuple)) else (cfg.sample_size,) * 2
        self.shape = (int(cfg.in_channels), int(size[0]), int(size[1]))

    def timestep(self, t: Tensor) -> Tensor:
        """The diffusers timestep (float, [B]) of continuous times ``t``."""
        if self.logsnr is None:  # flow matching: σ = t, timestep = σ·T
            return t.float() * self.num_train_timesteps
        return continuous_to_index(t, self.logsnr).float()

    def _labels(self, cond: Tensor | None, batch: int, device: Any) -> Tensor:
        if cond is None:
            cond = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        return cond.long()

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None, w: Tensor | None = None) -> Tensor:
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        ts = self.timestep(t)
        if self.kind == "UNet2DModel":
            labels = None
            if self.class_embeds is not None:
                labels = self._labels(cond, x.shape[0], x.device)
                if int(labels.max()) >= self.class_embeds:
                    raise MismatchError(f"label {int(labels.max())} has no class embedding (num_class_embeds = "
                                        f"{self.class_embeds}): classifier-free guidance and unconditional calls need "
                                        "a null label, num_class_embeds = num_classes + 1")
            out = self.unet(x, ts, class_labels=labels).sample
        else:
            if self.encode is not None:
                hidden = self.encode(cond)
            else:
                hidden = self.label(self._labels(cond, x.shape[0], x.device).clamp(0, self.num_classes))[:, None]
            out = self.unet(x, ts, encoder_hidden_states=hidden).sample
        return out[:, : x.shape[1]]  # learned-variance UNets output [mean, variance] channels


# --- folders ---------------------------------------------------------------------------------------------
def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _student(folder: Path) -> Path:
    return folder / "student" if (folder / "student").is_dir() else folder


def claims(cfg: dict[str, Any]) -> bool:
    """A diffusers UNet's ``config.json`` or a UNet pipeline's ``model_index.json``."""
    if cfg.get("_class_name") in UNET_CLASSES:
        return True
    return bool(cfg.get("_diffusers_version")) and isinstance(cfg.get("unet"), list)


def is_diffusers_folder(folder: str | Path) -> bool:
    """Whether ``folder`` (or its ``student/``) is a diffusers UNet pipeline or UNet folder."""
    folder = _student(Path(folder))
    return claims(_read(folder / "model_index.json")) or claims(_read(folder / "config.json"))


def load_diffusers_unet(folder_or_pipeline: Any, subfolder: str = "unet", scheduler: Any = None,
                        num_classes: int | None = None, encode: Callable | None = None) -> DiffusersDenoiser:
    """A ``DiffusersDenoiser`` from a diffusers pipeline (object or folder with ``model_index.json``), or a
    UNet folder whose scheduler is ``scheduler``, a sibling ``../scheduler`` or ``scheduler_config.json``.
    A folder written by ``save_pipeline`` also restores the student's sampler, steps and guidance."""
    d = _diffusers()
    side: dict[str, Any] = {}
    source = None
    if isinstance(folder_or_pipeline, (str, Path)):
        folder = source = _student(Path(folder_or_pipeline))
        if not folder.is_dir():
            raise MissingFileError(f"{folder} does not exist: give a diffusers pipeline or UNet folder")
        index = _read(folder / "model_index.json")
        if index:
            if not claims(index):
                raise MismatchError(f"{folder} holds a {index.get('_class_name', 'foreign')} pipeline without a UNet: "
                                    f"the diffusers bridge reads {' and '.join(UNET_CLASSES)}")
            unet_dir, sched_dir, side = folder / subfolder, folder / "scheduler", _read(folder / SIDECAR)
        else:
            cfg = _read(folder / "config.json")
            if cfg.get("_class_name") not in UNET_CLASSES:
                what = cfg.get("_class_name") or cfg.get("format") or cfg.get("model_type") or "no diffusers model"
                raise MismatchError(f"{folder} holds {what}, not a diffusers UNet pipeline (model_index.json) or UNet "
                                    f"folder ({' / '.join(UNET_CLASSES)})")
            unet_dir = folder
            sched_dir = folder.parent / "scheduler" if (folder.parent / "scheduler").is_dir() else folder
            side = _read(folder.parent / SIDECAR)
        ucfg = _read(unet_dir / "config.json")
        if ucfg.get("_class_name") not in UNET_CLASSES:
            raise MismatchError(f"{unet_dir} holds {ucfg.get('_class_name') or 'no config.json'}, not "
                                f"{' or '.join(UNET_CLASSES)}")
        unet = getattr(d, ucfg["_class_name"]).from_pretrained(str(unet_dir))
        if scheduler is None:
            scfg = _read(sched_dir / "scheduler_config.json")
            if not scfg:
                raise MissingFileError(f"{sched_dir / 'scheduler_config.json'} not found: a UNet folder needs its "
                                       "scheduler (give the pipeline folder, or scheduler=...)")
            scheduler = scfg
    else:
        unet = getattr(folder_or_pipeline, subfolder, None)
        scheduler = scheduler if scheduler is not None else getattr(folder_or_pipeline, "scheduler", None)
        if unet is None or scheduler is None:
            raise ModelError(f"{type(folder_or_pipeline).__name__} has no {subfolder} and scheduler")
    spec = side.get("diffusion", {})
    model = DiffusersDenoiser(unet, scheduler, num_classes if num_classes is not None else side.get("num_classes"),
                              encode, spec.get("steps"), spec.get("guidance", 1.0), spec.get("sampler"))
    model.saved_config = {"format": FORMAT, "source": None if source is None else str(source),  # type: ignore[assignment]
                          "shape": list(model.shape), "num_classes": model.num_classes,
                          "diffusion": dict(model.diffusion)}
    return model


FORMATS.register(FORMAT, "a diffusers UNet pipeline (model_index.json) or UNet folder (distill[diffusers])")(
    ModelFormat(claims=claims, load=load_diffusers_unet))


# --- export ----------------------------------------------------------------------------------------------
def save_pipeline(folder: str | Path, student: nn.Module, scheduler_config: Any = None) -> Path:
    """Write ``student`` (a ``DiffusersDenoiser`` over a ``UNet2DModel``, or a bare ``UNet2DModel`` with its
    ``scheduler_config``) as a diffusers pipeline folder that ``DDIMPipeline.from_pretrained`` loads.

    The scheduler follows the student's sampler: ddim / euler / heun -> ``DDIMScheduler`` in a
    ``DDIMPipeline`` (heun is exported first-order), sde -> ``DDPMScheduler``, consistency ->
    ``LCMScheduler`` with ``original_inference_steps`` = the student's steps (both in a ``DDPMPipeline``).
    ``timestep_spacing="trailing"`` makes N inference steps visit our grid t = 1, …, 1/N (exactly for
    squaredcos_cap_v2 betas). ``distill.json`` records the student's settings; call the pipeline with
    ``num_inference_steps`` = its ``steps``."""
    d = _diffusers()
    if isinstance(student, DiffusersDenoiser):
        unet, base, spec = student.unet, student.scheduler_config, dict(student.diffusion)
        num_classes = student.num_classes
        base = _config_of(scheduler_config) if scheduler_config is not None else base
    elif type(student).__name__ == "UNet2DModel":
        if scheduler_config is None:
            raise DistillError("save_pipeline(folder, unet, scheduler_config): a bare UNet2DModel needs its scheduler")
        unet, base = student, _config_of(scheduler_config)
        spec = spec_from_scheduler(base)
        num_classes = unet.config.num_class_embeds or 0
    else:
        raise DistillError(f"export writes a diffusers pipeline, which needs a diffusers UNet2DModel student, not "
                           f"{type(student).__name__}: distill's own denoisers load with distill.load_student")
    if type(unet).__name__ != "UNet2DModel":
        raise DistillError(f"DDPM/DDIM pipelines take a UNet2DModel, not {type(unet).__name__}")
    if spec["schedule"] != "vp_cosine" or base.get("_class_name") in FLOW_SCHEDULERS:
        raise DistillError(f"export writes DDPM-family schedulers: the student's {spec['schedule']} schedule "
                           "(FlowMatchEulerDiscreteScheduler) is not exported")
    steps = int(spec["steps"])
    common = {"timestep_spacing": "trailing", "steps_offset": 0, "clip_sample": False, "thresholding": False,
              "prediction_type": TO_DIFFUSERS[spec["prediction"]]}
    if spec["sampler"] == "sde":
        sched = d.DDPMScheduler.from_config(base, **common, variance_type="fixed_small")
        pipe = d.DDPMPipeline(unet=unet, scheduler=sched)
    elif spec["sampler"] == "consistency":
        # LCM's boundary scalings c_skip, c_out = σ_d²/((ts)² + σ_d²), ts/√((ts)² + σ_d²) with a large
        # scaling s: c_out = 1, c_skip = 0 at every grid step, so x̂₀ is the network's, as in our sampler
        if base.get("num_train_timesteps", 1000) % steps:
            raise DistillError(f"an LCM scheduler samples {steps} steps on its grid only when num_train_timesteps "
                               f"({base.get('num_train_timesteps', 1000)}) is a multiple of it")
        sched = d.LCMScheduler.from_config(base, **common, original_inference_steps=steps, timestep_scaling=1e6)
        pipe = d.DDPMPipeline(unet=unet, scheduler=sched)
    else:
        sched = d.DDIMScheduler.from_config(base, **common, set_alpha_to_one=True)
        pipe = d.DDIMPipeline(unet=unet, scheduler=sched)
    folder = Path(folder)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    side = {"format": "distill-diffusers-v1", "diffusion": spec, "num_classes": num_classes,
            "shape": [unet.config.in_channels, *((unet.config.sample_size,) * 2 if isinstance(
                unet.config.sample_size, int) else unet.config.sample_size)],
            "call": {"num_inference_steps": steps}}
    (folder / SIDECAR).write_text(json.dumps(side, indent=2))
    return folder


def exportable(model: nn.Module) -> bool:
    """Whether ``save_pipeline`` writes ``model`` (a UNet2DModel on a DDPM-family schedule)."""
    return (isinstance(model, DiffusersDenoiser) and model.kind == "UNet2DModel"
            and model.diffusion["schedule"] == "vp_cosine")


def check_task(model: nn.Module, shape: tuple[int, ...], num_classes: int, where: Any = "") -> None:
    """Raise ``MismatchError`` when a loaded diffusers denoiser cannot serve a task of ``shape``/``num_classes``."""
    cfg = getattr(model, "saved_config", {})
    if tuple(cfg.get("shape", ())) != tuple(shape) or int(cfg.get("num_classes", -1)) != num_classes:
        raise MismatchError(f"the diffusers UNet in {where} models data of shape {tuple(cfg.get('shape', ()))} with "
                            f"{cfg.get('num_classes')} classes; the task has {tuple(shape)} and {num_classes}")
    diffusion_spec(model)
