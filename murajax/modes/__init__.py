"""Workdir drivers: thin functions behind ``murajax --mode=...`` that read a trained run's
workdir (config, checkpoints), call the library, and write their outputs into it.

* ``evaluate``: ``--mode=evaluate``, the paper's evaluation of a run's best checkpoint(s).
* ``predict``: ``--mode=predict``, a run's ensemble on new radiographs -> predictions.csv,
  errors.csv and CAM overlays.
"""
