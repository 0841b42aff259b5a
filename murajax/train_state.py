"""The training state pytree and how to build it from a config.

``TrainState`` holds everything a step reads or writes: params, BatchNorm statistics, the Adam
state (which carries the current learning rate), the step counter, a PRNG key, the plateau
tracker and the per-study-type loss weights; and, as static fields, the model's apply function
and the training recipe. It is the unit that is sharded, donated and
checkpointed.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import flax.linen as nn
import flax.struct
from flax.training import train_state

from murajax import models, optim, recipes, tasks
from murajax.errors import UserError

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class TrainState(train_state.TrainState):
    batch_stats: Any
    rng: jax.Array
    plateau: optim.PlateauState
    loss_weights: jax.Array  # float32 [num_study_types, 2]: weight of (study type, label)
    # How outputs become the loss (static, like apply_fn: not saved, chosen by config.loss).
    recipe: recipes.Recipe = flax.struct.field(
        pytree_node=False, default=recipes.RECIPES[recipes.DEFAULT])

    @property
    def variables(self) -> dict:
        return {"params": self.params, "batch_stats": self.batch_stats}


def compute_dtype(name: str):
    if name not in _DTYPES:
        raise UserError(f"config.model.dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def model_from_config(config: ml_collections.ConfigDict, *, bn_axis_name: str | None = None):
    """The model ``config.model.name`` selects (``murajax.models`` registry), with as many
    outputs as ``config.task`` needs and the config's numerics settings. Unknown names and bad ``conv_impl``/``remat`` values are
    UserErrors naming the field (checked, and 'auto' resolved, by ``murajax.models``)."""
    model_config = config.model
    return models.create(
        model_config.name,
        num_outputs=tasks.from_config(config).num_outputs,
        dtype=compute_dtype(model_config.dtype),
        remat=model_config.remat,
        bn_momentum=float(model_config.bn_momentum),
        bn_epsilon=float(model_config.bn_epsilon),
        bn_axis_name=bn_axis_name,
        conv_impl=str(model_config.get("conv_impl", "auto")),
    )


def create_train_state(
    rng: jax.Array,
    model: nn.Module,
    tx,
    image_size: int,
    loss_weights: np.ndarray,
    recipe: recipes.Recipe | None = None,
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
        recipe=recipe or recipes.RECIPES[recipes.DEFAULT],
    )
