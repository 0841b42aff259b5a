"""A dense block's layers as a few ``lax.scan`` loops over a preallocated feature buffer:
speed only (compile time), the same mathematics as concatenating the maps layer by layer.

A DenseNet layer reads all earlier maps of its block and adds ``growth`` new channels, so every
layer of an unrolled block has its own input width and XLA generates forward, recompute and
backward kernels for each one (DenseNet-169: 82 widths, ~5,000 fusions, most of a minute of
LLVM code generation on a small CPU). Here the block's maps live in one buffer of the block's
final width, written at each layer's channel offset; a layer reads the buffer's first
``width`` channels, its bucket's width (its input width rounded up), and the layers of one
bucket share every shape and run as one scan over their stacked, zero-padded parameters.

Why padding changes nothing: a layer's first function (``part_a``, BatchNorm + ReLU then a
1x1 convolution in the DenseNet) sees, beyond its real input channels, zeros in the forward
pass and later layers' maps in the backward pass; the caller zeroes that BatchNorm's scale and
bias there (the DenseNet multiplies them by a 0/1 mask, which also zeroes their gradient), so
those channels give exactly 0, and the 1x1 kernel's padded input rows get zero gradient.
BatchNorm statistics are per channel, so the padded channels' own statistics never touch the
real ones.

The same fact makes remat cheap: in the backward pass every layer's input is the *final*
buffer's first ``width`` channels, so ``custom_vjp`` keeps that one buffer (plus, unless
``recompute_part_a_output``, each layer's ``part_a`` output, the 4 x growth bottleneck maps)
and recomputes the rest, as the unrolled block does with ``remat='bottleneck'``/``'layer'``.
Without remat (``save_everything``) the scans are differentiated by JAX and store each layer's
input.

Checked against the unrolled DenseNet (logits, gradients, running statistics) in
``tests/test_block_impl.py``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np

# part_a(x [..., width], p) -> (z, aux_a); part_b(z, p) -> (y [..., growth], aux_b).
LayerFn = Callable[[Any, Any], tuple[Any, Any]]


class Bucket(NamedTuple):
    """Layers that read the same ``width`` channels; ``offsets``: where each writes its maps
    (its real input width)."""

    width: int
    offsets: tuple[int, ...]


def buckets(in_features: int, num_layers: int, growth: int, bucket: int) -> tuple[Bucket, ...]:
    """Consecutive layers grouped by input width rounded up to a multiple of ``bucket`` (at
    most the block's final width)."""
    total = in_features + num_layers * growth
    groups: dict[int, list[int]] = {}
    for layer in range(num_layers):
        offset = in_features + layer * growth
        width = min(-(-offset // bucket) * bucket, total)
        groups.setdefault(width, []).append(offset)
    return tuple(Bucket(width, tuple(offsets)) for width, offsets in groups.items())


def _write(buffer, y, offset):
    return jax.lax.dynamic_update_slice_in_dim(buffer, y, offset, axis=buffer.ndim - 1)


def _forward(x0, params, layout, total, part_a, part_b):
    """(final buffer, per bucket (aux_a, aux_b, z) stacked over its layers)."""
    pad = [(0, 0)] * (x0.ndim - 1) + [(0, total - x0.shape[-1])]
    buffer = jax.lax.pad(x0, np.zeros((), x0.dtype), [(lo, hi, 0) for lo, hi in pad])
    outputs = []
    for bucket, p in zip(layout, params):
        def body(buffer, xs, width=bucket.width):
            p_layer, offset = xs
            x = jax.lax.slice_in_dim(buffer, 0, width, axis=buffer.ndim - 1)
            z, aux_a = part_a(x, p_layer)
            y, aux_b = part_b(z, p_layer)
            return _write(buffer, y, offset), (aux_a, aux_b, z)

        offsets = np.asarray(bucket.offsets, np.int32)
        buffer, out = jax.lax.scan(body, buffer, (p, offsets))
        outputs.append(out)
    return buffer, outputs


def dense_block(x0, params: Sequence[Any], layout: Sequence[Bucket], growth: int,
                part_a: LayerFn, part_b: LayerFn, *, save_everything: bool = False,
                recompute_part_a_output: bool = False):
    """A dense block computed bucket by bucket: returns ``(buffer, aux)``.

    ``x0`` [..., c0]: the block's input; ``params[i]``: bucket ``i``'s layer parameters,
    stacked on a leading axis (one entry per offset) and padded to its width;
    ``layout``: ``buckets(...)``. ``buffer`` [..., c0 + layers * growth] equals the
    concatenation of ``x0`` and every layer's output; ``aux[i]`` is ``(aux_a, aux_b)``
    stacked over bucket ``i``'s layers (the BatchNorm running statistics, say). ``aux`` gets
    no gradient (BatchNorm stops it). ``save_everything``: let JAX differentiate the scans
    (stores each layer's input); otherwise the backward pass recomputes from the final buffer,
    keeping each layer's ``part_a`` output unless ``recompute_part_a_output``.
    """
    layout = tuple(layout)
    total = x0.shape[-1] + sum(len(b.offsets) for b in layout) * growth

    def plain(x0, params):
        buffer, outputs = _forward(x0, params, layout, total, part_a, part_b)
        return buffer, [(a, b) for a, b, _ in outputs]

    if save_everything:
        return plain(x0, params)

    @jax.custom_vjp
    def block(x0, params):
        return plain(x0, params)

    def block_fwd(x0, params):
        buffer, outputs = _forward(x0, params, layout, total, part_a, part_b)
        saved = None if recompute_part_a_output else [z for _, _, z in outputs]
        return (buffer, [(a, b) for a, b, _ in outputs]), (buffer, params, saved)

    def block_bwd(residuals, cotangents):
        buffer, params, saved = residuals
        g_buffer = cotangents[0]  # the aux outputs are stop_gradient'ed statistics
        grads = [None] * len(layout)
        for i in reversed(range(len(layout))):
            width = layout[i].width

            def body(g, xs, width=width):
                p_layer, offset, z_saved = xs
                x = jax.lax.slice_in_dim(buffer, 0, width, axis=buffer.ndim - 1)
                z, vjp_a, _ = jax.vjp(part_a, x, p_layer, has_aux=True)
                if z_saved is not None:  # else recomputed (the 1x1 matmul again)
                    z = z_saved
                _, vjp_b, _ = jax.vjp(part_b, z, p_layer, has_aux=True)
                dz, dp_b = vjp_b(jax.lax.dynamic_slice_in_dim(g, offset, growth, axis=g.ndim - 1))
                dx, dp_a = vjp_a(dz)
                head = jax.lax.slice_in_dim(g, 0, width, axis=g.ndim - 1) + dx
                g = jax.lax.dynamic_update_slice_in_dim(g, head, 0, axis=g.ndim - 1)
                return g, jax.tree.map(jax.lax.add, dp_a, dp_b)

            offsets = np.asarray(layout[i].offsets, np.int32)
            z_saved = None if saved is None else saved[i]
            g_buffer, grads[i] = jax.lax.scan(body, g_buffer, (params[i], offsets, z_saved),
                                              reverse=True)
        return jax.lax.slice_in_dim(g_buffer, 0, x0.shape[-1], axis=g_buffer.ndim - 1), grads

    block.defvjp(block_fwd, block_bwd)
    return block(x0, list(params))
