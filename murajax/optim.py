"""The optimizer: optax Adam whose learning rate drops when validation loss plateaus.

The rate Adam applies lives in one place, ``opt_state.hyperparams['learning_rate']``
(``optax.inject_hyperparams``), so it is checkpointed with the rest of the state. The plateau rule
is a pure function of a small pytree (``PlateauState``) and one epoch's validation loss; it follows
PyTorch's ``ReduceLROnPlateau`` in 'min' mode with a relative threshold: a drop happens once more
than ``patience`` consecutive epochs failed to improve on the best loss by ``threshold`` (relative),
outside the ``cooldown`` epochs that follow a drop. With patience 0 (the paper's recipe) every epoch
that does not improve divides the rate by 10.
"""

from __future__ import annotations

import flax.struct
import jax.numpy as jnp
import ml_collections
import optax


def create_optimizer(optim_config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Adam with an injectable learning rate (the plateau rule rewrites it between epochs)."""
    return optax.inject_hyperparams(optax.adam)(
        learning_rate=optim_config.learning_rate,
        b1=optim_config.b1,
        b2=optim_config.b2,
        eps=optim_config.eps,
    )


def learning_rate(opt_state) -> jnp.ndarray:
    """The rate the next update will use."""
    return opt_state.hyperparams["learning_rate"]


def with_learning_rate(opt_state, rate):
    """A copy of ``opt_state`` whose next updates use ``rate``."""
    hyperparams = dict(opt_state.hyperparams)
    hyperparams["learning_rate"] = jnp.asarray(rate, dtype=hyperparams["learning_rate"].dtype)
    return opt_state._replace(hyperparams=hyperparams)


@flax.struct.dataclass
class PlateauState:
    best_loss: jnp.ndarray  # lowest validation loss seen so far (inf before the first epoch)
    bad_epochs: jnp.ndarray  # consecutive epochs without improvement
    cooldown_left: jnp.ndarray  # epochs during which no drop may happen
    num_drops: jnp.ndarray


def init_plateau() -> PlateauState:
    return PlateauState(
        best_loss=jnp.asarray(jnp.inf, jnp.float32),
        bad_epochs=jnp.asarray(0, jnp.int32),
        cooldown_left=jnp.asarray(0, jnp.int32),
        num_drops=jnp.asarray(0, jnp.int32),
    )


def plateau_step(
    plateau: PlateauState,
    rate: jnp.ndarray,
    val_loss: jnp.ndarray,
    optim_config: ml_collections.ConfigDict,
) -> tuple[PlateauState, jnp.ndarray]:
    """One epoch of the plateau rule: returns the new tracker and the rate for the next epoch."""
    val_loss = jnp.asarray(val_loss, jnp.float32)
    improved = val_loss < plateau.best_loss * (1.0 - optim_config.plateau_threshold)
    best_loss = jnp.where(improved, val_loss, plateau.best_loss)
    bad_epochs = jnp.where(improved, 0, plateau.bad_epochs + 1)
    in_cooldown = plateau.cooldown_left > 0
    cooldown_left = jnp.maximum(plateau.cooldown_left - 1, 0)
    bad_epochs = jnp.where(in_cooldown, 0, bad_epochs)

    reduced = jnp.maximum(rate * optim_config.plateau_factor, optim_config.min_learning_rate)
    # A drop that would not lower the rate (already at the floor) is not a drop.
    drop = (bad_epochs > optim_config.plateau_patience) & (reduced < rate)
    new_rate = jnp.where(drop, reduced, rate).astype(jnp.asarray(rate).dtype)
    new_plateau = PlateauState(
        best_loss=best_loss,
        bad_epochs=jnp.where(drop, 0, bad_epochs).astype(jnp.int32),
        cooldown_left=jnp.where(drop, optim_config.plateau_cooldown, cooldown_left).astype(jnp.int32),
        num_drops=plateau.num_drops + drop.astype(jnp.int32),
    )
    return new_plateau, new_rate
