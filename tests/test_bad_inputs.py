"""The bad-input matrix: every kind of broken file, CSV, config or workdir gets a clear message
(or a counted skip where configured), through the public entry points. See docs/reliability.md.
"""

import logging
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from murajax import checkpoints, train
from murajax.data import mura, pipeline
from murajax.errors import UserError
from tests import helpers

REPO = Path(__file__).resolve().parents[1]
SIZE = 32

# (study folder relative to MURA-v1.1, label); two views each.
_STUDIES = {
    "train": [("train/XR_WRIST/patient00001/study1_positive", 1),
              ("train/XR_WRIST/patient00002/study1_negative", 0),
              ("train/XR_HAND/patient00003/study1_positive", 1),
              ("train/XR_ELBOW/patient00004/study1_negative", 0)],
    "valid": [("valid/XR_WRIST/patient11185/study1_positive", 1),
              ("valid/XR_HAND/patient11186/study1_negative", 0)],
}


def _png(path, width=40, height=40, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8)).save(path)


@pytest.fixture
def root(tmp_path):
    """A small, valid MURA-v1.1 tree of real PNGs: 8 train and 4 valid images."""
    root = tmp_path / "MURA-v1.1"
    for split, studies in _STUDIES.items():
        image_rows, study_rows = [], []
        for i, (folder, label) in enumerate(studies):
            (root / folder).mkdir(parents=True)
            for view in (1, 2):
                _png(root / folder / f"image{view}.png", seed=10 * i + view)
                image_rows.append(f"MURA-v1.1/{folder}/image{view}.png")
            study_rows.append(f"MURA-v1.1/{folder}/,{label}")
        (root / f"{split}_image_paths.csv").write_text("\n".join(image_rows) + "\n")
        (root / f"{split}_labeled_studies.csv").write_text("\n".join(study_rows) + "\n")
    return root


def _data_config(root, **overrides):
    config = helpers.tiny_config().data
    config.root = str(root)
    config.synthetic_studies = 0
    config.image_size = SIZE
    config.prefetch = 0
    config.update(overrides)
    return config


def _first_image(root, split="train"):
    return root / (_STUDIES[split][0][0] + "/image1.png")


def _append_row(path: Path, row: str):
    path.write_text(path.read_text() + row + "\n")


def _replace_row(path: Path, number: int, row: str):
    lines = path.read_text().splitlines()
    lines[number - 1] = row
    path.write_text("\n".join(lines) + "\n")


# ---- images --------------------------------------------------------------------------------------


def _corrupt(path: Path, kind: str):
    if kind == "truncated PNG":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "corrupt PNG data":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif kind == "zero-byte file":
        path.write_bytes(b"")
    elif kind == "text file named .png":
        path.write_text("patient notes, not a radiograph\n" * 10)
    else:
        raise AssertionError(kind)


BAD_IMAGES = ["truncated PNG", "corrupt PNG data", "zero-byte file", "text file named .png"]


@pytest.mark.parametrize("kind", BAD_IMAGES)
def test_unreadable_image_stops_training_naming_the_file(root, kind):
    bad = _first_image(root)
    _corrupt(bad, kind)
    index = mura.read_split(root, "train")  # the CSVs are fine; images are decoded later
    loader = pipeline.eval_loader(index, _data_config(root), global_batch_size=4)
    with pytest.raises(UserError) as info:
        list(loader)
    message = str(info.value)
    assert message.startswith(f"{bad}: cannot read image (")
    assert "--config.data.on_bad_image=skip" in message
    if kind == "zero-byte file":
        assert "empty file (0 bytes)" in message


@pytest.mark.parametrize("kind", BAD_IMAGES)
def test_unreadable_image_is_skipped_and_counted_when_configured(root, kind, caplog):
    bad = _first_image(root)
    _corrupt(bad, kind)
    index = mura.read_split(root, "train")
    config = _data_config(root, on_bad_image="skip")
    position = [r.path for r in index.images].index(str(bad))
    with caplog.at_level(logging.WARNING):
        batches = list(pipeline.eval_loader(index, config, global_batch_size=4))
        train_loader = pipeline.train_loader(index, config, global_batch_size=4, seed=0, epoch=0)
        list(train_loader)
    masks = np.concatenate([b["mask"] for b in batches])
    assert masks[position] == 0 and masks.sum() == len(index.images) - 1
    assert train_loader.num_bad_images == 1 and train_loader.bad_images == {str(bad)}
    assert f"skipping unreadable image {bad}" in caplog.text


@pytest.mark.parametrize("width,height", [(20, 10), (10, 20), (1, 1)])
@pytest.mark.parametrize("resize", ["stretch", "pad"])
def test_images_smaller_than_the_input_are_upscaled(root, width, height, resize):
    """Decision: any image of at least 1x1 px is resized to config.data.image_size (MURA has
    views ~90 px narrow); only config.data.image_size itself must be at least 32."""
    small = _first_image(root)
    pixels = np.tile(np.linspace(0, 255, width, dtype=np.uint8), (height, 1))
    Image.fromarray(pixels).save(small)
    index = mura.read_split(root, "train")
    position = [r.path for r in index.images].index(str(small))
    batches = list(pipeline.eval_loader(index, _data_config(root, resize=resize),
                                        global_batch_size=4))
    image = np.concatenate([pipeline.whole_planes(b) for b in batches])[position]
    mask = np.concatenate([b["mask"] for b in batches])[position]
    assert mask == 1 and image.shape == (3, SIZE, SIZE)  # uint8, channels first
    if resize == "stretch" and width > 1:
        assert image[0, SIZE // 2, -1] > image[0, SIZE // 2, 0]  # the gradient survives


def test_input_size_below_32_is_refused(root, tmp_path):
    config = helpers.run_config(root, **{"data.image_size": 16, "batch_size": 4})
    with pytest.raises(UserError, match=r"config.data.image_size=16 is too small.*at least 32"):
        train.train_and_evaluate(config, tmp_path / "run")


# ---- CSVs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("csv_name,row,message", [
    # A missing column: the study row has no label.
    ("train_labeled_studies.csv", "MURA-v1.1/train/XR_WRIST/patient00001/study1_positive/",
     r"train_labeled_studies.csv, row 1: malformed row .*expected '<study folder>/,<label>'"),
    # Extra fields: an image row with two.
    ("train_image_paths.csv",
     "MURA-v1.1/train/XR_WRIST/patient00001/study1_positive/image1.png,1",
     r"train_image_paths.csv, row 1: malformed row .*expected one image path"),
    ("train_labeled_studies.csv",
     "MURA-v1.1/train/XR_WRIST/patient00001/study1_positive/,1,extra",
     r"train_labeled_studies.csv, row 1: malformed row"),
    # A label that is not 0 or 1.
    ("train_labeled_studies.csv", "MURA-v1.1/train/XR_WRIST/patient00001/study1_positive/,yes",
     r"row 1: malformed label 'yes'"),
])
def test_malformed_csv_rows_name_file_and_row(root, csv_name, row, message):
    _replace_row(root / csv_name, 1, row)
    with pytest.raises(UserError, match=message):
        mura.read_split(root, "train")


def test_label_contradicting_the_folder_name(root):
    _replace_row(root / "train_labeled_studies.csv", 1,
                 "MURA-v1.1/train/XR_WRIST/patient00001/study1_positive/,0")
    with pytest.raises(UserError, match=r"row 1: label 0 disagrees with the folder name "
                                        r"'study1_positive'"):
        mura.read_split(root, "train")


def test_csv_that_is_not_text(root):
    (root / "train_image_paths.csv").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00binary")
    with pytest.raises(UserError, match=r"train_image_paths.csv: not a text CSV file"):
        mura.read_split(root, "train")


def test_listed_image_missing_errors_or_is_counted(root, caplog):
    missing = _first_image(root)
    missing.unlink()
    with pytest.raises(UserError, match=r"row 1: image .* is listed but missing: .*image1.png.*"
                                        r"--config.data.on_missing=skip"):
        mura.read_split(root, "train")
    with caplog.at_level(logging.WARNING):
        index = mura.read_split(root, "train", on_missing="skip")
    assert index.skipped == {"missing image": 1}
    assert len(index.images) == 7 and "1 missing image(s)" in caplog.text


def test_duplicate_rows_are_skipped_and_counted(root):
    first = (root / "train_image_paths.csv").read_text().splitlines()[0]
    _append_row(root / "train_image_paths.csv", first)
    index = mura.read_split(root, "train")
    assert index.skipped == {"duplicate image row": 1} and len(index.images) == 8


ESCAPES = [
    "../../etc/passwd",
    "/etc/passwd",
    "MURA-v1.1/train/../../../../etc/passwd",
    "MURA-v1.1/train/XR_WRIST/patient00001/../../../../../etc/passwd",
    "MURA-v1.1/train/XR_WRIST/patient00001/study1_positive/../../../../../../etc/passwd",
    r"MURA-v1.1\train\XR_WRIST\..\..\..\..\etc\passwd",
    "MURA-v1.1/train/XR_WRIST/patient00001/study1_positive/%2e%2e/%2e%2e/etc/passwd",
]


@pytest.mark.parametrize("path", ESCAPES)
def test_image_paths_escaping_the_dataset_root_are_refused(root, path):
    _append_row(root / "train_image_paths.csv", path)
    with pytest.raises(UserError, match=r"train_image_paths.csv, row 9: malformed image path"):
        mura.read_split(root, "train")


@pytest.mark.parametrize("path", ["../../etc/", "MURA-v1.1/train/XR_WRIST/../../../etc/x/"])
def test_study_paths_escaping_the_dataset_root_are_refused(root, path):
    _append_row(root / "train_labeled_studies.csv", f"{path},1")
    with pytest.raises(UserError, match=r"train_labeled_studies.csv, row 5: malformed study path"):
        mura.read_split(root, "train")


def test_every_indexed_path_lies_inside_the_dataset_root(root):
    resolved_root = root.resolve()
    for split in ("train", "valid"):
        for record in mura.read_split(root, split).images:
            assert Path(record.path).resolve().is_relative_to(resolved_root / split)


# ---- config and command line -------------------------------------------------------------------


def _launch(*flags):
    return subprocess.run([sys.executable, "launch.py", *flags, "--workdir=/nonexistent/run"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("flags,names", [
    (["--config.nonexistent=1"], ["--config.nonexistent"]),
    (["--config", "smoke", "--config.data.rootx=/data"],
     ["--config.data.rootx", "did you mean 'root'"]),
    (["--config=default", "--config.batch_sise=8"],
     ["--config.batch_sise", "did you mean 'batch_size'"]),
])
def test_unknown_config_key_is_refused_without_a_traceback(flags, names):
    result = _launch(*flags)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "no such config field" in result.stderr
    for name in names:
        assert name in result.stderr


@pytest.mark.parametrize("flag", ["--config.batch_size=abc", "--config.data.image_size=1.5",
                                  "--config.data.hflip=maybe"])
def test_wrong_type_in_a_config_override_is_refused_without_a_traceback(flag):
    result = _launch(flag)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert f"flag {flag}:" in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 3, result.stderr


def test_batch_size_not_divisible_by_the_device_count(root, tmp_path):
    with pytest.raises(UserError, match=r"config.batch_size=6 must be a positive multiple of the "
                                        r"number of devices \(4"):
        train.train_and_evaluate(helpers.run_config(root, batch_size=6), tmp_path / "run")


def test_init_from_that_does_not_exist(root, tmp_path):
    missing = tmp_path / "densenet169_notop.h5"
    with pytest.raises(UserError, match=f"Keras weight file {missing} does not exist"):
        train.train_and_evaluate(helpers.run_config(root, init_from=str(missing)),
                                 tmp_path / "run")


def test_init_from_of_another_architecture(root, tmp_path):
    """A DenseNet-169 stem (64 filters) offered to densenet_tiny (16 filters)."""
    weights = tmp_path / "densenet169_stem.h5"
    with h5py.File(weights, "w") as f:
        f.attrs["layer_names"] = [b"conv1_conv"]
        group = f.create_group("conv1_conv")
        group.attrs["weight_names"] = [b"conv1_conv/kernel:0"]
        group.create_dataset("conv1_conv/kernel:0", data=np.zeros((7, 7, 3, 64), np.float32))
    with pytest.raises(UserError, match=r"does not fit this model: layer 'conv1_conv' weight "
                                        r"'kernel' has shape \(7, 7, 3, 64\), expected "
                                        r"\(7, 7, 3, 16\)"):
        train.train_and_evaluate(helpers.run_config(root, init_from=str(weights)),
                                 tmp_path / "run")


def test_workdir_of_another_model_is_refused_by_its_config(root, tmp_path):
    other = helpers.run_config(root)
    other.model.name = "densenet121"
    checkpoints.save_run_config(tmp_path, other)
    with pytest.raises(UserError, match=r"holds checkpoints of a run with "
                                        r"model.name='densenet121'.*use another --workdir"):
        train.train_and_evaluate(helpers.run_config(root), tmp_path)


def test_workdir_of_another_model_without_its_config_is_refused_and_left_alone(root, tmp_path):
    """No config.json (deleted or copied without it): the checkpoints do not restore into this
    model; nothing is trained over them, moved or deleted."""
    checkpointer = checkpoints.Checkpointer(tmp_path, keep_best=1)
    other_state = {"params": {"dense": {"kernel": np.ones((3, 5), np.float32)}}}
    checkpointer.save(7, other_state, {}, {"epoch": 0})
    checkpointer.wait()
    checkpointer.close()
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(UserError, match=r"no checkpoint in .*checkpoints could be read.*another "
                                        r"model, use another --workdir"):
        train.train_and_evaluate(helpers.run_config(root), tmp_path)
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert [p for p in before if p not in after] == []
    assert checkpoints.Checkpointer(tmp_path, read_only=True).all_steps() == [7]


def test_nothing_reads_pickles():
    """Checkpoints are orbax (StandardSave/Restore) and JSON; nothing unpickles."""
    forbidden = ("import pickle", "pickle.load", "cloudpickle", "dill", "allow_pickle=True",
                 "torch.load", "joblib.load")
    for path in list((REPO / "murajax").rglob("*.py")) + [REPO / "launch.py"]:
        text = path.read_text()
        for word in forbidden:
            assert word not in text, f"{path}: {word}"


def test_unknown_remat_policy_names_the_field():
    from murajax import train_state

    config = helpers.tiny_config(**{"model.remat": "sometimes"})
    with pytest.raises(UserError, match=r"config.model.remat must be one of .*'sometimes'"):
        train_state.model_from_config(config)


def test_unknown_conv_impl_names_the_field():
    from murajax import train_state

    config = helpers.tiny_config(**{"model.conv_impl": "cudnn"})
    with pytest.raises(UserError, match=r"config.model.conv_impl must be one of .*'cudnn'"):
        train_state.model_from_config(config)
