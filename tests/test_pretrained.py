"""Keras DenseNet weights load into murajax's DenseNet exactly (checked against Keras itself)."""

import contextlib
import os

os.environ["KERAS_BACKEND"] = "jax"  # before keras is imported anywhere

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from murajax import models
from murajax.errors import UserError
from murajax.pretrained import keras_layer_name, load_keras_weights

keras = pytest.importorskip("keras")
from keras.src.initializers import constant_initializers, random_initializers  # noqa: E402
from keras.src.legacy.saving import legacy_h5_format  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

SIZE = 64
TORCH_BN_EPSILON = 1e-5  # torchvision's DenseNet BatchNorm epsilon (Keras: 1.001e-5)
PARITY_RTOL = 1e-4  # max|murajax - keras| / max|keras| over the feature maps


@contextlib.contextmanager
def _numpy_initializers(seed):
    """Keras-on-JAX compiles one XLA program per weight shape to initialise a layer (about a
    minute for DenseNet-169 on two cores); draw the same distributions with NumPy instead."""
    rng = np.random.default_rng(seed)

    def uniform(shape, minval=0.0, maxval=1.0, dtype=None, seed=None):
        return rng.uniform(minval, maxval, shape).astype(dtype or "float32")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(random_initializers.random, "uniform", uniform)
        mp.setattr(constant_initializers.Zeros, "__call__",
                   lambda self, shape, dtype=None: np.zeros(shape, dtype or "float32"))
        mp.setattr(constant_initializers.Ones, "__call__",
                   lambda self, shape, dtype=None: np.ones(shape, dtype or "float32"))
        yield


@pytest.fixture(scope="module")
def keras_run(tmp_path_factory):
    """Keras DenseNet-169 with randomised BN weights and statistics, its output and weight files."""
    with _numpy_initializers(0):
        model = keras.applications.DenseNet169(
            weights=None, include_top=False, input_shape=(SIZE, SIZE, 3)
        )
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.gamma.assign(rng.uniform(0.5, 1.5, n).astype(np.float32))
            layer.beta.assign(rng.normal(0.0, 0.2, n).astype(np.float32))
            layer.moving_mean.assign(rng.normal(0.0, 0.2, n).astype(np.float32))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, n).astype(np.float32))
    images = rng.normal(size=(1, SIZE, SIZE, 3)).astype(np.float32)
    expected = np.asarray(model.predict(images, verbose=0))  # jit: faster than eager

    directory = tmp_path_factory.mktemp("keras")
    legacy = directory / "densenet169_keras3.h5"
    with h5py.File(legacy, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    native = directory / "densenet169.weights.h5"
    model.save_weights(native)
    return {"images": images, "expected": expected, "legacy": legacy, "native": native}


def _shapes(model, size=SIZE):
    """The model's variables as ShapeDtypeStructs (no init compute): enough for the loader."""
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))


@pytest.fixture(scope="module")
def shapes169():
    return _shapes(models.densenet169())


def _zeros(shapes):
    """Concrete variables; zeros, since the loader replaces all but the (unused) head."""
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


@pytest.fixture(scope="module")
def loaded(keras_run, shapes169):
    return load_keras_weights(keras_run["legacy"], _zeros(shapes169))


def _flat(variables):
    return {
        (c,) + k: np.asarray(v)
        for c in ("params", "batch_stats")
        for k, v in traverse_util.flatten_dict(variables[c]).items()
    }


def _assert_same(a, b):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for key in fa:
        np.testing.assert_array_equal(fa[key], fb[key], err_msg=str(key))


def _str(value):
    return value.decode() if isinstance(value, bytes) else str(value)


def _rewrite(src, dst, rename_layer=lambda n: n, weight_name=None, drop=(), root_group=None,
             replace=None):
    """Copies a legacy weight file, renaming layers/weights, dropping layers or replacing arrays."""
    replace = replace or {}
    with h5py.File(src, "r") as fin, h5py.File(dst, "w") as fout:
        out = fout.create_group(root_group) if root_group else fout
        names = [_str(n) for n in fin.attrs["layer_names"] if _str(n) not in drop]
        out.attrs["layer_names"] = [rename_layer(n).encode() for n in names]
        for name in names:
            new = rename_layer(name)
            group = out.create_group(new)  # 'conv1/conv' becomes nested groups, as in Keras 2
            old_weights = [_str(w) for w in fin[name].attrs["weight_names"]]
            new_weights = [
                weight_name(new, w.split("/")[-1]) if weight_name else w for w in old_weights
            ]
            group.attrs["weight_names"] = [w.encode() for w in new_weights]
            for old_w, new_w in zip(old_weights, new_weights):
                group.create_dataset(new_w, data=replace.get((name, old_w), fin[name][old_w][()]))


def test_file_written_in_legacy_layout(keras_run):
    with h5py.File(keras_run["legacy"], "r") as f:
        names = [_str(n) for n in f.attrs["layer_names"]]
        assert {"conv1_conv", "conv1_bn", "conv2_block1_0_bn", "pool2_conv", "bn"} <= set(names)
        assert [_str(w) for w in f["conv1_bn"].attrs["weight_names"]] == [
            "conv1_bn/gamma", "conv1_bn/beta", "conv1_bn/moving_mean", "conv1_bn/moving_variance"
        ]
        assert f["conv1_conv"]["conv1_conv/kernel"].shape == (7, 7, 3, 64)


def test_features_match_keras(keras_run, loaded):
    model = models.densenet169()
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False, return_features=True)[1])
    features = apply(loaded, keras_run["images"])
    features, expected = np.asarray(features), keras_run["expected"]
    assert features.shape == expected.shape == (1, 2, 2, 1664)
    # The randomised statistics make a non-trivial output, so the comparison means something.
    assert np.std(expected) > 1e-2 and np.mean(expected > 0) > 0.1
    rel = np.max(np.abs(features - expected)) / np.max(np.abs(expected))
    print(f"murajax vs Keras DenseNet-169 features: max|a-b|/max|b| = {rel:.2e}")
    assert rel < PARITY_RTOL, f"relative error {rel:.2e}"


def test_every_backbone_leaf_loaded_and_head_kept(keras_run, shapes169):
    template = _zeros(shapes169)
    template["params"]["head"]["kernel"] = np.full_like(template["params"]["head"]["kernel"], 3.0)
    out = load_keras_weights(keras_run["legacy"], template)
    np.testing.assert_array_equal(out["params"]["head"]["kernel"], 3.0)
    with h5py.File(keras_run["legacy"], "r") as f:
        for key, value in _flat(out).items():
            collection, *module, leaf = key
            if module[0] == "head":
                continue
            name = keras_layer_name(tuple(module))
            keras_leaf = {"kernel": "kernel", "scale": "gamma", "bias": "beta",
                          "mean": "moving_mean", "var": "moving_variance"}[leaf]
            np.testing.assert_array_equal(value, f[name][f"{name}/{keras_leaf}"][()])


def test_weights_import_into_the_scan_layout(keras_run, loaded):
    """``block_impl='scan'`` stores its layers stacked per bucket: the registered importer
    converts, so the scan model gets exactly the unrolled import, stacked (the two layouts'
    outputs from the same variables: tests/test_block_impl.py)."""
    scan = models.densenet169(block_impl="scan")
    out = models.get("densenet169").load_weights(keras_run["legacy"], _zeros(_shapes(scan)),
                                                 model=scan)
    assert "conv4_block1to1" in out["params"] and "conv4_block1" not in out["params"]
    _assert_same(out, models.in_layout(scan, loaded))


def test_keras2_slash_names_load_identically(keras_run, loaded, shapes169, tmp_path):
    keras2 = tmp_path / "densenet169_weights_tf_dim_ordering_tf_kernels_notop.h5"
    stem = {"conv1_conv": "conv1/conv", "conv1_bn": "conv1/bn", "conv1_relu": "conv1/relu"}
    _rewrite(keras_run["legacy"], keras2, rename_layer=lambda n: stem.get(n, n),
             weight_name=lambda layer, short: f"{layer}/{short}:0")
    with h5py.File(keras2, "r") as f:
        assert "conv1/conv" in [_str(n) for n in f.attrs["layer_names"]]
        assert f["conv1"]["conv"]["conv1"]["conv"]["kernel:0"].shape == (7, 7, 3, 64)
    _assert_same(load_keras_weights(keras2, _zeros(shapes169)), loaded)


def test_full_model_and_native_formats_load_identically(keras_run, loaded, shapes169,
                                                        tmp_path):
    full = tmp_path / "full_model.h5"
    _rewrite(keras_run["legacy"], full, root_group="model_weights")
    _assert_same(load_keras_weights(full, _zeros(shapes169)), loaded)
    _assert_same(load_keras_weights(keras_run["native"], _zeros(shapes169)), loaded)


@pytest.mark.parametrize(
    "variant, layer, found, expected",
    [
        # DenseNet-169 into DenseNet-121: conv4 blocks 1-24 fit, pool4 sees 1280 vs 1024 channels.
        ("densenet121", "pool4_bn", "(1280,)", "(1024,)"),
        ("densenet_tiny", "conv1_conv", "(7, 7, 3, 64)", "(7, 7, 3, 16)"),
    ],
)
def test_other_architecture_names_first_layer(keras_run, variant, layer, found, expected):
    with pytest.raises(UserError) as info:
        load_keras_weights(keras_run["legacy"], _shapes(models.create(variant), 32))
    message = str(info.value)
    assert str(keras_run["legacy"]) in message and repr(layer) in message
    assert f"shape {found}, expected {expected}" in message


def test_deeper_model_reports_missing_layer(keras_run):
    with pytest.raises(UserError, match=r"no layer 'conv4_block33_0_bn'") as info:
        load_keras_weights(keras_run["legacy"], _shapes(models.densenet201(), 32))
    assert str(keras_run["legacy"]) in str(info.value)


def test_missing_or_mismatched_layer_in_file(keras_run, shapes169, tmp_path):
    dropped = tmp_path / "dropped.h5"
    _rewrite(keras_run["legacy"], dropped, drop={"conv3_block7_1_conv"})
    with pytest.raises(UserError, match=r"dropped\.h5.*no layer 'conv3_block7_1_conv'"):
        load_keras_weights(dropped, shapes169)

    bad = tmp_path / "bad_shape.h5"
    wrong = np.zeros((1, 1, 512, 128), np.float32)
    _rewrite(keras_run["legacy"], bad, replace={("pool3_conv", "pool3_conv/kernel"): wrong})
    with pytest.raises(UserError, match=r"'pool3_conv' weight 'kernel' has shape \(1, 1, 512, "
                                        r"128\), expected \(1, 1, 512, 256\)"):
        load_keras_weights(bad, shapes169)


def test_unusable_files_and_epsilon(keras_run, tmp_path):
    template = {"params": {}}
    with pytest.raises(UserError, match="nowhere.h5 does not exist"):
        load_keras_weights(tmp_path / "nowhere.h5", template)
    junk = tmp_path / "junk.h5"
    junk.write_text("not hdf5")
    with pytest.raises(UserError, match="junk.h5 is not a readable HDF5 file"):
        load_keras_weights(junk, template)
    empty = tmp_path / "empty.h5"
    h5py.File(empty, "w").close()
    with pytest.raises(UserError, match="empty.h5 is an HDF5 file but not Keras weights"):
        load_keras_weights(empty, template)
    with pytest.raises(UserError, match="bn_epsilon=1e-05"):
        load_keras_weights(keras_run["legacy"], template,
                           model=models.densenet169(bn_epsilon=TORCH_BN_EPSILON))


def test_training_init_from_refuses_another_epsilon(keras_run):
    """train.py loads config.init_from through the registry's importer with the model, so a
    config.model.bn_epsilon other than Keras's is refused (not only warned about)."""
    import types

    from murajax import train
    from tests import helpers

    config = helpers.tiny_config(**{"model.bn_epsilon": TORCH_BN_EPSILON,
                                    "init_from": str(keras_run["legacy"])})
    strategy = types.SimpleNamespace(one_copy=lambda state: state)
    state = types.SimpleNamespace(variables={"params": {}})
    with pytest.raises(UserError, match=r"bn_epsilon=1e-05 \(config.model.bn_epsilon\)"):
        train._load_pretrained(config, strategy, state)
