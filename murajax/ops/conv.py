"""Convolutions computed as matmuls (``conv_impl='matmul'``, the CPU default): speed only.

NHWC activations, HWIO kernels, no bias. XLA:CPU computes a convolution's kernel gradient many
times slower than the same products written as one dot (docs/performance.md), so:

* 1x1 stride-1 convolutions are a dot over the channel axis;
* 3x3 stride-1 'same' convolutions (``conv3x3_same``) run ``lax.conv`` forward and both
  gradients as one dot each over shifted copies of the output gradient;
* any other square convolution (``conv_patch_grad``: DenseNet's 7x7/2 stem) runs ``lax.conv``
  forward and for the input gradient, and the kernel gradient as one matmul of im2col patches.

``MatmulConv`` puts them behind ``nn.Conv``'s interface and parameter (one ``kernel`` of shape
(kh, kw, in, out)), for bias-free square kernels. Checked against ``lax.conv`` / ``nn.Conv``
(values and gradients) in ``tests/test_ops.py`` and, inside a whole training step, in
``tests/test_train_step_reference.py``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from murajax.ops import params


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


def _same_size(name: str, value) -> int:
    """An int, or a sequence of equal ints (a square kernel / equal strides)."""
    values = (value,) if isinstance(value, int) else tuple(value)
    if len(values) not in (1, 2) or len(set(values)) != 1:
        raise ValueError(f"MatmulConv supports square 2-D {name} only, got {value!r}")
    return int(values[0])


def _symmetric_pad(padding, size: int, stride: int) -> int:
    """The one zero-padding amount of ``padding`` (nn.Conv's spellings), applied on all sides."""
    if isinstance(padding, str):
        if padding.upper() == "VALID":
            return 0
        if padding.upper() == "SAME" and stride == 1 and size % 2 == 1:
            return (size - 1) // 2
    elif isinstance(padding, int):
        return padding
    else:
        pairs = [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
        flat = {int(v) for pair in pairs for v in pair}
        if len(pairs) in (1, 2) and len(flat) == 1:
            return flat.pop()
    raise ValueError(f"MatmulConv supports equal zero padding on all sides (or 'SAME' with "
                     f"stride 1 and an odd kernel), got {padding!r}")


class MatmulConv(nn.Module):
    """``nn.Conv`` (bias-free, square kernel) whose gradients are computed as matmuls.

    Takes ``nn.Conv``'s arguments (``features``, ``kernel_size``, ``strides``, ``padding``,
    ``use_bias=False``, ``dtype``, ``param_dtype``, ``kernel_init``) and owns ``nn.Conv``'s
    parameter: ``kernel`` of shape (size, size, in, features), same initializer, same name.
    1x1 stride 1 without padding is a dot over the channel axis, 3x3 stride 1 padding 1 is
    ``conv3x3_same``, anything else ``conv_patch_grad``.
    """

    features: int
    kernel_size: int | Sequence[int]
    strides: int | Sequence[int] = 1
    padding: Any = "SAME"
    use_bias: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.linear.default_kernel_init

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        if self.use_bias:
            raise ValueError("MatmulConv has no bias; use nn.Conv for a convolution with one")
        size = _same_size("kernel_size", self.kernel_size)
        stride = _same_size("strides", self.strides)
        pad = _symmetric_pad(self.padding, size, stride)
        kernel = params.param(self, "kernel", self.kernel_init,
                              (size, size, x.shape[-1], self.features), self.param_dtype)
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        if size == 1 and stride == 1 and pad == 0:
            return _dot_channels(x, kernel[0, 0])
        if size == 3 and stride == 1 and pad == 1:
            return conv3x3_same(x, kernel)
        return conv_patch_grad(x, kernel, stride, pad)
