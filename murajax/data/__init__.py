"""MURA data: the reader (``mura``), CheXpert's CSVs (``chexpert``), finding image files
(``files``), image decoding (``images``) and Grain pipelines (``pipeline``).

The names below are imported lazily, so ``from murajax.data import images`` does not pull in
Grain (and JAX) when only decoding is needed.
"""

import importlib

_EXPORTS = {
    "STUDY_TYPES": "mura",
    "ImageRecord": "mura",
    "MuraIndex": "mura",
    "class_weights": "mura",
    "index_from_config": "mura",
    "read_split": "mura",
    "study_type_from_path": "mura",
    "find_images": "files",
    "load_image": "images",
    "preprocess": "images",
    "eval_loader": "pipeline",
    "num_eval_batches": "pipeline",
    "steps_per_epoch": "pipeline",
    "train_loader": "pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        module = importlib.import_module(f"murajax.data.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'murajax.data' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
