"""``param``: a Flax module's parameter, without Flax's shape check that re-traces its
initialiser at every apply.

``Module.param`` of an existing parameter runs ``jax.eval_shape`` on the initialiser, only to
compare the result's shape with the stored one: 0.65 ms for ``ones`` and 10.8 ms for a
kaiming-normal kernel on this CPU, once per parameter per trace (DenseNet-169 has 846, about
1.5 s of each train-step trace). ``param`` makes the same check with the shape it is given and
creates the parameter with ``Module.param`` as usual.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
from flax import errors
from flax import linen as nn


def param(module: nn.Module, name: str, init: Callable, shape: Sequence[int], dtype: Any):
    """``module.param(name, init, shape, dtype)``; an existing parameter of another shape
    raises Flax's own ``ScopeParamShapeError``."""
    shape = tuple(int(s) for s in shape)
    if module.has_variable("params", name):
        value = module.get_variable("params", name)
        if np.shape(value) != shape:
            raise errors.ScopeParamShapeError(name, module.scope.path_text, np.shape(value),
                                              shape)
        return value
    return module.param(name, init, shape, dtype)
