"""Diffusion and flow step distillation, the ``diffusion`` plug-in (issue 14, catalogue table G).

``schedules.py`` (flow, VP-cosine, TrigFlow; ε / x₀ / v / velocity conversions), ``sampling.py``
(CFG, Euler/DDIM, Heun, SDE, multistep consistency samplers), ``models.py`` (denoiser archs, EMA),
``metrics.py`` (MMD, mode precision/coverage, Fréchet distance, diversity, sample grids),
``base.py`` (``DiffusionDistiller``: teacher calls, multi-rate parameter groups), ``losses.py``
(pure objectives), ``methods/`` one file per method, ``data/`` the tasks, ``tools/`` (not imported).
Importing the package registers its archs, tasks and methods.
"""

from distill._autoimport import import_all

import_all(__name__, __path__)
