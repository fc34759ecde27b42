"""Feature-distillation methods, one file per method. Importing registers them all."""

from distill._autoimport import import_all

import_all(__name__, __path__)
