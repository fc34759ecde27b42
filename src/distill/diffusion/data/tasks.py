"""Diffusion tasks and their ``TaskOps``: sample quality instead of accuracy.

- ``ring8``: 8 Gaussians on a ring (radius √2, σ 0.1 per mode: unit variance per coordinate, the
  σ_d = 1 that TrigFlow assumes), unconditional; ``ring8-cond``: the same ring, the class of a point
  is its mode modulo ``num_classes`` (4: two opposite modes per class), for guidance.
- ``digits-diffusion``: scikit-learn's 8×8 digits in [−1, 1], class-conditional (10 classes).

A batch is ``{"x": [B, ...], "y": [B] (−1: unconditional), "index": [B]}``. Models are denoisers
(``models.py``) saved as ``model.safetensors`` + ``config.json`` (format ``distill-diffusion-v1``, with
the model's ``diffusion`` settings: schedule, prediction, sampler, steps, guidance) and a
``samples.png``. Every model is scored on the same noise (a fixed generator), so seeds and methods
are compared on paired draws. Metrics (``metrics.py``): ``mmd`` (with ``mmd_floor``, data against
data), mixtures ``precision``/``coverage`` (and ``class_acc``: samples near a mode of their class),
digits ``fd`` (with ``fd_floor``) and ``class_acc`` in a classifier trained here, ``diversity``,
``nfe`` and ``sec_per_sample``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from safetensors.torch import save_file
from torch import Tensor, nn

from distill.core import weights as weights_check
from distill.core.checkpoint import cpu_tensors
from distill.core.distiller import TaskInfo
from distill.core.refs import ModelFormat
from distill.core.registry import FORMATS, TASKS, Params
from distill.diffusion import hf_diffusers
from distill.diffusion import metrics as M
from distill.diffusion.models import build_denoiser, diffusion_spec
from distill.diffusion.sampling import nfe, timed_sample
from distill.errors import MismatchError, MissingFileError, ModelError, RecipeError
from distill.tasks.base import ArrayDataset, split_indices

FORMAT = "distill-diffusion-v1"
EVAL_SEED = 1234  # the noise every model is scored on


# --- model folders --------------------------------------------------------------------------------------
def _config(folder: Path) -> tuple[Path, dict[str, Any]]:
    folder = folder / "student" if (folder / "student").is_dir() else folder
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise MissingFileError(f"{cfg} not found: give a finished diffusion run folder or its student/ folder")
    return folder, json.loads(cfg.read_text())


def save_denoiser(folder: Path, model: nn.Module, spec: dict[str, Any] | None, shape: tuple[int, ...],
                  num_classes: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(cpu_tensors(model.state_dict()), str(folder / "model.safetensors"))
    config = {"format": FORMAT, "arch": spec["name"] if spec else None, "params": spec["params"] if spec else {},
              "class": type(model).__qualname__, "shape": list(shape), "num_classes": num_classes,
              "diffusion": diffusion_spec(model)}
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def load_denoiser(folder: Path) -> nn.Module:
    folder, cfg = _config(Path(folder))
    if cfg.get("format") != FORMAT:
        raise MismatchError(f"{folder} holds a {cfg.get('format') or cfg.get('model_type') or 'foreign'} model, "
                            f"not a denoiser ({FORMAT})")
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise MissingFileError(f"{weights} not found")
    if not cfg.get("arch"):
        raise MissingFileError(f"{folder} holds a custom denoiser ({cfg.get('class')}); build it yourself and load "
                               f"{weights} with safetensors")
    args = (cfg["arch"], cfg["params"], tuple(cfg["shape"]), int(cfg["num_classes"]))
    model = weights_check.load_checked(lambda: build_denoiser(*args), weights)
    model.diffusion = dict(cfg["diffusion"])
    model.saved_config = cfg  # type: ignore[assignment]
    return model


FORMATS.register(FORMAT, "a diffusion run's student/ (model.safetensors + config.json)")(
    ModelFormat(claims=lambda cfg: cfg.get("format") == FORMAT, load=load_denoiser))


# --- the task -------------------------------------------------------------------------------------------
@dataclass
class DiffusionTaskData:
    """Train / val / test data of a generative task and the diffusion ``TaskOps``."""

    name: str
    train: ArrayDataset
    val: ArrayDataset
    test: ArrayDataset
    num_classes: int  # 0: unconditional
    default_student: dict[str, Any]
    num_eval: int = 1000
    num_val_eval: int = 500
    centers: Tensor | None = None  # mixtures: the modes
    mode_std: float = 0.0
    mode_class: Tensor | None = None  # mixtures with classes: each mode's class
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    # --- sampling on fixed noise ------------------------------------------------------------------------
    def eval_inputs(self, n: int, seed: int = EVAL_SEED) -> tuple[Tensor, Tensor | None]:
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn((n, *self.shape), generator=g)
        cond = torch.arange(n) % self.num_classes if self.conditional else None
        return noise, cond

    def generate(self, model: nn.Module, n: int, seed: int = EVAL_SEED) -> tuple[Tensor, Tensor | None, float]:
        noise, cond = self.eval_inputs(n, seed)
        device = next(model.parameters()).device
        g = torch.Generator(device=device).manual_seed(seed + 1)  # the stochastic samplers' noise
        x, sec = timed_sample(model, noise.to(device), None if cond is None else cond.to(device), self.num_classes, g)
        return x.float().cpu(), cond, sec

    # --- metrics ----------------------------------------------------------------------------------------
    def sample_metrics(self, x: Tensor, cond: Tensor | None, ref: Tensor, other: Tensor) -> dict[str, float]:
        out = {"mmd": M.mmd(x, ref), "mmd_floor": M.mmd(other, ref), "diversity": M.diversity(x, ref)}
        if self.centers is not None:
            out["precision"], out["coverage"] = M.mode_stats(x, self.centers, self.mode_std)
            if cond is not None and self.mode_class is not None:
                d = torch.cdist(x.double(), self.centers.double())
                near, which = d.min(1)
                ok = (near <= 3 * self.mode_std) & (self.mode_class[which] == cond)
                out["class_acc"] = float(ok.double().mean())
        if "classifier" in self.extras:
            clf = self.extras["classifier"]
            feats = classifier_features(clf, x)
            out["fd"] = M.frechet(feats, classifier_features(clf, ref))
            out["fd_floor"] = M.frechet(classifier_features(clf, other), classifier_features(clf, ref))
            if cond is not None:
                out["class_acc"] = float((clf(x.reshape(len(x), -1)).argmax(1) == cond).double().mean())
        return out

    def metrics(self, model: nn.Module, split: ArrayDataset, other: ArrayDataset, n: int) -> dict[str, float]:
        x, cond, sec = self.generate(model, n)
        out = self.sample_metrics(x, cond, split.x[:n], other.x[:n])
        spec = diffusion_spec(model)
        out["nfe"] = nfe(spec["sampler"], int(spec["steps"]), float(spec.get("guidance", 1.0)), self.conditional)
        out["sec_per_sample"] = sec
        out["steps"] = int(spec["steps"])
        return out

    # --- TaskOps ----------------------------------------------------------------------------------------
    def build_model(self, spec: dict[str, Any]) -> nn.Module:
        return build_denoiser(spec["name"], spec["params"], self.shape, self.num_classes)

    def load_model(self, folder: Path) -> nn.Module:
        if hf_diffusers.is_diffusers_folder(folder):  # distill[diffusers]: a pipeline or UNet folder
            model = hf_diffusers.load_diffusers_unet(Path(folder), num_classes=self.num_classes or None)
            hf_diffusers.check_task(model, self.shape, self.num_classes, folder)
            return model
        model = load_denoiser(Path(folder))
        cfg = model.saved_config
        if tuple(cfg["shape"]) != self.shape or int(cfg["num_classes"]) != self.num_classes:
            raise MismatchError(f"the denoiser in {folder} models data of shape {tuple(cfg['shape'])} with "
                                f"{cfg['num_classes']} classes; task {self.name} has {self.shape} and {self.num_classes}")
        return model

    def saved_spec(self, folder: Path) -> dict[str, Any] | None:
        if hf_diffusers.is_diffusers_folder(folder):
            return None
        _, cfg = _config(Path(folder))
        return {"name": cfg["arch"], "params": cfg["params"]} if cfg.get("arch") else None

    def save_model(self, folder: Path, model: nn.Module, spec: dict[str, Any] | None) -> None:
        if hf_diffusers.exportable(model):  # a diffusers UNet student saves as a diffusers pipeline
            hf_diffusers.save_pipeline(folder, model)
        else:
            save_denoiser(folder, model, spec, self.shape, self.num_classes)
        x, cond, _ = self.generate(model, 8 * max(self.num_classes, 8) if len(self.shape) > 1 else 1000)  # a row per class
        s = diffusion_spec(model)
        M.sample_grid(folder / "samples.png", x, self.test.x if len(self.shape) == 1 else None,
                      f"{self.name}: {s['sampler']} × {s['steps']} steps, guidance {s.get('guidance', 1.0):g}",
                      cond if len(self.shape) > 1 else None)

    def check_models(self, student: nn.Module, teacher: nn.Module | None) -> None:
        for who, model in (("student", student), ("teacher", teacher)):
            if model is None:
                continue
            diffusion_spec(model)
            x = self.train.x[:2].to(next(model.parameters()).device)
            cond = torch.zeros(2, dtype=torch.long, device=x.device) if self.conditional else None
            try:
                with torch.no_grad():
                    out = model(x, torch.full((2,), 0.5, device=x.device), cond)
            except RuntimeError as err:
                raise ModelError(f"the {who} fails on data of shape {self.shape}: {str(err).splitlines()[0]}") from None
            if tuple(out.shape) != tuple(x.shape):
                raise MismatchError(f"the {who} maps data of shape {self.shape} to {tuple(out.shape[1:])}: a denoiser "
                                    "returns a prediction of its input's shape")

    def task_info(self, uses_unlabeled: bool) -> TaskInfo:
        return TaskInfo(self.num_classes, len(self.train), self.shape, len(self.train), self.train, self.val, self)

    def open_teacher_cache(self, folder: Path) -> Any:
        raise RecipeError("teacher.cache is for language-model tasks; give a denoiser teacher as recipe, run or model")

    def evaluator(self, teacher: nn.Module | None) -> Callable[[nn.Module], dict[str, float]]:
        def evaluate(model: nn.Module) -> dict[str, float]:
            return self.metrics(model, self.val, self.train, self.num_val_eval)

        return evaluate

    def final_metrics(self, student: nn.Module, teacher: nn.Module | None) -> dict[str, float]:
        out = {f"test/{k}": v for k, v in self.metrics(student, self.test, self.train, self.num_eval).items()}
        out.update({f"val/{k}": v for k, v in self.evaluator(teacher)(student).items()})
        out["params/student"] = sum(p.numel() for p in student.parameters())
        if teacher is not None:
            out["params/teacher"] = sum(p.numel() for p in teacher.parameters())
        return out


# --- 2-D mixtures ---------------------------------------------------------------------------------------
class RingParams(Params):
    modes: int = Field(8, ge=2)
    radius: float = Field(math.sqrt(2), gt=0, description="√2: unit variance per coordinate")
    std: float = Field(0.1, gt=0, description="each mode's standard deviation")
    num_classes: int = Field(0, ge=0, description="0: unconditional; else a point's class is its mode modulo this")
    num_train: int = Field(20000, ge=100)
    num_val: int = Field(1000, ge=100)
    num_test: int = Field(2000, ge=100)
    num_eval: int = Field(1000, ge=100, description="samples scored at the end (test) and per evaluation (half)")
    data_seed: int = 0


class RingCondParams(RingParams):
    num_classes: int = Field(4, ge=1, description="a point's class is its mode modulo this (two opposite modes per class)")


DEFAULT_MLP = {"arch": "mlp_denoiser", "hidden": 128, "depth": 3}


def ring(p: RingParams, name: str) -> DiffusionTaskData:
    ang = torch.arange(p.modes, dtype=torch.float64) * 2 * math.pi / p.modes
    centers = (p.radius * torch.stack([torch.cos(ang), torch.sin(ang)], 1)).float()
    g = torch.Generator().manual_seed(p.data_seed)
    n = p.num_train + p.num_val + p.num_test
    mode = torch.randint(p.modes, (n,), generator=g)
    x = centers[mode] + p.std * torch.randn((n, 2), generator=g)
    y = mode % p.num_classes if p.num_classes else None
    parts = [slice(0, p.num_train), slice(p.num_train, p.num_train + p.num_val), slice(p.num_train + p.num_val, n)]
    sets = [ArrayDataset(x[s], None if y is None else y[s]) for s in parts]
    mode_class = torch.arange(p.modes) % p.num_classes if p.num_classes else None
    return DiffusionTaskData(name, *sets, p.num_classes, DEFAULT_MLP, p.num_eval, p.num_eval // 2, centers, p.std,
                             mode_class)


@TASKS.register("ring8", "2-D mixture: 8 Gaussians on a ring, unconditional (diffusion)", RingParams)
def build_ring8(p: RingParams) -> DiffusionTaskData:
    return ring(p, "ring8")


@TASKS.register("ring8-cond", "2-D mixture: 8 Gaussians on a ring, 4 classes of 2 opposite modes (diffusion, CFG)",
                RingCondParams)
def build_ring8_cond(p: RingCondParams) -> DiffusionTaskData:
    return ring(p, "ring8-cond")


build_ring8.default_student = build_ring8_cond.default_student = DEFAULT_MLP  # type: ignore[attr-defined]


# --- digits ---------------------------------------------------------------------------------------------
class DigitsDiffusionParams(Params):
    num_train: int = Field(1297, ge=100)
    num_val: int = Field(100, ge=50)
    num_test: int = Field(400, ge=50)
    num_eval: int = Field(400, ge=50, description="samples scored at the end (test) and per evaluation (half)")
    data_seed: int = 0


DEFAULT_UNET = {"arch": "unet_small", "width": 16}


class DigitsClassifier(nn.Module):
    """The measuring classifier: an MLP on 64 pixels; its 64-unit hidden layer gives FD features."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def classifier_features(clf: DigitsClassifier, x: Tensor) -> Tensor:
    with torch.no_grad():
        return clf.body(x.reshape(len(x), -1).float())


_CLASSIFIERS: dict[tuple[int, int], DigitsClassifier] = {}


def digits_classifier(key: tuple[int, int], train_x: Tensor, train_y: Tensor) -> DigitsClassifier:
    """Trained once per process and split (``key``) on the task's training split (fixed seed, full-batch
    Adam, 300 steps; the caller's random state is left as it was)."""
    if key in _CLASSIFIERS:
        return _CLASSIFIERS[key]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        clf = DigitsClassifier()
        opt = torch.optim.Adam(clf.parameters(), lr=3e-3, weight_decay=1e-4)
        flat = train_x.reshape(len(train_x), -1)
        for _ in range(300):
            noisy = flat + 0.1 * torch.randn_like(flat)  # robust to the small pixel noise of samples
            loss = F.cross_entropy(clf(noisy), train_y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    _CLASSIFIERS[key] = clf.eval().requires_grad_(False)
    return _CLASSIFIERS[key]


@TASKS.register("digits-diffusion", "class-conditional generation of scikit-learn's 8×8 digits in [−1, 1] (diffusion)",
                DigitsDiffusionParams)
def build_digits_diffusion(p: DigitsDiffusionParams) -> DiffusionTaskData:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    y = torch.tensor(d.target, dtype=torch.long)
    tr, va, te = split_indices(len(x), [p.num_train, p.num_val, p.num_test], p.data_seed)
    sets = [ArrayDataset(x[i], y[i]) for i in (tr, va, te)]
    clf = digits_classifier((p.num_train, p.data_seed), sets[0].x, sets[0].y)
    return DiffusionTaskData("digits-diffusion", *sets, 10, DEFAULT_UNET, p.num_eval, p.num_eval // 2,
                             extras={"classifier": clf})


build_digits_diffusion.default_student = DEFAULT_UNET  # type: ignore[attr-defined]
