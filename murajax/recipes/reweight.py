"""Loss-based re-weighting of training examples (``config.reweight``).

The train state keeps each train image's running loss (``TrainState.running_loss``, float32
[number of train images], indexed by the image's position in the split; NaN: not seen yet):
after every step, ``r <- momentum * r + (1 - momentum) * loss`` for the step's real, labelled
examples (the loss itself at first sight). From ``config.reweight.start_epoch`` on, each
example's loss is multiplied by a weight read from the running loss BEFORE this step's update:

* ``small_loss``: examples whose running loss is above the ``quantile`` of the seen running
  losses get ``weight`` (< 1), the others 1: trust the small-loss examples, as MentorNet's
  curriculum (Jiang et al. 2018, "MentorNet: Learning Data-Driven Curriculum for Very Deep
  Neural Networks on Corrupted Labels"), co-teaching's small-loss selection (Han et al. 2018)
  and self-paced learning (Kumar et al. 2010) do;
* ``large_loss``: the seed study's variant, the opposite: examples above the quantile get
  ``weight`` (> 1), hard examples count more.

Examples not seen yet weigh 1. The loss stays a sum over the batch's examples divided by their
number (weights are not renormalised); the logged train loss is the unweighted one.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from murajax.errors import UserError
from murajax.recipes import number_field

MODES = ("none", "small_loss", "large_loss")


@dataclasses.dataclass(frozen=True)
class Reweight:
    """The static settings of a run's re-weighting (a static field of the train state)."""

    mode: str  # 'small_loss' or 'large_loss' ('none' has no Reweight at all)
    quantile: float  # in (0, 1): the running-loss quantile above which the weight applies
    weight: float  # small_loss: in [0, 1); large_loss: > 1
    momentum: float  # in [0, 1): r <- momentum * r + (1 - momentum) * loss
    start_step: int  # the first step whose loss is re-weighted (start_epoch * steps per epoch)


def threshold(running_loss: jax.Array, quantile: float) -> jax.Array:
    """The ``quantile`` of the seen (non-NaN) running losses; NaN when none is seen."""
    return jnp.nanquantile(running_loss, quantile)


def example_weights(running_loss: jax.Array, index: jax.Array, settings: Reweight,
                    step) -> jax.Array:
    """float32 [b]: each example's loss weight. ``index``: the examples' positions in the split
    (-1: padding, weight 1); ``step``: the state's step (before ``settings.start_step``: all 1).
    An example above the threshold (``threshold``) gets ``settings.weight``, else 1; one not
    seen yet (NaN running loss) gets 1. The same rule for both modes: the modes differ in the
    weight they allow (``from_config``)."""
    cut = threshold(running_loss, settings.quantile)
    own = running_loss[jnp.clip(index, 0, running_loss.shape[0] - 1)]
    above = (index >= 0) & ~jnp.isnan(own) & (own > cut)  # NaN cut (none seen): False
    weights = jnp.where(above, jnp.float32(settings.weight), jnp.float32(1.0))
    return jnp.where(jnp.asarray(step) >= settings.start_step, weights, jnp.float32(1.0))


def update_running_loss(running_loss: jax.Array, index: jax.Array, loss: jax.Array,
                        mask: jax.Array, momentum: float) -> jax.Array:
    """``running_loss`` with the entries of ``index`` (where ``mask`` > 0 and index >= 0)
    moved towards ``loss``: ``momentum * r + (1 - momentum) * loss``, or ``loss`` where r is NaN
    (first sight). Others unchanged. ``index``, ``loss``, ``mask``: the whole (global) batch."""
    n = running_loss.shape[0]
    loss = jax.lax.stop_gradient(loss).astype(jnp.float32)
    valid = (mask > 0) & (index >= 0)
    old = running_loss[jnp.clip(index, 0, n - 1)]
    new = jnp.where(jnp.isnan(old), loss, momentum * old + (1.0 - momentum) * loss)
    target = jnp.where(valid, index, n)  # out of bounds: dropped
    return running_loss.at[target].set(new, mode="drop")


def from_config(config, steps_per_epoch: int = 1) -> Reweight | None:
    """``config.reweight`` checked (UserError naming the field), as a ``Reweight``; None when
    its mode is 'none' (or the config has no ``reweight`` section)."""
    section = config.get("reweight")
    if section is None:
        return None
    mode = section.get("mode", "none")
    if mode not in MODES:
        raise UserError(f"config.reweight.mode must be one of {', '.join(MODES)}, got {mode!r}")

    def number(field, default):
        return number_field(section, "reweight", field, default)

    quantile, weight = number("quantile", 0.7), number("weight", 0.1)
    momentum, start_epoch = number("momentum", 0.9), section.get("start_epoch", 1)
    if not 0.0 < quantile < 1.0:
        raise UserError(f"config.reweight.quantile={quantile!r} must be in (0, 1)")
    if not 0.0 <= momentum < 1.0:
        raise UserError(f"config.reweight.momentum={momentum!r} must be in [0, 1)")
    if isinstance(start_epoch, bool) or not isinstance(start_epoch, int) or start_epoch < 0:
        raise UserError(f"config.reweight.start_epoch={start_epoch!r} must be an integer >= 0")
    if mode == "small_loss" and not 0.0 <= weight < 1.0:
        raise UserError(f"config.reweight.weight={weight!r} must be in [0, 1) with "
                        "mode='small_loss' (the high-loss examples are down-weighted)")
    if mode == "large_loss" and not (weight > 1.0 and math.isfinite(weight)):
        raise UserError(f"config.reweight.weight={weight!r} must be > 1 with "
                        "mode='large_loss' (the high-loss examples are up-weighted)")
    if mode == "none":
        return None
    return Reweight(mode=mode, quantile=quantile, weight=weight, momentum=momentum,
                    start_step=int(start_epoch) * int(steps_per_epoch))
