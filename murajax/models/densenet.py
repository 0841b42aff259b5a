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
    conv{B}_block{F}to{L}/...                 block_impl='scan': layers F..L stacked (below)

``DenseNet`` takes its convolution and normalisation as module factories, configured once in
``__call__`` and passed into the blocks (the pattern of flax's examples/imagenet): ``conv`` has
``nn.Conv``'s interface (``nn.Conv`` itself, or ``murajax.ops.MatmulConv``, which computes the
same convolutions with matmul gradients, faster on CPU), ``norm`` is BatchNorm followed by ReLU
with ``nn.BatchNorm``'s arguments (``murajax.ops.BatchNormReLU``). Either choice owns the same
parameters under the same names, so it changes speed only.

``block_impl='scan'`` computes each dense block with ``murajax.ops.dense_scan`` (layers of
similar input width as one ``lax.scan``, for a shorter compile) instead of layer by layer, and
stores the variables of each scan's layers stacked, as the scan reads them:
``conv{B}_block{first}to{last}/...`` under the same sub-names with a leading layer axis, the
bottleneck's input channels zero-padded to the bucket's width. So the train step holds no
per-layer stacking or slicing, and Adam updates 24 x 6 stacked leaves instead of 82 x 6
(DenseNet-169).
``DenseNet.layout_variables`` converts any collection between the layouts exactly (the padding
is zeros, ones for a running variance): the Keras importer works on the per-layer layout, and
checkpoints restore in either (``models.in_layout``, ``train_state.relayout``).

The variants (``densenet121`` ... ``densenet_tiny``) are the constructors registered in
``murajax.models.registry``: they resolve ``conv_impl`` and ``remat`` ('auto' included) once and
build a ``DenseNet``.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from murajax import ops
from murajax.models import registry

ModuleDef = Callable[..., nn.Module]

# Keras DenseNets normalise with epsilon 1.001e-5: the default, so Keras weights import exactly.
KERAS_BN_EPSILON = 1.001e-5
BN_MOMENTUM = 0.9  # running averages: ra = 0.9 ra + 0.1 batch (Keras's 0.99 is slower)
_KERNEL_INIT = nn.initializers.kaiming_normal()
_REMAT = ("none", "bottleneck", "layer")
_BLOCK_IMPLS = ("unrolled", "scan")
_LAYER_RUN = re.compile(r"conv(\d+)_block(\d+)to(\d+)")  # block_impl='scan': stacked layers


def _kernel_init(module: nn.Module, init=_KERNEL_INIT):
    """``init`` while ``module`` initialises, zeros when it applies: for Flax's own modules
    (``nn.Conv``, ``nn.Dense``), which check an existing parameter's shape by tracing its
    initialiser again at every apply (``ops.params``); zeros make the same check in 0.65 ms
    instead of a kaiming-normal's 10.8 ms."""
    return init if module.is_initializing() else nn.initializers.zeros


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


class _StackedNorm(nn.Module):
    """The BatchNorm variables (``BatchNormReLU``'s names) of a run of layers, stacked:
    ``[layers, features]``; ``mask`` [layers, features] (1: a real channel, 0: padding) is the
    initial scale. Returns them as values; ``update`` (new running mean and variance) is
    written back instead."""

    param_dtype: Any

    @nn.compact
    def __call__(self, mask: np.ndarray, update=None) -> dict[str, jnp.ndarray] | None:
        shape = mask.shape
        mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), shape)
        var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), shape)
        if update is not None:
            mean.value, var.value = update
            return None
        scale = ops.params.param(self, "scale", lambda key, s, dtype: jnp.asarray(mask, dtype),
                                 shape, self.param_dtype)
        bias = ops.params.param(self, "bias", nn.initializers.zeros, shape, self.param_dtype)
        return {"scale": scale, "bias": bias, "mean": mean.value, "var": var.value}


class _StackedKernel(nn.Module):
    """The bias-free convolution kernels of a run of layers, stacked: ``[layers, *shape]``,
    each drawn at its layer's own shape (``in_channels[i]`` input channels, so the He-normal
    scale is the layer's) and zero-padded to ``shape``."""

    shape: tuple[int, ...]
    in_channels: tuple[int, ...]
    param_dtype: Any

    @nn.compact
    def __call__(self) -> jnp.ndarray:
        *window, width, features = self.shape

        def init(key, shape, dtype):
            keys = jax.random.split(key, len(self.in_channels))
            return jnp.stack([
                jnp.pad(_KERNEL_INIT(k, (*window, n, features), dtype),
                        [(0, 0)] * len(window) + [(0, width - n), (0, 0)])
                for k, n in zip(keys, self.in_channels)])

        return ops.params.param(self, "kernel", init, (len(self.in_channels), *self.shape),
                                self.param_dtype)


class _StackedBottleneck(nn.Module):
    """``Bottleneck``'s variables (``norm``, ``conv``) for a run of layers, stacked."""

    width: int
    in_channels: tuple[int, ...]
    features: int
    param_dtype: Any

    @nn.compact
    def __call__(self, mask: np.ndarray, update=None):
        norm = _StackedNorm(self.param_dtype, name="norm")(mask, update)
        if update is not None:
            return None
        kernel = _StackedKernel((1, 1, self.width, self.features), self.in_channels,
                                self.param_dtype, name="conv")()
        return norm, kernel


class _StackedLayers(nn.Module):
    """The variables of the dense layers of one scan bucket (``block_impl='scan'``), stacked
    on a leading axis under ``DenseLayer``'s own sub-names (``bottleneck/norm``,
    ``bottleneck/conv``, ``norm``, ``conv``), the bottleneck's input padded to ``width``.
    Returns ``{"norm1", "kernel1", "norm2", "kernel2", "mask"}`` (``mask``: [layers, width],
    1 on each layer's real input channels); ``updates`` (the two norms' new running
    statistics) are written back instead."""

    width: int
    in_channels: tuple[int, ...]  # each layer's real input width
    growth_rate: int
    bottleneck_features: int
    param_dtype: Any

    @nn.compact
    def __call__(self, updates=None) -> dict[str, Any] | None:
        mask = (np.arange(self.width) < np.asarray(self.in_channels)[:, None]).astype(np.float32)
        full = np.ones((len(self.in_channels), self.bottleneck_features), np.float32)
        bottleneck = _StackedBottleneck(self.width, self.in_channels, self.bottleneck_features,
                                        self.param_dtype, name="bottleneck")
        norm = _StackedNorm(self.param_dtype, name="norm")
        if updates is not None:
            bottleneck(mask, updates[0])
            norm(full, updates[1])
            return None
        norm1, kernel1 = bottleneck(mask)
        kernel2 = _StackedKernel((3, 3, self.bottleneck_features, self.growth_rate),
                                 (self.bottleneck_features,) * len(self.in_channels),
                                 self.param_dtype, name="conv")()
        return {"norm1": norm1, "kernel1": kernel1, "norm2": norm(full), "kernel2": kernel2,
                "mask": jnp.asarray(mask, self.param_dtype)}


def _apply_norm(norm: ModuleDef, variables, x, train: bool):
    """(y, (new running mean, var)) of ``norm`` run as a pure function on ``variables``."""
    module = norm(parent=None)
    state = {"params": {"scale": variables["scale"], "bias": variables["bias"]},
             "batch_stats": {"mean": variables["mean"], "var": variables["var"]}}
    if not train:
        return module.apply(state, x), ()
    y, updated = module.apply(state, x, mutable=["batch_stats"])
    return y, (updated["batch_stats"]["mean"], updated["batch_stats"]["var"])


def _apply_conv(conv: ModuleDef, kernel, x):
    return conv(kernel.shape[-1], parent=None).apply({"params": {"kernel": kernel}}, x)


def _padded_axis(path) -> int | None:
    """The axis of a layer's variable that a scan bucket pads (its input channels): the
    bottleneck's norm vectors and 1x1 kernel; None for the rest."""
    keys = [getattr(entry, "key", None) for entry in path]
    if keys[:2] == ["bottleneck", "norm"]:
        return 0
    if keys[:2] == ["bottleneck", "conv"]:
        return 2
    return None


def _layout_of(tree: dict) -> dict[str, int]:
    """``variable_layout()`` of the model whose variables ``tree`` holds (one collection)."""
    layout = {}
    for name, value in tree.items():
        if _LAYER_RUN.fullmatch(name):
            vectors = jax.tree.leaves(value["bottleneck"]["norm"])  # [layers, width] each
            layout[name] = int(vectors[0].shape[-1]) if vectors else None
    return layout


def _stack_layers(path, leaves, width):
    """One variable of several layers, padded to ``width`` where buckets pad it, stacked."""
    axis = _padded_axis(path)
    if axis is not None:
        fill = 1.0 if getattr(path[-1], "key", None) == "var" else 0.0
        leaves = [jnp.pad(leaf, [(0, width - leaf.shape[axis]) if a == axis else (0, 0)
                                 for a in range(leaf.ndim)], constant_values=fill)
                  for leaf in leaves]
    return jnp.stack(leaves)


def _unstack_layer(path, leaf, index, width):
    """Layer ``index``'s own variable out of a stacked one, its padding cut off."""
    leaf = leaf[index]
    axis = _padded_axis(path)
    return leaf if axis is None else jax.lax.slice_in_dim(leaf, 0, width, axis=axis)


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
    ``block_impl``: 'unrolled' or 'scan' (``murajax.ops.dense_scan``, layers grouped by input
    width rounded up to ``scan_bucket`` channels, their variables stacked per group); the same
    results from the same variables (``layout_variables`` converts them).
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
    block_impl: str = "unrolled"
    scan_bucket: int = 128
    conv: ModuleDef = nn.Conv
    norm: ModuleDef = ops.BatchNormReLU

    @nn.compact
    def __call__(self, images: jnp.ndarray, train: bool = False, return_features: bool = False):
        if images.ndim != 4:
            raise ValueError(f"DenseNet expects NHWC images, got shape {images.shape}")
        if self.block_impl not in _BLOCK_IMPLS:
            raise ValueError(f"DenseNet.block_impl must be one of {_BLOCK_IMPLS} (resolved; "
                             f"build the model with murajax.models.create), got "
                             f"{self.block_impl!r}")
        if self.remat not in _REMAT:
            raise ValueError(f"DenseNet.remat must be one of {_REMAT} (resolved; build the "
                             f"model with murajax.models.create), got {self.remat!r}")
        conv = functools.partial(self.conv, use_bias=False, dtype=self.dtype,
                                 param_dtype=self.param_dtype, kernel_init=_kernel_init(self))
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
            if self.block_impl == "scan":
                x = self._scan_block(x, stage, num_layers, conv1x1, conv3x3, norm, train)
            else:
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
            kernel_init=_kernel_init(self, nn.linear.default_kernel_init),
            bias_init=nn.initializers.zeros,
            name="head",
        )(pooled)
        if return_features:
            return logits, features
        return logits

    # -- variable layouts: each dense layer's own variables, or stacked per scan bucket ------

    def variable_layout(self) -> dict[str, int]:
        """How this model stores its dense layers: ``{}`` per layer (``'unrolled'``), else
        ``{"conv{B}_block{first}to{last}": padded input width}`` for each scan bucket."""
        if self.block_impl != "scan":
            return {}
        return {name: bucket.width
                for stage, (in_features, num_layers) in self._dense_blocks().items()
                for name, bucket in self._scan_runs(stage, in_features, num_layers)}

    def _scan_runs(self, stage: int, in_features: int, num_layers: int):
        """``(name, bucket)`` of each scan bucket of dense block ``stage``
        (``conv{stage}_block{first}to{last}``: the layers it stacks)."""
        first = 1
        for bucket in ops.dense_scan.buckets(in_features, num_layers, self.growth_rate,
                                             self.scan_bucket):
            last = first + len(bucket.offsets) - 1
            yield f"conv{stage}_block{first}to{last}", bucket
            first = last + 1

    def layout_variables(self, tree: dict, like: dict | None = None) -> dict:
        """``tree`` (one collection of this architecture's variables, or anything shaped like
        one: Adam's moments, gradients; real or abstract arrays) in the layout ``like`` is in
        (default: this model's own; ``{}``: one entry per layer, as in weight files), whatever
        layout ``tree`` is in now. Stacking pads with zeros (ones for a running variance)."""
        layout = self.variable_layout() if like is None else _layout_of(like)
        now = _layout_of(tree)
        if now.keys() == layout.keys() and all(now[k] in (None, w) for k, w in layout.items()):
            return tree  # already there (None: a masked optimizer state's empty entries)
        leaves = jax.tree.leaves(tree)
        if leaves and all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves):
            sharding = leaves[0].sharding  # one model's variables share one (replicated)
            shapes = jax.eval_shape(lambda t: self.layout_variables(t, like), tree)
            return jax.tree.map(
                lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)
        tree = self._per_layer(tree)
        for name, width in layout.items():
            stage, first, last = map(int, _LAYER_RUN.fullmatch(name).groups())
            names = [f"conv{stage}_block{layer}" for layer in range(first, last + 1)]
            if names[0] in tree:
                group = [tree.pop(layer) for layer in names]
                tree[name] = jax.tree_util.tree_map_with_path(
                    lambda path, *leaves, width=width: _stack_layers(path, leaves, width), *group)
        return tree

    def _per_layer(self, tree: dict) -> dict:
        """``tree`` with its stacked layer runs split into one entry per layer."""
        inputs = {stage: c0 for stage, (c0, _) in self._dense_blocks().items()}
        out = {}
        for name, value in tree.items():
            run = _LAYER_RUN.fullmatch(name)
            if run is None:
                out[name] = value
                continue
            stage, first, last = map(int, run.groups())
            for index, layer in enumerate(range(first, last + 1)):
                width = inputs[stage] + (layer - 1) * self.growth_rate
                out[f"conv{stage}_block{layer}"] = jax.tree_util.tree_map_with_path(
                    lambda path, leaf, i=index, w=width: _unstack_layer(path, leaf, i, w), value)
        return out

    def _dense_blocks(self) -> dict[int, tuple[int, int]]:
        """Keras stage number -> (the dense block's input width, its number of layers)."""
        blocks, features = {}, self.initial_features
        for block, num_layers in enumerate(self.block_sizes):
            blocks[block + 2] = (features, num_layers)
            features += num_layers * self.growth_rate
            if block != len(self.block_sizes) - 1:
                features = int(features * self.compression)
        return blocks

    def _scan_block(self, x, stage, num_layers, conv1x1, conv3x3, norm, train):
        """One dense block as ``ops.dense_scan.dense_block`` (``block_impl='scan'``): the
        concatenation of ``x`` and the layers' maps, from each bucket's stacked variables
        (``_StackedLayers``; running statistics written back stacked)."""
        growth, in_features = self.growth_rate, x.shape[-1]
        bottleneck = self.bottleneck_width * growth
        runs = list(self._scan_runs(stage, in_features, num_layers))
        layout = [bucket for _, bucket in runs]
        layers = [_StackedLayers(bucket.width, bucket.offsets, growth, bottleneck,
                                 self.param_dtype, name=name) for name, bucket in runs]
        stacked = [layer() for layer in layers]

        def part_a(h, p):  # BN -> ReLU -> 1x1 conv over the bucket's width
            # The mask keeps the padding's scale and bias at exactly 0 and their gradient
            # too (ops.dense_scan: in the backward pass the padding holds later layers' maps).
            norm1 = {**p["norm1"], "scale": p["norm1"]["scale"] * p["mask"],
                     "bias": p["norm1"]["bias"] * p["mask"]}
            h, stats = _apply_norm(norm, norm1, h, train)
            return _apply_conv(conv1x1, p["kernel1"], h), stats

        def part_b(h, p):  # BN -> ReLU -> 3x3 conv: the layer's growth_rate new maps
            h, stats = _apply_norm(norm, p["norm2"], h, train)
            return _apply_conv(conv3x3, p["kernel2"], h), stats

        buffer, stats = ops.dense_scan.dense_block(
            x, stacked, layout, growth, part_a, part_b,
            save_everything=not train or self.remat == "none",
            recompute_part_a_output=self.remat == "layer",
        )
        if train and not self.is_initializing():
            for layer, bucket_stats in zip(layers, stats):
                layer(bucket_stats)
        return buffer


def _variant(name: str, **architecture) -> Callable[..., DenseNet]:
    def build(*, conv_impl: str = "auto", remat: bool | str = "auto",
              block_impl: str = "unrolled", **overrides) -> DenseNet:
        """A DenseNet of this variant; ``overrides`` replace any DenseNet field. ``conv_impl``
        ('auto', 'matmul', 'xla') and ``remat`` ('auto', 'none', 'bottleneck', 'layer' or a
        bool) are resolved for JAX's default backend, ``block_impl`` ('unrolled', 'scan')
        checked (``murajax.models.registry``)."""
        overrides.setdefault("conv", registry.conv_module(conv_impl))
        return DenseNet(**{**architecture, **overrides}, remat=registry.resolve_remat(remat),
                        block_impl=registry.resolve_block_impl(block_impl))

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
    when used: it needs h5py, and imports this module), on the variables one entry per layer
    (Keras's layout) and back in ``model``'s."""
    from murajax import pretrained

    if model is None:
        return pretrained.load_keras_weights(path, variables)
    per_layer = registry.in_layout(model, dict(variables), like={})
    return registry.in_layout(model, pretrained.load_keras_weights(path, per_layer, model=model))


for _build in (densenet121, densenet161, densenet169, densenet201, densenet_tiny):
    registry.register(_build.__name__, _build, load_weights=load_keras_weights)
