"""The training state pytree and how to build it from a config.

``TrainState`` holds everything a step reads or writes: params, BatchNorm statistics, the Adam
state (which carries the current learning rate), the step counter, a PRNG key, the plateau
tracker and the per-study-type loss weights. It is the unit that is sharded, donated and
checkpointed.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax.training import train_state

from murajax import models, optim
from murajax.errors import UserError

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class TrainState(train_state.TrainState):
    batch_stats: Any
    rng: jax.Array
    plateau: optim.PlateauState
    loss_weights: jax.Array  # float32 [num_study_types, 2]: weight of (study type, label)

    @property
    def variables(self) -> dict:
        return {"params": self.params, "batch_stats": self.batch_stats}


def compute_dtype(name: str):
    if name not in _DTYPES:
        raise UserError(f"config.model.dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def create_model(config: ml_collections.ConfigDict, *, bn_axis_name: str | None = None):
    """The DenseNet the config names, with its numerics settings."""
    model_config = config.model
    conv_impl = str(model_config.get("conv_impl", "auto"))
    if conv_impl not in models.CONV_IMPLS:
        raise UserError(f"config.model.conv_impl must be one of {list(models.CONV_IMPLS)}, "
                        f"got {conv_impl!r}")
    try:
        remat = models.remat_policy(model_config.remat)
    except ValueError:
        raise UserError(f"config.model.remat must be one of {list(models.REMAT_POLICIES)}, "
                        f"got {model_config.remat!r}") from None
    try:
        return models.create_model(
            model_config.name,
            dtype=compute_dtype(model_config.dtype),
            remat=remat,
            bn_momentum=float(model_config.bn_momentum),
            bn_epsilon=float(model_config.bn_epsilon),
            bn_axis_name=bn_axis_name,
            conv_impl=conv_impl,
        )
    except ValueError as e:
        raise UserError(f"config.model.name: {e}") from None


def create_train_state(
    rng: jax.Array,
    model: models.DenseNet,
    tx,
    image_size: int,
    loss_weights: np.ndarray,
) -> TrainState:
    """Initialises a fresh state. Pure: meant to run under ``jax.jit`` or ``jax.eval_shape``."""
    init_rng, state_rng = jax.random.split(rng)
    dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    variables = model.init(init_rng, dummy, train=False)
    params = variables["params"]
    return TrainState(
        step=jnp.asarray(0, jnp.int32),
        apply_fn=model.apply,
        params=params,
        tx=tx,
        opt_state=tx.init(params),
        batch_stats=variables["batch_stats"],
        rng=state_rng,
        plateau=optim.init_plateau(),
        loss_weights=jnp.asarray(loss_weights, jnp.float32),
    )
