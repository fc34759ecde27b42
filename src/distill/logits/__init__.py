"""Logit-level distillation for classifiers: pure losses (``losses.py``), one file per method
(``methods/``), the kernel-ridge theory of self-distillation (``theory.py``). Importing registers the methods."""

from distill._autoimport import import_all

import_all(__name__, __path__)
