"""The backbones, by ``config.model.name``: a registry of constructors and weight importers.

    from murajax import models
    model = models.create("densenet169", num_outputs=1)    # or models.densenet169(...)
    models.names()                                          # ('densenet121', ..., 'densenet_tiny')
    models.get("densenet169").load_weights(path, variables, model=model)

``registry.py`` owns the seam (``register``, ``get``, ``create``, ``names``) and the shared
creation-time settings (``conv_impl``, ``remat``: 'auto' resolved once, against the backend,
when a model is built). Each backbone is one file holding its architecture only, with its
convolution and normalisation passed in as module factories; the kernels they may use live in
``murajax.ops``. A new backbone is a new file that calls ``registry.register`` plus one import
line below.
"""

from murajax.models.registry import (CONV_IMPLS, REMAT_POLICIES, Backbone, conv_module, create,
                                     get, in_layout, names, register, resolve_conv_impl,
                                     resolve_remat)

# Backbones: importing a module registers its variants.
from murajax.models import densenet  # noqa: E402  (densenet121/161/169/201, densenet_tiny)

from murajax.models.densenet import (BN_MOMENTUM, KERAS_BN_EPSILON, DenseNet,  # noqa: E402
                                     densenet121, densenet161, densenet169, densenet201,
                                     densenet_tiny)

__all__ = [
    "BN_MOMENTUM", "Backbone", "CONV_IMPLS", "DenseNet", "KERAS_BN_EPSILON", "REMAT_POLICIES",
    "conv_module", "create", "densenet", "densenet121", "densenet161", "densenet169",
    "densenet201", "densenet_tiny", "get", "in_layout", "names", "register", "resolve_conv_impl",
    "resolve_remat",
]
