"""Super-resolution tasks and their ``TaskOps``: ``digits-sr``, ×2 / ×4 SR of scikit-learn's digits.

A batch is ``{"x": LR [B, 1, h, w], "hr": HR [B, 1, H, W], "index": [B]}`` in [0, 1]. HR images are
the 8×8 digits (values 0..16 / 16) resized to ``hr_size`` (bicubic, a = −0.5: PIL / MATLAB
``imresize``); LR images are HR downsampled by ``scale`` with the same antialiased bicubic (the
official IMDN data are MATLAB-bicubic LR of DIV2K) or by area averaging (``downsample: area``).
Models are SR archs (``distill.features.sr``) saved as ``model.safetensors`` + ``config.json``
(format ``distill-sr-v1``). Metrics: PSNR / SSIM as the official evaluation (``sr_metrics``), the
bicubic baseline, fidelity to the teacher, parameters, FLOPs and throughput.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.utils.data import Dataset

from distill.core import weights as weights_check
from distill.core.checkpoint import cpu_tensors
from distill.core.distiller import TaskInfo
from distill.core.refs import ModelFormat
from distill.core.registry import FORMATS, TASKS, Params
from distill.errors import MismatchError, MissingFileError, ModelError, RecipeError
from distill.features.sr import bicubic, build_sr_model, count_flops, images_per_second, sr_metrics
from distill.tasks.base import split_indices

SR_FORMAT = "distill-sr-v1"


class SRDataset(Dataset):
    """LR and HR images in memory, fetched a batch at a time."""

    def __init__(self, lr: Tensor, hr: Tensor) -> None:
        if len(lr) != len(hr):
            raise ValueError(f"{len(lr)} LR images for {len(hr)} HR images")
        self.x, self.hr, self.index = lr.float(), hr.float(), torch.arange(len(lr))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"x": self.x[i], "hr": self.hr[i], "index": self.index[i]}

    def __getitems__(self, idx: list[int] | Tensor) -> dict[str, Tensor]:
        t = torch.as_tensor(idx)
        return {"x": self.x[t], "hr": self.hr[t], "index": self.index[t]}


def predict_sr(model: nn.Module, x: Tensor, batch_size: int = 512) -> Tensor:
    """``model(x)`` in eval mode without gradients, on the model's device, returned on the CPU."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            return torch.cat([model(x[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)])
    finally:
        model.train(was)


# --- model folders --------------------------------------------------------------------------------------
def save_sr_model(folder: Path, model: nn.Module, spec: dict[str, Any] | None, input_shape: tuple[int, ...],
                  scale: int) -> None:
    """``model.safetensors`` + ``config.json`` (no pickles)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(cpu_tensors(model.state_dict()), str(folder / "model.safetensors"))
    config = {"format": SR_FORMAT, "arch": spec["name"] if spec else None, "params": spec["params"] if spec else {},
              "class": type(model).__qualname__, "input_shape": list(input_shape), "scale": scale}
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def _config(folder: Path) -> tuple[Path, dict[str, Any]]:
    folder = folder / "student" if (folder / "student").is_dir() else folder
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise MissingFileError(f"{cfg} not found: give a finished SR run folder or its student/ folder")
    return folder, json.loads(cfg.read_text())


def load_sr_model(folder: Path) -> nn.Module:
    """An SR model saved by ``save_sr_model`` (a run folder or its ``student/``)."""
    folder, cfg = _config(Path(folder))
    if cfg.get("format") != SR_FORMAT:
        raise MismatchError(f"{folder} holds a {cfg.get('format') or cfg.get('model_type') or 'foreign'} model, "
                            "not a super-resolution model (distill-sr-v1)")
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise MissingFileError(f"{weights} not found")
    if not cfg.get("arch"):
        raise MissingFileError(f"{folder} holds a custom model ({cfg.get('class')}); build it yourself and load "
                               f"{weights} with safetensors")
    args = (cfg["arch"], cfg["params"], tuple(cfg["input_shape"]), int(cfg["scale"]))
    model = weights_check.load_checked(lambda: build_sr_model(*args), weights)
    model.sr_config = cfg  # type: ignore[assignment]  # what it was trained for, checked against the task
    return model


FORMATS.register(SR_FORMAT, "a super-resolution run's student/ (model.safetensors + config.json)")(
    ModelFormat(claims=lambda cfg: cfg.get("format") == SR_FORMAT, load=load_sr_model))


# --- the task -------------------------------------------------------------------------------------------
@dataclass
class SRTaskData:
    """Train / val / test ``SRDataset`` splits and the SR ``TaskOps``."""

    name: str
    train: SRDataset
    val: SRDataset | None
    test: SRDataset
    scale: int
    default_student: dict[str, Any]
    ssim_window: int = 7
    quantize: bool = True

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])

    @property
    def hr_shape(self) -> tuple[int, ...]:
        return tuple(self.train.hr.shape[1:])

    # --- TaskOps ----------------------------------------------------------------------------------------
    def build_model(self, spec: dict[str, Any]) -> nn.Module:
        return build_sr_model(spec["name"], spec["params"], self.input_shape, self.scale)

    def load_model(self, folder: Path) -> nn.Module:
        model = load_sr_model(Path(folder))
        cfg = model.sr_config
        if int(cfg["scale"]) != self.scale or int(cfg["input_shape"][0]) != self.input_shape[0]:
            raise MismatchError(f"the model in {folder} does ×{cfg['scale']} SR of {cfg['input_shape'][0]}-channel "
                                f"images; task {self.name} is ×{self.scale} of {self.input_shape[0]}-channel images")
        return model

    def saved_spec(self, folder: Path) -> dict[str, Any] | None:
        _, cfg = _config(Path(folder))
        return {"name": cfg["arch"], "params": cfg["params"]} if cfg.get("arch") else None

    def save_model(self, folder: Path, model: nn.Module, spec: dict[str, Any] | None) -> None:
        save_sr_model(folder, model, spec, self.input_shape, self.scale)

    def check_models(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """Each model maps one LR image ``(C, h, w)`` to ``(C, H, W)``."""
        for who, model in (("student", student), ("teacher", teacher)):
            if model is None:
                continue
            try:
                out = predict_sr(model, self.train.x[:1])
            except RuntimeError as err:
                raise ModelError(f"the {who} fails on a {self.input_shape} LR image: {str(err).splitlines()[0]}") from None
            if tuple(out.shape[1:]) != self.hr_shape:
                raise MismatchError(f"the {who} maps a {self.input_shape} LR image to {tuple(out.shape[1:])}; "
                                    f"task {self.name} needs {self.hr_shape}")

    def task_info(self, uses_unlabeled: bool) -> TaskInfo:
        return TaskInfo(0, len(self.train), self.input_shape, len(self.train), self.train, self.val, self)

    def open_teacher_cache(self, folder: Path) -> Any:
        raise RecipeError("teacher.cache is for language-model tasks; give an SR teacher as recipe, run or model")

    def metrics(self, model: nn.Module, split: SRDataset, teacher_sr: Tensor | None = None) -> dict[str, float]:
        """PSNR / SSIM / L1 of ``model`` on ``split`` (and PSNR to the teacher's output when given)."""
        sr = predict_sr(model, split.x)
        out = sr_metrics(sr, split.hr, self.scale, self.ssim_window, self.quantize)
        out["l1"] = (sr - split.hr).abs().mean().item()
        if teacher_sr is not None:
            out["psnr_to_teacher"] = sr_metrics(sr, teacher_sr, self.scale, self.ssim_window, self.quantize)["psnr"]
        return out

    def evaluator(self, teacher: nn.Module | None) -> Callable[[nn.Module], dict[str, float]]:
        split = self.val if self.val is not None else self.test  # no val split: the last epoch anyway
        t_sr = predict_sr(teacher, split.x) if teacher is not None else None

        def evaluate(model: nn.Module) -> dict[str, float]:
            return self.metrics(model, split, t_sr)

        return evaluate

    def final_metrics(self, student: nn.Module, teacher: nn.Module | None) -> dict[str, float]:
        t_sr = predict_sr(teacher, self.test.x) if teacher is not None else None
        out = {f"test/{k}": v for k, v in self.metrics(student, self.test, t_sr).items()}
        base = sr_metrics(bicubic(self.test.x, self.scale), self.test.hr, self.scale, self.ssim_window, self.quantize)
        out.update({f"test/bicubic_{k}": v for k, v in base.items()})
        if self.val is not None:
            out.update({f"val/{k}": v for k, v in self.evaluator(teacher)(student).items()})
        one, batch = self.test.x[:1], self.test.x[:256]
        models = {"student": student} | ({"teacher": teacher} if teacher is not None else {})
        for who, model in models.items():
            if who == "teacher":
                out.update({f"teacher/{k}": v for k, v in self.metrics(teacher, self.test).items()})
            out[f"params/{who}"] = sum(p.numel() for p in model.parameters())
            out[f"flops/{who}"] = count_flops(model, one.to(next(model.parameters()).device))
            out[f"time/{who}_images_per_s"] = images_per_second(model, batch.to(next(model.parameters()).device))
        return out


class DigitsSRParams(Params):
    scale: Literal[2, 4] = Field(4, description="upscaling factor (×4: LR 4×4, below the digits' native 8×8)")
    hr_size: Literal[8, 16, 32] = Field(16, description="HR side: the 8×8 digits resized (bicubic) to it")
    downsample: Literal["bicubic", "area"] = Field("bicubic", description="HR -> LR degradation (antialiased bicubic or area mean)")
    num_train: int = Field(1000, ge=10)
    num_val: int = Field(200, ge=0)
    num_test: int = Field(597, ge=10)
    data_seed: int = 0
    ssim_window: int = Field(7, ge=3, description="SSIM Gaussian window side (σ 1.5), odd; official 11, which "
                             "exceeds the 8×8 pixels scored at ×4 of 16×16 after shaving 4 per border")
    quantize: bool = Field(True, description="score 8-bit images as the official evaluation (else clamped floats)")

    @model_validator(mode="after")
    def _sizes(self) -> "DigitsSRParams":
        if self.ssim_window % 2 == 0:
            raise ValueError(f"ssim_window must be odd, not {self.ssim_window}")
        scored = self.hr_size - 2 * self.scale  # what is left after shaving `scale` pixels per border
        if self.hr_size // self.scale < 2 or scored < self.ssim_window:
            raise ValueError(f"hr_size {self.hr_size} at scale {self.scale} leaves {max(scored, 0)}×{max(scored, 0)} "
                             f"pixels to score, fewer than ssim_window {self.ssim_window}: raise hr_size or lower ssim_window")
        return self


DEFAULT_STUDENT = {"arch": "imdn", "nf": 16, "num_modules": 3}


def degrade(hr: Tensor, scale: int, how: str) -> Tensor:
    """HR ``[N, C, H, W]`` -> LR ``[N, C, H/scale, W/scale]``, clamped to [0, 1]."""
    if how == "area":
        return F.avg_pool2d(hr, scale)
    lr = F.interpolate(hr, scale_factor=1 / scale, mode="bicubic", align_corners=False, antialias=True)
    return lr.clamp(0, 1)


@TASKS.register("digits-sr", "×4 (or ×2) super-resolution of scikit-learn's digits, HR 16×16, LR 4×4", DigitsSRParams)
def build_digits_sr(p: DigitsSRParams) -> SRTaskData:
    from sklearn.datasets import load_digits

    img = torch.tensor(load_digits().images, dtype=torch.float32)[:, None] / 16.0
    hr = img if p.hr_size == 8 else F.interpolate(img, size=(p.hr_size, p.hr_size), mode="bicubic",
                                                   align_corners=False, antialias=True).clamp(0, 1)
    lr = degrade(hr, p.scale, p.downsample)
    tr, va, te = split_indices(len(hr), [p.num_train, p.num_val, p.num_test], p.data_seed)
    return SRTaskData("digits-sr", SRDataset(lr[tr], hr[tr]), SRDataset(lr[va], hr[va]) if p.num_val else None,
                      SRDataset(lr[te], hr[te]), p.scale, DEFAULT_STUDENT, p.ssim_window, p.quantize)


build_digits_sr.default_student = DEFAULT_STUDENT  # type: ignore[attr-defined]
