"""One file per diffusion method."""

from distill._autoimport import import_all

import_all(__name__, __path__)
