"""DenseNet in Flax linen: the MURA baseline network and its size variants (architecture only).

It mirrors Huang et al. (2016) as Keras Applications and torchvision build it (7x7/2 stem, 3x3/2
max pool, dense blocks of BN-ReLU-1x1-BN-ReLU-3x3 layers, transitions of BN-ReLU-1x1 conv-2x2
average pool, final BN-ReLU, global average pool, linear head), so ImageNet weights from Keras
load one-to-one (``murajax.pretrained``, this backbone's registered weight importer).

Submodule names, which the weight importer and checkpoints rely on:

    stem_conv, stem_bn                        Keras conv1_conv, conv1_bn
    conv{B}_block{L}/bottleneck/{norm,conv}   Keras conv{B}_block{L}_0_bn, _1_conv
    conv{B}_block{L}/{norm,conv}              Keras conv{B}_block{L}_1_bn, _2_conv
    pool{B}/{norm,conv}                       Keras pool{B}_bn, pool{B}_conv
    final_bn                                  Keras bn
    head                                      (ours: num_outputs units)

``DenseNet`` takes its convolution and normalisation as module factories, configured once in
``__call__`` and passed into the blocks (the pattern of flax's examples/imagenet): ``conv`` has
``nn.Conv``'s interface (``nn.Conv`` itself, or ``murajax.ops.MatmulConv``, which computes the
same convolutions with matmul gradients, faster on CPU), ``norm`` is BatchNorm followed by ReLU
with ``nn.BatchNorm``'s arguments (``murajax.ops.BatchNormReLU``). Either choice owns the same
parameters under the same names, so it changes speed only.

The variants (``densenet121`` ... ``densenet_tiny``) are the constructors registered in
``murajax.models.registry``: they resolve ``conv_impl`` and ``remat`` ('auto' included) once and
build a ``DenseNet``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from murajax import ops
from murajax.models import registry

ModuleDef = Callable[..., nn.Module]

# Keras DenseNets normalise with epsilon 1.001e-5: the default, so Keras weights import exactly.
KERAS_BN_EPSILON = 1.001e-5
BN_MOMENTUM = 0.9  # running averages: ra = 0.9 ra + 0.1 batch (Keras's 0.99 is slower)
_KERNEL_INIT = nn.initializers.kaiming_normal()
_REMAT = ("none", "bottleneck", "layer")


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

    ``conv``: a module with ``nn.Conv``'s interface (default ``nn.Conv``; the variants pass the
    one ``config.model.conv_impl`` selects). ``norm``: BatchNorm + ReLU taking ``nn.BatchNorm``'s
    arguments (default ``murajax.ops.BatchNormReLU``), given ``bn_momentum``, ``bn_epsilon`` and
    ``bn_axis_name`` (set under pmap so BatchNorm averages over devices). ``remat``: 'none',
    'bottleneck' or 'layer' (resolved; the variants accept 'auto' and booleans).
    """

    block_sizes: Sequence[int] = (6, 12, 32, 32)
    growth_rate: int = 32
    bottleneck_width: int = 4
    initial_features: int = 64
    compression: float = 0.5
    num_outputs: int = 1
    bn_epsilon: float = KERAS_BN_EPSILON
    bn_momentum: float = BN_MOMENTUM
    bn_axis_name: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: str = "none"
    conv: ModuleDef = nn.Conv
    norm: ModuleDef = ops.BatchNormReLU

    @nn.compact
    def __call__(self, images: jnp.ndarray, train: bool = False, return_features: bool = False):
        if images.ndim != 4:
            raise ValueError(f"DenseNet expects NHWC images, got shape {images.shape}")
        if self.remat not in _REMAT:
            raise ValueError(f"DenseNet.remat must be one of {_REMAT} (resolved; build the "
                             f"model with murajax.models.create), got {self.remat!r}")
        conv = functools.partial(self.conv, use_bias=False, dtype=self.dtype,
                                 param_dtype=self.param_dtype, kernel_init=_KERNEL_INIT)
        stem_conv = functools.partial(conv, kernel_size=(7, 7), strides=(2, 2),
                                      padding=((3, 3), (3, 3)))
        conv1x1 = functools.partial(conv, kernel_size=(1, 1))
        conv3x3 = functools.partial(conv, kernel_size=(3, 3), padding=((1, 1), (1, 1)))
        norm = functools.partial(  # BatchNorm + ReLU
            self.norm,
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            axis_name=self.bn_axis_name if train else None,
        )
        dense_layer = nn.remat(DenseLayer) if self.remat == "layer" else DenseLayer

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
                        self.remat == "bottleneck",
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


def _variant(name: str, **architecture) -> Callable[..., DenseNet]:
    def build(*, conv_impl: str = "auto", remat: bool | str = "auto", **overrides) -> DenseNet:
        """A DenseNet of this variant; ``overrides`` replace any DenseNet field. ``conv_impl``
        ('auto', 'matmul', 'xla') and ``remat`` ('auto', 'none', 'bottleneck', 'layer' or a
        bool) are resolved for JAX's default backend (``murajax.models.registry``)."""
        overrides.setdefault("conv", registry.conv_module(conv_impl))
        return DenseNet(**{**architecture, **overrides}, remat=registry.resolve_remat(remat))

    build.__name__ = build.__qualname__ = name
    return build


densenet121 = _variant("densenet121", block_sizes=(6, 12, 24, 16), growth_rate=32,
                       initial_features=64)
densenet161 = _variant("densenet161", block_sizes=(6, 12, 36, 24), growth_rate=48,
                       initial_features=96)
densenet169 = _variant("densenet169", block_sizes=(6, 12, 32, 32), growth_rate=32,
                       initial_features=64)
densenet201 = _variant("densenet201", block_sizes=(6, 12, 48, 32), growth_rate=32,
                       initial_features=64)
# Same code path, a few thousand parameters: for tests and the smoke config.
densenet_tiny = _variant("densenet_tiny", block_sizes=(2, 2, 2, 2), growth_rate=8,
                         initial_features=16, bottleneck_width=2)


def load_keras_weights(path, variables, *, model=None):
    """The DenseNets' weight importer: ``murajax.pretrained.load_keras_weights`` (imported
    when used: it needs h5py, and imports this module)."""
    from murajax import pretrained

    return pretrained.load_keras_weights(path, variables, model=model)


for _build in (densenet121, densenet161, densenet169, densenet201, densenet_tiny):
    registry.register(_build.__name__, _build, load_weights=load_keras_weights)
