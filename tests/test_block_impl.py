"""``block_impl='scan'`` (``murajax.ops.dense_scan``) computes the unrolled DenseNet: its
variables (stacked per scan bucket) convert to the unrolled ones and back exactly, and given
the same variables both give the same logits, gradients and new BatchNorm running statistics,
for every remat policy; the padding's gradient is exactly zero, so training keeps it zero.

Tolerances. The two layouts sum in different orders, and training-mode BatchNorm gradients
cancel badly on a tiny model (the last blocks normalise a handful of values), so float32
gradients of the two agree only to ~1e-2 of a leaf's largest entry there, as two float32 runs
of *either* layout with reordered sums would. The gradient comparison therefore runs in
float64, where the layouts must agree to 1e4 float64 ulps of the largest gradient (a wrong
offset, padding or missing term errs by 1e-4 of it or more); the running statistics are
stored in float32 whatever the compute dtype, so they are compared to a few float32 ulps.
Forward outputs are compared in float32 at the model's own precision.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from murajax import models
from murajax.errors import UserError
from murajax.ops import dense_scan

KEY = jax.random.key(0)
EPS32 = float(np.finfo(np.float32).eps)
EPS64 = float(np.finfo(np.float64).eps)
# Three-layer blocks, growth 8 from 16 channels, buckets of 16: block 1 reads 16, 24 -> 32 and
# 32 channels, so one bucket is padded and runs a scan of length 2, and one is exact.
TINY = dict(block_sizes=(3, 3), growth_rate=8, initial_features=16, bottleneck_width=2,
            scan_bucket=16)


def _images(batch=4, size=32, dtype=np.float32):
    return np.random.default_rng(1).normal(size=(batch, size, size, 3)).astype(dtype)


def _random_variables(model, images, seed=0):
    """He-normal kernels and random BatchNorm state drawn with NumPy (no init compile)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda k, x: model.init(k, x, train=True), KEY, images)

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            value = rng.normal(0.0, math.sqrt(2.0 / math.prod(leaf.shape[:-1])), leaf.shape)
        elif name in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, leaf.shape)
        else:
            value = rng.normal(0.0, 0.1, leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _pair(conv_impl="auto", **fields):
    """The tiny DenseNet, unrolled and scanned."""
    conv = models.registry.conv_module(conv_impl)
    return tuple(models.DenseNet(**{**TINY, **fields}, block_impl=impl, conv=conv)
                 for impl in ("unrolled", "scan"))


def test_buckets_group_layers_by_rounded_input_width():
    layout = dense_scan.buckets(16, 3, 8, 16)
    assert layout == (dense_scan.Bucket(16, (16,)), dense_scan.Bucket(32, (24, 32)))
    # DenseNet-169's third block: 32 layers from 256 channels; the last bucket reads the
    # block's final 1280 channels.
    layout = dense_scan.buckets(256, 32, 32, 128)
    assert [b.width for b in layout] == list(range(256, 1281, 128))
    assert [len(b.offsets) for b in layout] == [1, 4, 4, 4, 4, 4, 4, 4, 3]
    assert all(b.offsets[-1] <= b.width for b in layout)
    # 82 layers, 82 input widths unrolled; 24 shapes scanned.
    widths = [(64, 6), (128, 12), (256, 32), (640, 32)]
    assert sum(len(dense_scan.buckets(c, n, 32, 128)) for c, n in widths) == 24


@pytest.mark.parametrize("name", ["densenet_tiny", "densenet169"])
def test_scan_variables_convert_to_the_unrolled_tree_and_back(name):
    images = jnp.zeros((1, 64, 64, 3))
    unrolled, scan = (models.create(name, block_impl=impl) for impl in ("unrolled", "scan"))
    per_layer, stacked = (jax.eval_shape(m.init, KEY, images) for m in (unrolled, scan))
    for want, got in ((per_layer, models.in_layout(unrolled, stacked)),
                      (stacked, models.in_layout(scan, per_layer))):
        assert jax.tree.structure(got) == jax.tree.structure(want)
        assert jax.tree.leaves(got) == jax.tree.leaves(want)
    if name == "densenet169":  # 82 layers in 24 buckets: 24 stacked runs of layers
        assert len(scan.variable_layout()) == 24
        assert len(jax.tree.leaves(stacked["params"])) == 24 * 6 + 3 * 3 + 2 + 2 + 2 + 1
    unrolled, scan = _pair()
    variables = _random_variables(unrolled, _images())
    there = models.in_layout(scan, variables)
    for x, y in zip(jax.tree.leaves(models.in_layout(unrolled, there)), jax.tree.leaves(variables)):
        np.testing.assert_array_equal(x, y)
    # Padding: zeros, and ones for a running variance (so that it normalises nothing to NaN).
    run = there["batch_stats"]["conv2_block2to3"]["bottleneck"]["norm"]
    np.testing.assert_array_equal(run["var"][0, 24:], 1.0)
    np.testing.assert_array_equal(there["params"]["conv2_block2to3"]["bottleneck"]["conv"]
                                  ["kernel"][0, :, :, 24:], 0.0)


def test_scan_initialises_each_layer_at_its_own_scale_with_zero_padding():
    unrolled, scan = _pair(growth_rate=16, bottleneck_width=4)
    variables = jax.jit(scan.init)(KEY, _images())
    per_layer = models.in_layout(unrolled, variables)
    for stage, (in_features, num_layers) in scan._dense_blocks().items():
        for layer in range(1, num_layers + 1):
            params = per_layer["params"][f"conv{stage}_block{layer}"]
            width = in_features + (layer - 1) * 16
            kernel = np.asarray(params["bottleneck"]["conv"]["kernel"])
            assert kernel.shape == (1, 1, width, 64)
            # He-normal with the layer's own fan-in (64 x width draws: within 20%).
            assert abs(kernel.std() / math.sqrt(2.0 / width) - 1.0) < 0.2
            np.testing.assert_array_equal(params["bottleneck"]["norm"]["scale"], 1.0)
    padded = traverse_util.flatten_dict(
        models.in_layout(scan, jax.tree.map(np.asarray, per_layer)))  # padding refilled
    for key, value in traverse_util.flatten_dict(variables).items():
        np.testing.assert_array_equal(value, padded[key], err_msg=str(key))


@pytest.mark.parametrize("remat", ["none", "bottleneck", "layer"])
def test_scan_gradients_and_statistics_equal_unrolled(remat):
    with jax.enable_x64(True):
        unrolled, scan = _pair(remat=remat, dtype=jnp.float64, param_dtype=jnp.float64)
        images = _images(dtype=np.float64)
        variables = _random_variables(unrolled, images)

        def run(model):
            def loss(params):
                logits, updates = model.apply(
                    {"params": params, "batch_stats": variables["batch_stats"]}, images,
                    train=True, mutable=["batch_stats"])
                return jnp.sum(jnp.sin(logits)), (logits, updates["batch_stats"])

            return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])

        (_, (logits_a, stats_a)), grads_a = run(unrolled)
        variables = models.in_layout(scan, variables)
        (_, (logits_b, stats_b)), grads_b = run(scan)
    # The padding gets exactly zero gradient (it holds later layers' maps in the backward pass
    # of remat's recomputation, which the mask on its scale and bias cancels).
    for a, b in zip(jax.tree.leaves(scan.layout_variables(unrolled.layout_variables(grads_b))),
                    jax.tree.leaves(grads_b)):
        np.testing.assert_array_equal(a, b)
    grads_b, stats_b = unrolled.layout_variables(grads_b), unrolled.layout_variables(stats_b)
    variables = models.in_layout(unrolled, variables)
    np.testing.assert_allclose(logits_b, logits_a, rtol=0,
                               atol=256 * EPS64 * float(np.max(np.abs(logits_a))))
    grads_a, grads_b = traverse_util.flatten_dict(grads_a), traverse_util.flatten_dict(grads_b)
    assert grads_a.keys() == grads_b.keys()
    scale = max(float(np.max(np.abs(g))) for g in grads_a.values())
    for key, a in grads_a.items():
        a, b = np.asarray(a), np.asarray(grads_b[key])
        assert b.dtype == np.float64
        # Relative to the largest gradient: small leaves (the stem's BatchNorm) are sums
        # of much larger terms that cancel. A wrong term errs by ~1e-4 of it or more.
        assert np.max(np.abs(a - b)) <= 1e4 * EPS64 * scale, key
    stats_a, stats_b = traverse_util.flatten_dict(stats_a), traverse_util.flatten_dict(stats_b)
    assert stats_a.keys() == stats_b.keys()
    for key, a in stats_a.items():
        a, b = np.asarray(a), np.asarray(stats_b[key])
        assert a.dtype == b.dtype == np.float32
        # Every statistic moved from its random start, and both layouts moved it alike.
        assert not np.allclose(a, traverse_util.flatten_dict(variables["batch_stats"])[key])
        np.testing.assert_allclose(b, a, rtol=4 * EPS32, atol=4 * EPS32, err_msg=str(key))


@pytest.mark.parametrize("conv_impl", ["xla", "matmul"])
def test_scan_forward_equals_unrolled_in_float32(conv_impl):
    unrolled, scan = _pair(conv_impl=conv_impl)
    images = _images()
    variables = _random_variables(unrolled, images)
    for train in (False, True):
        (a, sa), (b, sb) = (m.apply(models.in_layout(m, variables), images, train=train,
                                    mutable=["batch_stats"]) for m in (unrolled, scan))
        sb = models.in_layout(unrolled, sb)
        # A logit sums a few hundred float32 products: a few hundred ulps of its size at most.
        np.testing.assert_allclose(b, a, rtol=0, atol=256 * EPS32 * float(np.max(np.abs(a))))
        for x, y in zip(jax.tree.leaves(sa), jax.tree.leaves(sb)):
            np.testing.assert_allclose(y, x, rtol=64 * EPS32, atol=64 * EPS32)


def test_densenet169_scan_forward_equals_unrolled():
    """The real DenseNet-169 structure (its 82 layers in 24 buckets of 128 channels), one
    training-mode forward pass at 32 px: logits and every new running statistic. In float64:
    at 32 px the last block normalises 2 values per channel, and float32 rounding alone moves
    the logits by tens of percent (either layout against itself with sums reordered)."""
    with jax.enable_x64(True):
        images = _images(batch=2, dtype=np.float64)
        pair = [models.densenet169(block_impl=impl, dtype=jnp.float64, param_dtype=jnp.float64)
                for impl in ("unrolled", "scan")]
        variables = _random_variables(pair[0], images)
        (logits_a, stats_a), (logits_b, stats_b) = [
            jax.jit(lambda v, m=m: m.apply(v, images, train=True, mutable=["batch_stats"]))(
                models.in_layout(m, variables)) for m in pair]
        stats_b = models.in_layout(pair[0], stats_b)
    # The head computes in float32 (the logits' dtype): a few float32 ulps.
    np.testing.assert_allclose(logits_b, logits_a, rtol=0,
                               atol=16 * EPS32 * float(np.max(np.abs(logits_a))))
    stats_a, stats_b = traverse_util.flatten_dict(stats_a), traverse_util.flatten_dict(stats_b)
    assert stats_a.keys() == stats_b.keys() and len(stats_a) == 2 * (2 * 82 + 3 + 2)
    for key, a in stats_a.items():  # stored in float32
        np.testing.assert_allclose(stats_b[key], a, rtol=4 * EPS32, atol=4 * EPS32,
                                   err_msg=str(key))


def test_config_field_reaches_the_model_and_is_checked():
    from murajax import train_state
    from murajax.configs import default

    config = default.get_config()
    assert config.model.block_impl == "unrolled"  # the paper's recipe runs as before
    config.model.block_impl = "scan"
    assert train_state.model_from_config(config).block_impl == "scan"
    config.model.block_impl = "loop"
    with pytest.raises(UserError, match=r"config.model.block_impl must be one of "
                                        r"\['unrolled', 'scan'\], got 'loop'"):
        train_state.model_from_config(config)


def _randomised(state, seed=0):
    """``state`` with every float leaf random (Adam's moments, the EMA, the statistics too)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype)
                        if jnp.issubdtype(x.dtype, jnp.floating) else x, state)


def _comparable(leaf):
    return jax.random.key_data(leaf) if jax.dtypes.issubdtype(
        leaf.dtype, jax.dtypes.prng_key) else leaf


@pytest.mark.parametrize("trainable", ["all", "head"])
def test_a_checkpoint_restores_in_the_other_layout_bit_for_bit(tmp_path, trainable):
    """Params, statistics, Adam's moments (masked ones with trainable='head') and the EMA of a
    checkpoint written in one layout restore in the other, and back, exactly."""
    from murajax import checkpoints, train_state
    from tests import helpers

    fields = {"ema.decay": 0.9, "optim.trainable": trainable}
    configs = {impl: helpers.tiny_config(**fields, **{"model.block_impl": impl})
               for impl in ("unrolled", "scan")}
    model = {impl: train_state.model_from_config(c) for impl, c in configs.items()}
    states = {impl: helpers.tiny_state(c) for impl, c in configs.items()}
    saved = {"unrolled": _randomised(states["unrolled"], 1)}
    saved["scan"] = train_state.relayout(model["scan"], saved["unrolled"])
    assert set(saved["scan"].params) != set(saved["unrolled"].params)
    for source, target in (("unrolled", "scan"), ("scan", "unrolled")):
        checkpointer = checkpoints.Checkpointer(tmp_path / source)
        checkpointer.save(1, saved[source], {}, {})
        checkpointer.wait()
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                               sharding=x.sharding),
                                states[target])
        restored, _, _ = checkpointer.restore(
            1, abstract, functools.partial(train_state.relayout, model[target]))
        checkpointer.close()
        assert jax.tree.structure(restored) == jax.tree.structure(states[target])
        helpers.assert_same_tree(*(jax.tree.map(_comparable, s)
                                   for s in (restored, saved[target])))


def test_a_run_resumes_in_the_other_layout_and_predicts_from_it(tmp_path):
    from murajax import synthetic, train
    from murajax.inference import predictor
    from tests import helpers

    root = synthetic.generate(tmp_path / "data", num_studies=24, seed=3)
    config = functools.partial(helpers.run_config, root, checkpoint_every_steps=4)
    first = train.train_and_evaluate(config(stop_after_steps=3), tmp_path / "run")
    assert first["preempted"]
    final = train.train_and_evaluate(config(**{"model.block_impl": "scan"}), tmp_path / "run")
    assert not final["preempted"] and np.isfinite(final["val_loss"])
    member = predictor.Predictor.from_workdir(tmp_path / "run").variables[0]
    assert "conv2_block1to2" in member["params"]  # the run's layout now: scan
    # And a new unrolled run starts from that scan checkpoint (config.init_from).
    started = train.train_and_evaluate(config(init_from=str(tmp_path / "run"),
                                              stop_after_steps=1), tmp_path / "fine-tune")
    assert started["step"] == 1


def test_an_interrupted_scan_run_ends_bit_identical_to_an_uninterrupted_one(tmp_path):
    from murajax import synthetic, train
    from tests import helpers

    root = synthetic.generate(tmp_path / "data", num_studies=24, seed=5)

    def config(**extra):
        return helpers.run_config(root, **{"checkpoint_every_steps": 4,
                                           "model.block_impl": "scan", **extra})

    full = train.train_and_evaluate(config(), tmp_path / "full")
    steps_per_epoch = full["history"][0]["step"]
    resumed = helpers.train_with_two_interruptions(config, tmp_path / "resumed", steps_per_epoch)
    assert resumed["val_loss"] == full["val_loss"]
    helpers.assert_same_tree(helpers.final_variables(tmp_path / "resumed"),
                             helpers.final_variables(tmp_path / "full"))
