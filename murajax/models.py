"""DenseNet in Flax linen: the MURA baseline network and its size variants.

The module owns the architecture only. It mirrors Huang et al. (2016) as Keras Applications and
torchvision build it (7x7/2 stem, 3x3/2 max pool, dense blocks of BN-ReLU-1x1-BN-ReLU-3x3 layers,
transitions of BN-ReLU-1x1 conv-2x2 average pool, final BN-ReLU, global average pool, linear head),
so ImageNet weights from Keras load one-to-one (see ``murajax.pretrained``).

Submodule names, which the weight importer and checkpoints rely on:

    stem_conv, stem_bn                        Keras conv1_conv, conv1_bn
    conv{B}_block{L}/bottleneck/{norm,conv}   Keras conv{B}_block{L}_0_bn, _1_conv
    conv{B}_block{L}/{norm,conv}              Keras conv{B}_block{L}_1_bn, _2_conv
    pool{B}/{norm,conv}                       Keras pool{B}_bn, pool{B}_conv
    final_bn                                  Keras bn
    head                                      (ours: num_outputs units)

How the convolutions are computed (``DenseNet.conv_impl``) changes speed only, never the
parameters (every convolution owns one ``kernel`` of shape (kh, kw, in, out), created by the same
initializer under the same name) nor, beyond float32 rounding, the results. 'xla' uses
``nn.Conv`` throughout. 'matmul' (the default on CPU, see docs/performance.md) computes 1x1
convolutions as a matmul over the channel axis, and the 3x3 and 7x7 stem convolutions with
``lax.conv`` forward but their gradients as matmuls: XLA:CPU computes a convolution's kernel
gradient many times slower than the same products written as one dot. ``tests/
test_train_step_reference.py`` checks a training step against a plain ``nn.Conv`` formulation.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

ModuleDef = Callable[..., nn.Module]
CONV_IMPLS = ("auto", "matmul", "xla")
# What the backward pass recomputes instead of storing: nothing; each dense layer's
# concatenation -> BN -> ReLU (cheap elementwise work); or the whole layer minus its 3x3 output
# (adds the 1x1 matmul again). 'auto': 'bottleneck' on CPU, where it is also faster (XLA:CPU
# streams and faults in less scratch memory every step), 'none' elsewhere.
# docs/performance.md has their memory and time.
REMAT_POLICIES = ("auto", "none", "bottleneck", "layer")


def remat_policy(value) -> str:
    """``DenseNet.remat`` resolved to 'none', 'bottleneck' or 'layer' for the default backend;
    booleans mean 'none'/'bottleneck'."""
    if isinstance(value, (bool, np.bool_)):
        return "bottleneck" if value else "none"
    if value not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {REMAT_POLICIES} (or a bool), got {value!r}")
    if value == "auto":
        return "bottleneck" if jax.default_backend() == "cpu" else "none"
    return value


# ------------------------------------------------------------------------------------------
# Convolutions as matmuls (conv_impl='matmul'). NHWC activations, HWIO kernels, no bias.


def _dot_channels(x, w):
    """x [..., c] . w [c, d] -> [..., d]: a 1x1 convolution."""
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def _conv(x, kernel, stride, padding):
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _shifted_taps(g):
    """[n, h, w, 9 * c]: tap (i, j) at (r, s) holds g[r + 1 - i, s + 1 - j] (0 outside).

    For y = conv3x3_same(x, k): dk[i, j] = sum_{r,s} x[r, s]^T taps_ij[r, s] and
    dx[r, s] = sum_{i,j} taps_ij[r, s] k[i, j]^T, i.e. both gradients are one dot each.
    """
    _, h, w, _ = g.shape
    gp = jnp.pad(g, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return jnp.concatenate(
        [gp[:, 2 - i:2 - i + h, 2 - j:2 - j + w] for i in range(3) for j in range(3)], axis=-1
    )


@jax.custom_vjp
def conv3x3_same(x, kernel):
    """Stride-1 3x3 convolution with zero padding 1: ``lax.conv`` forward, matmul gradients."""
    return _conv(x, kernel, 1, ((1, 1), (1, 1)))


def _conv3x3_fwd(x, kernel):
    return conv3x3_same(x, kernel), (x, kernel)


def _conv3x3_bwd(residuals, g):
    x, kernel = residuals
    c, co = kernel.shape[2:]
    taps = _shifted_taps(g)  # [n, h, w, (i, j, co)]
    k_flat = kernel.transpose(2, 0, 1, 3).reshape(c, 9 * co)  # [c, (i, j, co)]
    dx = jax.lax.dot_general(taps, k_flat, (((3,), (1,)), ((), ())))
    dk = jax.lax.dot_general(x, taps, (((0, 1, 2), (0, 1, 2)), ((), ())))
    return dx.astype(x.dtype), dk.reshape(c, 3, 3, co).transpose(1, 2, 0, 3).astype(kernel.dtype)


conv3x3_same.defvjp(_conv3x3_fwd, _conv3x3_bwd)


def _patches(x, size, stride, pad):
    """[n, ho, wo, size * size * c] im2col patches, ordered (i, j, c) like an HWIO kernel."""
    _, h, w, _ = x.shape
    ho, wo = (h + 2 * pad - size) // stride + 1, (w + 2 * pad - size) // stride + 1
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    return jnp.concatenate(
        [
            xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]
            for i in range(size)
            for j in range(size)
        ],
        axis=-1,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_patch_grad(x, kernel, stride, pad):
    """Square-kernel convolution: ``lax.conv`` forward and input gradient, kernel gradient as
    one matmul of im2col patches (rebuilt in the backward pass: only ``x`` is kept)."""
    return _conv(x, kernel, stride, ((pad, pad), (pad, pad)))


def _patch_fwd(x, kernel, stride, pad):
    return conv_patch_grad(x, kernel, stride, pad), (x, kernel)


def _patch_bwd(stride, pad, residuals, g):
    x, kernel = residuals
    # Unused for the stem (images are not differentiated): XLA removes it from the program.
    dx = jax.vjp(lambda x_: _conv(x_, kernel, stride, ((pad, pad), (pad, pad))), x)[1](g)[0]
    patches = _patches(x, kernel.shape[0], stride, pad)
    dk = jax.lax.dot_general(patches, g, (((0, 1, 2), (0, 1, 2)), ((), ())))
    return dx, dk.reshape(kernel.shape).astype(kernel.dtype)


conv_patch_grad.defvjp(_patch_fwd, _patch_bwd)


class MatmulConv(nn.Module):
    """Bias-free square convolution whose gradients are computed as matmuls.

    The parameter is ``nn.Conv``'s: ``kernel`` of shape (size, size, in, features), same
    initializer, same name. Supported: 1x1 stride 1 (a dot over the channel axis), 3x3 stride 1
    padding 1 (``conv3x3_same``) and any size/stride/padding through ``conv_patch_grad``.
    """

    features: int
    size: int = 1
    stride: int = 1
    pad: int = 0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.kaiming_normal()

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        kernel = self.param("kernel", self.kernel_init,
                            (self.size, self.size, x.shape[-1], self.features), self.param_dtype)
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        if self.size == 1 and self.stride == 1 and self.pad == 0:
            return _dot_channels(x, kernel[0, 0])
        if self.size == 3 and self.stride == 1 and self.pad == 1:
            return conv3x3_same(x, kernel)
        return conv_patch_grad(x, kernel, self.stride, self.pad)

KERAS_BN_EPSILON = 1.001e-5
TORCH_BN_EPSILON = 1e-5


# ------------------------------------------------------------------------------------------
# BatchNorm followed by ReLU (every BatchNorm of a DenseNet is).


def _feature(v, x):
    """A per-channel vector broadcast against NHWC ``x``."""
    return jax.lax.broadcast_in_dim(v, x.shape, (x.ndim - 1,))


def _sum_nhw(x):
    return jax.lax.reduce(x, np.zeros((), x.dtype), jax.lax.add, tuple(range(x.ndim - 1)))


def _cast(x, dtype):
    return x if x.dtype == dtype else jax.lax.convert_element_type(x, dtype)


# BatchNorm+ReLU is written with lax primitives only: every jnp operator is a small jitted
# function, and 169 BatchNorms of them cost seconds of tracing (paid on every start, even when
# the compiled program comes from the persistent cache).


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
    E[x^2] - E[x]^2 clipped at 0, averaged over ``axis_name`` under pmap. Written with ``lax``
    primitives and one custom-gradient function: ``nn.BatchNorm`` costs a DenseNet-169 several
    seconds of tracing, and its differentiated form several passes over each activation.
    """

    use_running_average: bool = False
    momentum: float = 0.99
    epsilon: float = 1e-5
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
        scale = self.param("scale", nn.initializers.ones, features, self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, features, self.param_dtype)
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


class Bottleneck(nn.Module):
    """concat -> BN -> ReLU -> 1x1 conv: the part of a dense layer whose activations grow.

    Taking the list of earlier feature maps (rather than their concatenation) lets ``remat``
    recompute the concatenation in the backward pass instead of storing it: the memory-efficient
    DenseNet of Pleiss et al. (2017).
    """

    features: int
    conv: ModuleDef  # 1x1: conv(features, name=...)
    norm: ModuleDef  # BatchNorm followed by ReLU

    @nn.compact
    def __call__(self, inputs: Sequence[jnp.ndarray]) -> jnp.ndarray:
        x = jnp.concatenate(inputs, axis=-1) if len(inputs) > 1 else inputs[0]
        x = self.norm(name="norm")(x)
        return self.conv(self.features, name="conv")(x)


class DenseLayer(nn.Module):
    """One dense layer: bottleneck, then BN -> ReLU -> 3x3 conv giving ``growth_rate`` maps."""

    growth_rate: int
    bottleneck_width: int
    conv1x1: ModuleDef
    conv3x3: ModuleDef
    norm: ModuleDef  # BatchNorm followed by ReLU
    remat_bottleneck: bool = False

    @nn.compact
    def __call__(self, inputs: Sequence[jnp.ndarray]) -> jnp.ndarray:
        bottleneck_cls = nn.remat(Bottleneck) if self.remat_bottleneck else Bottleneck
        x = bottleneck_cls(
            self.bottleneck_width * self.growth_rate, self.conv1x1, self.norm, name="bottleneck"
        )(inputs)
        x = self.norm(name="norm")(x)
        return self.conv3x3(self.growth_rate, name="conv")(x)


class Transition(nn.Module):
    """BN -> ReLU -> 1x1 conv (compression) -> 2x2 average pool."""

    features: int
    conv: ModuleDef  # 1x1: conv(features, name=...)
    norm: ModuleDef  # BatchNorm followed by ReLU

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = self.norm(name="norm")(x)
        x = self.conv(self.features, name="conv")(x)
        return nn.avg_pool(x, (2, 2), strides=(2, 2))


class DenseNet(nn.Module):
    """DenseNet-BC classifier producing ``num_outputs`` logits per NHWC image.

    ``__call__(images, train=False, return_features=False)``: with ``return_features`` it returns
    ``(logits, features)``, the features being the last stage's maps after its final BN+ReLU and
    before pooling (what class activation maps need). Logits are always float32.

    ``conv_impl``: 'matmul', 'xla' or 'auto' ('matmul' when JAX's default backend is the CPU,
    'xla' elsewhere, where the vendor convolution libraries are fast); see the module docstring.
    """

    block_sizes: Sequence[int] = (6, 12, 32, 32)
    growth_rate: int = 32
    bottleneck_width: int = 4
    initial_features: int = 64
    compression: float = 0.5
    num_outputs: int = 1
    bn_epsilon: float = KERAS_BN_EPSILON
    bn_momentum: float = 0.9
    bn_axis_name: str | None = None  # set under pmap so BatchNorm averages over devices
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool | str = "auto"  # one of REMAT_POLICIES
    conv_impl: str = "auto"

    def _convs(self):
        """(stem 7x7/2, 1x1, 3x3) module factories taking (features, name=...)."""
        if self.conv_impl not in CONV_IMPLS:
            raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {self.conv_impl!r}")
        impl = self.conv_impl
        if impl == "auto":
            impl = "matmul" if jax.default_backend() == "cpu" else "xla"
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype,
                      kernel_init=nn.initializers.kaiming_normal())
        if impl == "matmul":
            conv = functools.partial(MatmulConv, **common)
            return (functools.partial(conv, size=7, stride=2, pad=3), conv,
                    functools.partial(conv, size=3, pad=1))
        conv = functools.partial(nn.Conv, use_bias=False, **common)
        return (
            functools.partial(conv, kernel_size=(7, 7), strides=(2, 2), padding=((3, 3), (3, 3))),
            functools.partial(conv, kernel_size=(1, 1)),
            functools.partial(conv, kernel_size=(3, 3), padding=((1, 1), (1, 1))),
        )

    @nn.compact
    def __call__(self, images: jnp.ndarray, train: bool = False, return_features: bool = False):
        if images.ndim != 4:
            raise ValueError(f"DenseNet expects NHWC images, got shape {images.shape}")
        stem_conv, conv1x1, conv3x3 = self._convs()
        remat = remat_policy(self.remat)
        dense_layer = nn.remat(DenseLayer) if remat == "layer" else DenseLayer
        norm = functools.partial(  # BatchNorm + ReLU
            BatchNormReLU,
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            axis_name=self.bn_axis_name if train else None,
        )

        x = images.astype(self.dtype)
        x = stem_conv(self.initial_features, name="stem_conv")(x)
        x = norm(name="stem_bn")(x)
        # After ReLU, -inf padding (Flax) and Keras's zero padding give the same maxima.
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

        num_features = self.initial_features
        for block, num_layers in enumerate(self.block_sizes):
            stage = block + 2  # Keras numbering: conv2 .. conv5, pool2 .. pool4
            maps = [x]
            for layer in range(num_layers):
                maps.append(
                    dense_layer(
                        self.growth_rate, self.bottleneck_width, conv1x1, conv3x3, norm,
                        remat == "bottleneck",
                        name=f"conv{stage}_block{layer + 1}",
                    )(maps)
                )
            x = jnp.concatenate(maps, axis=-1)
            num_features += num_layers * self.growth_rate
            if block != len(self.block_sizes) - 1:
                num_features = int(num_features * self.compression)
                x = Transition(num_features, conv1x1, norm, name=f"pool{stage}")(x)

        features = norm(name="final_bn")(x)
        pooled = jnp.mean(features.astype(jnp.float32), axis=(1, 2))
        logits = nn.Dense(
            self.num_outputs,
            dtype=jnp.float32,
            param_dtype=self.param_dtype,
            bias_init=nn.initializers.zeros,
            name="head",
        )(pooled)
        if return_features:
            return logits, features
        return logits


def _variant(**architecture):
    def build(**overrides) -> DenseNet:
        return DenseNet(**{**architecture, **overrides})

    return build


densenet121 = _variant(block_sizes=(6, 12, 24, 16), growth_rate=32, initial_features=64)
densenet161 = _variant(block_sizes=(6, 12, 36, 24), growth_rate=48, initial_features=96)
densenet169 = _variant(block_sizes=(6, 12, 32, 32), growth_rate=32, initial_features=64)
densenet201 = _variant(block_sizes=(6, 12, 48, 32), growth_rate=32, initial_features=64)
# Same code path, a few thousand parameters: for tests and the smoke config.
densenet_tiny = _variant(block_sizes=(2, 2, 2, 2), growth_rate=8, initial_features=16,
                         bottleneck_width=2)

VARIANTS: dict[str, Callable[..., DenseNet]] = {
    "densenet121": densenet121,
    "densenet161": densenet161,
    "densenet169": densenet169,
    "densenet201": densenet201,
    "densenet_tiny": densenet_tiny,
}


def create_model(name: str, **overrides) -> DenseNet:
    """Builds a named variant; ``overrides`` replace any DenseNet field."""
    if name not in VARIANTS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(VARIANTS)}")
    return VARIANTS[name](**overrides)
