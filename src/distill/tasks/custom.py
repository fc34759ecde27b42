"""``custom``: data passed from Python (``distill.distill``); a recipe cannot build it."""

from __future__ import annotations

from distill.core.registry import TASKS, Params
from distill.errors import RecipeError


@TASKS.register("custom", "your own tensors, passed from Python with distill.distill(...)", Params)
def build_custom(p: Params):
    raise RecipeError("task 'custom' takes its data from Python: use distill.distill(teacher, student, train, test)")
