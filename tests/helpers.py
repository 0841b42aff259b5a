"""Small builders shared by the tests: a tiny state and random MURA-shaped batches."""

import jax
import numpy as np

from configs import smoke
from murajax import optim, train_state

IMAGE_SIZE = 32


def tiny_config(**overrides):
    config = smoke.get_config()
    config.data.image_size = IMAGE_SIZE
    for dotted, value in overrides.items():
        section = config
        *parents, leaf = dotted.split(".")
        for parent in parents:
            section = section[parent]
        section[leaf] = value
    return config


def loss_weights():
    rng = np.random.default_rng(1)
    w1 = rng.uniform(0.3, 0.7, size=7)
    return np.stack([1.0 - w1, w1], axis=1).astype(np.float32)  # [type, label]


def tiny_state(config=None, bn_axis_name=None, seed=0):
    config = config or tiny_config()
    model = train_state.create_model(config, bn_axis_name=bn_axis_name)
    tx = optim.create_optimizer(config.optim)
    return train_state.create_train_state(
        jax.random.key(seed), model, tx, config.data.image_size, loss_weights()
    )


def random_batch(batch_size, seed=0, image_size=IMAGE_SIZE, masked=()):
    rng = np.random.default_rng(seed)
    mask = np.ones(batch_size, np.float32)
    mask[list(masked)] = 0.0
    return {
        "image": rng.normal(size=(batch_size, image_size, image_size, 3)).astype(np.float32),
        "label": rng.integers(0, 2, batch_size).astype(np.int32),
        "study_type": rng.integers(0, 7, batch_size).astype(np.int32),
        "mask": mask,
        "index": np.arange(batch_size, dtype=np.int32),
    }


# Adam moves each weight by about lr * g / (|g| + eps). With the default eps (1e-8), a gradient
# that is almost exactly zero, computed with its sums split differently across devices, can
# flip sign in its last bits and move that weight by a whole step. Tests that compare device
# layouts use this eps so they check the collectives rather than that amplification.
LAYOUT_TEST_EPS = 1e-4


def assert_params_close(actual, expected, learning_rate, num_steps):
    """Params of two runs that differ only in float32 summation order.

    At least 99.9% of the weights agree to 1% of a step per step; none is further apart than
    the sign flips described above could make it (2 steps per step).
    """
    a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(actual)])
    b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(expected)])
    assert a.shape == b.shape
    difference = np.abs(a - b)
    assert difference.max() <= 2 * learning_rate * num_steps, difference.max()
    close = np.mean(difference <= 0.01 * learning_rate * num_steps)
    assert close >= 0.999, f"only {close:.4%} of the weights agree to 1% of a step"


def assert_batch_stats_close(actual, expected):
    """Running variances are E[x^2] - E[x]^2 over the batch: the subtraction cancels digits."""
    for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-6)
