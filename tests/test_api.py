"""The Python API with one's own modules and data, and every shipped recipe."""

from __future__ import annotations

import pytest
import yaml
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


LM_OR_OWN_TEST = ("arithmetic-", "pytext-", "sentences-")  # language models and the MiniLM showcase: own tests


def _shortened(ref, sets: list[str], folder, i: int):
    """A teacher/init reference whose recipe (a name, a path or inline) is shortened like the recipe itself,
    written to ``folder``; a list of references (``sources``) each; other kinds as they are."""
    from distill.core.recipe import apply_overrides, recipe_from_dict

    if ref is None:
        return None
    if getattr(ref, "sources", None):
        return ref.model_copy(update={"sources": [_shortened(r, sets, folder, 10 * i + j) for j, r in enumerate(ref.sources)]})
    if ref.recipe is None:
        return ref
    t = recipe_from_dict(apply_overrides(ref.recipe, sets)) if isinstance(ref.recipe, dict) else load_recipe(ref.recipe, sets)
    t = t.model_copy(update={"teacher": _shortened(t.teacher, sets, folder, 100 * i + 1)})
    (folder / f"t{i}.yaml").write_text(yaml.safe_dump(t.resolved()))
    return ref.model_copy(update={"recipe": str(folder / f"t{i}.yaml")})


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in shipped_recipes() if not n.startswith(LM_OR_OWN_TEST)])
def test_every_shipped_recipe_runs_shortened(name, tmp_path):
    """Each shipped recipe end to end with its own method and model, shortened to one small epoch (its
    teachers too): it trains, and reports test metrics (accuracy in [0, 1] where it has one)."""
    r = load_recipe(name)
    small = ({"num_train": 200, "num_val": 50, "num_test": 100, "num_transfer": 200} if r.task.name.startswith("mnist1d")
             else {"num_train": 1000, "num_val": 200, "num_test": 200, "num_eval": 200} if r.task.name.startswith("ring8")
             else {"num_eval": 100} if r.task.name == "digits-diffusion" else {})
    sets = [f"task.{k}={v}" for k, v in small.items() if k in r.task.params] + [
        "train.epochs=1", "train.progress=false", "train.trackers=none"]
    r = load_recipe(name, sets)
    r = r.model_copy(update={"teacher": _shortened(r.teacher, sets, tmp_path, 0),
                             "init": _shortened(r.init, sets, tmp_path, 1)})
    res = run_recipe(r, out=tmp_path / "runs")
    assert any(k.startswith("test/") for k in res.metrics)
    if "test/accuracy" in res.metrics:
        assert 0.0 <= res.metrics["test/accuracy"] <= 1.0
