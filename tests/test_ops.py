"""The speed-only kernels of murajax.ops equal the plain formulation (values and gradients).

Tolerances: float32, the two formulations sum in different orders; errors are compared with
the largest entry of the reference (absolute 1e-5 x max|reference|), a few ulps of float32
accumulated over at most a few hundred terms. A wrong tap, stride or transposition errs by
order 1.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from murajax import ops

KEY = jax.random.key(0)


def _close(got, want, rel=1e-5):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=0, atol=rel * float(np.max(np.abs(want))))


def _value_and_grads(module, variables, x):
    def loss(params, x):
        y = module.apply({"params": params}, x)
        return jnp.sum(jnp.sin(y)), y  # a non-trivial cotangent

    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        variables["params"], x)
    return y, grads


@pytest.mark.parametrize("size, stride, padding", [
    (1, 1, "SAME"),                # 1x1: a dot over channels
    (3, 1, ((1, 1), (1, 1))),      # conv3x3_same
    (7, 2, ((3, 3), (3, 3))),      # the DenseNet stem: conv_patch_grad
    (3, 2, 1),                     # any other square convolution: conv_patch_grad
])
def test_matmul_conv_equals_nn_conv(size, stride, padding):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 11, 11, 4)), jnp.float32)
    kwargs = dict(kernel_size=(size, size), strides=(stride, stride), padding=padding,
                  use_bias=False)
    plain, fast = nn.Conv(5, **kwargs), ops.MatmulConv(5, **kwargs)
    variables = plain.init(KEY, x)
    assert jax.tree.map(jnp.shape, fast.init(KEY, x)) == jax.tree.map(jnp.shape, variables)
    y_plain, (dk_plain, dx_plain) = _value_and_grads(plain, variables, x)
    y_fast, (dk_fast, dx_fast) = _value_and_grads(fast, variables, x)
    _close(y_fast, y_plain)
    _close(dk_fast["kernel"], dk_plain["kernel"])
    _close(dx_fast, dx_plain)


def test_matmul_conv_initialises_as_nn_conv():
    x = jnp.zeros((1, 8, 8, 3))
    init = nn.initializers.kaiming_normal()
    a = nn.Conv(4, (3, 3), padding=1, use_bias=False, kernel_init=init).init(KEY, x)
    b = ops.MatmulConv(4, (3, 3), padding=1, kernel_init=init).init(KEY, x)
    np.testing.assert_array_equal(a["params"]["kernel"], b["params"]["kernel"])


@pytest.mark.parametrize("kwargs, message", [
    (dict(kernel_size=(3, 1)), "square"),
    (dict(kernel_size=(3, 3), padding=((1, 0), (1, 0))), "equal zero padding"),
    (dict(kernel_size=(3, 3), use_bias=True), "no bias"),
])
def test_matmul_conv_refuses_what_it_does_not_compute(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ops.MatmulConv(4, **kwargs).init(KEY, jnp.zeros((1, 8, 8, 3)))


def _bn_variables(channels, seed=1):
    rng = np.random.default_rng(seed)
    return {
        "params": {"scale": jnp.asarray(rng.uniform(0.5, 1.5, channels), jnp.float32),
                   "bias": jnp.asarray(rng.normal(0.0, 0.5, channels), jnp.float32)},
        "batch_stats": {"mean": jnp.asarray(rng.normal(0.0, 0.5, channels), jnp.float32),
                        "var": jnp.asarray(rng.uniform(0.5, 2.0, channels), jnp.float32)},
    }


def _plain_bn_relu(train, **kwargs):
    class Plain(nn.Module):
        @nn.compact
        def __call__(self, x):
            return jax.nn.relu(nn.BatchNorm(use_running_average=not train, **kwargs)(x))

    return Plain()


def test_batch_norm_relu_equals_nn_batch_norm_then_relu():
    # Away from zero mean, so E[x^2] - E[x]^2 is tested where it loses digits.
    x = jnp.asarray(np.random.default_rng(0).normal(1.5, 2.0, size=(4, 5, 5, 6)), jnp.float32)
    variables = _bn_variables(6)
    plain_vars = {"params": {"BatchNorm_0": variables["params"]},
                  "batch_stats": {"BatchNorm_0": variables["batch_stats"]}}
    settings = dict(momentum=0.9, epsilon=1e-3)
    for train in (False, True):
        fast = ops.BatchNormReLU(use_running_average=not train, **settings)
        plain = _plain_bn_relu(train, **settings)

        def run(module, v, x):
            def loss(params, x):
                y, updates = module.apply({"params": params, "batch_stats": v["batch_stats"]},
                                          x, mutable=["batch_stats"])
                return jnp.sum(jnp.sin(y)), (y, updates["batch_stats"])

            return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
                v["params"], x)

        (_, (y_fast, stats_fast)), (dp_fast, dx_fast) = run(fast, variables, x)
        (_, (y_plain, stats_plain)), (dp_plain, dx_plain) = run(plain, plain_vars, x)
        _close(y_fast, y_plain)
        _close(dx_fast, dx_plain)
        for name in ("scale", "bias"):
            _close(dp_fast[name], dp_plain["BatchNorm_0"][name])
        for name in ("mean", "var"):
            _close(stats_fast[name], stats_plain["BatchNorm_0"][name])


def test_batch_norm_relu_averages_statistics_over_axis_name():
    """Under pmap (here vmap with an axis name) the statistics are those of the whole batch."""
    x = jnp.asarray(np.random.default_rng(2).normal(0.5, 1.0, size=(2, 3, 4, 4, 5)), jnp.float32)
    variables = _bn_variables(5)
    sharded = ops.BatchNormReLU(momentum=0.9, epsilon=1e-5, axis_name="devices")
    whole = ops.BatchNormReLU(momentum=0.9, epsilon=1e-5)

    def apply(module, x):
        return module.apply(variables, x, mutable=["batch_stats"])

    y_sharded, stats_sharded = jax.vmap(lambda s: apply(sharded, s), axis_name="devices")(x)
    y_whole, stats_whole = apply(whole, x.reshape(6, 4, 4, 5))
    _close(y_sharded.reshape(y_whole.shape), y_whole)
    for name in ("mean", "var"):
        _close(stats_sharded["batch_stats"][name][0], stats_whole["batch_stats"][name])


def test_params_helper_creates_as_flax_does_and_still_refuses_a_wrong_shape():
    """ops.params.param skips Flax's re-trace of the initialiser at apply, not its check."""
    from flax import errors
    from flax import linen as nn

    from murajax.ops import params

    class Ours(nn.Module):
        width: int

        @nn.compact
        def __call__(self, x):
            w = params.param(self, "kernel", nn.initializers.lecun_normal(), (3, self.width),
                             jnp.float32)
            return x @ w

    class Flax(Ours):
        @nn.compact
        def __call__(self, x):
            return x @ self.param("kernel", nn.initializers.lecun_normal(), (3, self.width))

    x = jnp.ones((2, 3))
    ours = Ours(4).init(jax.random.key(1), x)
    np.testing.assert_array_equal(ours["params"]["kernel"],
                                  Flax(4).init(jax.random.key(1), x)["params"]["kernel"])
    np.testing.assert_array_equal(Ours(4).apply(ours, x), x @ ours["params"]["kernel"])
    with pytest.raises(errors.ScopeParamShapeError,
                       match=r"expected to generate shape \(3, 5\).*has shape \(3, 4\)"):
        Ours(5).apply(ours, x)
