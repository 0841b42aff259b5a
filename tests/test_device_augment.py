"""Augmentation on the device (config.data.augment_on='device'): normalisation as on the host,
exact flips and half turns, the identity, the host's rotation direction, keys that follow the
image and not the batch layout, the train step's hook, exact resume, and the config check."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image

from murajax import checkpoints, inference, steps, synthetic, train, train_state
from murajax.data import device_augment, images, mura, pipeline
from murajax.data.mura import ImageRecord
from murajax.errors import UserError
from tests import harness, helpers

EPS = float(np.finfo(np.float32).eps)
ON = device_augment.DeviceAugment(hflip=True, rotation_degrees=30.0)
# Jitted once each: op by op, the vmapped warp would compile every primitive it dispatches.
_transform = jax.jit(device_augment.transform)
_augment = jax.jit(device_augment.augment, static_argnums=4)
_draw = jax.jit(device_augment.draw, static_argnums=3)


def _uint8(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _normalise_tolerance(pixels, host):
    """The host's table rounds x * scale and + offset separately, the device may fuse them (one
    rounding less): at most an ulp of each term apart."""
    scaled = np.abs(np.asarray(pixels, np.float32) * images.NORMALISE_SCALE)
    return EPS * (float(scaled.max()) + float(np.abs(host).max()))


def _smooth(size=64):
    """A smooth grey image: bilinear resamplers then differ by their rounding only."""
    yy, xx = np.mgrid[0:size, 0:size]
    return (128 + 60 * np.sin(xx / 7.0) + 50 * np.cos(yy / 5.0 + xx / 11.0)).astype(np.uint8)


# ---- the pure functions ----------------------------------------------------------------------


def test_normalise_equals_the_host_normalisation():
    """uint8: every grey level in every channel (each channel a different order), bit for bit.
    Float pixel values (the warp's) take the multiply-add: to float32 rounding."""
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    pixels = np.stack([levels, levels[::-1], levels.T], axis=2)
    host = images.normalize(pixels)
    device = np.asarray(jax.jit(device_augment.normalise)(pixels))
    assert device.dtype == np.float32
    np.testing.assert_array_equal(device, host)
    floats = np.asarray(jax.jit(device_augment.normalise)(pixels.astype(np.float32)))
    np.testing.assert_allclose(floats, host, rtol=0, atol=_normalise_tolerance(pixels, host))


def test_flip_and_half_turn_are_the_numpy_flips_exactly():
    x = _uint8((3, 16, 20, 3))
    out = np.asarray(_transform(x, np.array([True, False, True]), np.array([0.0, 180, -180])))
    np.testing.assert_array_equal(out[0], x[0][:, ::-1])
    np.testing.assert_array_equal(out[1], x[1][::-1, ::-1])
    np.testing.assert_array_equal(out[2], x[2][::-1, :])  # half turn, then mirror
    quarter = np.asarray(_transform(x[:1, :, :16], np.array([False]), np.array([90.0])))[0]
    np.testing.assert_array_equal(quarter, np.rot90(x[0, :, :16], 1))  # counter-clockwise


def test_no_flip_and_zero_angle_is_the_identity():
    x = _uint8((4, 16, 16, 3), seed=1)
    np.testing.assert_array_equal(np.asarray(_transform(x, np.zeros(4, bool), np.zeros(4))),
                                  x.astype(np.float32))
    still = device_augment.DeviceAugment(hflip=False, rotation_degrees=0.0)
    np.testing.assert_array_equal(
        np.asarray(_augment(x, jax.random.key(0), np.arange(4), 3, still)),
        np.asarray(jax.jit(device_augment.normalise)(x)))


@pytest.mark.parametrize("flip,angle", [(False, 30.0), (True, -20.0), (True, 7.5)])
def test_rotation_and_flip_match_the_host_transform(flip, angle):
    """Same direction, centre and order (rotate, then mirror) as the host's PIL transform of an
    already resized image, away from the corners: PIL rounds its output to uint8 (half a grey
    level) and interpolates with fixed-point weights; a wrong direction is tens of levels off."""
    image = _smooth()
    host = np.asarray(images.transform(Image.fromarray(image), 64, "stretch", flip=flip,
                                       angle=angle), np.float32)
    rgb = np.repeat(image[None, :, :, None], 3, axis=3)
    device = np.asarray(_transform(rgb, np.array([flip]), np.array([angle])))[0]
    np.testing.assert_array_equal(device[..., 0], device[..., 2])
    inner = slice(12, 52)
    assert np.max(np.abs(device[inner, inner, 0] - host[inner, inner])) <= 1.0


def test_draws_follow_key_step_and_index_within_the_configured_ranges():
    key = jax.random.key(7)
    index = np.arange(2000)
    flips, angles = map(np.asarray, _draw(key, index, 5, ON))
    assert 0.45 < flips.mean() < 0.55  # 2000 fair coins: 4.5 standard deviations
    assert np.all(np.abs(angles) <= 30.0) and angles.min() < -29 and angles.max() > 29
    again = _draw(key, index, 5, ON)
    np.testing.assert_array_equal(np.asarray(again[1]), angles)
    for other in (_draw(key, index, 6, ON), _draw(jax.random.fold_in(key, 1), index, 5, ON)):
        assert not np.array_equal(np.asarray(other[1]), angles)
    no_flip = device_augment.DeviceAugment(hflip=False, rotation_degrees=10.0)
    flips, angles = map(np.asarray, _draw(key, index, 5, no_flip))
    assert not flips.any() and np.all(np.abs(angles) <= 10.0)


def test_each_image_gets_its_own_augmentation_whatever_the_batch_order():
    x = _uint8((8, 16, 16, 3), seed=2)
    index = np.array([3, 17, 0, 5, 9, 11, 2, 40])
    key = jax.random.key(1)
    out = np.asarray(_augment(x, key, index, 4, ON))
    order = np.random.default_rng(0).permutation(8)
    permuted = np.asarray(_augment(x[order], key, index[order], 4, ON))
    np.testing.assert_array_equal(permuted, out[order])
    alone, together = _draw(key, index[5:6], 4, ON), _draw(key, index, 4, ON)
    for one, all_ in zip(alone, together):  # another batch size: the same draws
        np.testing.assert_array_equal(np.asarray(one)[0], np.asarray(all_)[5])
    other_step = np.asarray(_augment(x, key, index, 5, ON))
    assert not np.array_equal(other_step, out)


def test_sharded_over_four_devices_draws_the_same_and_warps_to_rounding():
    """The draws are bit for bit those of one device; the warped pixels differ at most by how
    the two programs round: a coordinate rounded otherwise (by up to eps * size) moves the
    bilinear weights as much, times at most the 255 levels between neighbours, then the
    normalisation's own roundings."""
    devices = jax.devices()[:4]
    assert len(devices) == 4  # tests/conftest.py: four host CPU devices
    size = 16
    x, index = _uint8((8, size, size, 3), seed=3), np.arange(8) * 3
    key = jax.random.key(0)
    fn = jax.jit(lambda im, i: (device_augment.draw(key, i, 2, ON),
                                device_augment.augment(im, key, i, 2, ON)))
    (flips, angles), one = fn(jax.device_put(x, devices[0]), jax.device_put(index, devices[0]))
    rows = NamedSharding(Mesh(np.asarray(devices), ("data",)), PartitionSpec("data"))
    (flips4, angles4), four = fn(jax.device_put(x, rows), jax.device_put(index, rows))
    assert len(four.sharding.device_set) == 4
    np.testing.assert_array_equal(np.asarray(flips4), np.asarray(flips))
    np.testing.assert_array_equal(np.asarray(angles4), np.asarray(angles))
    one = np.asarray(one)
    bound = EPS * (size * 255 * float(images.NORMALISE_SCALE.max()) + 2 * np.abs(one).max())
    np.testing.assert_allclose(np.asarray(four), one, rtol=0, atol=bound)


def test_masked_rows_are_zero_as_on_the_host_and_float_batches_pass():
    batch = {"image": jnp.asarray(_uint8((4, 3, 16, 16), seed=4)),  # the pipeline's layout
             "mask": jnp.asarray([1.0, 0.0, 1.0, 0.0]), "index": jnp.asarray([0, 1, 2, -1])}
    train_batch = jax.jit(device_augment.train_batch, static_argnums=3)
    out = np.asarray(train_batch(batch, jax.random.key(0), 0, ON)["image"])
    evaluated = np.asarray(device_augment.eval_batch(batch)["image"])
    for image in (out, evaluated):
        assert image.dtype == np.float32
        np.testing.assert_array_equal(image[[1, 3]], 0.0)
        assert np.all(np.abs(image[[0, 2]]).max(axis=(1, 2, 3)) > 1.0)
    np.testing.assert_array_equal(evaluated[0],
                                  device_augment.normalise(np.moveaxis(batch["image"][0], 0, -1)))
    host = {**batch, "image": jnp.zeros((4, 16, 16, 3), jnp.float32)}
    assert device_augment.eval_batch(host) is host
    assert device_augment.train_batch(host, jax.random.key(0), 0, None) is host
    with pytest.raises(ValueError, match="needs uint8 images"):
        device_augment.train_batch(host, jax.random.key(0), 0, ON)


# ---- the config, the pipeline, the train step ------------------------------------------------


def test_bad_augment_on_is_a_user_error_naming_the_field(tmp_path):
    config = helpers.tiny_config(**{"data.augment_on": "gpu"})
    with pytest.raises(UserError, match=r"config\.data\.augment_on must be 'host'.*'gpu'"):
        device_augment.from_config(config)
    with pytest.raises(UserError, match=r"config\.data\.augment_on"):
        pipeline.eval_loader(mura.index_from_records([]), config.data, global_batch_size=8)
    with pytest.raises(UserError, match=r"config\.data\.augment_on"):  # before any work
        train.train_and_evaluate(config, tmp_path)


def test_default_is_host_and_leaves_the_state_as_before():
    config = helpers.tiny_config()
    assert config.data.augment_on == "host"
    assert device_augment.from_config(config) is None
    old = ml_collections.ConfigDict({"data": {"hflip": True, "rotation_degrees": 30.0}})
    assert device_augment.from_config(old) is None  # a config saved before the field
    assert jax.eval_shape(lambda: helpers.tiny_state(config)).augment is None
    device = helpers.tiny_config(**{"data.augment_on": "device", "data.rotation_degrees": 10.0})
    assert device_augment.from_config(device) == device_augment.DeviceAugment(True, 10.0)


@pytest.fixture(scope="module")
def image_index(tmp_path_factory):
    """Grey and RGB PNGs of varied sizes."""
    folder = tmp_path_factory.mktemp("images")
    records = []
    for i in range(6):
        pixels = _uint8((20 + 3 * i, 30 - 2 * i) if i % 2 else (25, 18 + i, 3), seed=10 + i)
        path = folder / f"img{i}.png"
        Image.fromarray(pixels).save(path)
        records.append(ImageRecord(str(path), f"train/XR_HAND/p{i}/study1", 3, f"p{i}", i % 2))
    return mura.index_from_records(records)


def test_device_batches_are_the_resized_uint8_images_of_the_host_batches(image_index):
    """Eval: the same uint8 images as the host path's batches. Train: the same order and
    images, unaugmented (the host's are flipped/rotated)."""
    host_config = helpers.tiny_config(**{"data.image_size": 16}).data
    device_config = helpers.tiny_config(**{"data.image_size": 16, "data.augment_on": "device"}).data
    kwargs = {"global_batch_size": 4}
    for host, device in zip(pipeline.eval_loader(image_index, host_config, **kwargs),
                            pipeline.eval_loader(image_index, device_config, **kwargs)):
        assert device["image"].dtype == np.uint8 and device["image"].shape == (4, 3, 16, 16)
        helpers.assert_same_batch(device, host)
    train_host, train_device = (next(iter(pipeline.train_loader(
        image_index, c, seed=0, epoch=0, **kwargs))) for c in (host_config, device_config))
    np.testing.assert_array_equal(train_device["index"], train_host["index"])
    plain = pipeline.eval_loader(image_index, device_config, global_batch_size=6)
    by_index = pipeline.whole_planes(next(iter(plain)))
    np.testing.assert_array_equal(pipeline.whole_planes(train_device),
                                  by_index[train_device["index"]])


def test_train_step_augments_uint8_batches_with_the_documented_key():
    """The state's settings make the step flip and rotate the uint8 images, keyed by stream 2 of
    the step's key: the gradients equal the plain step's on the batch augmented outside (to
    rounding, helpers.ROUNDING), and differ from those of the merely normalised batch."""
    plain = helpers.tiny_state()
    state = plain.replace(augment=ON)
    batch = helpers.random_batch(8, masked=(2,))
    b, s = batch["image"].shape[:2]
    batch["image"] = _uint8((b, 3, s, s), seed=5)  # the pipeline's layout
    batch["index"] = np.arange(8, dtype=np.int32) * 5
    gradients = jax.jit(steps.compute_gradients)
    grads, outputs, _ = gradients(state, batch)
    key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 2)
    device_batch = jax.tree.map(jnp.asarray, batch)
    augmented = jax.device_get(device_augment.train_batch(device_batch, key, state.step, ON))
    expected_grads, expected, _ = gradients(plain, augmented)

    def norm(tree):
        return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64)))
                                 for x in jax.tree.leaves(tree))))

    np.testing.assert_allclose(np.asarray(outputs["loss"]), np.asarray(expected["loss"]),
                               rtol=helpers.ROUNDING)
    gap = norm(jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), grads, expected_grads))
    assert gap <= helpers.ROUNDING * norm(expected_grads)
    normalised = jax.device_get(device_augment.eval_batch(device_batch))
    unaugmented = gradients(plain, normalised)[0]
    far = norm(jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), grads, unaugmented))
    assert far > 100 * helpers.ROUNDING * norm(expected_grads)


def test_a_grey_plane_reaches_the_model_as_its_three_plane_copy():
    """config.data.colour='grey' ships one plane, [b, 1, S, S]: the train step's augmented
    input and the eval step's normalised one equal those of the plane repeated three times,
    bit for bit, and so do the predictor's logits."""
    grey = _uint8((4, 1, 16, 16), seed=7)
    three = np.repeat(grey, 3, axis=1)

    def batch(image):
        return {"image": jnp.asarray(image), "index": jnp.arange(4, dtype=jnp.int32) * 3,
                "mask": jnp.asarray([1.0, 1.0, 0.0, 1.0])}

    train_batch = jax.jit(device_augment.train_batch, static_argnums=3)
    eval_batch = jax.jit(device_augment.eval_batch)
    key = jax.random.key(3)
    augmented = np.asarray(train_batch(batch(grey), key, 5, ON)["image"])
    normalised = np.asarray(eval_batch(batch(grey))["image"])
    assert augmented.shape == normalised.shape == (4, 16, 16, 3)
    assert np.abs(augmented - normalised).max() > 1.0  # it was warped
    np.testing.assert_array_equal(augmented,
                                  np.asarray(train_batch(batch(three), key, 5, ON)["image"]))
    np.testing.assert_array_equal(normalised, np.asarray(eval_batch(batch(three))["image"]))
    config = helpers.tiny_config()
    predictor = inference.Predictor(train_state.model_from_config(config),
                                    helpers.tiny_state(config).variables,
                                    image_size=config.data.image_size, batch_size=4)
    pixels = _uint8((4, 1, 32, 32), seed=8)
    np.testing.assert_array_equal(predictor.predict_logits(pixels)[0],
                                  predictor.predict_logits(np.repeat(pixels, 3, axis=1))[0])


def test_a_grey_rows_unwritten_planes_are_never_read():
    """The pipeline writes a grey image into plane 0 only and flags its row ``grey``: whatever
    its planes 1 and 2 hold, the train step's augmented input, the eval step's normalised one
    and the predictor's logits are those of plane 0 repeated (``pipeline.whole_planes``), bit
    for bit; read as pixels, the leftovers would change them."""
    whole = _uint8((4, 3, 16, 16), seed=11)
    grey = np.asarray([True, False, True, False])
    whole[grey] = whole[grey, :1]
    leftovers = whole.copy()
    leftovers[grey, 1:] = _uint8((2, 2, 16, 16), seed=12)

    def batch(image, flags=grey):
        return {"image": image, "grey": flags, "index": np.arange(4, dtype=np.int32) * 3,
                "mask": np.asarray([1.0, 1.0, 1.0, 0.0], np.float32)}

    np.testing.assert_array_equal(pipeline.whole_planes(batch(leftovers)), whole)
    train_batch = jax.jit(device_augment.train_batch, static_argnums=3)
    eval_batch = jax.jit(device_augment.eval_batch)
    key = jax.random.key(3)
    for fn in (lambda b: train_batch(b, key, 5, ON), eval_batch):
        expected = np.asarray(fn(batch(whole))["image"])
        np.testing.assert_array_equal(np.asarray(fn(batch(leftovers))["image"]), expected)
        read = np.asarray(fn(batch(leftovers, np.zeros(4, bool)))["image"])
        assert np.abs(read - expected).max() > 0.1
    config = helpers.tiny_config(**{"data.image_size": 16})
    predictor = inference.Predictor(train_state.model_from_config(config),
                                    helpers.tiny_state(config).variables,
                                    image_size=16, batch_size=4)
    np.testing.assert_array_equal(predictor.predict_batch(batch(leftovers)),
                                  predictor.predict_batch(batch(whole)))


def test_predictor_normalises_uint8_batches():
    config = helpers.tiny_config()
    state = helpers.tiny_state(config)
    predictor = inference.Predictor(train_state.model_from_config(config), state.variables,
                                    image_size=config.data.image_size, batch_size=4)
    pixels = _uint8((4, 3, 32, 32), seed=6)  # an eval batch's layout
    logits, _ = predictor.predict_logits(pixels)
    expected, _ = predictor.predict_logits(
        np.asarray(device_augment.normalise(pixels.transpose(0, 2, 3, 1))))
    np.testing.assert_array_equal(logits, expected)


# ---- a whole run: exact resume ---------------------------------------------------------------


@pytest.fixture(scope="module")
def mura_root(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("data"), num_studies=40, seed=3)


def _config(root, **overrides):
    return helpers.run_config(root, **{"checkpoint_every_steps": 4, "log_every_steps": 2,
                                       "data.augment_on": "device", **overrides})


def test_interrupted_device_augmented_run_ends_bit_identical(mura_root, tmp_path_factory):
    full_dir = tmp_path_factory.mktemp("device_uninterrupted")
    full = train.train_and_evaluate(_config(mura_root), full_dir)
    steps_per_epoch = full["history"][0]["step"]
    resumed_dir = tmp_path_factory.mktemp("device_resumed")
    final = helpers.train_with_two_interruptions(lambda **extra: _config(mura_root, **extra),
                                                 resumed_dir, steps_per_epoch)
    helpers.assert_same_tree(helpers.final_variables(resumed_dir),
                             helpers.final_variables(full_dir))
    assert final["history"] == full["history"]
    assert harness.metric_records(resumed_dir) == harness.metric_records(full_dir)
    assert np.isfinite(full["auroc"])
    assert checkpoints.load_run_config(full_dir).data.augment_on == "device"
