"""The Python entry point for one's own models and data.

    import distill
    result = distill.distill(teacher, student, distill.ArrayDataset(x, y),
                             test=distill.ArrayDataset(x_test, y_test), method="kd",
                             method_params={"temperature": 4.0}, train_config={"epochs": 20})
    print(result.metrics["test/accuracy"])
"""

from __future__ import annotations

import importlib
import re
import warnings
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from distill.core.recipe import Recipe, recipe_from_dict
from distill.core.registry import METHODS
from distill.core.runner import RunResult, run_recipe
from distill.errors import DataError, ModelError, RecipeError, RunExistsError
from distill.tasks.base import ArrayDataset, TaskData
from distill.tasks.checks import PROBE_ROWS, ModelProbe, as_array_dataset, check_labels, check_split, check_widths

# the recipe section each keyword argument fills, to name the argument in a recipe error
_ARGS = {"method": "method_params", "train": "train_config", "seed": "seed", "name": "name"}


def distill(
    teacher: nn.Module | None,
    student: nn.Module,
    train: ArrayDataset | Dataset,
    test: ArrayDataset | Dataset | None = None,
    num_classes: int | None = None,
    method: str = "kd",
    method_params: dict[str, Any] | None = None,
    val: ArrayDataset | Dataset | None = None,
    transfer: ArrayDataset | Dataset | None = None,
    train_config: dict[str, Any] | None = None,
    seed: int = 0,
    out: str | Path = "runs",
    name: str = "custom",
    overwrite: bool = False,
    tokenizer: Any = None,
    task_params: dict[str, Any] | None = None,
) -> RunResult:
    """Distill ``teacher`` into ``student`` on your data and write ``<out>/<name>``.

    ``train``/``val``/``test`` are labeled datasets: ``ArrayDataset(x, y)``, a ``TensorDataset(x, y)``
    or any map-style dataset of ``(x, y)`` pairs, with ``y`` class indices ``0..C-1`` (integers; float
    labels only when exactly whole numbers). ``transfer`` is optional unlabeled data the teacher labels
    (``ArrayDataset(x)``: label -1). Without ``test``, the ``test/`` metrics are computed on ``val`` (or,
    without ``val`` either, on ``train``), with a warning. ``C`` is ``num_classes``, or else the student's
    output width. ``method`` is any registered classifier method (``distill list``), validated with
    ``method_params``; ``train_config`` takes the recipe's ``train`` keys.

    Before anything is written, each model runs once on a few rows of ``train``: it must return
    ``[batch, C]`` logits (a tensor, a tuple whose first element is the logits, or an HF ``ModelOutput``'s
    ``.logits``); a teacher in another dtype (bf16) is fed its dtype and its logits come out float32.
    An existing ``<out>/<name>`` is an error unless ``overwrite=True``. Every problem with the
    arguments raises a ``distill.DistillError`` naming the argument, and leaves no run folder.

    Language models: pass HF causal LMs, their ``tokenizer`` and an LM method (``lm_kd``, ``sft``, ``gkd``,
    ...); ``train``/``val``/``test`` are then lists of strings or of ``{"prompt", "completion"}``
    mappings, or JSONL paths (``val``/``test`` split off ``train`` when absent); ``task_params`` takes the
    ``jsonl`` task's keys (``max_length``, ``max_new_tokens``, ...). See ``distill/lm/api.py``.
    """
    recipe = _recipe(method, method_params, train_config, seed, name)
    entry = METHODS.get(method)
    if tokenizer is not None or _is_lm_method(entry.obj):
        return _distill_lm(teacher, student, tokenizer, train, val, test, recipe, entry, task_params or {}, out,
                           name, overwrite)
    if entry.obj.needs_teacher and teacher is None:
        raise ModelError(f"method '{method}' needs a teacher: pass teacher=<your nn.Module>, "
                         "or method='ce' to train the student on the labels alone")
    if teacher is not None and teacher is student:
        raise ModelError("teacher and student are the same module: pass a separate student (e.g. a fresh copy)")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 2):
        raise DataError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if not isinstance(overwrite, bool):
        raise RecipeError(f"overwrite must be True or False, got {overwrite!r}")
    _check_out(Path(out), name, overwrite)

    train = as_array_dataset(train, "train", labeled=True)
    check_split(train, "train", None)
    splits = {"train": train}
    for arg, ds in (("test", test), ("val", val), ("transfer", transfer)):
        if ds is not None:
            splits[arg] = as_array_dataset(ds, arg, labeled=arg != "transfer")
            check_split(splits[arg], arg, tuple(train.x.shape[1:]))

    probes: list[ModelProbe] = []
    try:
        probes.append(ModelProbe(student, "student", train.x[:PROBE_ROWS]))
        t_probe = ModelProbe(teacher, "teacher", train.x[:PROBE_ROWS]) if teacher is not None else None
        if t_probe is not None:
            probes.append(t_probe)
        check_widths(probes[0], t_probe, num_classes)
        n_classes = probes[0].width
        source = f"num_classes={n_classes}" if num_classes is not None else f"the student predicts {n_classes} classes"
        for arg, ds in splits.items():
            check_labels(ds, arg, n_classes, source)

        if "test" not in splits:
            stand_in = "val" if "val" in splits else "train"
            warnings.warn(f"distill.distill: no test split given; the test/ metrics are computed on {stand_in}",
                          UserWarning, stacklevel=2)
            splits["test"] = splits[stand_in]
        data = TaskData(train=train, test=splits["test"], val=splits.get("val"), transfer=splits.get("transfer"),
                        num_classes=n_classes)
        return run_recipe(recipe, out=out, name=name, overwrite=overwrite, data=data, student=student,
                          teacher=teacher)
    finally:
        for p in probes:
            p.remove()


def _recipe(method: Any, method_params: Any, train_config: Any, seed: Any, name: Any) -> Recipe:
    if not isinstance(method, str):
        raise RecipeError(f"method must be a method name (a str, see `distill list`), got {type(method).__name__}")
    for arg, value in (("method_params", method_params), ("train_config", train_config)):
        if value is not None and not isinstance(value, dict):
            raise RecipeError(f"{arg} must be a dict, got {type(value).__name__}")
    if method_params and "name" in method_params:
        raise RecipeError("method_params: 'name' is not a parameter; choose the method with method=")
    try:
        return recipe_from_dict({
            "name": name,
            "seed": seed,
            "task": {"name": "custom"},
            "method": {"name": method, **(method_params or {})},
            "train": train_config or {},
        })
    except RecipeError as err:
        msg = str(err)
        key = re.match(r"recipe key '(\w+)", msg)
        arg = _ARGS.get(key.group(1)) if key else ("method" if msg.startswith("unknown method") else None)
        raise RecipeError(f"{arg}: {msg}" if arg else msg) from None


def _distill_lm(teacher: Any, student: Any, tokenizer: Any, train: Any, val: Any, test: Any, recipe: Recipe,
                entry: Any, task_params: dict[str, Any], out: str | Path, name: str, overwrite: bool) -> RunResult:
    from distill.lm.api import is_causal_lm, lm_task

    if not _is_lm_method(entry.obj):
        raise RecipeError(f"method '{entry.name}' is for classifiers; with a tokenizer, use an LM method "
                          "(lm_kd, sft, seq_kd, gkd, ...: `distill list`)")
    if tokenizer is None:
        raise ModelError(f"method '{entry.name}' is for language models: pass tokenizer=<the models' HF tokenizer>")
    for who, model in (("student", student), ("teacher", teacher)):
        if model is not None and not is_causal_lm(model):
            raise ModelError(f"{who}: an LM method needs an HF causal LM (AutoModelForCausalLM), got "
                             f"{type(model).__name__}")
    if entry.obj.needs_teacher and teacher is None:
        raise ModelError(f"method '{entry.name}' needs a teacher: pass teacher=<an HF causal LM>")
    _check_out(Path(out), name, overwrite)
    data = lm_task(tokenizer, train, val, test, **task_params)
    return run_recipe(recipe, out=out, name=name, overwrite=overwrite, data=data, student=student, teacher=teacher)


def _is_lm_method(cls: type) -> bool:
    try:
        base = importlib.import_module("distill.lm.base").LMDistiller
    except ImportError:  # the language-model family is not installed
        return False
    return isinstance(cls, type) and issubclass(cls, base)


def _check_out(out: Path, name: str, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise RunExistsError(f"out={str(out)!r} is a file, not a folder")
    final, partial = out / name, out / f"{name}.partial"
    if final.exists() and not overwrite:
        # a run of the API is not reused: the recipe does not fingerprint your data or modules
        raise RunExistsError(f"run folder {final} exists: pass overwrite=True to replace it, or another name= or out=")
    if (partial / "checkpoints").exists() and not overwrite:
        raise RunExistsError(f"{partial} holds an interrupted run, which distill.distill does not resume: "
                             "pass overwrite=True to start over, or another name= or out=")
