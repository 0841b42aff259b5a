"""The image cache (murajax/data/cache.py) and config.data.num_workers='auto': the cached pixels
are the decoded and resized PNGs; mismatched caches are refused; a build killed with SIGKILL
and rerun writes the same bytes; training and evaluating from it repeat and resume exactly, and
need no data.root (the cache holds copies of the CSVs)."""

import json
import os
import shutil
import signal
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image

from murajax import synthetic, tasks, train
from murajax.data import cache, images, mura, pipeline
from murajax.errors import UserError
from tests import harness, helpers

SIZE = helpers.IMAGE_SIZE
PER_SHARD = 8  # several shards from the 24-study set


@pytest.fixture(scope="module")
def mura_root(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("data"), num_studies=24, seed=5)


@pytest.fixture(scope="module")
def built(mura_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache")
    manifest = cache.build(mura_root, out, image_size=SIZE, records_per_shard=PER_SHARD)
    return out, manifest


def _config(root, out, **overrides):
    return helpers.run_config(root, **{"data.cache": str(out), "checkpoint_every_steps": 4,
                                       "log_every_steps": 2, **overrides})


def _channels_first(pixels):
    """A batch's layout of cached pixels: [3, S, S], a grey image three times."""
    return np.broadcast_to(pixels, (3, SIZE, SIZE)) if pixels.ndim == 2 else \
        pixels.transpose(2, 0, 1)


def _files(folder):
    """Every file under ``folder`` (the shards, the manifest, the CSV copies) -> its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_cached_pixels_are_the_decoded_and_resized_images(mura_root, built):
    out, manifest = built
    assert manifest["num_records"] == sum(manifest["splits"].values()) > 2 * PER_SHARD
    for split in ("train", "valid"):
        index = mura.read_split(mura_root, split)
        pixels = cache.pixels_for_index(index, _config(mura_root, out).data)
        for pos, record in enumerate(index.images):
            expected = np.asarray(images.transform(images.decode(record.path), SIZE, "stretch"))
            np.testing.assert_array_equal(pixels.pixels(pos), expected)
    # The metadata travels with the pixels.
    header, _ = cache.decode_record(pixels._source[int(pixels.records[0])])
    first = index.images[0]
    assert (header["study"], header["label"], header["study_type"]) == (
        first.study, first.label, first.study_type)
    assert header["csv_path"].startswith("MURA-v1.1/valid/")
    assert header["width"] == images.decode(first.path).width


def test_pixels_read_without_the_header_equal_the_decoded_record():
    rng = np.random.default_rng(0)
    header = {"key": "train/XR_HAND/patient1/study1_negative/image1.png", "error": None}
    for pixels in (rng.integers(0, 256, (5, 5), np.uint8),
                   rng.integers(0, 256, (5, 5, 3), np.uint8)):
        data = cache.encode_record(header, pixels)
        np.testing.assert_array_equal(cache.record_pixels(data, 5), cache.decode_record(data)[1])
        assert cache.record_pixels(data, 5).shape == pixels.shape
    unreadable = cache.encode_record(dict(header, error="truncated"), None)
    assert cache.record_pixels(unreadable, 5) is None
    with pytest.raises(ValueError, match="48 pixel bytes in a cache of 5 px"):
        cache.record_pixels(cache.encode_record(header, np.zeros((4, 4, 3), np.uint8)), 5)
    with pytest.raises(ValueError, match="not a murajax image-cache record"):
        cache.record_pixels(b"PNG..." + bytes(30), 5)


def test_batches_from_the_cache_equal_those_from_the_files(mura_root, built):
    out, _ = built
    # No augmentation: exactly the same batches.
    config = _config(mura_root, out, **{"data.hflip": False, "data.rotation_degrees": 0.0})
    index = mura.index_from_config(config.data, "train")
    files = ml_collections.ConfigDict(config.data.to_dict())
    files.cache = ""
    eval_pairs = zip(pipeline.eval_loader(index, config.data, global_batch_size=16),
                     pipeline.eval_loader(index, files, global_batch_size=16))
    train_pairs = zip(pipeline.train_loader(index, config.data, global_batch_size=8, seed=1,
                                            epoch=0),
                      pipeline.train_loader(index, files, global_batch_size=8, seed=1, epoch=0))
    for a, b in list(eval_pairs) + list(train_pairs):
        helpers.assert_same_batch(a, b)
    # Augmented on the host: the cached image flipped and rotated by images.transform.
    config.data.hflip, config.data.rotation_degrees = True, 30.0
    loader = pipeline.train_loader(index, config.data, global_batch_size=8, seed=1, epoch=0)
    batch = next(iter(loader))
    _, flips, angles = pipeline.epoch_plan(len(index.images), global_batch_size=8, seed=1,
                                           epoch=0, hflip=True, rotation_degrees=30.0)
    assert flips[0].any() and np.abs(angles[0]).max() > 1.0
    pixels = cache.pixels_for_index(index, config.data)
    whole = pipeline.whole_planes(batch)
    for i, pos in enumerate(batch["index"]):
        flipped = images.transform(Image.fromarray(pixels.pixels(pos)), SIZE, "stretch",
                                   flip=bool(flips[0, i]), angle=float(angles[0, i]))
        expected = np.asarray(flipped)
        np.testing.assert_array_equal(whole[i], _channels_first(expected))


def _luminance(batch_image):
    """A 'keep' batch's ``[b, 3, S, S]`` as config.data.colour='grey' makes it: ``[b, 1, S, S]``."""
    return np.stack([images.as_colour(row.transpose(1, 2, 0), "grey")
                     for row in batch_image])[:, None]


def test_grey_batches_are_one_plane_the_luminance_of_the_kept_colour(mura_root, built):
    """config.data.colour='grey': each batch's image is ``[b, 1, S, S]``, the luminance of the
    'keep' batch's (after the resize, flip and rotation), from the cache and the files alike;
    the other fields are the same."""
    out, _ = built
    index = mura.index_from_config(_config(mura_root, out).data, "train")
    configs = {}
    for source, folder in (("cache", str(out)), ("files", "")):
        for colour in ("keep", "grey"):
            configs[source, colour] = _config(mura_root, folder, **{"data.colour": colour}).data

    def loaders(config):
        return (list(pipeline.eval_loader(index, config, global_batch_size=16))
                + [next(iter(pipeline.train_loader(index, config, global_batch_size=8,
                                                   seed=1, epoch=0)))])

    coloured = 0
    for source in ("cache", "files"):
        for kept, grey in zip(loaders(configs[source, "keep"]), loaders(configs[source, "grey"])):
            whole = pipeline.whole_planes(kept)
            assert grey["image"].shape == (kept["image"].shape[0], 1, SIZE, SIZE)
            np.testing.assert_array_equal(grey["image"], _luminance(whole))
            for key in ("label", "study_type", "mask", "index"):
                np.testing.assert_array_equal(grey[key], kept[key])
            coloured += int(np.sum(np.any(whole[:, 0] != whole[:, 1], axis=(1, 2))))
    assert coloured > 0  # the synthetic set has tinted (RGB) images
    # Unaugmented, the cache's grey batches are the files' (as with 'keep').
    grey_cache, grey_files = (list(pipeline.eval_loader(index, configs[s, "grey"],
                                                        global_batch_size=16))
                              for s in ("cache", "files"))
    for a, b in zip(grey_cache, grey_files):
        np.testing.assert_array_equal(a["image"], b["image"])


def test_device_augmentation_gets_the_cached_uint8_pixels(mura_root, built):
    out, _ = built
    config = _config(mura_root, out, **{"data.augment_on": "device"})
    index = mura.index_from_config(config.data, "train")
    batch = next(iter(pipeline.train_loader(index, config.data, global_batch_size=8, seed=1,
                                            epoch=0)))
    assert batch["image"].dtype == np.uint8
    pixels = cache.pixels_for_index(index, config.data)
    whole = pipeline.whole_planes(batch)
    for i, pos in enumerate(batch["index"]):
        np.testing.assert_array_equal(whole[i], _channels_first(pixels.pixels(pos)))


def test_a_cache_of_other_settings_or_csvs_is_refused_naming_the_field(mura_root, built,
                                                                       tmp_path):
    out, _ = built
    index = mura.read_split(mura_root, "valid")
    for field, value in (("image_size", 48), ("resize", "pad")):
        config = _config(mura_root, out, **{f"data.{field}": value})
        with pytest.raises(UserError, match=rf"built with {field}=.*config\.data\.{field} is "
                                            rf".*murajax\.data\.cache build"):
            cache.pixels_for_index(index, config.data)
    # Other CSVs at data.root: a copy of the root with one image row fewer.
    root = tmp_path / "MURA-v1.1"
    shutil.copytree(mura_root, root)
    csv = root / "valid_image_paths.csv"
    csv.write_text("".join(csv.read_text().splitlines(keepends=True)[:-1]))
    with pytest.raises(UserError, match="csv_digest differs"):
        cache.pixels_for_index(index, _config(root, out).data)
    with pytest.raises(UserError, match=f"config.data.cache: {tmp_path / 'none'} is not a "
                                        "folder"):
        cache.pixels_for_index(index, _config(mura_root, tmp_path / "none").data)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a murajax image cache"):
        cache.pixels_for_index(index, _config(mura_root, tmp_path / "empty").data)
    # An image the cache does not hold (here: one whose key is not in it).
    other = mura.index_from_records([mura.ImageRecord(
        "/x/image9.png", "valid/XR_WRIST/patient1/study1_positive", 6, "patient1", 1)])
    with pytest.raises(UserError, match="1 image.* not in the cache"):
        cache.pixels_for_index(other, _config(mura_root, out).data)
    # The build refuses to finish a folder holding another build.
    with pytest.raises(UserError, match="image_size: 32 there, 48 now"):
        cache.build(mura_root, out, image_size=48, records_per_shard=PER_SHARD)


def test_an_image_unreadable_at_build_time_fails_or_is_skipped_like_a_png(mura_root, tmp_path):
    root = tmp_path / "MURA-v1.1"
    shutil.copytree(mura_root, root)
    index = mura.read_split(root, "valid")
    broken = index.images[1].path
    open(broken, "wb").close()  # zero bytes
    out = tmp_path / "cache"
    cache.build(root, out, image_size=SIZE, records_per_shard=PER_SHARD)
    config = _config(root, out, **{"data.num_workers": 0})
    with pytest.raises(UserError, match=f"{broken}: cannot read image .*empty file.*"
                                        "on_bad_image=skip"):
        list(pipeline.eval_loader(index, config.data, global_batch_size=16))
    config.data.on_bad_image = "skip"
    batch = next(iter(pipeline.eval_loader(index, config.data, global_batch_size=16)))
    assert batch["mask"][1] == 0 and batch["index"][1] == 1 and batch["mask"][0] == 1


_KILL_AT_RECORD = 2 * PER_SHARD + 3  # two shards complete, the third half-written


def test_build_killed_by_sigkill_then_rerun_writes_the_same_shards(mura_root, built, tmp_path):
    out, _ = built
    again = tmp_path / "cache"
    driver = (  # the child SIGKILLs itself while writing record _KILL_AT_RECORD
        "import os, signal, sys\n"
        "from murajax.data import cache\n"
        "update = cache._Progress.update\n"
        "def killing(self, n=1):\n"
        f"    if self.done + n == {_KILL_AT_RECORD}: os.kill(os.getpid(), signal.SIGKILL)\n"
        "    update(self, n)\n"
        "cache._Progress.update = killing\n"
        f"sys.exit(cache.main(sys.argv[1:]))\n")
    args = ["build", "--root", str(mura_root), "--out", str(again), "--image_size", str(SIZE),
            "--records_per_shard", str(PER_SHARD), "--num_workers", "0"]
    env = harness.subprocess_env(str(tmp_path / "xla"))
    killed = subprocess.run([sys.executable, "-c", driver, *args], env=env, cwd=harness.REPO,
                            capture_output=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    left = sorted(p.name for p in again.iterdir())
    assert cache.MANIFEST not in left and any(".tmp-" in name for name in left)
    assert sum(name.endswith(".array_record") for name in left) == 2
    with pytest.raises(UserError, match="its build did not finish .*: rerun the build"):
        cache.pixels_for_index(mura.read_split(mura_root, "valid"),
                               _config(mura_root, again).data)
    rerun = subprocess.run([sys.executable, "-m", "murajax.data.cache", *args], env=env,
                           cwd=harness.REPO, capture_output=True, timeout=120, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "ETA" in rerun.stderr and f"train with --config.data.cache={again}" in rerun.stdout
    assert _files(again) == _files(out)


def test_build_with_worker_processes_writes_the_same_shards(mura_root, built, tmp_path):
    out, _ = built
    cache.build(mura_root, tmp_path, image_size=SIZE, records_per_shard=PER_SHARD,
                num_workers=2)
    assert _files(tmp_path) == _files(out)


@pytest.fixture(scope="module")
def trained(mura_root, built, tmp_path_factory):
    out, _ = built
    workdir = tmp_path_factory.mktemp("run")
    # 'auto' as the default config has it (0 workers on 2 CPUs; the results do not depend on it)
    config = _config(mura_root, out, **{"data.num_workers": "auto"})
    return workdir, train.train_and_evaluate(config, workdir)


def test_train_and_evaluate_from_the_cache_repeat_exactly(mura_root, built, trained, tmp_path,
                                                          monkeypatch):
    from murajax.modes import evaluate

    out, _ = built
    workdir, first = trained
    manifests_read = []
    checked_manifest = cache._checked_manifest
    monkeypatch.setattr(cache, "_checked_manifest",
                        lambda *a: manifests_read.append(a) or checked_manifest(*a))
    second = train.train_and_evaluate(_config(mura_root, out), tmp_path)
    assert second["history"] == first["history"]
    # Read once per split for its CSVs and once per split for its pixels, not once per epoch.
    assert len(first["history"]) == 2 and len(manifests_read) == 4
    helpers.assert_same_tree(helpers.final_variables(tmp_path), helpers.final_variables(workdir))
    reports = []
    for run, overrides in ((workdir, {}), (tmp_path, {}), (tmp_path, {"data.cache": ""})):
        folder = evaluate.evaluate_workdir({"eval.bootstrap_samples": 100, **overrides}, run)
        reports.append((open(f"{folder}/predictions.csv").read(),
                        json.loads(open(f"{folder}/report.json").read())["aggregate"]))
    # The second run's evaluation, and the PNG files' evaluation of it, equal the first's.
    assert reports[0] == reports[1] == reports[2]
    # The saved config says num_workers='auto'; an integer from the command line still applies.
    assert evaluate.evaluation_config({"data.num_workers": 2}, workdir).data.num_workers == 2
    assert json.loads((workdir / "config.json").read_text())["data"]["num_workers"] == "auto"
    assert evaluate.evaluation_config({"data.prefetch": 0}, workdir).data.prefetch == 0


def test_resume_from_the_cache_is_exact(mura_root, built, trained, tmp_path):
    out, _ = built
    workdir, full = trained
    final = helpers.train_with_two_interruptions(
        lambda **extra: _config(mura_root, out, **extra), tmp_path, full["history"][0]["step"])
    assert final["val_loss"] == full["val_loss"]
    helpers.assert_same_tree(helpers.final_variables(tmp_path), helpers.final_variables(workdir))


def test_num_workers_auto_leaves_a_core_for_the_loop_and_one_per_device():
    import jax

    from murajax.configs import default

    assert pipeline.resolve_num_workers("auto", cpus=2, devices=1) == 0
    assert pipeline.resolve_num_workers("auto", cpus=1, devices=1) == 0
    assert pipeline.resolve_num_workers("auto", cpus=16, devices=8) == 7
    assert pipeline.resolve_num_workers("auto", cpus=8, devices=1) == 6
    assert pipeline.resolve_num_workers("auto", cpus=224, devices=8) == pipeline._MAX_AUTO_WORKERS
    config = default.get_config()
    assert config.data.num_workers == "auto"
    expected = max(0, min(pipeline._MAX_AUTO_WORKERS,
                          len(os.sched_getaffinity(0)) - 1 - jax.local_device_count()))
    assert pipeline.resolve_num_workers(config.data.num_workers) == expected
    config.data.num_workers = 3  # an integer still works (from Python and the command line)
    assert pipeline.resolve_num_workers(config.data.num_workers) == 3
    assert pipeline.resolve_num_workers("2") == 2
    for bad in (-1, "many", True, 1.5):
        with pytest.raises(UserError, match="config.data.num_workers must be an integer >= 0 "
                                            "or 'auto'"):
            pipeline.resolve_num_workers(bad)


def test_prefetch_auto_builds_cached_batches_in_the_loops_thread(mura_root, built):
    """'auto' (the default): no background thread when a process without workers reads the
    cache, Grain's prefetch thread otherwise; the batches are the same either way."""
    from murajax.configs import default

    assert default.get_config().data.prefetch == "auto"
    assert pipeline.resolve_prefetch("auto", cache="/c", num_workers=0) == 0
    assert pipeline.resolve_prefetch("auto", cache="/c", num_workers=3) == pipeline.AUTO_PREFETCH
    assert pipeline.resolve_prefetch("auto", cache="", num_workers=0) == pipeline.AUTO_PREFETCH
    assert pipeline.resolve_prefetch("3", cache="/c", num_workers=0) == 3  # command line
    assert pipeline.resolve_prefetch(0, cache="", num_workers=0) == 0
    for bad in (-1, "soon", True, 1.5):
        with pytest.raises(UserError, match="config.data.prefetch must be an integer >= 0 or "
                                            "'auto'"):
            pipeline.resolve_prefetch(bad, cache="", num_workers=0)
    out, _ = built
    config = _config(mura_root, out)
    index = mura.index_from_config(config.data, "train")
    threaded = _config(mura_root, out, **{"data.prefetch": 2}).data
    auto = pipeline.train_loader(index, config.data, global_batch_size=8, seed=1, epoch=0)
    ahead = pipeline.train_loader(index, threaded, global_batch_size=8, seed=1, epoch=0)
    assert (auto._options.prefetch, ahead._options.prefetch) == (0, 2)
    pairs = list(zip(auto, ahead))
    assert len(pairs) == len(index.images) // 8
    for a, b in pairs:
        helpers.assert_same_batch(a, b)


def test_predict_from_the_cache_equals_predicting_the_files(mura_root, built, trained, tmp_path):
    """--mode=predict with config.data.cache and no --input: every cached valid image, with the
    probabilities of predicting its PNG file, studies from the keys, overlays on the cached
    pixels; no CSV is read."""
    from murajax import cli
    from murajax.modes import predict

    out, manifest = built
    workdir, _ = trained
    from_cache = predict.run_predict(workdir, [], tmp_path / "cache", cache=str(out), cam=True)
    keys = [k for k in manifest["keys"] if k.startswith("valid/")]
    assert [row.image for row in from_cache.rows] == keys
    from_files = predict.run_predict(workdir, [os.path.join(mura_root, "valid")],
                                     tmp_path / "files")
    by_key = {row.image.split("MURA-v1.1/", 1)[-1].replace(os.sep, "/"): row
              for row in from_files.rows}
    assert sorted(by_key) == sorted(keys)
    np.testing.assert_allclose([row.view_probability for row in from_cache.rows],
                               [by_key[k].view_probability for k in keys], rtol=0,
                               atol=8 * float(np.finfo(np.float32).eps))
    for row in from_cache.rows:
        assert row.study == os.path.dirname(row.image) and row.study_type in row.image
        views = [r.view_probability for r in from_cache.rows if r.study == row.study]
        assert row.study_probability == pytest.approx(float(np.mean(views)))
        with Image.open(tmp_path / "cache" / "cam" / f"{row.name}.png") as overlay:
            assert overlay.size == (SIZE, SIZE)  # drawn on the cached image
    assert (tmp_path / "cache" / "predictions.csv").read_text().count("\n") == len(keys) + 1
    # The train split, and the command line's fields.
    train_rows = predict.run_predict(workdir, [], tmp_path / "train", cache=str(out),
                                     split="train").rows
    assert len(train_rows) == manifest["splits"]["train"]
    assert cli.predict_options({"data.cache": str(out), "eval.split": "all"}) == {
        "cache": str(out), "split": "all"}
    with pytest.raises(UserError, match="not both"):
        predict.run_predict(workdir, [os.path.join(mura_root, "valid")], tmp_path / "x",
                            cache=str(out))
    with pytest.raises(UserError, match="train, valid, all"):
        predict.run_predict(workdir, [], tmp_path / "x", cache=str(out), split="test")
    with pytest.raises(UserError, match=f"image_size={SIZE}.*config.data.image_size"):
        cache.split_for_prediction(out, "valid", image_size=SIZE + 8, resize="stretch")



def test_a_grey_run_from_the_cache_evaluates_and_predicts_as_from_the_files(mura_root, built,
                                                                          tmp_path):
    """config.data.colour='grey' with the augmentation on the device (the cheapest input): the
    run trains on one-plane batches and saves the field; its evaluation and prediction from the
    cache equal those from the PNG files."""
    from murajax.modes import evaluate, predict

    out, _ = built
    workdir = tmp_path / "run"
    config = _config(mura_root, out, **{"data.colour": "grey", "data.augment_on": "device",
                                        "num_epochs": 1})
    summary = train.train_and_evaluate(config, workdir)
    assert np.isfinite(summary["val_loss"])
    assert json.loads((workdir / "config.json").read_text())["data"]["colour"] == "grey"
    reports = []
    for overrides in ({}, {"data.cache": ""}):
        folder = evaluate.evaluate_workdir({"eval.bootstrap_samples": 50, **overrides}, workdir)
        reports.append((open(f"{folder}/predictions.csv").read(),
                        json.loads(open(f"{folder}/report.json").read())["aggregate"]))
    assert reports[0] == reports[1]
    from_cache = predict.run_predict(workdir, [], tmp_path / "cache", cache=str(out))
    from_files = predict.run_predict(workdir, [os.path.join(mura_root, "valid")],
                                     tmp_path / "files")
    by_key = {row.image.split("MURA-v1.1/", 1)[-1].replace(os.sep, "/"): row.view_probability
              for row in from_files.rows}
    np.testing.assert_allclose([row.view_probability for row in from_cache.rows],
                               [by_key[row.image] for row in from_cache.rows], rtol=0,
                               atol=8 * float(np.finfo(np.float32).eps))


@pytest.fixture(scope="module")
def portable(mura_root, tmp_path_factory):
    """A cache built from a copy of the MURA folder that was then moved away: only the cache
    is left to read."""
    folder = tmp_path_factory.mktemp("portable")
    root = folder / "MURA-v1.1"
    shutil.copytree(mura_root, root)
    out = folder / "cache"
    cache.build(root, out, image_size=SIZE, records_per_shard=PER_SHARD)
    root.rename(folder / "moved-away")
    return out


def test_the_cache_holds_byte_copies_of_the_csvs(mura_root, built):
    out, manifest = built
    for name in cache.CSV_FILES:
        assert (out / cache.CSV_DIR / name).read_bytes() == (mura_root / name).read_bytes()
    assert cache.csv_digest(out / cache.CSV_DIR) == manifest["csv_digest"]
    assert manifest["root_name"] == "MURA-v1.1"


def test_train_and_evaluate_from_the_cache_alone_equal_those_with_the_root(mura_root, built,
                                                                           trained, portable,
                                                                           tmp_path):
    """Empty data.root, the originals gone: the same index, labels, training and evaluation as
    with data.root (the ``trained`` run), from the cache's CSV copies and pixels."""
    from murajax.modes import evaluate

    workdir, first = trained
    config = _config("", portable, **{"data.num_workers": "auto", "data.synthetic_studies": 4})
    for split in ("train", "valid"):  # the index, labels, subsets, labels_csv as from the root
        with_root = mura.index_from_config(_config(mura_root, built[0]).data, split)
        alone = mura.index_from_config(config.data, split)
        assert [(r.study, r.label, r.study_type, r.patient) for r in alone.images] == [
            (r.study, r.label, r.study_type, r.patient) for r in with_root.images]
    subset = _config("", portable, **{"data.study_types": "XR_HAND", "data.fraction": 0.5})
    assert mura.index_from_config(subset.data, "train").studies == mura.index_from_config(
        _config(mura_root, built[0], **{"data.study_types": "XR_HAND",
                                        "data.fraction": 0.5}).data, "train").studies
    relabeled = tmp_path / "labels.csv"  # the first study's label flipped
    rows = (mura_root / "train_labeled_studies.csv").read_text().splitlines(keepends=True)
    path, label = rows[0].rstrip("\n").rsplit(",", 1)
    relabeled.write_text(f"{path},{1 - int(label)}\n" + "".join(rows[1:]))
    labels = mura.index_from_config(
        _config("", portable, **{"data.labels_csv": str(relabeled)}).data, "train").study_labels()
    assert labels.tolist() == mura.index_from_config(_config(mura_root, built[0], **{
        "data.labels_csv": str(relabeled)}).data, "train").study_labels().tolist()
    assert labels[0] == 1 - int(label)
    assert mura.study_labels_file(config.data, "valid") == \
        portable / cache.CSV_DIR / "valid_labeled_studies.csv"
    # Training: the cache's copies win over generating synthetic data.
    summary = train.train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run" / "data").exists()
    assert summary["history"] == first["history"]
    helpers.assert_same_tree(helpers.final_variables(tmp_path / "run"),
                             helpers.final_variables(workdir))
    reports = []
    for run in (workdir, tmp_path / "run"):
        folder = evaluate.evaluate_workdir({"eval.bootstrap_samples": 100}, run)
        reports.append((open(f"{folder}/predictions.csv").read(),
                        json.loads(open(f"{folder}/report.json").read())["aggregate"]))
    assert reports[0] == reports[1]
    # The run trained with data.root, evaluated from the cache alone.
    folder = evaluate.evaluate_workdir({"eval.bootstrap_samples": 100, "data.root": "",
                                        "data.cache": str(portable)}, workdir)
    assert open(f"{folder}/predictions.csv").read() == reports[0][0]
    # Audit (its CAM overlays drawn on the cached images) and relabel from the cache alone.
    from murajax.modes import audit, relabel

    audited = audit.audit_workdir({"eval.split": "valid"}, tmp_path / "run")
    overlays = list((audited / "cam").iterdir())
    assert overlays and all(Image.open(p).size == (SIZE, SIZE) for p in overlays)
    assert "could not be drawn" not in (audited / "suspects.md").read_text()
    relabeled = relabel.relabel_workdir({"relabel.confidence": 0.6}, tmp_path / "run")
    text = (relabeled / "train_labeled_studies.csv").read_text().splitlines()
    assert len(text) == len(rows)  # rewritten from the cache's copy of the train labels


def test_with_a_cache_the_root_needs_its_csvs_only(mura_root, built, tmp_path):
    """data.root set and a cache: the images listed are looked up in the cache, not on disk
    (a root of the four CSVs and no image folder reads the same index)."""
    root = tmp_path / "MURA-v1.1"
    root.mkdir()
    for name in cache.CSV_FILES:
        shutil.copy(mura_root / name, root / name)
    for split in ("train", "valid"):
        csvs_only = mura.index_from_config(_config(root, built[0]).data, split)
        full = mura.index_from_config(_config(mura_root, built[0]).data, split)
        assert [os.path.relpath(r.path, root) for r in csvs_only.images] == [
            os.path.relpath(r.path, mura_root) for r in full.images]
        assert [r.label for r in csvs_only.images] == [r.label for r in full.images]
    with pytest.raises(UserError, match="folder missing"):  # without the cache: the files
        mura.index_from_config(_config(root, "").data, "valid")


def test_a_cache_without_csv_copies_and_no_root_is_refused_with_both_fixes(built, tmp_path):
    old = tmp_path / "old-cache"
    shutil.copytree(built[0], old)
    shutil.rmtree(old / cache.CSV_DIR)  # as built before caches held the copies
    config = _config("", old)
    message = (rf"config.data.root is empty and the image cache config.data.cache={old} has no "
               r"copies of the MURA CSVs .*Set --config.data.root=.*rerun the build, which adds "
               rf"them: python -m murajax.data.cache build --root .* --out {old} ")
    with pytest.raises(UserError, match=message):
        mura.index_from_config(config.data, "valid")
    with pytest.raises(UserError, match=message):
        train.prepare_data(config, tmp_path / "run", tasks.from_config(config))
    assert not (tmp_path / "run").exists()  # no synthetic data generated instead


def test_rerunning_the_build_adds_the_copies_only_from_the_same_csvs(mura_root, built, tmp_path):
    out, manifest = built
    old = tmp_path / "old-cache"
    shutil.copytree(out, old)
    shutil.rmtree(old / cache.CSV_DIR)
    stale = json.loads((old / cache.MANIFEST).read_text())
    del stale["root_name"]  # a manifest as written before the copies
    (old / cache.MANIFEST).write_text(json.dumps(stale))
    assert cache.build(mura_root, old, image_size=SIZE, records_per_shard=PER_SHARD) == manifest
    assert _files(old) == _files(out)
    assert len(mura.index_from_config(_config("", old).data, "valid").images) == \
        manifest["splits"]["valid"]
    # Other CSVs at --root: refused, naming both folders; the cache is left as it was.
    root = tmp_path / "MURA-v1.1"
    shutil.copytree(mura_root, root)
    with open(root / "valid_labeled_studies.csv", "a") as f:
        f.write("\n")  # a blank row: the same index, other bytes
    shutil.rmtree(old / cache.CSV_DIR)
    with pytest.raises(UserError, match=rf"--root {root}: its CSVs .* differ from those the "
                                        rf"cache in --out {old} was built from"):
        cache.build(root, old, image_size=SIZE, records_per_shard=PER_SHARD)
    assert not (old / cache.CSV_DIR).exists()
