"""Tasks: data, default architectures and metrics (one file per task). Importing registers them."""

from distill._autoimport import import_all
from distill.tasks.base import ArrayDataset, TaskData

import_all(__name__, __path__)

__all__ = ["ArrayDataset", "TaskData"]
