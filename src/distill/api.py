"""The Python entry point for one's own models and data.

    import distill
    result = distill.distill(teacher, student, distill.ArrayDataset(x, y),
                             test=distill.ArrayDataset(x_test, y_test), method="kd",
                             method_params={"temperature": 4.0}, train={"epochs": 20})
    print(result.metrics["test/accuracy"])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from distill.core.recipe import recipe_from_dict
from distill.core.runner import RunResult, run_recipe
from distill.tasks.base import ArrayDataset, TaskData


def distill(
    teacher: nn.Module | None,
    student: nn.Module,
    train: ArrayDataset,
    test: ArrayDataset,
    num_classes: int | None = None,
    method: str = "kd",
    method_params: dict[str, Any] | None = None,
    val: ArrayDataset | None = None,
    transfer: ArrayDataset | None = None,
    train_config: dict[str, Any] | None = None,
    seed: int = 0,
    out: str | Path = "runs",
    name: str = "custom",
    overwrite: bool = True,
) -> RunResult:
    """Distill ``teacher`` into ``student`` on your data and write ``<out>/<name>``.

    ``train``/``val``/``test`` are labeled ``ArrayDataset``s; ``transfer`` is optional unlabeled
    data the teacher labels (``ArrayDataset(x)``). ``method`` is any registered method (``distill
    list``), validated with ``method_params``; ``train_config`` takes the recipe's ``train`` keys.
    """
    n_classes = num_classes or int(max(train.y.max(), test.y.max()).item()) + 1
    data = TaskData(train=train, test=test, val=val, transfer=transfer, num_classes=n_classes)
    recipe = recipe_from_dict(
        {
            "name": name,
            "seed": seed,
            "task": {"name": "custom"},
            "method": {"name": method, **(method_params or {})},
            "train": train_config or {},
        }
    )
    return run_recipe(recipe, out=out, name=name, overwrite=overwrite, data=data, student=student, teacher=teacher)
