"""The feature family's tasks and data code. Importing registers every task defined here."""

from distill._autoimport import import_all

import_all(__name__, __path__)
