"""Import ImageNet (or any Keras-trained) DenseNet weights into murajax's Flax DenseNet.

``load_keras_weights(path, variables, model=None)`` reads a Keras DenseNet weight file with h5py
(no Keras or TensorFlow at run time) and returns a copy of ``variables`` (``{'params': ...,
'batch_stats': ...}`` of :class:`murajax.models.DenseNet`) with every backbone parameter and
BatchNorm statistic replaced by the file's; the ``head`` (and any other collection) is kept from
``variables``. It is the weight importer the DenseNets register (``murajax.models.get(name)
.load_weights``), which is how training's ``config.init_from`` reaches it. ``variables`` may be real arrays or the ``jax.ShapeDtypeStruct`` tree of
``jax.eval_shape(model.init, ...)``; only shapes and dtypes are read from backbone leaves, and
loaded arrays take the leaf's dtype.

File formats read:

* legacy Keras HDF5 weights (``model.save_weights('x.h5')`` in Keras 2,
  ``legacy_h5_format.save_weights_to_hdf5_group`` in Keras 3): root attribute ``layer_names``,
  one group per layer with attribute ``weight_names``. This is the format of the published
  ``densenet169_weights_tf_dim_ordering_tf_kernels_notop.h5``, whose stem layers are named
  ``conv1/conv``, ``conv1/bn`` (weights ``conv1/conv/kernel:0``); Keras 3 writes ``conv1_conv``
  and ``conv1_conv/kernel``. Both spellings are accepted ('/' in a layer name is read as '_').
* a legacy full-model HDF5 file (``model.save('x.h5')``): the same under ``model_weights``.
* the Keras 3 native ``*.weights.h5`` (``layers/conv2d_N/vars/0`` ...): layers there carry
  auto-generated names, so convolutions and BatchNorms are matched by creation order, which for
  ``keras.applications.DenseNet*`` is the architecture's order.

Name mapping (see ``murajax.models.densenet``): ``stem_conv``/``stem_bn`` <- ``conv1_conv``/``conv1_bn``;
``conv{B}_block{L}/bottleneck/norm``, ``/bottleneck/conv``, ``/norm``, ``/conv`` <-
``conv{B}_block{L}_0_bn``, ``_1_conv``, ``_1_bn``, ``_2_conv``; ``pool{B}/norm``, ``/conv`` <-
``pool{B}_bn``, ``pool{B}_conv``; ``final_bn`` <- ``bn``. BatchNorm ``gamma``, ``beta``,
``moving_mean``, ``moving_variance`` become ``scale``, ``bias`` (params) and ``mean``, ``var``
(batch_stats). Conv kernels are HWIO in both frameworks and are copied as they are.

Every backbone leaf must be assigned: a file for another architecture (DenseNet-121 weights into
a DenseNet-169), a missing layer or weight, or a shape that does not fit raises one
:class:`~murajax.errors.UserError` naming the file and the first layer (in network order) that
does not fit, with the expected and found shapes. A missing or unreadable file is a UserError too.

BatchNorm epsilon: Keras DenseNets normalise with epsilon 1.001e-5, which is the model default
``DenseNet.bn_epsilon`` (``models.KERAS_BN_EPSILON``) and ``config.model.bn_epsilon``'s. Weights
from Keras should be used with that epsilon (torchvision's 1e-5 shifts outputs slightly). The
epsilon cannot be seen in ``variables``; pass ``model=`` (training does) and
``load_keras_weights`` raises a UserError if the model's ``bn_epsilon`` differs.

The input convention is the caller's business: Keras DenseNet ImageNet weights expect
``keras.applications.densenet.preprocess_input`` ("torch" mode: RGB in [0, 1], then ImageNet
mean/std normalisation).
"""

from __future__ import annotations

import os
import re
from typing import Any

import h5py
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import FrozenDict, unfreeze

from murajax.errors import UserError
from murajax.models.densenet import KERAS_BN_EPSILON

__all__ = ["load_keras_weights", "keras_layer_name"]

# Flax leaf name -> Keras weight name, per layer kind. Collection is where the Flax leaf lives.
_CONV_WEIGHTS = {("params", "kernel"): "kernel"}
_BN_WEIGHTS = {
    ("params", "scale"): "gamma",
    ("params", "bias"): "beta",
    ("batch_stats", "mean"): "moving_mean",
    ("batch_stats", "var"): "moving_variance",
}
# Keras 3 native format stores a layer's variables by index, in this order.
_NATIVE_ORDER = {
    "conv": ["kernel"],
    "bn": ["gamma", "beta", "moving_mean", "moving_variance"],
}
_HEAD = "head"
_BACKBONE_NAME = re.compile(
    r"conv1_(conv|bn)|conv\d+_block\d+_(0_bn|1_conv|1_bn|2_conv)|pool\d+_(bn|conv)|bn"
)


def keras_layer_name(module_path: tuple[str, ...]) -> str:
    """The Keras Applications layer name of a murajax DenseNet submodule path."""
    top, rest = module_path[0], tuple(module_path[1:])
    simple = {"stem_conv": "conv1_conv", "stem_bn": "conv1_bn", "final_bn": "bn"}
    if top in simple and not rest:
        return simple[top]
    if re.fullmatch(r"conv\d+_block\d+", top):
        suffix = {
            ("bottleneck", "norm"): "_0_bn",
            ("bottleneck", "conv"): "_1_conv",
            ("norm",): "_1_bn",
            ("conv",): "_2_conv",
        }.get(rest)
        if suffix:
            return top + suffix
    if re.fullmatch(r"pool\d+", top):
        suffix = {("norm",): "_bn", ("conv",): "_conv"}.get(rest)
        if suffix:
            return top + suffix
    raise ValueError(f"no Keras name for DenseNet submodule {'/'.join(module_path)}")


def _network_position(keras_name: str) -> tuple[int, int, int, int]:
    """Sort key putting Keras DenseNet layers in the order the network (and Keras) builds them."""
    if keras_name == "bn":
        return (10**6, 0, 0, 0)
    m = re.fullmatch(r"conv1_(conv|bn)", keras_name)
    if m:
        return (1, 0, 0, 0 if m.group(1) == "conv" else 1)
    m = re.fullmatch(r"conv(\d+)_block(\d+)_(0_bn|1_conv|1_bn|2_conv)", keras_name)
    if m:
        sub = ["0_bn", "1_conv", "1_bn", "2_conv"].index(m.group(3))
        return (int(m.group(1)), 1, int(m.group(2)), sub)
    m = re.fullmatch(r"pool(\d+)_(bn|conv)", keras_name)
    if m:
        return (int(m.group(1)), 2, 0, 0 if m.group(2) == "bn" else 1)
    raise ValueError(f"not a Keras DenseNet layer name: {keras_name}")


def _decode(value) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def _read_name_list(group: h5py.Group, name: str) -> list[str] | None:
    """Reads a string-list attribute, also when Keras split it into ``name0``, ``name1``, ..."""
    if name in group.attrs:
        return [_decode(v) for v in np.atleast_1d(group.attrs[name])]
    if f"{name}0" not in group.attrs:
        return None
    names, chunk = [], 0
    while f"{name}{chunk}" in group.attrs:
        names.extend(_decode(v) for v in np.atleast_1d(group.attrs[f"{name}{chunk}"]))
        chunk += 1
    return names


class _LegacyReader:
    """Layer-name based reader for legacy Keras HDF5 weights (Keras 2 and Keras 3 spellings)."""

    def __init__(self, path: str, root: h5py.Group, layer_names: list[str]):
        self.path = path
        self.root = root
        # '/' (Keras 2: conv1/conv) and '_' (Keras 3: conv1_conv) spellings are the same layer.
        self.layers = {name.replace("/", "_"): name for name in layer_names}

    def describe(self, keras_name: str) -> str:
        return f"layer {keras_name!r}"

    def has_weights(self, file_name: str) -> bool:
        group = self.root.get(file_name)
        return isinstance(group, h5py.Group) and bool(_read_name_list(group, "weight_names"))

    def unused_backbone_layers(self, used: set[str]) -> list[str]:
        return [
            name for name, file_name in self.layers.items()
            if name not in used and _BACKBONE_NAME.fullmatch(name) and self.has_weights(file_name)
        ]

    def weights(self, keras_name: str, kind: str) -> dict[str, np.ndarray] | None:
        del kind
        file_name = self.layers.get(keras_name)
        if file_name is None:
            return None
        group = self.root.get(file_name)
        if not isinstance(group, h5py.Group):
            raise UserError(
                f"{self.path}: layer {file_name!r} is listed in 'layer_names' but has no group; "
                "the file is damaged. Save the weights again."
            )
        found = {}
        for weight_name in _read_name_list(group, "weight_names") or []:
            # conv1/conv/kernel:0 (Keras 2), conv1_conv/kernel (Keras 3) -> kernel
            short = weight_name.split("/")[-1].split(":")[0]
            if short in found:
                raise UserError(
                    f"{self.path}: layer {file_name!r} has two weights named {short!r}; "
                    "this is not a Keras DenseNet weight file."
                )
            try:
                found[short] = np.asarray(group[weight_name][()])
            except KeyError:
                raise UserError(
                    f"{self.path}: layer {file_name!r} lists weight {weight_name!r} but the file "
                    "has no such dataset; the file is damaged. Save the weights again."
                ) from None
        return found


class _NativeReader:
    """Order-based reader for the Keras 3 ``.weights.h5`` format (auto-named layers)."""

    def __init__(self, path: str, layers: h5py.Group):
        self.path = path
        self.by_kind: dict[str, list[str]] = {"conv": [], "bn": []}
        prefixes = {"conv": "conv2d", "bn": "batch_normalization"}
        for kind, prefix in prefixes.items():
            numbered = []
            for name in layers:
                m = re.fullmatch(prefix + r"(?:_(\d+))?", name)
                if m:
                    numbered.append((int(m.group(1) or 0), name))
            self.by_kind[kind] = [name for _, name in sorted(numbered)]
        self.layers = layers
        self.next_index = {"conv": 0, "bn": 0}
        self.current: dict[str, str] = {}

    def describe(self, keras_name: str) -> str:
        file_name = self.current.get(keras_name)
        if file_name is None:
            return f"layer {keras_name!r}"
        return f"layer {file_name!r} (matched by order to Keras {keras_name!r})"

    def unused_backbone_layers(self, used: set[str]) -> list[str]:
        del used
        return [
            name for kind, names in self.by_kind.items() for name in names[self.next_index[kind]:]
        ]

    def weights(self, keras_name: str, kind: str) -> dict[str, np.ndarray] | None:
        index = self.next_index[kind]
        names = self.by_kind[kind]
        if index >= len(names):
            return None
        self.next_index[kind] += 1
        file_name = names[index]
        self.current[keras_name] = file_name
        variables = self.layers[file_name].get("vars")
        count = len(variables) if isinstance(variables, h5py.Group) else 0
        order = _NATIVE_ORDER[kind]
        if count != len(order):
            # Let the caller report the mismatch with the names it expected.
            return {f"vars/{i}": np.asarray(variables[str(i)][()]) for i in range(count)}
        return {order[i]: np.asarray(variables[str(i)][()]) for i in range(count)}


def _open_reader(path: str, f: h5py.File):
    for root in (f, f.get("model_weights")):
        if isinstance(root, h5py.Group):
            layer_names = _read_name_list(root, "layer_names")
            if layer_names is not None:
                return _LegacyReader(path, root, layer_names)
    if isinstance(f.get("layers"), h5py.Group):
        return _NativeReader(path, f["layers"])
    raise UserError(
        f"{path} is an HDF5 file but not Keras weights: it has no 'layer_names' attribute, no "
        "'model_weights' group and no 'layers' group. Pass a file written by Keras "
        "(e.g. densenet169_weights_tf_dim_ordering_tf_kernels_notop.h5)."
    )


def _shape_of(leaf) -> tuple[int, ...]:
    return tuple(int(d) for d in leaf.shape)


def load_keras_weights(path: str | os.PathLike, variables: Any, *, model: Any = None) -> Any:
    """Returns ``variables`` with the DenseNet backbone replaced by the Keras weights in ``path``.

    ``model``, when given, is the ``DenseNet`` the variables belong to; its ``bn_epsilon`` must be
    Keras's 1.001e-5. Raises ``UserError`` for a missing or unreadable file and for a file that does
    not fit the model (naming the first layer that does not fit).
    """
    path = os.fspath(path)
    if model is not None:
        epsilon = getattr(model, "bn_epsilon", KERAS_BN_EPSILON)
        if not np.isclose(epsilon, KERAS_BN_EPSILON, rtol=0, atol=1e-12):
            raise UserError(
                f"Keras weights from {path} need BatchNorm epsilon {KERAS_BN_EPSILON} (Keras "
                f"DenseNet), but the model uses bn_epsilon={epsilon} (config.model.bn_epsilon). "
                f"Set config.model.bn_epsilon={KERAS_BN_EPSILON} (the DenseNet default), or "
                f"build the model with bn_epsilon={KERAS_BN_EPSILON}."
            )
    if not os.path.exists(path):
        raise UserError(f"Keras weight file {path} does not exist.")
    if not os.path.isfile(path):
        raise UserError(f"Keras weight file {path} is not a file.")

    frozen = isinstance(variables, FrozenDict)
    variables = unfreeze(variables)
    if "params" not in variables:
        raise ValueError("variables must be a DenseNet variable dict with a 'params' collection")
    flat = {
        collection: traverse_util.flatten_dict(variables.get(collection, {}))
        for collection in ("params", "batch_stats")
    }

    # Backbone modules: submodule path -> {(collection, leaf name): template leaf}.
    modules: dict[tuple[str, ...], dict[tuple[str, str], Any]] = {}
    for collection, leaves in flat.items():
        for key, leaf in leaves.items():
            if key[0] == _HEAD:
                continue
            modules.setdefault(tuple(key[:-1]), {})[(collection, key[-1])] = leaf
    ordered = sorted(modules, key=lambda p: _network_position(keras_layer_name(p)))

    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise UserError(f"{path} is not a readable HDF5 file ({e}).") from None
    assigned: dict[tuple[str, tuple[str, ...]], np.ndarray] = {}
    with f:
        reader = _open_reader(path, f)
        used: set[str] = set()
        for module_path in ordered:
            keras_name = keras_layer_name(module_path)
            leaves = modules[module_path]
            kind = "conv" if ("params", "kernel") in leaves else "bn"
            mapping = _CONV_WEIGHTS if kind == "conv" else _BN_WEIGHTS
            found = reader.weights(keras_name, kind)
            if found is None:
                raise UserError(
                    f"{path} does not fit this model: it has no layer {keras_name!r} (for murajax "
                    f"{'/'.join(module_path)}). The file is probably for a smaller DenseNet or "
                    "another architecture; use weights of the same variant as the model."
                )
            used.add(keras_name)
            expected = {mapping[k]: _shape_of(leaf) for k, leaf in leaves.items() if k in mapping}
            if set(found) != set(expected) or len(expected) != len(leaves):
                raise UserError(
                    f"{path} does not fit this model: {reader.describe(keras_name)} has weights "
                    f"{sorted(found)}, expected {sorted(expected)} (for murajax "
                    f"{'/'.join(module_path)})."
                )
            for (collection, leaf_name), leaf in sorted(leaves.items()):
                keras_weight = mapping[(collection, leaf_name)]
                value = found[keras_weight]
                if tuple(value.shape) != _shape_of(leaf):
                    raise UserError(
                        f"{path} does not fit this model: {reader.describe(keras_name)} weight "
                        f"{keras_weight!r} has shape {tuple(value.shape)}, expected "
                        f"{_shape_of(leaf)} (murajax {'/'.join(module_path)}/{leaf_name}). The "
                        "file is probably for another DenseNet variant; use weights of the same "
                        "variant as the model."
                    )
                assigned[(collection, module_path + (leaf_name,))] = value
        unused = reader.unused_backbone_layers(used)
        if unused:
            raise UserError(
                f"{path} does not fit this model: it has DenseNet layers the model lacks, first "
                f"{unused[0]!r} ({len(unused)} in all). The file is probably for a deeper "
                "DenseNet; use weights of the same variant as the model."
            )

    # No silent partial loads: every backbone leaf must have been replaced.
    backbone = {
        (collection, key) for collection, leaves in flat.items()
        for key in leaves if key[0] != _HEAD
    }
    missing = backbone - set(assigned)
    if missing:  # pragma: no cover - guarded by the loop above
        raise AssertionError(f"backbone leaves not assigned: {sorted(missing)[:5]}")

    result = dict(variables)
    for collection, leaves in flat.items():
        if not leaves:
            continue
        new_leaves = dict(leaves)
        for key, leaf in leaves.items():
            if (collection, key) in assigned:
                new_leaves[key] = jnp.asarray(assigned[(collection, key)], dtype=leaf.dtype)
        result[collection] = traverse_util.unflatten_dict(new_leaves)
    return FrozenDict(result) if frozen else result
