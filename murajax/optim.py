"""The optimizer: optax Adam whose learning rate drops when validation loss plateaus; with
``config.optim.trainable='head'``, Adam on the classifier head only (``create_optimizer``,
``head_only_apply``: the backbone frozen, run as at evaluation).

The rate Adam applies lives in one place, ``opt_state.hyperparams['learning_rate']``
(``optax.inject_hyperparams``), so it is checkpointed with the rest of the state. The plateau rule
is a pure function of a small pytree (``PlateauState``) and one epoch's validation loss; it follows
PyTorch's ``ReduceLROnPlateau`` in 'min' mode with a relative threshold: a drop happens once more
than ``patience`` consecutive epochs failed to improve on the best loss by ``threshold`` (relative),
outside the ``cooldown`` epochs that follow a drop. With patience 0 (the paper's recipe) every epoch
that does not improve divides the rate by 10.

Linear warm-up (``config.optim.warmup_steps``, or ``warmup_epochs`` resolved from the steps per
epoch; 0, the default: off, and the optimizer is exactly the paper's): the injected Adam chained
with ``optax.scale_by_schedule``, which multiplies each update by ``min(1, (count + 1) / warmup)``
on top of the plateau-controlled rate. Its ``count`` is part of the optimizer state, so the
warm-up position is checkpointed and a resumed run continues it exactly.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from murajax.errors import UserError


TRAINABLE = ("all", "head")  # config.optim.trainable
HEAD = "head"  # the top-level params collection of the classifier head (every backbone's)


def trainable_from_config(optim_config: ml_collections.ConfigDict) -> str:
    """``config.optim.trainable`` checked: 'all' (the paper; runs saved before the field
    existed) or 'head'; a UserError naming the field otherwise."""
    trainable = optim_config.get("trainable", "all")
    if trainable not in TRAINABLE:
        raise UserError(f"config.optim.trainable must be one of {list(TRAINABLE)} ('head': "
                        f"train the classifier head only, the backbone frozen), got "
                        f"{trainable!r}")
    return trainable


def warmup_steps_from_config(optim_config: ml_collections.ConfigDict,
                             steps_per_epoch: int | None = None) -> int:
    """The warm-up length in steps (0: none): ``config.optim.warmup_steps``, or
    ``warmup_epochs`` times ``steps_per_epoch`` (rounded, at least 1); configs saved before the
    fields existed have none. A UserError naming the field for a negative value or both set."""
    steps = optim_config.get("warmup_steps", 0)
    epochs = optim_config.get("warmup_epochs", 0.0)
    if steps < 0 or epochs < 0:
        raise UserError(f"config.optim.warmup_steps and warmup_epochs must be >= 0 (0: no "
                        f"warm-up), got warmup_steps={steps}, warmup_epochs={epochs}")
    if steps and epochs:
        raise UserError(f"config.optim.warmup_steps={steps} and warmup_epochs={epochs} are both "
                        "set: give the warm-up in one of them, the other 0")
    if not epochs:
        return int(steps)
    if steps_per_epoch is None:
        raise ValueError("config.optim.warmup_epochs needs the number of steps per epoch")
    return max(1, round(epochs * steps_per_epoch))


def has_warmup(optim_config: ml_collections.ConfigDict) -> bool:
    """Whether the optimizer state holds a warm-up position (its structure depends on it)."""
    return warmup_steps_from_config(optim_config, steps_per_epoch=1) > 0


def create_optimizer(optim_config: ml_collections.ConfigDict,
                     steps_per_epoch: int | None = None) -> optax.GradientTransformation:
    """Adam with an injectable learning rate (the plateau rule rewrites it between epochs).

    ``config.optim.trainable='head'``: the same Adam on the head's params only, every other
    param's update set to zero (``optax.multi_transform``, inside the same
    ``inject_hyperparams``, so ``opt_state.hyperparams['learning_rate']`` stays where the
    plateau rule reads and writes it). 'all' (the default) is exactly the optimizer, state
    structure and numbers of before the field existed.

    With a warm-up (``warmup_steps_from_config``; ``steps_per_epoch`` resolves
    ``warmup_epochs``) that optimizer is chained with a linear ``scale_by_schedule``."""
    adam = _injected_adam(optim_config)
    warmup = warmup_steps_from_config(optim_config, steps_per_epoch)
    if not warmup:
        return adam
    return optax.chain(adam, optax.scale_by_schedule(functools.partial(
        _warmup_factor, warmup=warmup)))


def _warmup_factor(count, warmup: int):
    return jnp.minimum(1.0, (count + 1).astype(jnp.float32) / warmup)


def _injected_adam(optim_config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    if trainable_from_config(optim_config) == "all":
        return optax.inject_hyperparams(optax.adam)(
            learning_rate=optim_config.learning_rate,
            b1=optim_config.b1,
            b2=optim_config.b2,
            eps=optim_config.eps,
        )

    def head_only_adam(learning_rate, b1, b2, eps):
        return optax.multi_transform(
            {"train": optax.adam(learning_rate, b1=b1, b2=b2, eps=eps),
             "frozen": optax.set_to_zero()},
            head_only_labels)

    return optax.inject_hyperparams(head_only_adam)(
        learning_rate=optim_config.learning_rate,
        b1=optim_config.b1,
        b2=optim_config.b2,
        eps=optim_config.eps,
    )


def head_only_labels(params):
    """``multi_transform`` labels for ``trainable='head'``: 'train' for every leaf under the
    top-level ``head`` collection, 'frozen' for the rest (same tree structure as ``params``)."""
    if not isinstance(params, Mapping) or HEAD not in params:
        names = list(params) if isinstance(params, Mapping) else type(params).__name__
        raise UserError(f"config.optim.trainable='head' needs a model whose classifier params "
                        f"are under {HEAD!r}; this model's top-level params are {names}")
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "train" if getattr(path[0], "key", None) == HEAD else "frozen", params)


def head_only_apply(apply_fn):
    """The model's apply function for ``trainable='head'``: the frozen backbone always runs as
    at evaluation (BatchNorm normalises with, and never updates, its running statistics), so
    the head is fitted on exactly the features it will see at evaluation and a head-only run
    changes no backbone weight *and* no BatchNorm statistic. The train step's
    ``mutable=['batch_stats']`` call gets the statistics back unchanged."""
    # A named function, not a closure: one per apply_fn (functools.cache), so that the states
    # built for one run share it (it is a static field of the train state).
    return _head_only_apply(apply_fn)


@functools.cache
def _head_only_apply(apply_fn):
    @functools.wraps(apply_fn)
    def apply(variables, *args, train: bool = False, mutable=False, **kwargs):
        del train  # always evaluation mode
        outputs = apply_fn(variables, *args, train=False, **kwargs)
        if mutable:
            return outputs, {"batch_stats": variables["batch_stats"]}
        return outputs

    return apply


def _injected_state(opt_state):
    """The ``inject_hyperparams`` state: ``opt_state`` itself, or the first of the warm-up
    chain's states."""
    return opt_state if hasattr(opt_state, "hyperparams") else opt_state[0]


def learning_rate(opt_state) -> jnp.ndarray:
    """The plateau-controlled rate (the one the plateau rule reads and writes); the next
    update applies it times the warm-up factor (``applied_learning_rate``)."""
    return _injected_state(opt_state).hyperparams["learning_rate"]


def applied_learning_rate(opt_state, optim_config: ml_collections.ConfigDict,
                          steps_per_epoch: int | None = None) -> jnp.ndarray:
    """The rate the next update will apply: ``learning_rate`` times the warm-up factor."""
    rate = learning_rate(opt_state)
    warmup = warmup_steps_from_config(optim_config, steps_per_epoch)
    if not warmup or hasattr(opt_state, "hyperparams"):
        return rate
    return rate * _warmup_factor(opt_state[1].count, warmup)


def with_learning_rate(opt_state, rate):
    """A copy of ``opt_state`` whose next updates use ``rate`` (times any warm-up factor)."""
    injected = _injected_state(opt_state)
    hyperparams = dict(injected.hyperparams)
    hyperparams["learning_rate"] = jnp.asarray(rate, dtype=hyperparams["learning_rate"].dtype)
    injected = injected._replace(hyperparams=hyperparams)
    if hasattr(opt_state, "hyperparams"):
        return injected
    return (injected, *opt_state[1:])


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
