"""The optimised train step equals a plain formulation of the same training step.

``murajax.models`` computes some convolutions as matmuls (and may fuse BatchNorm with ReLU) for
speed. This test re-states the tiny DenseNet the plain way, from the same parameter tree:
``nn.Conv`` for every convolution, training-mode BatchNorm written out (batch mean and biased
variance, running averages with the model's momentum), ``lax.reduce_window`` pools and
``jnp.concatenate`` dense connectivity; the loss is the paper's weighted binary cross-entropy
written out, averaged over unmasked examples; the update is a plain ``optax.adam`` step. One
``train_step`` of the real (jitted, sharded) step must give the same loss, the same new params,
BatchNorm statistics and Adam moments; for ``block_impl='scan'`` too, whose stacked state is
compared in the per-layer layout (``train_state.relayout``).

Tolerances (float32 on CPU; the two programs sum in different orders):
* loss: relative 1e-5;
* gradients (Adam's first moment / (1 - b1)): absolute 1e-4 x the largest gradient;
* new params: absolute 1e-7 + relative 1e-5, where Adam's first step moves every weight by
  about the learning rate (1e-3 here) times the sign of its gradient, so a wrong gradient sign
  or a missing update shows up 100x above the tolerance. Weights whose gradient is below 1e-4 x
  the largest (where float32 rounding can flip Adam's normalised step) are compared with an
  absolute tolerance of 2 x the learning rate instead;
* BatchNorm running statistics: absolute 1e-5 + relative 1e-5.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import traverse_util

from murajax import parallel, train_state
from murajax.train_state import TrainState
from tests import helpers

LEARNING_RATE = 1e-3


# ------------------------------------------------------------------------------------------
# The plain formulation.


def _conv(x, kernel, stride=1):
    """nn.Conv with the given kernel, 'SAME'-style padding of (k-1)/2, no bias."""
    k = kernel.shape[0]
    pad = (k - 1) // 2
    conv = nn.Conv(kernel.shape[-1], kernel.shape[:2], strides=(stride, stride),
                   padding=((pad, pad), (pad, pad)), use_bias=False)
    return conv.apply({"params": {"kernel": kernel}}, x)


def _batch_norm(x, params, stats, eps, momentum, new_stats, name):
    """Training-mode BatchNorm written out; records the updated running statistics."""
    mean = jnp.mean(x, axis=(0, 1, 2))
    var = jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))  # biased, as flax and Keras use
    y = (x - mean) / jnp.sqrt(var + eps) * params["scale"] + params["bias"]
    new_stats[name] = {
        "mean": momentum * stats["mean"] + (1.0 - momentum) * mean,
        "var": momentum * stats["var"] + (1.0 - momentum) * var,
    }
    return y


def plain_densenet(model, params, batch_stats, images):
    """(logits, new batch_stats): the DenseNet forward pass in training mode, the plain way."""
    eps, momentum = model.bn_epsilon, model.bn_momentum
    new_stats = {}

    def bn_relu(x, path):
        p = params
        s = batch_stats
        for key in path:
            p, s = p[key], s[key]
        return jax.nn.relu(_batch_norm(x, p, s, eps, momentum, new_stats, "/".join(path)))

    x = _conv(images, params["stem_conv"]["kernel"], stride=2)
    x = bn_relu(x, ("stem_bn",))
    x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                              ((0, 0), (1, 1), (1, 1), (0, 0)))
    for block, num_layers in enumerate(model.block_sizes):
        stage = block + 2
        maps = [x]
        for layer in range(num_layers):
            name = f"conv{stage}_block{layer + 1}"
            h = jnp.concatenate(maps, axis=-1)
            h = bn_relu(h, (name, "bottleneck", "norm"))
            h = _conv(h, params[name]["bottleneck"]["conv"]["kernel"])
            h = bn_relu(h, (name, "norm"))
            maps.append(_conv(h, params[name]["conv"]["kernel"]))
        x = jnp.concatenate(maps, axis=-1)
        if block != len(model.block_sizes) - 1:
            name = f"pool{stage}"
            x = bn_relu(x, (name, "norm"))
            x = _conv(x, params[name]["conv"]["kernel"])
            x = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1),
                                      "VALID") / 4.0
    x = bn_relu(x, ("final_bn",))
    pooled = jnp.mean(x, axis=(1, 2))
    logits = pooled @ params["head"]["kernel"] + params["head"]["bias"]
    return logits, traverse_util.unflatten_dict(new_stats, sep="/")


def plain_loss(logits, batch, loss_weights):
    """Mean over unmasked examples of -w [y log p + (1-y) log(1-p)], p = sigmoid(logit)."""
    z = logits[:, 0]
    y = batch["label"].astype(jnp.float32)
    known = batch["study_type"] >= 0
    w = jnp.where(known, loss_weights[jnp.maximum(batch["study_type"], 0), batch["label"]], 1.0)
    p = jax.nn.sigmoid(z)
    per_example = -w * (y * jnp.log(p) + (1.0 - y) * jnp.log(1.0 - p))
    mask = batch["mask"]
    return jnp.sum(per_example * mask) / jnp.sum(mask)


def plain_step(model, state: TrainState, batch):
    """(loss, grads, new params, new batch_stats, new Adam state) of one plain Adam step."""
    tx = optax.adam(LEARNING_RATE, b1=0.9, b2=0.999, eps=1e-8)

    def loss_fn(params):
        logits, new_stats = plain_densenet(model, params, state.batch_stats, batch["image"])
        return plain_loss(logits, batch, state.loss_weights), new_stats

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    opt_state = tx.init(state.params)
    updates, opt_state = tx.update(grads, opt_state, state.params)
    return loss, grads, optax.apply_updates(state.params, updates), new_stats, opt_state


# ------------------------------------------------------------------------------------------
# The comparison.


@pytest.fixture(scope="module", params=["unrolled", "scan"])
def both_steps(request):
    """The plain step on the per-layer variables, and the real step of ``block_impl``, whose
    new state is compared in the per-layer layout (``scan`` stores its layers stacked)."""
    config = helpers.tiny_config(**{"optim.learning_rate": LEARNING_RATE,
                                    "model.block_impl": request.param})
    state = helpers.tiny_state(config)
    model = state.apply_fn.__self__
    batch = helpers.random_batch(8, seed=3, masked=(5,))
    batch["study_type"][2] = -1  # unknown type: weight 1
    batch = {k: jnp.asarray(v) for k, v in batch.items()}

    per_layer = train_state.relayout(model, state, like={})
    plain = jax.jit(lambda s, b: plain_step(model, s, b))(per_layer, batch)

    strategy = parallel.JitStrategy()
    new_state, metrics = strategy.train_step(strategy.place_state(state),
                                             strategy.shard_batch(batch))
    new_state = train_state.relayout(model, jax.device_get(new_state), like={})
    return plain, jax.device_get(new_state), jax.device_get(metrics)


def test_loss_matches_the_plain_formulation(both_steps):
    (loss, *_), _, metrics = both_steps
    assert float(metrics.loss.compute()) == pytest.approx(float(loss), rel=1e-5)
    assert int(metrics.loss.count) == 7


def test_params_and_adam_moments_match_after_one_step(both_steps):
    (_, grads, params, _, opt_state), new_state, _ = both_steps
    flat = traverse_util.flatten_dict
    g_plain = flat(grads)
    g_scale = max(float(np.max(np.abs(g))) for g in g_plain.values())
    # Adam's first moment after one step is (1 - b1) * grad.
    mu = flat(new_state.opt_state.inner_state[0].mu)
    assert mu.keys() == g_plain.keys()
    for key, g in g_plain.items():
        np.testing.assert_allclose(np.asarray(mu[key]) / 0.1, g, rtol=0,
                                   atol=1e-4 * g_scale, err_msg=str(key))

    got, want = flat(new_state.params), flat(params)
    assert got.keys() == want.keys()
    moved = 0
    for key, expected in want.items():
        expected = np.asarray(expected)
        actual = np.asarray(got[key])
        small = np.abs(np.asarray(g_plain[key])) < 1e-4 * g_scale
        np.testing.assert_allclose(actual[~small], expected[~small], rtol=1e-5, atol=1e-7,
                                   err_msg=str(key))
        np.testing.assert_allclose(actual[small], expected[small], rtol=0,
                                   atol=2 * LEARNING_RATE, err_msg=str(key))
        moved += int(np.sum(~small))
    # About 12% of the tiny model's gradient entries are exactly 0 (both steps leave them).
    assert moved > 0.8 * sum(v.size for v in want.values())
    assert int(new_state.step) == 1
    assert int(opt_state[0].count) == int(new_state.opt_state.inner_state[0].count) == 1


def test_batch_statistics_match(both_steps):
    (*_, new_stats, _), new_state, _ = both_steps
    got = traverse_util.flatten_dict(new_state.batch_stats)
    want = traverse_util.flatten_dict(new_stats)
    assert got.keys() == want.keys()
    for key, expected in want.items():
        np.testing.assert_allclose(got[key], expected, rtol=1e-5, atol=1e-5, err_msg=str(key))


def test_xla_and_matmul_convolutions_agree():
    """conv_impl='xla' (nn.Conv everywhere, the GPU/TPU default) and 'matmul' (CPU default)."""
    from murajax import models

    images = jnp.asarray(helpers.random_batch(4, seed=5)["image"])
    xla = models.create("densenet_tiny", conv_impl="xla")
    matmul = models.create("densenet_tiny", conv_impl="matmul")
    variables = jax.jit(xla.init)(jax.random.key(0), images)

    def loss(model, params):
        logits, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                images, train=True, mutable=["batch_stats"])
        return jnp.sum(jnp.square(logits))

    results = [jax.jit(jax.value_and_grad(functools.partial(loss, m)))(variables["params"])
               for m in (xla, matmul)]
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert float(loss_b) == pytest.approx(float(loss_a), rel=1e-4)
    scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(grads_a))
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-4 * scale)
    np.testing.assert_allclose(matmul.apply(variables, images), xla.apply(variables, images),
                               rtol=1e-5, atol=1e-6)
