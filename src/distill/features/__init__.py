"""Feature and architecture distillation, the ``features`` plug-in (issue 13, catalogue table F).

``tap.py`` reads named submodules' outputs with forward hooks (``FeatureTap``, partial execution
with ``stop_after``); ``projectors.py`` maps a student's feature shape to a teacher's; ``losses.py``
holds the pure feature losses and similarity measures (hint, cosine, attention transfer, SP,
linear/RBF CKA); ``base.py`` the methods' base (``FeatureDistiller``: taps, projectors in their own
parameter group); ``models.py`` the archs ``convnet``, ``mlpnet``, ``vit``; ``methods/`` one file
per method; ``data/`` its tasks; ``tools/`` research harnesses (not imported here).
Importing the package registers its archs, tasks and methods.
"""

from distill._autoimport import import_all

import_all(__name__, __path__)  # machinery, methods/, data/ (tools/ is a bare package)
from distill.features.base import FeatureDistiller
from distill.features.projectors import make_projector
from distill.features.tap import FeatureTap, default_layers, feature_shapes

__all__ = ["FeatureDistiller", "FeatureTap", "default_layers", "feature_shapes", "make_projector"]
