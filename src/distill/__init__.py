"""distill: knowledge distillation with one engine and many faithful methods."""

from distill.api import distill
from distill.core.distiller import Distiller, Step, TaskInfo
from distill.core.recipe import load_recipe, recipe_from_dict
from distill.core.registry import ARCHS, METHODS, TASKS
from distill.core.runner import load_student, run_recipe
from distill.errors import DistillError
from distill.tasks.base import ArrayDataset, TaskData

__all__ = [
    "ARCHS", "METHODS", "TASKS", "ArrayDataset", "DistillError", "Distiller", "Step", "TaskData", "TaskInfo",
    "distill", "load_recipe", "load_student", "recipe_from_dict", "run_recipe",
]
__version__ = "0.1.0"
