"""``fair_tabular``: a synthetic tabular task with a binary sensitive attribute (S46 ``fair_latent``), and
its ``TaskOps`` (the data object implements the protocol, as ``lm/data/task.py`` does).

Per row: ``a ~ Bern(½)``; features ``x1, x2, x3 ~ N(0, 1)`` (legitimate), ``p1 = proxy·a + N(0, 0.7²)`` and
``p2 = 0.8·proxy·a + N(0, 1)`` (proxies of ``a``, independent of the legitimate ones), ``n1 ~ N(0, 1)`` (noise); the label is biased by
``a``: ``y = 1[x1 + 0.7·x2 + bias·(2a − 1) + N(0, 0.5²) > 0]``. Features are z-scored with the train
split's statistics. A model trains on records ``[x, y]``; ``a`` is only seen by fairness penalties and
metrics (``features/fair.py``: ``fair_metrics``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.utils.data import Dataset

from distill.core.distiller import TaskInfo
from distill.core.registry import ARCHS, TASKS, Params
from distill.errors import MismatchError, RecipeError
from distill.features import fair


class FairDataset(Dataset):
    """Rows of features ``x`` ``[n, d]``, labels ``y`` and sensitive attribute ``a`` (``long``); a batch is
    ``{"x", "y", "a", "index"}``."""

    def __init__(self, x: Tensor, y: Tensor, a: Tensor) -> None:
        self.x, self.y, self.a = x.float(), y.long(), a.long()
        self.index = torch.arange(len(x))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"x": self.x[i], "y": self.y[i], "a": self.a[i], "index": self.index[i]}

    def __getitems__(self, idx: list[int]) -> dict[str, Tensor]:
        t = torch.as_tensor(idx)
        return {"x": self.x[t], "y": self.y[t], "a": self.a[t], "index": self.index[t]}


class FairTabularParams(Params):
    num_train: int = Field(2000, ge=20)
    num_val: int = Field(500, ge=20)
    num_test: int = Field(2000, ge=20)
    bias: float = Field(1.0, description="how much a shifts the label (0 = unbiased labels)")
    proxy: float = Field(1.5, description="how strongly the proxy features encode a")
    data_seed: int = 0


def make_rows(n: int, bias: float, proxy: float, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    def randn() -> Tensor:
        return torch.randn(n, generator=g)
    a = (torch.rand(n, generator=g) < 0.5).long()
    x1, x2, x3, n1 = randn(), randn(), randn(), randn()
    p1 = proxy * a + 0.7 * randn()
    p2 = 0.8 * proxy * a + randn()
    y = (x1 + 0.7 * x2 + bias * (2 * a - 1) + 0.5 * randn() > 0).long()
    return torch.stack([x1, x2, x3, p1, p2, n1], 1), y, a


@dataclass
class FairTabularData:
    """The task's splits and its ``TaskOps``."""

    train: FairDataset
    val: FairDataset
    test: FairDataset
    default_student: dict[str, Any] = field(default_factory=lambda: {"arch": "tab_vae", "enc_hidden": 16})
    family = "fair_tabular"

    @property
    def record_dim(self) -> int:
        return self.train.x.shape[1] + 1

    # --- TaskOps ---------------------------------------------------------------------------------
    def build_model(self, spec: dict[str, Any]) -> nn.Module:
        if spec["name"] != "tab_vae":
            raise RecipeError(f"fair_tabular: student.arch must be tab_vae (a record VAE), not {spec['name']!r}")
        entry = ARCHS.get(spec["name"])
        return entry.obj(entry.params.model_validate(spec["params"]), (self.record_dim,))

    def load_model(self, folder: Path) -> nn.Module:
        return fair.load_vae(folder)

    def saved_spec(self, folder: Path) -> dict[str, Any] | None:
        import json

        cfg = json.loads((fair.model_dir(Path(folder)) / "config.json").read_text())
        return {"name": cfg["arch"], "params": cfg["params"]}

    def save_model(self, folder: Path, model: nn.Module, spec: dict[str, Any] | None) -> None:
        fair.save_vae(folder, model, spec)

    def check_models(self, student: nn.Module, teacher: nn.Module | None) -> None:
        for who, m in (("student", student), ("teacher", teacher)):
            if m is None:
                continue
            if not isinstance(m, fair.TabVAE):
                raise MismatchError(f"fair_tabular: the {who} is a {type(m).__name__}, not a tab_vae")
            if m.record_dim != self.record_dim:
                raise MismatchError(f"fair_tabular: the {who} reads records of {m.record_dim} values, the task has {self.record_dim}")

    def task_info(self, uses_unlabeled: bool) -> TaskInfo:
        return TaskInfo(2, len(self.train), (self.record_dim,), len(self.train), self.train, self.val, self)

    def open_teacher_cache(self, folder: Path) -> Any:
        raise RecipeError("teacher.cache is for language-model tasks; give a fair_tabular teacher as recipe, run or model")

    def evaluator(self, teacher: nn.Module | None) -> Callable[[nn.Module], dict[str, float]]:
        def evaluate(model: nn.Module) -> dict[str, float]:  # cheap, every epoch: no downstream classifiers
            with torch.inference_mode():
                mu, logvar = model.encode(fair.records(self.val.x, self.val.y))
                x_hat, y_logit = model.decode(mu)
                rec = fair.recon_loss(x_hat, model.decoder.log_sigma, y_logit, self.val.x, self.val.y)
            return {"recon": float(rec), "latent_dcov": float(fair.dcov2(mu, self.val.a))}

        return evaluate

    def final_metrics(self, student: nn.Module, teacher: nn.Module | None) -> dict[str, float]:
        out = {f"test/{k}": v for k, v in fair.fair_metrics(student, self.train, self.test).items()}
        out |= {f"val/{k}": v for k, v in self.evaluator(teacher)(student).items()}
        if teacher is not None:
            out |= {f"teacher/{k}": v for k, v in fair.fair_metrics(teacher, self.train, self.test).items()}
            out["params/teacher"] = sum(p.numel() for p in teacher.parameters())
            out["params/teacher_encoder"] = sum(p.numel() for p in teacher.encoder.parameters())
        real = fair._fit_predict(self.train.x, self.train.y, self.test.x)  # the real data's own reference
        out["test/real_accuracy"] = float((real == self.test.y).float().mean())
        out["test/real_dp_gap"] = fair.dp_gap(real, self.test.a)
        out["params/student"] = sum(p.numel() for p in student.parameters())
        out["params/student_encoder"] = sum(p.numel() for p in student.encoder.parameters())
        return out


@TASKS.register("fair_tabular", "synthetic tabular records with a binary sensitive attribute and biased labels (S46)", FairTabularParams)
def build_fair_tabular(p: FairTabularParams) -> FairTabularData:
    g = torch.Generator().manual_seed(p.data_seed)
    x, y, a = make_rows(p.num_train + p.num_val + p.num_test, p.bias, p.proxy, g)
    n1, n2 = p.num_train, p.num_train + p.num_val
    mean, std = x[:n1].mean(0), x[:n1].std(0)
    x = (x - mean) / std
    return FairTabularData(FairDataset(x[:n1], y[:n1], a[:n1]), FairDataset(x[n1:n2], y[n1:n2], a[n1:n2]),
                           FairDataset(x[n2:], y[n2:], a[n2:]))


build_fair_tabular.default_student = {"arch": "tab_vae", "enc_hidden": 16}  # type: ignore[attr-defined]
