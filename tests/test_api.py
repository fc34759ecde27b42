"""The Python API with one's own modules and data, and every shipped recipe."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import distill
from distill.core.recipe import load_recipe, shipped_recipes
from distill.core.runner import run_recipe


def test_distill_own_modules_from_python(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(300, 12), torch.randint(0, 3, (300,))
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()  # a learnable 3-class rule
    teacher = nn.Sequential(nn.Linear(12, 64), nn.ReLU(), nn.Linear(64, 3))
    distill.distill(None, teacher, distill.ArrayDataset(x[:200], y[:200]), distill.ArrayDataset(x[200:], y[200:]),
                    method="ce", train_config={"epochs": 30, "lr": 0.01, "progress": False, "trackers": "none"},
                    out=tmp_path, name="teacher")
    student = nn.Sequential(nn.Linear(12, 4), nn.ReLU(), nn.Linear(4, 3))
    res = distill.distill(teacher, student, distill.ArrayDataset(x[:200], y[:200]), distill.ArrayDataset(x[200:], y[200:]),
                          transfer=distill.ArrayDataset(torch.randn(500, 12)), method="kd",
                          method_params={"temperature": 2.0},
                          train_config={"epochs": 5, "progress": False, "trackers": "none"}, out=tmp_path, name="student")
    assert (tmp_path / "student" / "student" / "model.safetensors").is_file()
    assert 0.0 <= res.metrics["test/agreement"] <= 1.0 and "teacher/accuracy" in res.metrics
    assert not any(p.requires_grad for p in teacher.parameters())


def test_bad_method_params_from_python(tmp_path):
    ds = distill.ArrayDataset(torch.randn(8, 3), torch.zeros(8, dtype=torch.long))
    with pytest.raises(distill.DistillError, match="method.temprature"):
        distill.distill(nn.Linear(3, 2), nn.Linear(3, 2), ds, ds, method="kd", method_params={"temprature": 2}, out=tmp_path)


@pytest.mark.parametrize("name", shipped_recipes())
def test_every_shipped_recipe_validates(name):
    r = load_recipe(name)
    assert r.name == name


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in shipped_recipes() if n.startswith(("mnist1d-", "digits-"))])
def test_every_shipped_recipe_runs_shortened(name, tmp_path):
    """Each shipped recipe end to end with its own method and model, shortened to one small epoch."""
    r = load_recipe(name)
    small = {"num_train": 200, "num_val": 50, "num_test": 100, "num_transfer": 200} if r.task.name.startswith("mnist1d") else {}
    sets = [f"task.{k}={v}" for k, v in small.items() if k in r.task.params] + [
        "train.epochs=1", "train.progress=false", "train.trackers=none"]
    r = load_recipe(name, sets)
    if r.teacher is not None and r.teacher.recipe is not None:
        if isinstance(r.teacher.recipe, dict):  # an inline teacher recipe (mnist1d-bdkd's)
            from distill.core.recipe import apply_overrides, recipe_from_dict

            t = recipe_from_dict(apply_overrides(r.teacher.recipe, sets))
        else:
            t = load_recipe(r.teacher.recipe, [s for s in sets])
        import yaml

        (tmp_path / "t.yaml").write_text(yaml.safe_dump(t.resolved()))
        r = r.model_copy(update={"teacher": r.teacher.model_copy(update={"recipe": str(tmp_path / "t.yaml")})})
    res = run_recipe(r, out=tmp_path / "runs")
    assert 0.0 <= res.metrics["test/accuracy"] <= 1.0
