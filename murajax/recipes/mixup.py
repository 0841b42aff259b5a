"""Mixup and CutMix inside the jitted step: each example is blended with a partner.

Mixup (Zhang et al. 2018, "mixup: Beyond empirical risk minimization") blends whole images,
x = lam x_i + (1 - lam) x_j; CutMix (Yun et al. 2019, "CutMix") pastes a box of x_j into x_i,
and lam is the share of x_i left. The targets and the paper's per-example loss weights are
mixed with the same lam. One lam per batch, drawn from Beta(alpha, alpha), from the step's
PRNG key (deterministic, resumable). Partners are real, labelled examples only: a padded or
skipped example (mask 0) or an unlabelled one (label -1) never mixes into another, and is left
as it is.

Under ``pmap`` each device mixes within its own share of the batch; under ``jit`` partners
come from the whole global batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from murajax.recipes.weighted_bce import example_weights


def _mixable(batch: dict) -> jax.Array:
    """Real, labelled examples: the only ones that mix (and are mixed into)."""
    return (batch["mask"] > 0) & (batch["label"] >= 0)


def real_partners(key: jax.Array, mask: jax.Array) -> jax.Array:
    """For each example, the index of its partner: the real examples (mask > 0) in a random
    cycle (each real one's partner is another real one when there are two or more); padding
    partners itself."""
    b = mask.shape[0]
    real = mask > 0
    # Real examples first, in random order; then the padding.
    order = jnp.argsort(jnp.where(real, jax.random.uniform(key, (b,)), 2.0))
    n_real = jnp.maximum(jnp.sum(real), 1)
    k = jnp.arange(b)
    successor = jnp.where(k < n_real, order[(k + 1) % n_real], order)
    return jnp.zeros(b, jnp.int32).at[order].set(successor.astype(jnp.int32))


def box_mask(key: jax.Array, height: int, width: int, lam: jax.Array) -> tuple[jax.Array, jax.Array]:
    """CutMix's box: 1 inside a random box covering about 1 - lam of the image, 0 elsewhere
    ([H, W, 1] float32), and the lam the box actually leaves (its clipped area)."""
    cut = jnp.sqrt(1.0 - lam)
    box_h, box_w = jnp.round(height * cut), jnp.round(width * cut)
    ky, kx = jax.random.split(key)
    cy = jax.random.uniform(ky, (), maxval=height)
    cx = jax.random.uniform(kx, (), maxval=width)
    y0, y1 = jnp.clip(cy - box_h / 2, 0, height), jnp.clip(cy + box_h / 2, 0, height)
    x0, x1 = jnp.clip(cx - box_w / 2, 0, width), jnp.clip(cx + box_w / 2, 0, width)
    ys = jnp.arange(height, dtype=jnp.float32)[:, None]
    xs = jnp.arange(width, dtype=jnp.float32)[None, :]
    inside = ((ys >= jnp.floor(y0)) & (ys < jnp.floor(y1)) &
              (xs >= jnp.floor(x0)) & (xs < jnp.floor(x1))).astype(jnp.float32)
    return inside[..., None], 1.0 - jnp.mean(inside)


def mix(batch: dict, partner: jax.Array, lam: jax.Array, paste: jax.Array | None,
        loss_weights: jax.Array) -> dict:
    """``batch`` with images, targets and loss weights mixed with ``partner``'s by ``lam``:
    blended (``paste`` None) or with ``partner``'s pixels where ``paste`` is 1 (CutMix)."""
    mask = _mixable(batch)
    keep = jnp.where(mask, lam, 1.0)  # padding and unlabelled examples keep themselves whole
    image = batch["image"]
    other = image[partner]
    if paste is None:
        k = keep.reshape((-1, 1, 1, 1)).astype(image.dtype)
        mixed = k * image + (1 - k) * other
    else:
        where = paste[None] * jnp.where(mask, 1.0, 0.0).reshape((-1, 1, 1, 1))
        mixed = jnp.where(where > 0, other, image)
    target = batch.get("target", batch["label"].astype(jnp.float32))
    weight = batch.get("loss_weight",
                       example_weights(loss_weights, batch["study_type"], batch["label"]))
    return {**batch, "image": mixed,
            "target": keep * target + (1 - keep) * target[partner],
            "loss_weight": keep * weight + (1 - keep) * weight[partner]}


@dataclasses.dataclass(frozen=True)
class Mixup:
    """A recipe's ``prepare``: mixup (``alpha`` > 0), CutMix (``cutmix_alpha`` > 0) or, with
    both, one of the two at random per batch; applied to a batch with probability ``prob``."""

    alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0

    def __call__(self, batch: dict, key: jax.Array, state) -> dict:
        k_apply, k_choice, k_lam, k_partner, k_box = jax.random.split(key, 5)
        partner = real_partners(k_partner, _mixable(batch).astype(jnp.float32))
        use_cutmix = (jax.random.bernoulli(k_choice, 0.5) if self.alpha and self.cutmix_alpha
                      else jnp.asarray(self.cutmix_alpha > 0))
        a = jnp.where(use_cutmix, self.cutmix_alpha or 1.0, self.alpha or 1.0)
        lam = jax.random.beta(k_lam, a, a)
        lam = jnp.where(jax.random.bernoulli(k_apply, self.prob), lam, 1.0)
        blended = mix(batch, partner, lam, None, state.loss_weights)
        if not self.cutmix_alpha:
            return blended
        _, height, width, _ = batch["image"].shape
        paste, box_lam = box_mask(k_box, height, width, lam)
        pasted = mix(batch, partner, box_lam, paste, state.loss_weights)
        return jax.tree.map(lambda c, m: jnp.where(use_cutmix, c, m), pasted, blended)
