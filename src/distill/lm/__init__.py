"""Language-model distillation, the ``lm`` plug-in: token losses (``losses.py``), models, the teacher cache,
rollouts, policy objectives and merging at the top; ``methods/`` one file per method; ``data/`` the tasks
(arithmetic, pytext, jsonl); ``tools/`` research harnesses (teacher hacking, trace analysis).

Conventions (causal shift, ``-100`` masks, generalized-JSD β, reduction over the optimizer step,
sparse top-k teacher tail) are fixed in ``docs/architecture.md`` and the docstrings of ``losses.py``.
Importing the package registers its tasks, archs, methods, model-reference kinds and model format.
"""

from distill._autoimport import import_all

import_all(__name__, __path__)  # the machinery, and methods/ (which imports its files)
from distill.lm.data import tasks  # noqa: E402,F401  registers arithmetic, pytext, jsonl
