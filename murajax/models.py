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
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

ModuleDef = Callable[..., nn.Module]

KERAS_BN_EPSILON = 1.001e-5
TORCH_BN_EPSILON = 1e-5


class Bottleneck(nn.Module):
    """concat -> BN -> ReLU -> 1x1 conv: the part of a dense layer whose activations grow.

    Taking the list of earlier feature maps (rather than their concatenation) lets ``remat``
    recompute the concatenation in the backward pass instead of storing it: the memory-efficient
    DenseNet of Pleiss et al. (2017).
    """

    features: int
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, inputs: Sequence[jnp.ndarray]) -> jnp.ndarray:
        x = jnp.concatenate(inputs, axis=-1) if len(inputs) > 1 else inputs[0]
        x = nn.relu(self.norm(name="norm")(x))
        return self.conv(self.features, (1, 1), name="conv")(x)


class DenseLayer(nn.Module):
    """One dense layer: bottleneck, then BN -> ReLU -> 3x3 conv giving ``growth_rate`` maps."""

    growth_rate: int
    bottleneck_width: int
    conv: ModuleDef
    norm: ModuleDef
    remat: bool = False

    @nn.compact
    def __call__(self, inputs: Sequence[jnp.ndarray]) -> jnp.ndarray:
        bottleneck_cls = nn.remat(Bottleneck) if self.remat else Bottleneck
        x = bottleneck_cls(
            self.bottleneck_width * self.growth_rate, self.conv, self.norm, name="bottleneck"
        )(inputs)
        x = nn.relu(self.norm(name="norm")(x))
        return self.conv(self.growth_rate, (3, 3), padding=((1, 1), (1, 1)), name="conv")(x)


class Transition(nn.Module):
    """BN -> ReLU -> 1x1 conv (compression) -> 2x2 average pool."""

    features: int
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = nn.relu(self.norm(name="norm")(x))
        x = self.conv(self.features, (1, 1), name="conv")(x)
        return nn.avg_pool(x, (2, 2), strides=(2, 2))


class DenseNet(nn.Module):
    """DenseNet-BC classifier producing ``num_outputs`` logits per NHWC image.

    ``__call__(images, train=False, return_features=False)``: with ``return_features`` it returns
    ``(logits, features)``, the features being the last stage's maps after its final BN+ReLU and
    before pooling (what class activation maps need). Logits are always float32.
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
    remat: bool = False

    @nn.compact
    def __call__(self, images: jnp.ndarray, train: bool = False, return_features: bool = False):
        if images.ndim != 4:
            raise ValueError(f"DenseNet expects NHWC images, got shape {images.shape}")
        conv = functools.partial(
            nn.Conv,
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.initializers.kaiming_normal(),
        )
        norm = functools.partial(
            nn.BatchNorm,
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            axis_name=self.bn_axis_name if train else None,
        )

        x = images.astype(self.dtype)
        x = conv(self.initial_features, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)),
                 name="stem_conv")(x)
        x = nn.relu(norm(name="stem_bn")(x))
        # After ReLU, -inf padding (Flax) and Keras's zero padding give the same maxima.
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

        num_features = self.initial_features
        for block, num_layers in enumerate(self.block_sizes):
            stage = block + 2  # Keras numbering: conv2 .. conv5, pool2 .. pool4
            maps = [x]
            for layer in range(num_layers):
                maps.append(
                    DenseLayer(
                        self.growth_rate, self.bottleneck_width, conv, norm, self.remat,
                        name=f"conv{stage}_block{layer + 1}",
                    )(maps)
                )
            x = jnp.concatenate(maps, axis=-1)
            num_features += num_layers * self.growth_rate
            if block != len(self.block_sizes) - 1:
                num_features = int(num_features * self.compression)
                x = Transition(num_features, conv, norm, name=f"pool{stage}")(x)

        features = nn.relu(norm(name="final_bn")(x))
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
