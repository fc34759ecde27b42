"""Projectors: output shapes; in a FeatureDistiller they train in their own parameter group, are saved
in the run's checkpoint and are not in the exported student. Heterogeneous pairs run on digits."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from distill.core.checkpoint import trainable_state
from distill.core.distiller import Step, TaskInfo
from distill.core.recipe import TrainConfig, recipe_from_dict
from distill.core.registry import Params
from distill.core.runner import run_recipe
from distill.core.trainer import Trainer
from distill.errors import Interrupted, RecipeError
from distill.features import FeatureDistiller, FeatureTap, feature_shapes, make_projector
from distill.features.losses import hint_loss
from distill.features.projectors import AttentionPool, Conv1x1Projector, LinearProjector
from distill.tasks.base import ArrayDataset
from distill.tasks.models import build_model
from distill.tasks.ops import load_classifier, save_student


@pytest.mark.parametrize("kind, src, dst", [
    ("linear", (16,), (32,)),
    ("linear", (17, 8), (17, 16)),       # tokens: per token
    ("linear", (4, 8, 8), (32,)),        # a map to a vector: flattened
    ("mlp", (17, 8), (17, 16)),
    ("mlp", (8, 4, 4), (16, 2, 2)),
    ("conv1x1", (4, 8, 8), (16, 8, 8)),
    ("conv1x1", (4, 8, 8), (16, 2, 2)),  # pooled down
    ("conv1x1", (4, 2, 2), (16, 4, 4)),  # interpolated up
    ("conv1x1", (4, 40), (8, 10)),       # 1-D maps
    ("attnpool", (17, 8), (32,)),        # tokens -> vector
    ("attnpool", (4, 8, 8), (32,)),      # map positions as tokens
    ("identity", (5,), (5,)),
])
def test_projector_output_shapes(kind, src, dst):
    p = make_projector(kind, src, dst)
    assert p(torch.randn(3, *src)).shape == (3, *dst)


def test_projectors_compute_what_they_say():
    torch.manual_seed(0)
    lin = LinearProjector((3, 4), (3, 2))
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(lin(x)[1, 2], lin.net.weight @ x[1, 2] + lin.net.bias)  # per token
    conv = Conv1x1Projector((4, 6, 6), (2, 2, 2))
    y = torch.randn(1, 4, 6, 6)
    full = torch.einsum("oc,nchw->nohw", conv.conv.weight[:, :, 0, 0], y) + conv.conv.bias[:, None, None]
    torch.testing.assert_close(conv(y)[0, :, 0, 1], full[0, :, 0:3, 3:6].mean((1, 2)))  # 3x3 average
    pool = AttentionPool((5, 4), (3,))
    tokens = torch.randn(2, 5, 4)
    assert not torch.allclose(pool(tokens)[0], pool(tokens.flip(0))[0])  # depends on its own sample's tokens
    torch.testing.assert_close(pool(tokens[:, torch.randperm(5)]), pool(tokens), rtol=1e-5, atol=1e-6)  # a set


def test_projector_errors_are_one_line():
    with pytest.raises(RecipeError, match="did you mean 'conv1x1'"):
        make_projector("conv1x", (4, 2, 2), (4, 2, 2))
    with pytest.raises(RecipeError, match="conv1x1 projector maps"):
        make_projector("conv1x1", (16,), (8,))
    with pytest.raises(RecipeError, match="identity projector"):
        make_projector("identity", (4,), (5,))


class _Hint(FeatureDistiller):
    """A test method: CE + FitNets hint from the student's stage 1 to the teacher's last ViT layer."""

    needs_teacher = True

    def __init__(self, student, teacher, params, info):
        super().__init__(student, teacher, params, info)
        self.s_tap = FeatureTap(student, ["stages.1"]).attach()
        self.t_tap = FeatureTap(teacher, [teacher.feature_layers()[-1]], stop_after=True)
        s_shape = feature_shapes(student, ["stages.1"], self.example_input())["stages.1"]
        t_shape = feature_shapes(teacher, self.t_tap.layers, self.example_input())[self.t_tap.layers[0]]
        self.add_projector("stages.1", "attnpool", s_shape, t_shape[-1:])  # map -> the [CLS] vector

    def training_step(self, batch):
        x, y = batch["x"], batch["y"]
        logits = self.student(x)
        t = self.teacher_features(self.t_tap, x)[self.t_tap.layers[0]][:, 0]  # the [CLS] state
        hint = hint_loss(self.projector("stages.1")(self.s_tap["stages.1"]), t)
        return Step({"student": F.cross_entropy(logits, y) + hint}, {"hint": hint.detach()})


def _pair():
    torch.manual_seed(0)
    student = build_model("convnet", {"width": 4, "depth": 2}, (8, 8), 10)
    teacher = build_model("vit", {"hidden": 16, "depth": 2, "heads": 2}, (8, 8), 10)
    return student, teacher


def test_projectors_train_in_their_own_group_ride_the_checkpoint_and_leave_the_export(tmp_path):
    student, teacher = _pair()
    g = torch.Generator().manual_seed(0)
    data = ArrayDataset(torch.rand(32, 8, 8, generator=g), torch.randint(0, 10, (32,), generator=g))
    d = _Hint(student, teacher, Params(), TaskInfo(10, 32, (8, 8), train=data))
    groups = d.param_groups()
    assert list(groups) == ["student", "projectors"]
    proj_ids = {id(p) for p in d.projectors.parameters()}
    assert {id(p) for p in groups["projectors"]} == proj_ids and not proj_ids & {id(p) for p in groups["student"]}
    assert isinstance(d.projector("stages.1"), AttentionPool)
    before = {k: v.clone() for k, v in d.projectors.state_dict().items()}
    t_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    run = tmp_path / "run"
    cfg = TrainConfig(epochs=1, batch_size=8, lr=0.01, progress=False, trackers="none", cache_teacher=False)
    trainer = Trainer(d, data, cfg, run_dir=run)
    assert len(trainer.optimizers) == 2
    trainer.fit()
    moved = [k for k, v in d.projectors.state_dict().items() if not torch.equal(v, before[k])]
    assert moved  # the projector group's optimizer stepped
    assert all(torch.equal(v, t_before[k]) for k, v in teacher.state_dict().items())  # frozen teacher
    # the run's checkpoint holds the projectors (exact resume) ...
    ckpt = load_file(str(run / "checkpoints" / "latest" / "model.safetensors"))
    assert any(k.startswith("projectors.stages__1.") for k in ckpt)
    assert ckpt.keys() == trainable_state(d).keys()
    # ... the exported student does not, and loads back into its registered arch
    save_student(tmp_path / "student", d.student, {"name": "convnet", "params": {"width": 4, "depth": 2}}, (8, 8), 10)
    exported = load_file(str(tmp_path / "student" / "model.safetensors"))
    assert exported.keys() == student.state_dict().keys()
    assert not any("projector" in k or "query" in k for k in exported)
    back = load_classifier(tmp_path / "student")
    x = torch.rand(4, 8, 8)
    torch.testing.assert_close(back.eval()(x), d.student.eval()(x))


@pytest.mark.parametrize("teacher_arch, student_arch", [
    ({"arch": "vit", "hidden": 16, "depth": 1, "heads": 2}, {"arch": "convnet", "width": 4, "depth": 2}),
    ({"arch": "convnet", "width": 8, "depth": 2}, {"arch": "mlpnet", "width": 16, "depth": 2}),
    ({"arch": "mlpnet", "width": 32, "depth": 2}, {"arch": "vit", "hidden": 8, "depth": 1, "heads": 2, "patch": 4}),
])
def test_heterogeneous_pairs_run_on_digits(tmp_path, teacher_arch, student_arch):
    task = {"name": "digits", "num_train": 64, "num_val": 16, "num_test": 32}
    train = {"epochs": 1, "batch_size": 32, "lr": 0.003, "progress": False, "trackers": "none"}
    teacher = {"name": "t", "seed": 0, "task": task, "student": teacher_arch, "method": {"name": "ce"}, "train": train}
    r = recipe_from_dict({"name": "s", "seed": 0, "task": task, "student": student_arch, "teacher": {"recipe": teacher},
                          "method": {"name": "kd", "temperature": 2.0}, "train": train})
    res = run_recipe(r, out=tmp_path / "runs")
    assert 0.0 <= res.metrics["test/accuracy"] <= 1.0 and "test/agreement" in res.metrics
    cfg = json.loads((res.run_dir / "student" / "config.json").read_text())
    assert cfg["arch"] == student_arch["arch"]
    back = load_classifier(res.run_dir / "student")
    assert back(torch.rand(2, 8, 8)).shape == (2, 10)


def test_pair_projectors_are_sized_from_one_forward_of_each_model():
    torch.manual_seed(0)
    student = build_model("convnet", {"width": 4, "depth": 3}, (8, 8), 10)
    teacher = build_model("convnet", {"width": 8, "depth": 3, "growth": 1.0}, (8, 8), 10)
    d = FeatureDistiller(student, teacher, Params(), TaskInfo(10, 8, (8, 8)))
    projs = d.pair_projectors("conv1x1", ["stages.0", "stages.2"], ["stages.1", "stages.2"])
    assert list(d.projectors) == ["stages__0", "stages__2"] and projs["stages.0"] is d.projector("stages.0")
    x = torch.rand(3, 8, 8)
    with FeatureTap(student, ["stages.0", "stages.2"]) as s_tap:
        student(x)
    t = d.teacher_features(FeatureTap(teacher, ["stages.1", "stages.2"], stop_after=True), x)
    assert projs["stages.0"](s_tap["stages.0"]).shape == t["stages.1"].shape == (3, 8, 4, 4)
    assert projs["stages.2"](s_tap["stages.2"]).shape == t["stages.2"].shape == (3, 8, 2, 2)
    assert not t["stages.1"].is_inference()  # usable in a loss that autograd saves


def test_an_interrupted_run_resumes_its_projectors_exactly(tmp_path):
    g = torch.Generator().manual_seed(1)
    data = ArrayDataset(torch.rand(32, 8, 8, generator=g), torch.randint(0, 10, (32,), generator=g))
    cfg = TrainConfig(epochs=2, batch_size=8, lr=0.01, progress=False, trackers="none", cache_teacher=False)

    def fresh() -> _Hint:
        return _Hint(*_pair(), Params(), TaskInfo(10, 32, (8, 8), train=data))

    straight = fresh()
    Trainer(straight, data, cfg, seed=0, run_dir=tmp_path / "a").fit()
    with pytest.raises(Interrupted):
        Trainer(fresh(), data, cfg, seed=0, run_dir=tmp_path / "b").fit(stop_at_step=3)
    resumed = fresh()
    Trainer(resumed, data, cfg, seed=0, run_dir=tmp_path / "b").fit(resume=True)
    a, b = trainable_state(straight), trainable_state(resumed)
    assert a.keys() == b.keys() and any(k.startswith("projectors.") for k in a)
    for k in a:  # bitwise: the projectors' weights and their optimizer state came back
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
