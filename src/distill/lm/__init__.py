"""Language-model distillation: token losses, tasks (arithmetic, pytext, jsonl), methods, teacher cache, rollouts.

Conventions (causal shift, ``-100`` masks, generalized-JSD β, reduction over the optimizer step,
sparse top-k teacher tail) are fixed in ``docs/conventions.md``, section "Language-model token losses".
Importing the package registers its tasks, archs and methods.
"""

from distill._autoimport import import_all

import_all(__name__, __path__)
