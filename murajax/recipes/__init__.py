"""The recipe seam: how a batch's model outputs become the loss that training minimises.

A recipe is a ``Recipe``: pure functions of the step's float32 logits, the batch and the train
state (whose PRNG key and step give any randomness a recipe needs). ``config.loss.name``
selects one from ``RECIPES``; the choice is a static field of the train state, so
``steps.train_step`` stays ``(state, batch) -> (state, metrics)`` whatever the recipe.
``weighted_bce``, the MURA paper's loss, is the default and the only recipe today; label
smoothing, mixup, soft or bootstrapped targets and teacher signals are new files here, each
registered with one line below.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax

from murajax.errors import UserError
from murajax.recipes import weighted_bce

# (logits float32 [b, outputs], batch, state) -> float32 [b]: each example's loss, unmasked.
PerExampleLoss = Callable[[jax.Array, dict, object], jax.Array]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What a training run minimises, and what its validation reports.

    ``train_loss`` is what the gradients come from. ``eval_loss`` is the validation loss that
    the plateau rule and the best-checkpoint choice read: the task's plain loss, so that runs
    of different recipes stay comparable.
    """

    name: str
    train_loss: PerExampleLoss
    eval_loss: PerExampleLoss = weighted_bce.per_example_loss


RECIPES = {
    "weighted_bce": Recipe("weighted_bce", train_loss=weighted_bce.per_example_loss),
}
DEFAULT = "weighted_bce"


def get(name: str, field: str = "config.loss.name") -> Recipe:
    """The registered recipe called ``name``; a UserError naming ``field`` otherwise."""
    if name not in RECIPES:
        raise UserError(f"{field}={name!r} is not a known recipe; known: {', '.join(RECIPES)}")
    return RECIPES[name]


def from_config(config) -> Recipe:
    """The recipe ``config.loss.name`` names (configs without a ``loss`` section: the default)."""
    loss = config.get("loss")
    return get(str(loss.name) if loss is not None else DEFAULT)
