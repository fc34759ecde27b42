"""The diffusion family's tasks: 2-D mixtures (``ring8``, ``ring8-cond``) and ``digits-diffusion``."""

from distill._autoimport import import_all

import_all(__name__, __path__)
