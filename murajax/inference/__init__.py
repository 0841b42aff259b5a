"""Inference: predictions for new radiographs, class activation maps and their overlays.

* ``cam``: class activation maps (``class_activation_maps``), colormaps and overlays
  (``overlay``, ``cam_box``, ``load_original``).
* ``predictor``: the ``Predictor`` (a run's best-k ensemble, loaded once; threaded decoding
  ahead of the forward passes), its ``Predictions`` and ``PredictionRow``.

Finding the input images is ``murajax.data.files.find_images``; the ``--mode=predict`` driver
(predictions.csv, errors.csv, CAM overlays) is ``murajax.modes.predict``.
"""

from murajax.inference.cam import as_rgb, cam_box, class_activation_maps, load_original, overlay
from murajax.inference.predictor import (
    DECODE_ERRORS,
    PredictionRow,
    Predictions,
    Predictor,
    describe_unreadable,
    load_preprocessed,
)

__all__ = [
    "DECODE_ERRORS",
    "PredictionRow",
    "Predictions",
    "Predictor",
    "as_rgb",
    "cam_box",
    "class_activation_maps",
    "describe_unreadable",
    "load_original",
    "load_preprocessed",
    "overlay",
]
