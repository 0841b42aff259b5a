"""Finding images on disk (murajax/data/files.py): what counts as an image, natural order,
study ids and study types from folders, unique output names, errors for missing inputs."""

import pathlib

import pytest

from murajax.data import files
from murajax.errors import UserError


def _touch(path: pathlib.Path, data=b"png"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_natural_key_orders_numbers_by_value_and_ignores_case():
    names = ["image10.png", "Image2.png", "image1.png"]
    assert sorted(names, key=files.natural_key) == ["image1.png", "Image2.png", "image10.png"]


def test_test_style_tree_gives_one_study_per_folder_in_natural_order(tmp_path):
    base = tmp_path / "test"
    for rel, names in {
        "XR_WRIST/patient20001/study1": ["image1.png", "image2.png", "image10.png"],
        "XR_HAND/patient20002/study1": ["image1.png"],
        "XR_HAND/patient20002/study2_positive": ["image1.png"],
    }.items():
        for name in names:
            _touch(base / rel / name)
    _touch(base / "XR_WRIST/patient20001/study1/.hidden.png", b"x")
    _touch(base / "XR_WRIST/patient20001/study1/notes.txt", b"x")
    _touch(base / ".cache/image1.png", b"x")
    images = files.find_images(base)
    assert list(dict.fromkeys(i.study for i in images)) == [
        "XR_HAND/patient20002/study1", "XR_HAND/patient20002/study2_positive",
        "XR_WRIST/patient20001/study1"]
    wrist = [i for i in images if i.study == "XR_WRIST/patient20001/study1"]
    assert [pathlib.Path(i.path).name for i in wrist] == ["image1.png", "image2.png",
                                                          "image10.png"]
    assert {i.study_type for i in wrist} == {"XR_WRIST"}
    assert len({i.name for i in images}) == len(images) == 5


def test_a_single_study_folder_is_named_after_itself_and_typed_by_its_parents(tmp_path):
    study = tmp_path / "XR_WRIST/patient20001/study1"
    for name in ("image1.png", "image2.png", "image3.png"):
        _touch(study / name)
    images = files.find_images(study)
    assert {i.study for i in images} == {"study1"} and len(images) == 3
    assert {i.study_type for i in images} == {"XR_WRIST"}


def test_plain_folders_are_studies_without_a_type(tmp_path):
    _touch(tmp_path / "a/x.PNG", b"x")
    _touch(tmp_path / "b/y.jpg", b"x")
    images = files.find_images(tmp_path)
    assert [i.study for i in images] == ["a", "b"]
    assert all(i.study_type == "" for i in images)


def test_empty_folder_missing_input_and_no_input_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images found"):
        files.find_images(tmp_path / "empty")
    with pytest.raises(UserError, match="no such file or folder"):
        files.find_images(tmp_path / "missing")
    with pytest.raises(UserError, match="no input given"):
        files.find_images([])
