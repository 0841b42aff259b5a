"""The MURA paper's loss: binary cross-entropy weighted per study type and label.

An abnormal image of study type T weighs w_T1 = |N_T| / (|A_T| + |N_T|) and a normal one
w_T0 = |A_T| / (|A_T| + |N_T|) (``data.mura.class_weights`` computes the table, which the train
state carries as ``loss_weights``). Computed in float32 whatever the model's compute dtype.
"""

import jax
import jax.numpy as jnp


def example_weights(loss_weights: jax.Array, study_type: jax.Array, label: jax.Array) -> jax.Array:
    """w_T1 for abnormal, w_T0 for normal images of study type T; 1 where the type is unknown."""
    known = study_type >= 0
    weights = loss_weights[jnp.where(known, study_type, 0), jnp.clip(label, 0, 1)]
    return jnp.where(known, weights, 1.0)


def weighted_bce(logits: jax.Array, label: jax.Array, weights: jax.Array) -> jax.Array:
    """Per-example -w [y log p + (1-y) log(1-p)], p = sigmoid(logit), in float32."""
    logits = logits.astype(jnp.float32)
    y = label.astype(jnp.float32)
    log_p = jax.nn.log_sigmoid(logits)
    log_not_p = jax.nn.log_sigmoid(-logits)
    return -weights * (y * log_p + (1.0 - y) * log_not_p)


def per_example_loss(logits: jax.Array, batch: dict, state) -> jax.Array:
    """The recipe: one logit per image ([b, 1]) against its binary label."""
    weights = example_weights(state.loss_weights, batch["study_type"], batch["label"])
    return weighted_bce(logits[:, 0], batch["label"], weights)
