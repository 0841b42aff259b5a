"""The model registry and the DenseNet architecture: names, creation-time settings, sizes,
shapes, BatchNorm state, remat, mixed precision, input checks."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from murajax import models, ops
from murajax.errors import UserError

KEY = jax.random.key(0)

# (variant, channels of the final feature maps); every variant downsamples by 32.
FEATURES = [
    ("densenet121", 1024),
    ("densenet161", 2208),
    ("densenet169", 1664),
    ("densenet201", 1920),
    ("densenet_tiny", 32),
]


def _count(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def _tiny_batch(batch=2, size=32):
    return np.random.default_rng(1).normal(size=(batch, size, size, 3)).astype(np.float32)


def _random_variables(model, images, seed=0):
    """Variables with He-normal kernels and random BN state, drawn with NumPy.

    ``model.init`` compiles a threefry program per weight shape (tens of seconds on two shared
    cores); the shapes come from ``jax.eval_shape`` instead and the values from NumPy.
    """
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, KEY, images)

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_in = math.prod(leaf.shape[:-1])
            value = rng.normal(0.0, math.sqrt(2.0 / fan_in), leaf.shape)
        elif name in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, leaf.shape)
        else:  # bias, mean
            value = rng.normal(0.0, 0.1, leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def test_densenet169_parameter_count():
    model = models.densenet169(num_outputs=1)
    variables = jax.eval_shape(model.init, KEY, jnp.zeros((1, 224, 224, 3)))
    assert _count(variables["params"]) == 12_486_145
    # Keras DenseNet169(include_top=False) has 12,642,880 weights; ours adds a 1664+1 head.
    assert _count(variables) == 12_642_880 + 1665


@pytest.mark.parametrize("variant, channels", FEATURES)
def test_output_and_feature_shapes_at_224(variant, channels):
    model = models.create(variant, num_outputs=3)
    (logits, features), variables = jax.eval_shape(
        lambda k, x: model.init_with_output(k, x, return_features=True),
        KEY, jnp.zeros((2, 224, 224, 3)),
    )
    assert logits.shape == (2, 3) and logits.dtype == jnp.float32
    assert features.shape == (2, 7, 7, channels)
    assert variables["params"]["head"]["kernel"].shape == (channels, 3)


def test_densenet169_real_forward_pass_is_finite():
    model = models.densenet169(num_outputs=1)
    images = _tiny_batch(batch=1)
    logits = jax.jit(model.apply)(_random_variables(model, images), images)
    assert logits.shape == (1, 1) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(logits)))


def test_batch_stats_change_only_in_training():
    model = models.densenet_tiny()
    images = _tiny_batch()
    variables = _random_variables(model, images)

    def run(train):  # eager: the tiny model's ops are quicker to run than to compile as a whole
        return model.apply(variables, images, train=train, mutable=["batch_stats"])

    _, frozen = run(False)
    for old, new in zip(jax.tree.leaves(variables["batch_stats"]),
                        jax.tree.leaves(frozen["batch_stats"])):
        np.testing.assert_array_equal(old, new)

    _, updated = run(True)
    changed = [
        not np.allclose(old, new)
        for old, new in zip(jax.tree.leaves(variables["batch_stats"]),
                            jax.tree.leaves(updated["batch_stats"]))
    ]
    assert all(changed)
    # Evaluation never needs a mutable collection.
    logits = model.apply(variables, images)
    assert logits.shape == (2, 1)


@pytest.mark.parametrize("policy", ["bottleneck", "layer", True])
def test_remat_matches_plain(policy):
    images = _tiny_batch()
    plain, remat = models.densenet_tiny(remat="none"), models.densenet_tiny(remat=policy)
    shapes_plain = jax.eval_shape(plain.init, KEY, images)
    shapes_remat = jax.eval_shape(remat.init, KEY, images)
    assert jax.tree.structure(shapes_plain) == jax.tree.structure(shapes_remat)
    assert jax.tree.leaves(shapes_plain) == jax.tree.leaves(shapes_remat)
    v_plain = _random_variables(plain, images)

    def loss_and_grad(model):
        def loss(params, batch_stats):
            logits, updates = model.apply(
                {"params": params, "batch_stats": batch_stats}, images, train=True,
                mutable=["batch_stats"],
            )
            return jnp.mean(jnp.square(logits)), (logits, updates)

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(
            v_plain["params"], v_plain["batch_stats"]
        )

    (loss_a, (logits_a, stats_a)), grads_a = loss_and_grad(plain)
    (loss_b, (logits_b, stats_b)), grads_b = loss_and_grad(remat)
    np.testing.assert_allclose(logits_a, logits_b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)
    # Recomputation reorders float32 sums and training-mode BatchNorm gradients cancel, so leaves
    # differ by up to ~1e-4 of their largest entry (in float64 they agree to 1e-12); a wrong
    # recomputation would differ at order 1.
    for a, b in zip(jax.tree.leaves((grads_a, stats_a)), jax.tree.leaves((grads_b, stats_b))):
        a, b = np.asarray(a), np.asarray(b)
        assert np.max(np.abs(a - b)) <= 1e-3 * np.max(np.abs(b)) + 1e-8


def test_remat_halves_the_compiled_train_steps_temporaries():
    """Compiled as murajax compiles its steps (``parallel.xla_compiler_options``), recomputing
    needs less XLA scratch memory: on this DenseNet with 8-layer blocks half, on DenseNet-169
    at 320x320 3746 -> 1925 MB ('bottleneck') and 1245 MB ('layer')."""
    from murajax import parallel

    images = _tiny_batch(batch=4, size=64)
    temp_mb = {}
    for policy in ("none", "bottleneck", "layer"):
        model = models.densenet_tiny(block_sizes=(8, 8), remat=policy)
        variables = _random_variables(model, images)

        def loss(params):
            logits, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                    images, train=True, mutable=["batch_stats"])
            return jnp.mean(jnp.square(logits))

        compiled = jax.jit(jax.grad(loss), compiler_options=parallel.xla_compiler_options()) \
            .lower(variables["params"]).compile()
        temp_mb[policy] = compiled.memory_analysis().temp_size_in_bytes / 2**20
    assert temp_mb["bottleneck"] < 0.7 * temp_mb["none"], temp_mb
    assert temp_mb["layer"] <= temp_mb["bottleneck"], temp_mb


def test_remat_policy_accepts_booleans_and_rejects_unknown_names():
    assert models.resolve_remat(False) == "none" and models.resolve_remat(True) == "bottleneck"
    assert models.resolve_remat("layer") == "layer"
    assert models.resolve_remat("auto") == ("bottleneck" if jax.default_backend() == "cpu"
                                            else "none")
    with pytest.raises(UserError, match=r"config.model.remat must be one of .*'all'"):
        models.densenet_tiny(remat="all")


def test_unknown_conv_impl_is_refused_when_the_model_is_built():
    with pytest.raises(UserError, match=r"config.model.conv_impl must be one of .*'cudnn'"):
        models.densenet_tiny(conv_impl="cudnn")


def test_auto_settings_are_resolved_once_when_the_model_is_built():
    cpu = jax.default_backend() == "cpu"
    model = models.create("densenet_tiny")
    assert model.remat == ("bottleneck" if cpu else "none")
    assert model.conv is (ops.MatmulConv if cpu else nn.Conv)
    assert models.create("densenet_tiny", conv_impl="xla", remat="layer").conv is nn.Conv
    assert models.create("densenet_tiny", conv_impl="matmul").conv is ops.MatmulConv
    # The module itself takes resolved values only.
    with pytest.raises(ValueError, match="resolved"):
        models.DenseNet(block_sizes=(1,), remat="auto").init(KEY, _tiny_batch())


def test_registry_builds_every_densenet_by_name():
    assert models.names() == ("densenet121", "densenet161", "densenet169", "densenet201",
                              "densenet_tiny")
    for name in models.names():
        assert models.get(name).name == name
        assert models.get(name).load_weights is not None  # the Keras HDF5 importer
    # Equal settings give equal (and hashable) modules: jit's static arguments rely on it.
    assert models.create("densenet169", num_outputs=2) == models.densenet169(num_outputs=2)
    assert hash(models.create("densenet_tiny")) == hash(models.densenet_tiny())


def test_unknown_model_name_names_the_field_and_the_known_names():
    with pytest.raises(UserError, match=r"config.model.name='resnet9' is not a known model; "
                                        r"choose one of \['densenet121', .*'densenet_tiny'\]"):
        models.create("resnet9")


def test_a_name_registers_once():
    with pytest.raises(ValueError, match="registered twice"):
        models.register("densenet169", models.densenet169)


def test_conv_and_norm_factories_keep_the_parameter_tree():
    """The factories change how the layers compute, never the variables' names or shapes."""
    images = _tiny_batch()
    trees = [jax.eval_shape(models.densenet_tiny(conv_impl=impl).init, KEY, images)
             for impl in ("xla", "matmul")]
    assert jax.tree.structure(trees[0]) == jax.tree.structure(trees[1])
    assert jax.tree.leaves(trees[0]) == jax.tree.leaves(trees[1])
    assert set(trees[0]["params"]["conv2_block1"]) == {"bottleneck", "norm", "conv"}


def test_bfloat16_compute_returns_float32_logits():
    model = models.densenet_tiny(dtype=jnp.bfloat16, num_outputs=2)
    (logits, features), variables = jax.eval_shape(
        lambda k, x: model.init_with_output(k, x, return_features=True), KEY, _tiny_batch()
    )
    assert logits.dtype == jnp.float32 and logits.shape == (2, 2)
    assert features.dtype == jnp.bfloat16
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))


def test_three_dimensional_input_is_rejected():
    with pytest.raises(ValueError, match="NHWC"):
        models.densenet_tiny().init(KEY, jnp.zeros((32, 32, 3)))
