"""Inference: CAMs, overlays, DICOM decoding, the Predictor and the predict mode's outputs."""

import csv
import importlib.util
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from murajax import inference, models
from murajax.data import files
from murajax.data.dicom import is_dicom, read_dicom
from murajax.data import images
from murajax.errors import UserError
from murajax.modes import predict

SIZE = 64
HAS_CHECKPOINTS = importlib.util.find_spec("murajax.checkpoints") is not None
needs_checkpoints = pytest.mark.skipif(not HAS_CHECKPOINTS, reason="murajax.checkpoints missing")


# ---- fixtures -----------------------------------------------------------------------------------


def _variables(model, seed, bias=0.3):
    """Random variables of the right shapes without compiling ``model.init`` (slow on CPU):
    He-scaled kernels, BatchNorm with non-trivial statistics, a non-zero head bias."""
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3)), train=False)
    )
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return (rng.normal(size=leaf.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        if name in ("scale", "var"):
            return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        if name == "bias" and path[-2].key == "head":
            return np.full(leaf.shape, bias, np.float32)
        return rng.uniform(-0.2, 0.2, leaf.shape).astype(np.float32)  # bias, mean

    return jax.tree_util.tree_map_with_path(fill, shapes)


@jax.jit
def _apply(variables, x):
    return models.densenet_tiny().apply(variables, x, train=False, return_features=True)


@pytest.fixture(scope="module")
def model():
    return models.densenet_tiny()


@pytest.fixture(scope="module")
def members(model):
    return [_variables(model, 0, 0.3), _variables(model, 1, -0.2)]


def _png(path, height, width, seed, mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (height, width) if mode == "L" else (height, width, 3)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
    return path


@pytest.fixture()
def tree(tmp_path):
    """Two studies in MURA layout (one with an RGB and a non-square view), and a corrupt file."""
    root = tmp_path / "valid"
    s1 = root / "XR_WRIST" / "patient1" / "study1_positive"
    s2 = root / "XR_HAND" / "patient2" / "study1"
    _png(s1 / "image1.png", 70, 50, 1)
    _png(s1 / "image2.png", 48, 80, 2, mode="RGB")
    _png(s2 / "image1.png", 64, 64, 3)
    (s2 / "image2.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (s2 / ".DS_Store").write_bytes(b"junk")
    return root


def _direct_probabilities(variables, paths):
    """sigmoid(model.apply(...)) on the evaluation transform of 3 images."""
    batch = np.stack([images.preprocess(images.load_image(p), SIZE, "stretch") for p in paths])
    logits, _ = _apply(variables, batch)
    return np.asarray(jax.nn.sigmoid(logits[:, 0]))


def _write_dicom(path, pixels, photometric="MONOCHROME2", bits_stored=12, **elements):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    for key, value in elements.items():
        setattr(ds, key, value)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


# ---- class activation maps ----------------------------------------------------------------------


def test_cam_spatial_mean_plus_bias_equals_logit(members):
    variables = members[0]
    x = jax.random.normal(jax.random.PRNGKey(1), (3, SIZE, SIZE, 3))
    logits, features = _apply(variables, x)
    head = variables["params"]["head"]
    cams = inference.class_activation_maps(features, head["kernel"])
    assert cams.shape == features.shape[:3] + (1,)
    np.testing.assert_allclose(cams.mean(axis=(1, 2)) + head["bias"], logits, atol=1e-5)
    with_bias = inference.class_activation_maps(features, head["kernel"], head["bias"])
    np.testing.assert_allclose(with_bias.mean(axis=(1, 2)), logits, atol=1e-5)


def test_cam_is_the_head_weighted_sum_of_feature_maps_per_output():
    features = np.random.default_rng(0).uniform(size=(2, 3, 4, 5)).astype(np.float32)
    kernel = np.random.default_rng(1).normal(size=(5, 2)).astype(np.float32)
    cams = inference.class_activation_maps(features, kernel, np.array([1.0, -1.0]))
    assert cams.shape == (2, 3, 4, 2)
    np.testing.assert_allclose(cams[1, 2, 3, 1], features[1, 2, 3] @ kernel[:, 1] - 1.0, rtol=1e-6)


def test_overlay_has_the_original_size_of_a_non_square_image():
    image = np.random.default_rng(0).integers(0, 256, (37, 91), dtype=np.uint8)
    cam = np.array([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]], np.float32)
    out = inference.overlay(image, cam, alpha=0.4)
    assert out.shape == (37, 91, 3) and out.dtype == np.uint8
    # alpha 0 is the image itself; a constant CAM is fine.
    np.testing.assert_array_equal(inference.overlay(image, cam, alpha=0.0),
                                  np.repeat(image[..., None], 3, axis=2))
    assert inference.overlay(image, np.ones((2, 2, 1)), alpha=1.0).shape == (37, 91, 3)
    # The hot end of the CAM (bottom right) is red in 'jet', the cold end blue.
    heat = inference.overlay(image, cam, alpha=1.0)
    assert heat[-1, -1, 0] > 100 and heat[-1, -1, 1] < 30 and heat[-1, -1, 2] < 30
    assert heat[0, 0, 2] > 100 and heat[0, 0, 0] < 30 and heat[0, 0, 1] < 30


def test_cam_box_covers_the_padded_image_only():
    # A 40x80 image padded to 64x64 occupies rows 16..48: in a 2x2 CAM, rows 0.5..1.5.
    assert inference.cam_box(40, 80, 64, "pad", 2, 2) == (0.0, 0.5, 2.0, 1.5)
    assert inference.cam_box(40, 80, 64, "stretch", 2, 2) is None


# ---- DICOM --------------------------------------------------------------------------------------


def _linear_window(x, center, width):
    y = ((x - (center - 0.5)) / (width - 1.0) + 0.5) * 255.0
    return np.rint(np.clip(y, 0, 255)).astype(np.uint8)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_dicom_16_bit_with_rescale_and_window(tmp_path, photometric):
    stored = np.random.default_rng(0).integers(0, 4096, (30, 20)).astype(np.uint16)
    path = _write_dicom(tmp_path / "x.dcm", stored, photometric, RescaleSlope=2,
                        RescaleIntercept=-1024, WindowCenter=1000, WindowWidth=3000)
    expected = _linear_window(stored * 2.0 - 1024.0, 1000.0, 3000.0)
    if photometric == "MONOCHROME1":
        expected = 255 - expected
    out = read_dicom(path)
    assert out.dtype == np.uint8 and out.shape == (30, 20)
    np.testing.assert_array_equal(out, expected)


def test_dicom_without_window_is_min_max_scaled(tmp_path):
    stored = np.arange(8 * 8, dtype=np.uint16).reshape(8, 8) * 50 + 100
    path = _write_dicom(tmp_path / "x.dicom", stored, RescaleSlope=1, RescaleIntercept=0)
    expected = np.rint((stored - 100.0) / (stored.max() - 100.0) * 255.0).astype(np.uint8)
    np.testing.assert_array_equal(read_dicom(path), expected)


def test_dicom_8_bit(tmp_path):
    stored = np.arange(256, dtype=np.uint8).reshape(16, 16)
    path = _write_dicom(tmp_path / "x.dcm", stored, bits_stored=8)
    np.testing.assert_array_equal(read_dicom(path), stored)


def test_is_dicom_by_suffix_or_magic(tmp_path):
    path = _write_dicom(tmp_path / "noext", np.zeros((4, 4), np.uint16))
    assert is_dicom(path) and is_dicom(tmp_path / "missing.DCM")
    assert not is_dicom(_png(tmp_path / "a.png", 4, 4, 0))


def test_unreadable_dicom_names_the_file(tmp_path):
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(b"nonsense")
    with pytest.raises(UserError, match="broken.dcm"):
        read_dicom(bad)


def test_large_16_bit_dicom_decodes_without_big_copies(tmp_path, model, members):
    stored = np.random.default_rng(0).integers(0, 65536, (3000, 2500)).astype(np.uint16)
    path = _write_dicom(tmp_path / "big.dcm", stored, bits_stored=16)
    del stored
    tracemalloc.start()
    try:
        x = inference.load_preprocessed(path, SIZE, "stretch")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert x.shape == (SIZE, SIZE, 3) and x.dtype == np.float32
    assert peak < 64 * 2**20  # 15 MB stored + 7.5 MB result: no full-size float or RGB copies
    predictor = inference.Predictor(model, members[:1], SIZE, batch_size=2)
    (row,) = predictor.predict(path).rows
    assert 0.0 < row.view_probability < 1.0


# ---- the Predictor ------------------------------------------------------------------------------


def test_predictor_matches_direct_model_apply(tree, model, members):
    predictor = inference.Predictor(model, members[:1], SIZE, "stretch", 0.5, batch_size=2)
    rows = predictor.predict(tree).rows  # 3 readable images: a full and a padded batch
    paths = [row.image for row in rows]
    assert [p.split("valid/")[1] for p in paths] == [
        "XR_HAND/patient2/study1/image1.png",
        "XR_WRIST/patient1/study1_positive/image1.png",
        "XR_WRIST/patient1/study1_positive/image2.png",
    ]
    expected = _direct_probabilities(members[0], paths)
    np.testing.assert_allclose([r.view_probability for r in rows], expected, atol=1e-6)
    wrist = rows[1:]
    assert {r.study for r in wrist} == {"XR_WRIST/patient1/study1_positive"}
    assert rows[0].study_type == "XR_HAND" and wrist[0].study_type == "XR_WRIST"
    study_p = float(np.mean(expected[1:]))
    for r in wrist:
        assert r.study_probability == pytest.approx(study_p, abs=1e-6)
        assert r.decision == int(study_p > 0.5)


def test_ensemble_is_the_mean_of_its_members(tree, model, members):
    single = [inference.Predictor(model, [v], SIZE, batch_size=2).predict(tree).rows
              for v in members]
    both = inference.Predictor(model, members, SIZE, batch_size=2).predict(tree).rows
    mean = np.mean([[r.view_probability for r in rows] for rows in single], axis=0)
    np.testing.assert_allclose([r.view_probability for r in both], mean, atol=1e-7)


def test_cams_are_at_feature_resolution_and_average_to_the_logit(tree, model, members):
    predictor = inference.Predictor(model, members[:1], SIZE, batch_size=2)
    rows = predictor.predict(tree, cam=True).rows
    for row in rows:
        assert row.cam.shape == (SIZE // 32, SIZE // 32)
        p = row.view_probability
        assert row.cam.mean() == pytest.approx(np.log(p / (1 - p)), abs=1e-4)


def test_unreadable_file_is_reported_and_the_others_predicted(tree, model, members):
    predictions = inference.Predictor(model, members[:1], SIZE, batch_size=2).predict(tree)
    assert len(predictions.rows) == 3
    ((path, message),) = predictions.errors
    assert path.endswith("XR_HAND/patient2/study1/image2.png") and "image2.png" in message


def test_empty_or_missing_input_raises(tmp_path, model, members):
    predictor = inference.Predictor(model, members[:1], SIZE)
    (tmp_path / "empty" / ".hidden").mkdir(parents=True)
    with pytest.raises(UserError, match="no images"):
        predictor.predict(tmp_path / "empty")
    with pytest.raises(UserError, match="no such file"):
        predictor.predict(tmp_path / "nope")
    with pytest.raises(UserError):
        predictor.predict([])


def test_single_files_and_dicom_are_accepted(tmp_path, tree, model, members):
    dcm = _write_dicom(tmp_path / "v.dcm",
                       np.random.default_rng(0).integers(0, 4096, (90, 70)).astype(np.uint16))
    png = tree / "XR_WRIST" / "patient1" / "study1_positive" / "image1.png"
    rows = inference.Predictor(model, members[:1], SIZE, batch_size=2).predict([png, dcm]).rows
    assert [r.study_type for r in rows] == ["XR_WRIST", ""]
    assert rows[0].study.endswith("study1_positive")


def _default_config():
    """murajax/configs/default.py with the tiny model at the test image size."""
    from murajax.configs import default

    config = default.get_config()
    config.model.name = "densenet_tiny"
    config.data.image_size = SIZE
    config.eval_batch_size = 2
    return config


# ---- the predict mode's files -------------------------------------------------------------------


def test_write_predictions_csv_cams_and_errors(tmp_path, tree, model, members):
    predictor = inference.Predictor(model, members, SIZE, "pad", batch_size=2)
    run = predict.write_predictions(predictor, tree, tmp_path / "out", cam=True)
    with open(run.predictions_csv) as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == predict.PREDICTION_COLUMNS and len(rows) == 3
    with open(run.errors_csv) as f:
        assert len(list(csv.DictReader(f))) == 1
    cams = sorted(p.name for p in run.cam_dir.iterdir())
    assert len(cams) == 3 and len(set(cams)) == 3
    for row in run.rows:
        original = Image.open(row.image)
        with Image.open(run.cam_dir / f"{row.name}.png") as written:
            assert written.size == original.size and written.mode == "RGB"


def test_run_predict_without_inputs_names_both_ways_to_give_them(tmp_path):
    # Before any checkpoint is looked for: this workdir is not even a run.
    with pytest.raises(UserError, match=r"needs --input PATH .* or --config\.data\.cache=DIR"):
        predict.run_predict(tmp_path, [], tmp_path / "out")


@needs_checkpoints
def test_run_predict_without_checkpoints_raises(tmp_path, tree):
    from murajax import checkpoints

    with pytest.raises(UserError, match="not a murajax run"):
        predict.run_predict(tmp_path, tree, tmp_path / "out")
    checkpoints.save_run_config(tmp_path, _default_config())
    with pytest.raises(UserError, match="no checkpoints"):
        predict.run_predict(tmp_path, tree, tmp_path / "out")


@needs_checkpoints
def test_from_workdir_uses_the_best_checkpoints_and_the_run_config(tmp_path, tree, monkeypatch,
                                                                    members):
    from murajax import checkpoints

    config = _default_config()
    asked = []
    monkeypatch.setattr(checkpoints, "load_run_config", lambda workdir: config)
    monkeypatch.setattr(checkpoints, "best_steps", lambda workdir, k: asked.append(k) or [20, 10])
    monkeypatch.setattr(checkpoints, "restore_variables",
                        lambda workdir, step: members[{20: 0, 10: 1}[step]])
    run = predict.run_predict(tmp_path, tree, tmp_path / "out")
    assert asked == [5] and len(run.rows) == 3
    direct = np.mean([_direct_probabilities(v, [r.image for r in run.rows]) for v in members], 0)
    np.testing.assert_allclose([r.view_probability for r in run.rows], direct, atol=1e-6)
    assert inference.Predictor.from_workdir(tmp_path, top_k=1).steps == [20, 10]
    assert asked[-1] == 1


@needs_checkpoints
def test_run_predict_on_a_saved_run_ensembles_its_best_checkpoints(tmp_path, tree, members):
    from murajax import checkpoints

    config = _default_config()
    config.eval.ensemble_top_k = 1
    workdir = tmp_path / "run"
    workdir.mkdir()
    checkpoints.save_run_config(workdir, config)
    checkpointer = checkpoints.Checkpointer(workdir, keep_best=2)
    for step, variables, val_loss in [(10, members[0], 0.7), (20, members[1], 0.4)]:
        checkpointer.save(step, dict(variables), {}, {"val_loss": val_loss}, val_loss=val_loss)
    checkpointer.wait()
    checkpointer.close()

    best = predict.run_predict(workdir, tree, tmp_path / "out1")  # top_k from the config: 1
    both = predict.run_predict(workdir, tree, tmp_path / "out2", top_k=2)
    paths = [r.image for r in best.rows]
    np.testing.assert_allclose([r.view_probability for r in best.rows],
                               _direct_probabilities(members[1], paths), atol=1e-6)
    np.testing.assert_allclose(
        [r.view_probability for r in both.rows],
        np.mean([_direct_probabilities(v, paths) for v in members], axis=0), atol=1e-6)


def test_study_folders_with_the_same_name_stay_separate_studies(tmp_path):
    from PIL import Image as PILImage

    for patient in ("patient1", "patient2"):
        folder = tmp_path / patient / "study1_positive"
        folder.mkdir(parents=True)
        PILImage.new("L", (40, 30), 128).save(folder / "image1.png")
    images = files.find_images([tmp_path / "patient1" / "study1_positive",
                                    tmp_path / "patient2" / "study1_positive"])
    assert sorted(i.study for i in images) == ["patient1/study1_positive",
                                               "patient2/study1_positive"]
    assert len({i.name for i in images}) == 2


def test_predict_mode_finds_its_inputs_once(tmp_path, tree, model, members, monkeypatch):
    calls = []
    real = files.find_images
    monkeypatch.setattr(predict, "find_images", lambda inputs: calls.append(1) or real(inputs))
    monkeypatch.setattr(inference.Predictor, "from_workdir",
                        classmethod(lambda cls, workdir, **kw: cls(model, members[:1], SIZE)))
    run = predict.run_predict(tmp_path, tree, tmp_path / "out")
    assert len(calls) == 1 and len(run.rows) == 3 and len(run.errors) == 1


def test_predictions_hold_rows_and_errors(tree, model, members):
    predictions = inference.Predictor(model, members[:1], SIZE, batch_size=2).predict(tree)
    assert isinstance(predictions, inference.Predictions)
    assert list(predictions) == predictions.rows and len(predictions) == 3
    message = predictions.errors[0][1]  # the loader's message, without its training advice
    assert "image2.png: cannot read image (" in message and message.endswith(").")
    assert "on_bad_image" not in message
