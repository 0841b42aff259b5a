"""The recipe seam: how a batch's model outputs become the loss that training minimises.

A recipe is a ``Recipe``: pure functions of the step's float32 logits, the batch and the train
state (whose PRNG key and step give any randomness a recipe needs). ``config.loss.name``
selects a builder from ``RECIPES``, which reads its hyperparameters from ``config.loss``; the
recipe is a static field of the train state, so ``steps.train_step`` stays
``(state, batch) -> (state, metrics)`` whatever the recipe. ``weighted_bce``, the MURA paper's
loss, is the default; ``soft_targets`` holds losses for labels that may be wrong, and
``config.mixup`` adds mixup/CutMix (``mixup``) to any of them. A new recipe is a file here plus
one line in ``RECIPES``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax

from murajax.errors import UserError
from murajax.recipes import mixup, soft_targets, weighted_bce

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
    # (batch, key, state) -> batch, applied to training batches before the forward pass
    # (mixup, CutMix); None: the batch as the loader made it.
    prepare: Callable[[dict, jax.Array, object], dict] | None = None


def _weighted_bce(loss) -> Recipe:
    if loss.label_smoothing:
        return Recipe("weighted_bce", soft_targets.SmoothedBCE(smoothing=loss.label_smoothing))
    return DEFAULT_RECIPE  # exactly the paper's loss, as before label smoothing existed


RECIPES: dict[str, Callable[..., Recipe]] = {
    "weighted_bce": _weighted_bce,
    "focal": lambda loss: Recipe("focal", soft_targets.Focal(
        smoothing=loss.label_smoothing, gamma=loss.focal_gamma,
        alpha=loss.focal_alpha if loss.focal_alpha > 0 else None)),
    "gce": lambda loss: Recipe("gce", soft_targets.GeneralisedCrossEntropy(
        smoothing=loss.label_smoothing, q=loss.gce_q)),
    "bootstrap": lambda loss: Recipe("bootstrap", soft_targets.Bootstrap(
        smoothing=loss.label_smoothing, beta=loss.bootstrap_beta,
        hard=_bootstrap_mode(loss.bootstrap_mode) == "hard")),
}
DEFAULT = "weighted_bce"
DEFAULT_RECIPE = Recipe("weighted_bce", train_loss=weighted_bce.per_example_loss)


def number_field(section, section_name: str, field: str, default, *,
                 finite: bool = False) -> float:
    """``config.<section_name>.<field>`` of a recipe's ``section`` as a float (``default`` when
    absent); a UserError naming the field if it is not a number, is NaN or, with ``finite``,
    infinite. Ranges are the caller's to check."""
    value = section.get(field, default)
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise UserError(f"config.{section_name}.{field} must be a number, got {value!r}") from None
    if finite and not math.isfinite(value):
        raise UserError(f"config.{section_name}.{field} must be a finite number, got {value!r}")
    if math.isnan(value):
        raise UserError(f"config.{section_name}.{field} must be a number, got nan")
    return value


def _bootstrap_mode(mode: str) -> str:
    if mode not in ("soft", "hard"):
        raise UserError(f"config.loss.bootstrap_mode must be 'soft' or 'hard', got {mode!r}")
    return mode


def _check(loss) -> None:
    checks = {
        "label_smoothing": (0.0 <= loss.label_smoothing < 1.0, "in [0, 1)"),
        "focal_gamma": (loss.focal_gamma >= 0.0, ">= 0"),
        "focal_alpha": (0.0 <= loss.focal_alpha < 1.0, "in [0, 1) (0: no class balance)"),
        "gce_q": (0.0 < loss.gce_q <= 1.0, "in (0, 1]"),
        "bootstrap_beta": (0.0 <= loss.bootstrap_beta <= 1.0, "in [0, 1]"),
    }
    for field, (ok, allowed) in checks.items():
        if not ok:
            raise UserError(f"config.loss.{field}={loss[field]!r} must be {allowed}")


def _with_soft_targets(recipe: Recipe) -> Recipe:
    """``recipe`` with a train loss that reads a batch's soft ``target`` and ``loss_weight``
    (the paper's loss becomes the same loss written for soft targets)."""
    if recipe.train_loss is weighted_bce.per_example_loss:
        return dataclasses.replace(recipe, train_loss=soft_targets.SmoothedBCE(smoothing=0.0))
    return recipe


def from_config(config) -> Recipe:
    """The recipe ``config.loss`` describes (a config without a ``loss`` section: the paper's)."""
    loss = config.get("loss")
    if loss is None:
        return DEFAULT_RECIPE
    name = str(loss.name)
    if name not in RECIPES:
        raise UserError(f"config.loss.name={name!r} is not a known recipe; known: "
                        f"{', '.join(RECIPES)}")
    _check(loss)
    recipe = RECIPES[name](loss)
    teacher = config.get("teacher")
    if teacher is not None and bool(teacher.get("enabled", False)):
        recipe = _with_soft_targets(recipe)  # the teacher's merged targets may be soft
    mixing = config.get("mixup")
    if mixing is not None and (mixing.alpha > 0 or mixing.cutmix_alpha > 0):
        if not 0.0 < mixing.prob <= 1.0:
            raise UserError(f"config.mixup.prob={mixing.prob!r} must be in (0, 1]")
        if mixing.alpha < 0 or mixing.cutmix_alpha < 0:
            raise UserError("config.mixup.alpha and config.mixup.cutmix_alpha must be >= 0")
        recipe = dataclasses.replace(_with_soft_targets(recipe), prepare=mixup.Mixup(
            alpha=float(mixing.alpha), cutmix_alpha=float(mixing.cutmix_alpha),
            prob=float(mixing.prob)))
    return recipe
