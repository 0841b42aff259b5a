"""The MURA reader: CSV index, errors naming file and row, subsets, class weights, study types
from paths."""

import logging
import pathlib

import ml_collections
import numpy as np
import pytest

from murajax.data import mura
from murajax.data.mura import STUDY_TYPES, ImageRecord
from murajax.errors import UserError

# (study folder relative to MURA-v1.1, label, number of views)
_TRAIN = [
    ("train/XR_WRIST/patient00001/study1_positive", 1, 2),
    ("train/XR_WRIST/patient00001/study2_negative", 0, 1),
    ("train/XR_ELBOW/patient00002/study1_negative", 0, 3),
    ("train/XR_HAND/patient00003/study1_positive", 1, 1),
    ("train/XR_FINGER/patient00004/study1_negative", 0, 2),
]
_VALID = [
    ("valid/XR_WRIST/patient11185/study1_positive", 1, 2),
    ("valid/XR_SHOULDER/patient11186/study1_negative", 0, 1),
]


def write_mura(base: pathlib.Path, train=_TRAIN, valid=_VALID) -> pathlib.Path:
    """A minimal MURA-v1.1 tree; images are placeholders (the reader never decodes)."""
    root = base / "MURA-v1.1"
    for split, studies in (("train", train), ("valid", valid)):
        image_rows, study_rows = [], []
        for folder, label, views in studies:
            (root / folder).mkdir(parents=True, exist_ok=True)
            for v in range(1, views + 1):
                (root / folder / f"image{v}.png").write_bytes(b"png")
                image_rows.append(f"MURA-v1.1/{folder}/image{v}.png")
            study_rows.append(f"MURA-v1.1/{folder}/,{label}")
        (root / f"{split}_image_paths.csv").write_text("\n".join(image_rows) + "\n")
        (root / f"{split}_labeled_studies.csv").write_text("\n".join(study_rows) + "\n")
    (root / "train" / ".DS_Store").write_bytes(b"junk")  # stray files are ignored
    return root


@pytest.fixture
def root(tmp_path):
    return write_mura(tmp_path)


def _replace_line(path: pathlib.Path, row: int, text: str):
    lines = path.read_text().splitlines()
    lines[row - 1] = text
    path.write_text("\n".join(lines) + "\n")


def test_read_split_builds_images_and_studies(root):
    index = mura.read_split(root, "train")
    assert len(index.images) == 9
    assert index.studies == [s for s, _, _ in _TRAIN]
    first = index.images[0]
    assert first == ImageRecord(
        path=str(root / "train/XR_WRIST/patient00001/study1_positive/image1.png"),
        study="train/XR_WRIST/patient00001/study1_positive",
        study_type=STUDY_TYPES.index("XR_WRIST"),
        patient="patient00001",
        label=1,
    )
    assert pathlib.Path(first.path).is_absolute()
    assert index.views("train/XR_ELBOW/patient00002/study1_negative") == [3, 4, 5]
    np.testing.assert_array_equal(index.study_labels(), [1, 0, 0, 1, 0])
    np.testing.assert_array_equal(index.study_of_image(), [0, 0, 1, 2, 2, 2, 3, 4, 4])
    assert index.skipped == {}
    valid = mura.read_split(root, "valid")
    assert valid.studies[0] == "valid/XR_WRIST/patient11185/study1_positive"
    assert [r.label for r in valid.images] == [1, 1, 0]


def test_root_may_be_the_folder_holding_mura(root):
    assert len(mura.read_split(root.parent, "train").images) == 9


def test_missing_root(tmp_path):
    with pytest.raises(UserError, match=r"nowhere.*folder missing.*config.data.root"):
        mura.read_split(tmp_path / "nowhere", "train")


@pytest.mark.parametrize("name", ["train_image_paths.csv", "train_labeled_studies.csv"])
def test_missing_csv(root, name):
    (root / name).unlink()
    with pytest.raises(UserError, match=rf"{name}: CSV file missing.*config.data.root"):
        mura.read_split(root, "train")


def test_missing_split_folder(root):
    (root / "valid").rename(root / "valid_moved")
    with pytest.raises(UserError, match=r"valid: folder missing"):
        mura.read_split(root, "valid")


@pytest.mark.parametrize(
    "csv_name,row,text,message",
    [
        ("train_labeled_studies.csv", 2, "MURA-v1.1/train/XR_WRIST/patient00001/study2_negative/",
         "malformed row"),
        ("train_labeled_studies.csv", 3, "MURA-v1.1/train/XR_ELBOW/patient00002/study1_negative/,2",
         "malformed label '2'"),
        ("train_labeled_studies.csv", 1, "MURA-v1.1/train/XR_WRIST/study1_positive/,1",
         "malformed study path"),
        ("train_image_paths.csv", 4, "MURA-v1.1/train/XR_ELBOW/patient00002/study1_negative/"
         "image1.png,extra", "malformed row"),
        ("train_image_paths.csv", 2, "image2.png", "malformed image path"),
        ("train_image_paths.csv", 1, "MURA-v1.1/valid/XR_WRIST/patient00001/study1_positive/"
         "image1.png", "malformed image path"),
    ],
)
def test_malformed_rows_name_file_and_row(root, csv_name, row, text, message):
    _replace_line(root / csv_name, row, text)
    with pytest.raises(UserError) as e:
        mura.read_split(root, "train")
    assert f"{csv_name}, row {row}" in str(e.value)
    assert message in str(e.value)
    assert "Fix or remove the row" in str(e.value)


def test_unknown_study_type(root):
    folder = root / "train/XR_FOOT/patient00009/study1_positive"
    folder.mkdir(parents=True)
    (folder / "image1.png").write_bytes(b"png")
    with open(root / "train_labeled_studies.csv", "a") as f:
        f.write("MURA-v1.1/train/XR_FOOT/patient00009/study1_positive/,1\n")
    with pytest.raises(UserError, match=r"train_labeled_studies.csv, row 6: unknown study type "
                                        r"'XR_FOOT'.*XR_ELBOW"):
        mura.read_split(root, "train")


def test_image_of_unlisted_study(root):
    with open(root / "train_image_paths.csv", "a") as f:
        f.write("MURA-v1.1/train/XR_HAND/patient00042/study1_negative/image1.png\n")
    with pytest.raises(UserError, match=r"row 10: .* which train_labeled_studies.csv does not "
                                        r"list"):
        mura.read_split(root, "train")


def test_missing_image_skip_is_counted_and_logged(root, caplog):
    (root / "train/XR_ELBOW/patient00002/study1_negative/image2.png").unlink()
    # A study whose only image is missing disappears, also counted.
    (root / "train/XR_HAND/patient00003/study1_positive/image1.png").unlink()
    with caplog.at_level(logging.WARNING):
        index = mura.read_split(root, "train", on_missing="skip")
    assert index.skipped == {"missing image": 2, "study without images": 1}
    assert len(index.images) == 7
    assert "train/XR_HAND/patient00003/study1_positive" not in index.studies
    assert "image2.png" in caplog.text
    assert "2 missing image(s)" in caplog.text


def test_bad_on_missing_value(root):
    with pytest.raises(UserError, match="config.data.on_missing must be 'error' or 'skip', "
                                        "got 'ignore'"):
        mura.read_split(root, "train", on_missing="ignore")


def test_study_types_subset(root):
    index = mura.read_split(root, "train", study_types="XR_WRIST, hand")
    assert {r.study_type for r in index.images} == {
        STUDY_TYPES.index("XR_WRIST"), STUDY_TYPES.index("XR_HAND")}
    assert len(index.studies) == 3
    with pytest.raises(UserError, match=r"config.data.study_types: unknown study type 'XR_KNEE'"):
        mura.read_split(root, "train", study_types="XR_KNEE")


def test_fraction_selects_whole_studies_deterministically(root):
    a = mura.read_split(root, "train", fraction=0.4, seed=3)
    b = mura.read_split(root, "train", fraction=0.4, seed=3)
    assert a.images == b.images
    assert len(a.studies) == 2
    full = mura.read_split(root, "train")
    for study in a.studies:  # every view of a chosen study is kept
        assert len(a.views(study)) == len(full.views(study))
    # Order of the full index is kept.
    assert a.studies == [s for s in full.studies if s in a.studies]
    chosen = {tuple(mura.read_split(root, "train", fraction=0.4, seed=s).studies)
              for s in range(8)}
    assert len(chosen) > 1  # the seed matters
    with pytest.raises(UserError, match=r"config.data.fraction must be in \(0, 1\]"):
        mura.read_split(root, "train", fraction=0.0)


def test_index_from_config(root):
    config = ml_collections.ConfigDict(
        {"root": str(root), "study_types": "XR_ELBOW", "fraction": 1.0, "on_missing": "error"})
    index = mura.index_from_config(config, "train")
    assert index.studies == ["train/XR_ELBOW/patient00002/study1_negative"]
    config.root = ""
    with pytest.raises(UserError, match="config.data.root is empty"):
        mura.index_from_config(config, "train")


# Counts from MURA.md: train images abnormal / normal per study type.
_MURA_TRAIN_IMAGES = {
    "XR_ELBOW": (2006, 2925),
    "XR_FINGER": (1968, 3138),
    "XR_FOREARM": (661, 1164),
    "XR_HAND": (1484, 4059),
    "XR_HUMERUS": (599, 673),
    "XR_SHOULDER": (4168, 4211),
    "XR_WRIST": (3987, 5765),
}


def test_class_weights_match_paper_definition_on_mura_counts():
    records = []
    for name, (abnormal, normal) in _MURA_TRAIN_IMAGES.items():
        t = STUDY_TYPES.index(name)
        for label, n in ((1, abnormal), (0, normal)):
            records += [ImageRecord(f"/x/{name}/{label}/{i}.png", f"{name}/{label}/{i // 3}", t,
                                    "p", label) for i in range(n)]
    index = mura.index_from_records(records)
    assert len(index.images) == 36808  # MURA.md: 36,808 train images
    weights = mura.class_weights(index)
    assert weights.shape == (7, 2) and weights.dtype == np.float32
    for name, (a, n) in _MURA_TRAIN_IMAGES.items():
        t = STUDY_TYPES.index(name)
        assert weights[t, 1] == pytest.approx(n / (a + n), rel=1e-6)  # abnormal: N/(A+N)
        assert weights[t, 0] == pytest.approx(a / (a + n), rel=1e-6)  # normal: A/(A+N)
    wrist = STUDY_TYPES.index("XR_WRIST")
    assert weights[wrist, 1] == pytest.approx(5765 / 9752, rel=1e-6)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-6)


def test_class_weights_ignore_unlabeled_and_default_missing_types():
    records = [ImageRecord("/a.png", "s1", 0, "p", 1), ImageRecord("/b.png", "s2", 0, "p", 0),
               ImageRecord("/c.png", "s2", 0, "p", 0), ImageRecord("/d.png", "s3", 1, "p", -1)]
    weights = mura.class_weights(mura.index_from_records(records))
    np.testing.assert_allclose(weights[0], [1 / 3, 2 / 3])
    np.testing.assert_allclose(weights[1:], 0.5)


def test_study_type_from_path_is_the_last_xr_component_in_any_case():
    assert mura.study_type_from_path("valid/XR_WRIST/patient1/study1") == STUDY_TYPES.index(
        "XR_WRIST")
    assert mura.study_type_from_path(pathlib.Path("/a/xr_hand/XR_ELBOW/p/s/image1.png")) == (
        STUDY_TYPES.index("XR_ELBOW"))
    assert mura.study_type_from_path(r"test\XR_Finger\patient2") == STUDY_TYPES.index("XR_FINGER")
    assert mura.study_type_from_path("XR_SHOULDER") == STUDY_TYPES.index("XR_SHOULDER")
    assert mura.study_type_from_path("valid/XR_KNEE/p/study1") == -1
    assert mura.study_type_from_path("s1") == -1
