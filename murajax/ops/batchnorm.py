"""BatchNorm followed by ReLU, fused and with a hand-written backward pass: speed only.

``BatchNormReLU`` has ``nn.BatchNorm``'s variables and semantics and applies the ReLU that
follows every BatchNorm of a DenseNet. Why: ``nn.BatchNorm`` costs a DenseNet-169 several
seconds of tracing (every ``jnp`` operator is a small jitted function, and there are 169
BatchNorms; the cost is paid on every start, even when the compiled program comes from the
persistent cache), and its differentiated form makes several passes over each activation.
So it is written with ``lax`` primitives only, and training mode is one custom-gradient
function, ``batch_norm_relu_train``.

Checked against ``nn.BatchNorm`` + ``jax.nn.relu`` (outputs, gradients, running statistics) in
``tests/test_ops.py``, and inside a whole training step in
``tests/test_train_step_reference.py``.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from murajax.ops import params


def _feature(v, x):
    """A per-channel vector broadcast against NHWC ``x``."""
    return jax.lax.broadcast_in_dim(v, x.shape, (x.ndim - 1,))


def _sum_nhw(x):
    return jax.lax.reduce(x, np.zeros((), x.dtype), jax.lax.add, tuple(range(x.ndim - 1)))


def _cast(x, dtype):
    return x if x.dtype == dtype else jax.lax.convert_element_type(x, dtype)


def _batch_stats(x, axis_name):
    """Per-channel mean and biased variance E[x^2] - E[x]^2 (clipped at 0), over ``axis_name``
    too when given (pmap), and the number of values they average."""
    lax = jax.lax
    count = x.size // x.shape[-1]
    mean = lax.div(_sum_nhw(x), np.asarray(count, x.dtype))
    mean2 = lax.div(_sum_nhw(lax.mul(x, x)), np.asarray(count, x.dtype))
    if axis_name is not None:
        mean, mean2 = lax.pmean((mean, mean2), axis_name)
        count = count * lax.psum(1, axis_name)
    var = lax.max(lax.sub(mean2, lax.mul(mean, mean)), np.zeros((), x.dtype))
    return mean, var, count


def _bn_relu_pre(xf, mean, a, bias):
    lax = jax.lax
    return lax.add(lax.mul(lax.sub(xf, _feature(mean, xf)), _feature(a, xf)), _feature(bias, xf))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_relu_train(x, scale, bias, epsilon, axis_name):
    """Training-mode BatchNorm over N, H, W (and ``axis_name``) followed by ReLU.

    Returns ``(y, mean, var)``; ``scale``/``bias`` are float32 (or wider) per-channel vectors.
    The backward pass is the textbook one on centred values, dx = a (dy - E[dy] - x^ E[dy x^]),
    one reduction and one elementwise pass over ``x`` instead of autodiff's several.
    """
    return _bn_relu_train_fwd(x, scale, bias, epsilon, axis_name)[0]


def _bn_relu_train_fwd(x, scale, bias, epsilon, axis_name):
    lax = jax.lax
    xf = _cast(x, scale.dtype)
    mean, var, count = _batch_stats(xf, axis_name)
    rstd = lax.rsqrt(lax.add(var, np.asarray(epsilon, var.dtype)))
    a = lax.mul(scale, rstd)
    pre = _bn_relu_pre(xf, mean, a, bias)
    y = _cast(lax.max(pre, np.zeros((), pre.dtype)), x.dtype)
    count = lax.convert_element_type(count, xf.dtype)
    return (y, mean, var), (x, scale, bias, mean, rstd, count)


def _bn_relu_train_bwd(epsilon, axis_name, residuals, cotangents):
    lax = jax.lax
    x, scale, bias, mean, rstd, count = residuals
    g, g_mean, g_var = cotangents
    xf = _cast(x, scale.dtype)
    zeros = lax.full_like(xf, 0)
    a = lax.mul(scale, rstd)
    dy = lax.select(lax.gt(_bn_relu_pre(xf, mean, a, bias), zeros), _cast(g, xf.dtype), zeros)
    centred = lax.sub(xf, _feature(mean, xf))
    xhat = lax.mul(centred, _feature(rstd, xf))
    d_bias = _sum_nhw(dy)  # this device's share; train_step sums gradients over devices
    d_scale = _sum_nhw(lax.mul(dy, xhat))
    total_bias, total_scale = d_bias, d_scale
    if axis_name is not None:
        total_bias, total_scale = lax.psum((d_bias, d_scale), axis_name)
    inv = lax.div(np.ones((), xf.dtype), count)
    dy_mean, dyx_mean = lax.mul(total_bias, inv), lax.mul(total_scale, inv)
    dx = lax.mul(lax.sub(lax.sub(dy, _feature(dy_mean, xf)),
                         lax.mul(xhat, _feature(dyx_mean, xf))), _feature(a, xf))
    # The returned batch statistics only feed the running averages; a gradient for them is
    # supported all the same (it is zero in training, and XLA drops it).
    two_inv = lax.mul(inv, np.asarray(2.0, xf.dtype))
    stats = lax.add(_feature(lax.mul(g_mean, inv), xf),
                    lax.mul(centred, _feature(lax.mul(g_var, two_inv), xf)))
    return _cast(lax.add(dx, stats), x.dtype), d_scale, d_bias


batch_norm_relu_train.defvjp(_bn_relu_train_fwd, _bn_relu_train_bwd)


class BatchNormReLU(nn.Module):
    """``nn.BatchNorm`` then ReLU, with ``nn.BatchNorm``'s variables and semantics.

    Params ``scale``, ``bias`` and batch_stats ``mean``, ``var`` (float32, biased variance,
    ``ra = momentum * ra + (1 - momentum) * batch``), statistics in at least float32 with
    E[x^2] - E[x]^2 clipped at 0, averaged over ``axis_name`` under pmap.

    ``momentum`` and ``epsilon`` have no defaults here: the model that uses this kernel owns
    them (``murajax.models.densenet``: ``BN_MOMENTUM``, ``KERAS_BN_EPSILON``).
    """

    momentum: float
    epsilon: float
    use_running_average: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        features = (x.shape[-1],)
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32),
                                features)
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32),
                               features)
        scale = params.param(self, "scale", nn.initializers.ones, features, self.param_dtype)
        bias = params.param(self, "bias", nn.initializers.zeros, features, self.param_dtype)
        lax = jax.lax
        compute = jnp.promote_types(jnp.promote_types(x.dtype, self.param_dtype), jnp.float32)
        x = _cast(x, jnp.dtype(self.dtype or jnp.result_type(x, self.param_dtype)))
        scale, bias = _cast(scale, compute), _cast(bias, compute)
        if self.use_running_average:
            # nn.BatchNorm's formula: (x - mean) * (rsqrt(var + eps) * scale) + bias
            mul = lax.mul(lax.rsqrt(lax.add(ra_var.value, np.asarray(self.epsilon, compute))),
                          scale)
            pre = _bn_relu_pre(_cast(x, compute), _cast(ra_mean.value, compute), mul, bias)
            return _cast(lax.max(pre, np.zeros((), compute)), x.dtype)
        y, mean, var = batch_norm_relu_train(x, scale, bias, self.epsilon, self.axis_name)
        if not self.is_initializing():
            keep = np.asarray(self.momentum, jnp.float32)
            new = np.asarray(1.0 - self.momentum, jnp.float32)
            ra_mean.value = lax.add(lax.mul(keep, ra_mean.value),
                                    lax.mul(new, _cast(lax.stop_gradient(mean), jnp.float32)))
            ra_var.value = lax.add(lax.mul(keep, ra_var.value),
                                   lax.mul(new, _cast(lax.stop_gradient(var), jnp.float32)))
        return y
