"""Faults of the Python API: every bad input is a one-line ``DistillError`` naming the argument, raised
before any folder is written; models with tuple or ``ModelOutput`` outputs, bf16 teachers, torch
datasets of ``(x, y)`` pairs and ``test=None`` train end to end."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, IterableDataset, TensorDataset

import distill
from distill import ArrayDataset as A
from distill.errors import DataError, MismatchError, ModelError, RecipeError, RunExistsError

N, D, C = 24, 4, 3
TRAIN = {"epochs": 1, "batch_size": 8, "progress": False, "trackers": "none"}


def xy(n: int = N, classes: int = C, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g), torch.randint(0, classes, (n,), generator=g)


def with_nan(x: torch.Tensor, value: float = float("nan"), row: int = 3) -> torch.Tensor:
    x = x.clone()
    x[row, 1] = value
    return x


def labels(value: int, row: int = 5) -> torch.Tensor:
    y = xy()[1].clone()
    y[row] = value
    return y


class Out(nn.Module):
    """A linear model whose forward returns ``wrap(logits)``."""

    def __init__(self, classes: int = C, wrap=lambda t: t, d_in: int = D) -> None:
        super().__init__()
        self.lin, self.wrap = nn.Linear(d_in, classes), wrap

    def forward(self, x: torch.Tensor):
        return self.wrap(self.lin(x))


class Pairs(Dataset):
    """A map-style dataset of (x, y) pairs, as a user's own would be."""

    def __init__(self, x, y, shapes=None) -> None:
        self.x, self.y, self.shapes = x, y, shapes

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        x = self.x[i] if self.shapes is None else torch.zeros(self.shapes[i])
        return x, self.y[i]


class Items(Dataset):
    """A map-style dataset whose items are given as a list."""

    def __init__(self, items) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def mutated_labels() -> A:
    ds = A(x0, y0)
    ds.y = ds.y.float()  # changed after construction
    return ds


class Stream(IterableDataset):
    def __iter__(self):
        yield from zip(*xy())


def frozen() -> nn.Module:
    return nn.Linear(D, C).requires_grad_(False)


def same_module() -> dict:
    m = nn.Linear(D, C)
    return {"teacher": m, "student": m}


x0, y0 = xy()

# (id, kwargs over the defaults (a callable: built inside pytest.raises), error class, text the message must hold)
BAD = [
    ("label-too-big", lambda: {"train": A(x0, labels(5))}, DataError, "train has label 5 in row 5"),
    ("label-too-big-test", lambda: {"test": A(x0, labels(3))}, DataError, "test has label 3"),
    ("label-negative-val", lambda: {"val": A(x0, labels(-2))}, DataError, "val has label -2"),
    ("unlabeled-in-train", lambda: {"train": A(x0, labels(-1))}, DataError, "train has unlabeled samples"),
    ("unlabeled-test", lambda: {"test": A(x0)}, DataError, "test has unlabeled samples"),
    ("label-too-big-transfer", lambda: {"transfer": A(x0, labels(3))}, DataError, "transfer has label 3"),
    ("label-beyond-num_classes", lambda: {"train": A(x0, labels(4)), "student": nn.Linear(D, 4),
                                          "teacher": nn.Linear(D, 4)}, DataError, "student predicts 4 classes"),
    ("float-labels", lambda: {"train": A(x0, y0.float() + 0.5)}, DataError, "not a whole number"),
    ("float-labels-nan", lambda: {"train": A(x0, labels(0).float().index_fill(0, torch.tensor([2]), float("nan")))},
     DataError, "y[2] = nan"),
    ("float-labels-tensordataset", lambda: {"train": TensorDataset(x0, y0.float() / 2 + 0.25)}, DataError,
     "train: y must be integer"),
    ("2d-labels", lambda: {"train": A(x0, nn.functional.one_hot(y0, C))}, DataError, "y.argmax(1)"),
    ("2d-labels-pairs", lambda: {"train": Pairs(x0, nn.functional.one_hot(y0, C))}, DataError,
     "train[0] has a label of shape [3]"),
    ("rows-mismatch", lambda: {"train": A(x0, y0[:-1])}, DataError, "x has 24 rows but y has 23"),
    ("teacher-5-student-3", lambda: {"teacher": nn.Linear(D, 5)}, MismatchError,
     "teacher predicts 5 classes but the student predicts 3"),
    ("student-4-teacher-5", lambda: {"teacher": nn.Linear(D, 5), "student": nn.Linear(D, 4)}, MismatchError,
     "teacher predicts 5 classes but the student predicts 4"),
    ("num_classes-vs-student", lambda: {"num_classes": 4}, MismatchError, "student predicts 3 classes but num_classes=4"),
    ("num_classes-bad", lambda: {"num_classes": 1}, DataError, "num_classes must be an int"),
    ("empty-train", lambda: {"train": A(x0[:0], y0[:0])}, DataError, "train is empty"),
    ("empty-test", lambda: {"test": A(x0[:0], y0[:0])}, DataError, "test is empty"),
    ("empty-val", lambda: {"val": A(x0[:0], y0[:0])}, DataError, "val is empty"),
    ("empty-transfer", lambda: {"transfer": A(x0[:0])}, DataError, "transfer is empty"),
    ("empty-pairs", lambda: {"train": Pairs([], [])}, DataError, "train is empty"),
    ("nan-test", lambda: {"test": A(with_nan(x0), y0)}, DataError, "test has non-finite inputs"),
    ("inf-train", lambda: {"train": A(with_nan(x0, float("inf")), y0)}, DataError, "train has non-finite inputs"),
    ("nan-val", lambda: {"val": A(with_nan(x0, row=7), y0)}, DataError, "the first is row 7"),
    ("nan-transfer", lambda: {"transfer": A(with_nan(x0))}, DataError, "transfer has non-finite inputs"),
    ("shape-test", lambda: {"test": A(torch.randn(N, D + 1), y0)}, DataError,
     "test has inputs of shape [5] but train has [4]"),
    ("ragged-pairs", lambda: {"train": Pairs(x0, y0, shapes=[(D,)] * 3 + [(D + 1,)] * (N - 3))}, DataError,
     "train[3] has x of shape [5]"),
    ("pairs-of-str", lambda: {"train": Items(["x"] * N)}, DataError, "train[0] is a str: expected an (x, y) pair"),
    ("pairs-mixed", lambda: {"train": Items([(x0[0], 1), (x0[1],)])}, DataError, "train[1] has 1 elements but train[0] has 2"),
    ("pairs-not-numbers", lambda: {"train": Items([("a", 1)])}, DataError, "train[0] is not numbers"),
    ("labels-changed-after", lambda: {"train": mutated_labels()}, DataError, "train.y must be 24 class indices"),
    ("labels-str", lambda: {"train": A(x0, ["a"] * N)}, DataError, "y must be integer class indices (a tensor"),
    ("labels-complex", lambda: {"train": A(x0, y0 + 0j)}, DataError, "complex"),
    ("x-str", lambda: {"train": A("abc", y0)}, DataError, "x must be a tensor or array of numbers"),
    ("x-scalar", lambda: {"train": A(torch.tensor(1.0))}, DataError, "x must have one row per sample"),
    ("tensordataset-no-labels", lambda: {"train": TensorDataset(x0)}, DataError, "train has inputs but no labels"),
    ("tensordataset-3", lambda: {"val": TensorDataset(x0, y0, y0)}, DataError, "val is a TensorDataset of 3 tensors"),
    ("iterable-dataset", lambda: {"train": Stream()}, DataError, "train is an IterableDataset"),
    ("tuple-not-dataset", lambda: {"test": (x0, y0)}, DataError, "test must be a dataset"),
    ("kd-without-teacher", lambda: {"teacher": None}, ModelError, "pass teacher="),
    ("lm-method", lambda: {"method": "lm_kd"}, ModelError, "method 'lm_kd' is for language models: pass tokenizer="),
    ("unknown-method", lambda: {"method": "kdd"}, RecipeError, "method: unknown method 'kdd'"),
    ("method_params-typo", lambda: {"method_params": {"temprature": 2.0}}, RecipeError, "method_params: "),
    ("method_params-name", lambda: {"method_params": {"name": "dkd"}}, RecipeError, "method="),
    ("method-not-str", lambda: {"method": None}, RecipeError, "method must be a method name"),
    ("train_config-not-dict", lambda: {"train_config": [("epochs", 1)]}, RecipeError, "train_config must be a dict"),
    ("overwrite-not-bool", lambda: {"overwrite": "yes"}, RecipeError, "overwrite must be True or False"),
    ("method_params-not-dict", lambda: {"method_params": 4.0}, RecipeError, "method_params must be a dict"),
    ("train_config-typo", lambda: {"train_config": {"epoch": 1}}, RecipeError, "train_config: "),
    ("teacher-not-module", lambda: {"teacher": lambda x: x}, ModelError, "teacher must be a torch.nn.Module"),
    ("student-none", lambda: {"student": None}, ModelError, "student must be a torch.nn.Module"),
    ("same-module", same_module, ModelError, "the same module"),
    ("student-frozen", lambda: {"student": frozen()}, ModelError, "no trainable parameters"),
    ("student-bf16", lambda: {"student": nn.Linear(D, C).to(torch.bfloat16)}, ModelError, "float32 student"),
    ("student-wrong-input", lambda: {"student": nn.Linear(D + 1, C)}, ModelError, "the student failed on 2 rows"),
    ("teacher-returns-str", lambda: {"teacher": Out(wrap=lambda t: "logits")}, ModelError, "teacher returned a str"),
    ("teacher-3d-logits", lambda: {"teacher": Out(wrap=lambda t: t[:, None])}, ModelError, "shape [2, 1, 3]"),
    ("student-one-logit", lambda: {"student": nn.Linear(D, 1), "teacher": nn.Linear(D, 1)}, ModelError,
     "1 logit per sample"),
    ("teacher-int-output", lambda: {"teacher": Out(wrap=lambda t: t.argmax(1, keepdim=True).expand(-1, C))},
     ModelError, "expected float logits"),
    ("teacher-nan-logits", lambda: {"teacher": Out(wrap=lambda t: t * float("nan"))}, ModelError,
     "non-finite logits"),
]


def call(tmp_path, **kw):
    args = {"teacher": nn.Linear(D, C), "student": nn.Linear(D, C), "train": A(x0, y0), "test": A(x0, y0),
            "method": "kd", "train_config": TRAIN, "out": tmp_path / "runs"}
    args.update(kw)
    return distill.distill(**args)


@pytest.mark.parametrize("make,error,text", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_error_and_no_folder(tmp_path, make, error, text):
    with pytest.raises(error) as info:
        call(tmp_path, **make())
    msg = str(info.value)
    assert isinstance(info.value, distill.DistillError)
    assert text in msg, msg
    assert "\n" not in msg and "YAML" not in msg and "--" not in msg, msg
    assert not (tmp_path / "runs").exists()  # every check runs before a folder is created


def test_existing_run_is_an_error_unless_overwrite(tmp_path):
    first = call(tmp_path, method="ce", teacher=None)
    mtime = (first.run_dir / "metrics.json").stat().st_mtime_ns
    with pytest.raises(RunExistsError, match="overwrite=True"):  # not silently reused: other data, same recipe
        call(tmp_path, method="ce", teacher=None, train=A(*xy(seed=1)))
    assert (first.run_dir / "metrics.json").stat().st_mtime_ns == mtime
    call(tmp_path, method="ce", teacher=None, train=A(*xy(seed=1)), overwrite=True)
    assert (first.run_dir / "metrics.json").stat().st_mtime_ns != mtime


def test_out_is_a_file(tmp_path):
    (tmp_path / "runs").write_text("")
    with pytest.raises(RunExistsError, match="is a file"):
        call(tmp_path)


def test_interrupted_run_is_not_dropped_silently(tmp_path):
    (tmp_path / "runs" / "custom.partial" / "checkpoints").mkdir(parents=True)
    with pytest.raises(RunExistsError, match="interrupted run"):
        call(tmp_path)
    assert (tmp_path / "runs" / "custom.partial" / "checkpoints").is_dir()


def test_whole_float_labels_are_accepted_exactly():
    assert A(x0[:3], torch.tensor([0.0, 2.0, 1.0])).y.tolist() == [0, 2, 1]
    assert A(x0[:3], torch.tensor([True, False, True])).y.dtype == torch.long
    with pytest.raises(DataError, match=r"y\[1\] = 1.9999"):
        A(x0[:3], torch.tensor([0.0, 1.9999, 1.0]))


def test_probe_hooks_give_float32_logits_and_come_off():
    from distill.tasks.checks import ModelProbe

    teacher = Out(wrap=lambda t: (t.to(torch.bfloat16),)).to(torch.bfloat16)
    probe = ModelProbe(teacher, "teacher", x0[:2])
    assert probe.width == C
    out = teacher(x0)  # float32 inputs are cast to bf16 for it; its logits come out float32
    assert torch.is_tensor(out) and out.dtype == torch.float32 and out.shape == (N, C)
    probe.remove()
    assert isinstance(teacher(x0.to(torch.bfloat16)), tuple)


def model_output(t):
    transformers = pytest.importorskip("transformers")
    return transformers.modeling_outputs.SequenceClassifierOutput(logits=t)


SUPPORTED = [
    ("tuple-output", lambda: {"student": Out(wrap=lambda t: (t, t.detach())), "teacher": Out(wrap=lambda t: (t,))}),
    ("model-output", lambda: {"student": Out(wrap=model_output), "teacher": Out(wrap=model_output)}),
    ("dict-output", lambda: {"teacher": Out(wrap=lambda t: {"logits": t, "hidden": t})}),
    ("bf16-teacher", lambda: {"teacher": Out().to(torch.bfloat16)}),
    ("bf16-logits", lambda: {"teacher": Out(wrap=lambda t: t.to(torch.bfloat16))}),
    ("tensordataset", lambda: {"train": TensorDataset(x0, y0), "test": TensorDataset(*xy(seed=2)),
                               "transfer": TensorDataset(torch.randn(8, D))}),
    ("map-style-pairs", lambda: {"train": Pairs(x0, y0.tolist()), "val": Pairs(list(x0), y0.float())}),
    ("test-none", lambda: {"test": None, "val": A(*xy(seed=3))}),
    ("test-none-no-val", lambda: {"test": None}),
]


@pytest.mark.parametrize("make", [s[1] for s in SUPPORTED], ids=[s[0] for s in SUPPORTED])
def test_supported_inputs_train_end_to_end(tmp_path, make):
    kw = make()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = call(tmp_path, transfer=A(torch.randn(8, D)), **kw) if "transfer" not in kw else call(tmp_path, **kw)
    assert 0.0 <= res.metrics["test/accuracy"] <= 1.0
    assert torch.isfinite(torch.tensor(res.metrics["test/nll"]))
    assert "teacher/accuracy" in res.metrics and "test/agreement" in res.metrics
    assert (res.run_dir / "student" / "model.safetensors").is_file()
    if kw.get("test", "given") is None:
        assert any("test/ metrics are computed on" in str(w.message) for w in caught)
    for m in (kw.get("student"), kw.get("teacher")):  # hooks are taken off again; the module is the user's
        if isinstance(m, nn.Module):
            assert not m._forward_hooks and not m._forward_pre_hooks
    if "student" in kw:
        from safetensors.torch import load_file

        assert set(load_file(str(res.run_dir / "student" / "model.safetensors"))) == set(kw["student"].state_dict())
