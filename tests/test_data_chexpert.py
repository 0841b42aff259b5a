"""CheXpert folders (murajax/data/chexpert.py) and their image cache: the CSVs read into records
with the four label values kept apart (1, 0, -1 uncertain, blank), shape errors that name the
file, line and column, and a cache built from a CheXpert folder whose records hold the resized
pixels and the labels, which a MURA run refuses by name."""

import json

import numpy as np
import pytest
from PIL import Image

from murajax.data import cache, chexpert, images
from murajax.errors import UserError
from tests import helpers

SIZE = 24
HEADER = ",".join(chexpert.METADATA + chexpert.OBSERVATIONS)
BLANKS = [""] * (len(chexpert.OBSERVATIONS) - 3)


def _row(path, sex="Female", age="68", view="Frontal", projection="AP",
         labels=("1.0", "", "-1.0")):
    return ",".join([path, sex, age, view, projection, *labels, *BLANKS])


def _write_folder(parent, name="CheXpert-v1.0-small", views=None):
    """A small CheXpert folder: JPEGs of several sizes, grey and RGB, and its two CSVs."""
    root = parent / name
    views = views or {
        "train": [("patient00001/study1/view1_frontal.jpg", ("1.0", "", "-1.0")),
                  ("patient00001/study1/view2_lateral.jpg", ("0.0", "1.0", "")),
                  ("patient00002/study1/view1_frontal.jpg", ("", "-1.0", "0.0")),
                  ("patient00003/study2/view1_frontal.jpg", ("1.0", "1.0", "1.0"))],
        "valid": [("patient64541/study1/view1_frontal.jpg", ("0.0", "0.0", "1.0"))],
    }
    rng = np.random.default_rng(0)
    for split, rows in views.items():
        lines = [HEADER]
        for n, (relative, labels) in enumerate(rows):
            path = root / split / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            shape = (30 + 7 * n, 41 - 3 * n) + ((3,) if n == 1 else ())
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path, quality=90)
            view = "Lateral" if "lateral" in relative else "Frontal"
            lines.append(_row(f"{name}/{split}/{relative}", view=view,
                              projection="" if view == "Lateral" else "PA", labels=labels))
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return root


def test_split_rows_become_records_with_the_four_label_values_kept_apart(tmp_path):
    root = _write_folder(tmp_path)
    assert chexpert.is_folder(root) and not chexpert.is_folder(tmp_path)
    train, skipped = chexpert.read_split(root, "train")
    assert skipped == 0 and len(train) == 4
    first, lateral = train[0], train[1]
    assert first.key == "train/patient00001/study1/view1_frontal.jpg"
    assert first.csv_path == "CheXpert-v1.0-small/" + first.key
    assert first.path == str(root / first.key)
    assert first.study == "train/patient00001/study1" == lateral.study
    assert len(first.labels) == len(chexpert.OBSERVATIONS) == 14
    assert first.labels[:3] == (1.0, None, -1.0) and set(first.labels[3:]) == {None}
    assert (first.sex, first.age, first.view, first.projection) == ("Female", 68, "Frontal", "PA")
    assert (lateral.view, lateral.projection) == ("Lateral", "")
    valid, _ = chexpert.read_split(root, "valid")
    assert [r.key for r in valid] == ["valid/patient64541/study1/view1_frontal.jpg"]


def test_a_renamed_folder_still_resolves_the_csv_paths(tmp_path):
    root = _write_folder(tmp_path)
    renamed = root.rename(tmp_path / "chexpert")
    train, _ = chexpert.read_split(renamed, "train")
    assert all(r.path.startswith(str(renamed)) for r in train)


@pytest.mark.parametrize("edit,message", [
    (lambda text: text.replace("Cardiomegaly,", ""), "lacks the column.*Cardiomegaly"),
    (lambda text: text.replace(",68,", ",68,extra,", 1), r"line 2: 20 fields, the header has 19"),
    (lambda text: text.replace("1.0,,-1.0", "yes,,-1.0", 1),
     r"line 2: column 'No Finding' is 'yes'"),
    (lambda text: text.replace(",68,", ",old,", 1), r"line 2: column 'Age' is 'old'"),
    (lambda text: text.replace("small/train/patient00001/study1/", "small/train/", 1),
     r"line 2: path .* is not of the form CheXpert-v1.0/train/<patient>/<study>/<image>"),
])
def test_a_csv_of_another_shape_names_the_file_line_and_column(tmp_path, edit, message):
    root = _write_folder(tmp_path)
    csv_file = root / "train.csv"
    csv_file.write_text(edit(csv_file.read_text()))
    with pytest.raises(UserError, match=message) as error:
        chexpert.read_split(root, "train")
    assert str(csv_file) in str(error.value)


def test_a_missing_image_fails_or_is_skipped_and_counted(tmp_path):
    root = _write_folder(tmp_path)
    missing = root / "train/patient00002/study1/view1_frontal.jpg"
    missing.unlink()
    with pytest.raises(UserError, match=rf"train.csv, line 4: image {missing} missing"):
        chexpert.read_split(root, "train")
    kept, skipped = chexpert.read_split(root, "train", on_missing="skip")
    assert skipped == 1 and str(missing) not in [r.path for r in kept]


def test_a_cache_of_a_chexpert_folder_holds_the_pixels_and_labels(tmp_path):
    root = _write_folder(tmp_path / "data")
    out = tmp_path / "cache"
    # --root may also name the folder that holds CheXpert-v1.0-small, as with MURA-v1.1.
    manifest = cache.build(root.parent, out, image_size=SIZE, records_per_shard=2)
    assert manifest["dataset"] == "chexpert" and manifest["root_name"] == root.name
    assert manifest["splits"] == {"train": 4, "valid": 1} and len(manifest["shards"]) == 3
    assert sorted(p.name for p in (out / cache.CSV_DIR).iterdir()) == ["train.csv", "valid.csv"]
    assert (out / "csv" / "train.csv").read_bytes() == (root / "train.csv").read_bytes()
    rows = {r.key: r for split in chexpert.SPLITS for r in chexpert.read_split(root, split)[0]}
    assert manifest["keys"] == list(rows)
    keys = manifest["keys"]
    pixels = cache.CachedPixels(out, [s["file"] for s in manifest["shards"]],
                                np.arange(len(keys)), keys, SIZE)
    for pos, key in enumerate(keys):
        header, stored = cache.decode_record(pixels._read(pos))
        expected = images.transform(images.decode(rows[key].path), SIZE, "stretch")
        np.testing.assert_array_equal(stored, np.asarray(expected))
        assert header["labels"] == list(rows[key].labels)
        assert (header["study"], header["view"], header["age"]) == (
            rows[key].study, rows[key].view, rows[key].age)
        assert header["width"] == images.decode(rows[key].path).width
    # A rerun finds everything written and changes no byte.
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert cache.build(root, out, image_size=SIZE, records_per_shard=2) == manifest
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert json.loads((out / cache.BUILD).read_text())["dataset"] == "chexpert"


def test_a_mura_run_refuses_a_chexpert_cache_by_name(tmp_path):
    root = _write_folder(tmp_path / "data")
    out = tmp_path / "cache"
    cache.build(root, out, image_size=SIZE)
    config = helpers.run_config(tmp_path / "no-mura", **{"data.cache": str(out),
                                                         "data.image_size": SIZE})
    config.data.root = ""
    with pytest.raises(UserError, match=r"is an image cache of CheXpert .*reads MURA .*murajax "
                       r"has no CheXpert task yet"):
        cache.csv_copies(config.data)
    with pytest.raises(UserError, match="image cache of CheXpert"):
        cache.split_for_prediction(out, "valid", image_size=SIZE, resize="stretch")
