"""Grain pipelines: batch layout, eval coverage, multi-process slicing, restore, bad images."""

import json
import logging

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from murajax.data import device_augment, images, mura, pipeline
from murajax.data.mura import ImageRecord
from murajax.errors import UserError
from tests import helpers

SIZE = 16
NUM_IMAGES = 23


def data_config(**overrides):
    config = ml_collections.ConfigDict({
        "root": "", "image_size": SIZE, "resize": "stretch", "hflip": True,
        "rotation_degrees": 30.0, "study_types": "", "fraction": 1.0, "on_missing": "error",
        "on_bad_image": "error", "num_workers": 0, "prefetch": 2,
    })
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    """23 small distinct images (grey and RGB, varied sizes) in 9 studies."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    records = []
    for i in range(NUM_IMAGES):
        h, w = int(rng.integers(12, 40)), int(rng.integers(12, 40))
        pixels = rng.integers(0, 256, (h, w) if i % 4 else (h, w, 3), dtype=np.uint8)
        path = folder / f"img{i:02d}.png"
        Image.fromarray(pixels).save(path)
        study = i // 3
        records.append(ImageRecord(str(path), f"train/XR_WRIST/p{study}/study1", study % 7,
                                   f"p{study}", study % 2))
    return mura.index_from_records(records)


def _all(iterable):
    return list(iterable)


def _concat(batches_per_process):
    """Concatenates the processes' k-th batches for every k."""
    return [
        {key: np.concatenate([b[key] for b in step]) for key in step[0]}
        for step in zip(*batches_per_process)
    ]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        helpers.assert_same_batch(x, y)


def test_counts():
    assert pipeline.steps_per_epoch(23, 4) == 5
    assert pipeline.steps_per_epoch(24, 4) == 6
    assert pipeline.num_eval_batches(23, 4) == 6
    assert pipeline.num_eval_batches(24, 4) == 6


def test_train_batches_layout_and_epoch_coverage(index):
    loader = pipeline.train_loader(index, data_config(), global_batch_size=4, seed=0, epoch=0)
    batches = _all(loader)
    assert len(batches) == pipeline.steps_per_epoch(NUM_IMAGES, 4) == len(loader) == 5
    first = batches[0]
    assert first["image"].shape == (4, 3, SIZE, SIZE) and first["image"].dtype == np.uint8
    for key, dtype in (("label", np.int32), ("study_type", np.int32), ("mask", np.float32),
                       ("index", np.int32)):
        assert first[key].shape == (4,) and first[key].dtype == dtype, key
    seen = np.concatenate([b["index"] for b in batches])
    assert len(set(seen.tolist())) == 20  # distinct images, remainder of 3 dropped
    assert all((b["mask"] == 1).all() for b in batches)
    for b in batches:
        np.testing.assert_array_equal(b["label"], [index.images[i].label for i in b["index"]])
        np.testing.assert_array_equal(b["study_type"],
                                      [index.images[i].study_type for i in b["index"]])


def test_batches_normalised_in_the_step_equal_the_host_normalisation_bit_for_bit(index):
    """The batch ships uint8 (flipped and rotated on the host); the step's normalisation
    (``device_augment``, jitted as the step is) gives exactly ``images.normalize`` of the same
    transformed image, grey and RGB alike, so moving it off the host changes no result."""
    config = data_config()
    normalise = jax.jit(device_augment.eval_batch)
    _, flips, angles = pipeline.epoch_plan(NUM_IMAGES, global_batch_size=4, seed=3, epoch=0,
                                           hflip=True, rotation_degrees=30.0)
    loader = pipeline.train_loader(index, config, global_batch_size=4, seed=3, epoch=0)
    for step, batch in enumerate(list(loader)[:2]):
        normalised = np.asarray(normalise(batch)["image"])
        whole = pipeline.whole_planes(batch)
        for i, pos in enumerate(batch["index"]):
            transformed = images.transform(images.decode(index.images[pos].path), SIZE,
                                           "stretch", flip=bool(flips[step, i]),
                                           angle=float(angles[step, i]))
            pixels = np.asarray(transformed)  # channels first in the batch
            assert batch["grey"][i] == (pixels.ndim == 2)
            np.testing.assert_array_equal(batch["image"][i, 0], pixels if pixels.ndim == 2
                                          else pixels[..., 0])
            np.testing.assert_array_equal(
                whole[i], np.broadcast_to(pixels, (3, SIZE, SIZE))
                if pixels.ndim == 2 else pixels.transpose(2, 0, 1))
            np.testing.assert_array_equal(normalised[i], images.normalize(transformed))


def test_train_is_deterministic_and_reshuffles_each_epoch(index):
    config = data_config()
    a = _all(pipeline.train_loader(index, config, global_batch_size=4, seed=1, epoch=0))
    b = _all(pipeline.train_loader(index, config, global_batch_size=4, seed=1, epoch=0))
    _assert_batches_equal(a, b)
    c = _all(pipeline.train_loader(index, config, global_batch_size=4, seed=1, epoch=1))
    order_a = np.concatenate([x["index"] for x in a])
    order_c = np.concatenate([x["index"] for x in c])
    assert not np.array_equal(order_a, order_c)


def test_augmentation_flips_and_rotates(index):
    plain = data_config(hflip=False, rotation_degrees=0.0)
    train = _all(pipeline.train_loader(index, plain, global_batch_size=4, seed=0, epoch=0))
    evaluation = _all(pipeline.eval_loader(index, plain, global_batch_size=NUM_IMAGES + 1))[0]
    evaluated = pipeline.whole_planes(evaluation)
    for b in train:  # without augmentation train images are the eval images
        np.testing.assert_array_equal(pipeline.whole_planes(b), evaluated[b["index"]])
    augmented = _all(pipeline.train_loader(index, data_config(), global_batch_size=4, seed=0,
                                           epoch=0))
    differ = sum(not np.allclose(pipeline.whole_planes(b)[i], evaluated[b["index"][i]])
                 for b in augmented for i in range(4))
    assert differ >= 15


@pytest.mark.parametrize("batch_size", [1, 4, 5, 7, 23, 30])
def test_eval_covers_every_image_exactly_once(index, batch_size):
    loader = pipeline.eval_loader(index, data_config(), global_batch_size=batch_size)
    batches = _all(loader)
    assert len(batches) == len(loader) == pipeline.num_eval_batches(NUM_IMAGES, batch_size)
    assert all(b["image"].shape == (batch_size, 3, SIZE, SIZE) for b in batches)
    indices = np.concatenate([b["index"] for b in batches])
    mask = np.concatenate([b["mask"] for b in batches])
    np.testing.assert_array_equal(indices[mask == 1], np.arange(NUM_IMAGES))
    assert (indices[mask == 0] == -1).all()
    assert (mask == 0).sum() == len(batches) * batch_size - NUM_IMAGES
    pads = np.concatenate([b["label"] for b in batches])[mask == 0]
    assert (pads == -1).all()
    assert _all(loader)[0]["index"].tolist() == batches[0]["index"].tolist()  # re-iterable


@pytest.mark.parametrize("global_batch,processes", [(6, 2), (6, 3), (4, 4)])
def test_multi_process_batches_concatenate_to_single_process_batches(index, global_batch,
                                                                     processes):
    config = data_config()
    single = _all(pipeline.train_loader(index, config, global_batch_size=global_batch, seed=7,
                                        epoch=3))
    shards = [
        _all(pipeline.train_loader(index, config, global_batch_size=global_batch, seed=7,
                                   epoch=3, process_index=p, process_count=processes))
        for p in range(processes)
    ]
    assert all(s[0]["image"].shape[0] == global_batch // processes for s in shards)
    _assert_batches_equal(_concat(shards), single)

    single_eval = _all(pipeline.eval_loader(index, config, global_batch_size=global_batch))
    eval_shards = [
        _all(pipeline.eval_loader(index, config, global_batch_size=global_batch,
                                  process_index=p, process_count=processes))
        for p in range(processes)
    ]
    _assert_batches_equal(_concat(eval_shards), single_eval)


def test_restored_iterator_continues_exactly(index):
    config = data_config()
    uninterrupted = _all(pipeline.train_loader(index, config, global_batch_size=4, seed=5,
                                               epoch=2))
    loader = pipeline.train_loader(index, config, global_batch_size=4, seed=5, epoch=2)
    head = [next(loader) for _ in range(2)]
    state = json.loads(json.dumps(loader.get_state()))  # what orbax JsonSave stores
    loader.close()
    restored = pipeline.train_loader(index, config, global_batch_size=4, seed=5, epoch=2)
    restored.set_state(state)
    _assert_batches_equal(head + _all(restored), uninterrupted)
    # A restored process of a different process count continues the same global batches.
    half = pipeline.train_loader(index, config, global_batch_size=4, seed=5, epoch=2,
                                 process_index=1, process_count=2)
    half.set_state(state)
    rest = _all(half)
    assert len(rest) == 3
    for got, full in zip(rest, uninterrupted[2:]):
        np.testing.assert_array_equal(pipeline.whole_planes(got),
                                      pipeline.whole_planes(full)[2:])


@pytest.mark.slow  # spawns a Grain worker process (a few seconds)
def test_restore_with_worker_processes(index):
    config = data_config(num_workers=1, prefetch=1, image_size=8)
    reference = _all(pipeline.train_loader(index, data_config(image_size=8),
                                           global_batch_size=4, seed=2, epoch=0))
    loader = pipeline.train_loader(index, config, global_batch_size=4, seed=2, epoch=0)
    head = [next(loader) for _ in range(2)]
    state = json.loads(json.dumps(loader.get_state()))
    loader.close()
    restored = pipeline.train_loader(index, config, global_batch_size=4, seed=2, epoch=0)
    restored.set_state(state)
    tail = _all(restored)
    restored.close()
    _assert_batches_equal(head + tail, reference)


def test_restore_rejects_other_settings(index):
    loader = pipeline.train_loader(index, data_config(), global_batch_size=4, seed=0, epoch=0)
    state = loader.get_state()
    other = pipeline.train_loader(index, data_config(), global_batch_size=2, seed=0, epoch=0)
    with pytest.raises(UserError, match="global_batch_size=4.*config.batch_size now gives 2"):
        other.set_state(state)
    other_epoch = pipeline.train_loader(index, data_config(), global_batch_size=4, seed=0,
                                        epoch=1)
    with pytest.raises(UserError, match="epoch=0"):
        other_epoch.set_state(state)


def _index_with_bad_image(index, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    records = list(index.images)
    records[5] = ImageRecord(str(bad), records[5].study, records[5].study_type,
                             records[5].patient, records[5].label)
    return mura.index_from_records(records), bad


def test_bad_image_error_names_the_file(index, tmp_path):
    bad_index, bad = _index_with_bad_image(index, tmp_path)
    with pytest.raises(UserError) as e:
        _all(pipeline.eval_loader(bad_index, data_config(), global_batch_size=8))
    assert str(bad) in str(e.value)
    assert "--config.data.on_bad_image=skip" in str(e.value)


def test_bad_image_skip_masks_counts_and_logs(index, tmp_path, caplog):
    bad_index, bad = _index_with_bad_image(index, tmp_path)
    config = data_config(on_bad_image="skip")
    loader = pipeline.eval_loader(bad_index, config, global_batch_size=8)
    with caplog.at_level(logging.WARNING):
        batches = _all(loader)
    indices = np.concatenate([b["index"] for b in batches])
    mask = np.concatenate([b["mask"] for b in batches])
    assert all(b["image"].shape == (8, 3, SIZE, SIZE) for b in batches)
    assert mask[indices == 5].tolist() == [0.0]
    assert mask[(indices >= 0) & (indices != 5)].tolist() == [1.0] * (NUM_IMAGES - 1)
    assert loader.num_bad_images == 1 and loader.bad_images == {str(bad)}
    assert str(bad) in caplog.text
    # Training: same shapes and the same batches otherwise (determinism holds).
    train = pipeline.train_loader(bad_index, config, global_batch_size=4, seed=0, epoch=0)
    got = _all(train)
    clean = _all(pipeline.train_loader(index, config, global_batch_size=4, seed=0, epoch=0))
    for g, c in zip(got, clean):
        np.testing.assert_array_equal(g["index"], c["index"])
        keep = g["index"] != 5
        np.testing.assert_array_equal(pipeline.whole_planes(g)[keep],
                                      pipeline.whole_planes(c)[keep])
        np.testing.assert_array_equal(g["mask"], keep.astype(np.float32))
    assert train.num_bad_images == int(sum((g["index"] == 5).sum() for g in got))


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"resize": "foo"}, "config.data.resize must be 'stretch' or 'pad', got 'foo'"),
        ({"on_bad_image": "ignore"}, "config.data.on_bad_image must be 'error' or 'skip'"),
        ({"num_workers": -1}, "config.data.num_workers must be an integer >= 0"),
        ({"rotation_degrees": -5.0}, "config.data.rotation_degrees must be a number in"),
    ],
)
def test_config_errors(index, overrides, message):
    with pytest.raises(UserError, match=message):
        pipeline.train_loader(index, data_config(**overrides), global_batch_size=4, seed=0,
                              epoch=0)


def test_batch_size_errors(index):
    with pytest.raises(UserError, match=r"config.batch_size \(6\) must be divisible by the "
                                        r"number of JAX processes \(4\)"):
        pipeline.train_loader(index, data_config(), global_batch_size=6, seed=0, epoch=0,
                              process_index=0, process_count=4)
    with pytest.raises(UserError, match=r"the train split has 23 images, fewer than one batch "
                                        r"\(config.batch_size=32\)"):
        pipeline.train_loader(index, data_config(), global_batch_size=32, seed=0, epoch=0)
    with pytest.raises(UserError, match="config.eval_batch_size"):
        pipeline.eval_loader(index, data_config(), global_batch_size=3, process_count=2)
