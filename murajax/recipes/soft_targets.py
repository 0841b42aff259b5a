"""Losses for labels that may be wrong: label smoothing, focal, generalised cross-entropy and
bootstrapped targets, each weighted per study type and label like the paper's loss.

Every loss here is a frozen dataclass called as ``loss(logits, batch, state)`` (the recipe
interface, ``murajax.recipes``), holding its hyperparameters as fields so that two recipes
built from the same config compare equal (the recipe is a static field of the train state).
The per-example weight is the paper's w_T0/w_T1 of the *given* label. Label smoothing
(``smoothing`` = a) first turns the given label y into y (1 - a) + a / 2, for every loss. A
batch that ``recipes.mixup`` mixed brings its own soft ``target`` and ``loss_weight``.

* ``focal`` (Lin et al. 2017, "Focal loss for dense object detection"): optax's
  ``sigmoid_focal_loss``, cross-entropy scaled by (1 - p_t)^gamma: confident examples count less.
* ``gce`` (Zhang & Sabuncu 2018, "Generalized cross entropy loss for training deep neural
  networks with noisy labels"): (1 - p_y^q) / q, between cross-entropy (q -> 0) and the
  noise-robust mean absolute error (q = 1); with a soft target t it is the t-weighted mix of the
  two classes' terms.
* ``bootstrap`` (Reed et al. 2015, "Training deep neural networks on noisy labels with
  bootstrapping"): cross-entropy against beta y + (1 - beta) z, where z is the model's own
  prediction, its probability (``soft``) or its 0/1 decision (``hard``). z is held fixed
  (``stop_gradient``): the model is pulled towards its own belief, not allowed to move it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from murajax.recipes.weighted_bce import example_weights, weighted_bce


def smooth(label: jax.Array, smoothing: float) -> jax.Array:
    """y (1 - a) + a / 2: a hard binary label moved towards 1/2 by ``smoothing``."""
    return label.astype(jnp.float32) * (1.0 - smoothing) + 0.5 * smoothing


@dataclasses.dataclass(frozen=True)
class _TargetLoss:
    """Shared by the losses below: the paper's weights and the smoothed given label."""

    smoothing: float = 0.0

    def __call__(self, logits: jax.Array, batch: dict, state) -> jax.Array:
        # A mixed batch (recipes.mixup) carries its blended targets and weights.
        weights = batch.get("loss_weight")
        if weights is None:
            weights = example_weights(state.loss_weights, batch["study_type"], batch["label"])
        logit = logits[:, 0].astype(jnp.float32)
        target = batch.get("target", batch["label"])
        return weights * self.unweighted(logit, smooth(target, self.smoothing))

    def unweighted(self, logit: jax.Array, target: jax.Array) -> jax.Array:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class SmoothedBCE(_TargetLoss):
    """The paper's weighted cross-entropy against the smoothed label."""

    def unweighted(self, logit, target):
        return weighted_bce(logit, target, 1.0)


@dataclasses.dataclass(frozen=True)
class Focal(_TargetLoss):
    gamma: float = 2.0
    alpha: float | None = None  # optax's class balance; None: the paper's weights alone

    def unweighted(self, logit, target):
        return optax.sigmoid_focal_loss(logit, target, alpha=self.alpha, gamma=self.gamma)


@dataclasses.dataclass(frozen=True)
class GeneralisedCrossEntropy(_TargetLoss):
    q: float = 0.7

    def unweighted(self, logit, target):
        # p^q = exp(q log p), from log_sigmoid for stability at large |logit|.
        p_q = jnp.exp(self.q * jax.nn.log_sigmoid(logit))
        not_p_q = jnp.exp(self.q * jax.nn.log_sigmoid(-logit))
        return (target * (1.0 - p_q) + (1.0 - target) * (1.0 - not_p_q)) / self.q


@dataclasses.dataclass(frozen=True)
class Bootstrap(_TargetLoss):
    beta: float = 0.95
    hard: bool = False

    def unweighted(self, logit, target):
        belief = (logit > 0).astype(jnp.float32) if self.hard else jax.nn.sigmoid(logit)
        bootstrapped = self.beta * target + (1.0 - self.beta) * jax.lax.stop_gradient(belief)
        return weighted_bce(logit, bootstrapped, 1.0)
