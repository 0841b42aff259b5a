"""Synthetic MURA: exact MURA-v1.1 layout, read back by the reader, deterministic bytes."""

import hashlib
import pathlib
import re

import numpy as np
import pytest
from PIL import Image

from murajax import synthetic
from murajax.data import mura
from murajax.data.mura import STUDY_TYPES
from murajax.errors import UserError

NUM_STUDIES = 16
SEED = 3


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("a"), num_studies=NUM_STUDIES, seed=SEED)


def _digests(root: pathlib.Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_layout_and_csv_rows(generated):
    assert generated.name == "MURA-v1.1"
    for split in ("train", "valid"):
        images_csv = generated / f"{split}_image_paths.csv"
        studies_csv = generated / f"{split}_labeled_studies.csv"
        image_rows = images_csv.read_text().splitlines()
        study_rows = studies_csv.read_text().splitlines()
        assert image_rows and study_rows
        for row in image_rows:
            assert re.fullmatch(rf"MURA-v1\.1/{split}/XR_[A-Z]+/patient\d{{5}}/"
                                r"study\d+_(positive|negative)/image\d+\.png", row), row
            assert (generated.parent / row).is_file()
        for row in study_rows:
            m = re.fullmatch(rf"MURA-v1\.1/{split}/(XR_[A-Z]+)/patient\d{{5}}/"
                             r"study\d+_(positive|negative)/,([01])", row)
            assert m, row
            assert m.group(1) in STUDY_TYPES
            assert (m.group(2) == "positive") == (m.group(3) == "1")
            assert (generated.parent / row.split(",")[0]).is_dir()


def test_reader_reads_what_the_generator_writes(generated):
    train = mura.read_split(generated, "train")
    valid = mura.read_split(generated, "valid")
    assert len(train.studies) + len(valid.studies) == NUM_STUDIES
    assert len(valid.studies) >= 2
    assert {r.study_type for r in train.images} == set(range(7))  # all seven types
    for index in (train, valid):
        labels = index.study_labels()
        assert set(labels.tolist()) == {0, 1}  # both classes in each split
        for study in index.studies:
            assert 1 <= len(index.views(study)) <= 4
    assert not {r.patient for r in train.images} & {r.patient for r in valid.images}
    assert train.skipped == {} and valid.skipped == {}


def test_images_are_mura_like(generated):
    index = mura.read_split(generated, "train")
    modes, sizes = set(), []
    for record in index.images:
        with Image.open(record.path) as image:
            modes.add(image.mode)
            sizes.append(image.size)
    assert modes == {"L", "RGB"}
    assert max(max(s) for s in sizes) <= 512
    assert min(max(s) for s in sizes) >= 256
    assert len(set(sizes)) > len(sizes) // 2  # varied sizes
    grey = sum(Image.open(r.path).mode == "L" for r in index.images)
    assert grey > len(index.images) // 2  # mostly grayscale


def test_narrow_images_exist():
    rng = np.random.default_rng(0)
    widths = [min(synthetic._render_view(rng, "XR_FINGER", None, False).size) for _ in range(12)]
    assert min(widths) < 160


def test_same_seed_same_bytes_other_seed_other_bytes(generated, tmp_path):
    again = synthetic.generate(tmp_path / "b", num_studies=NUM_STUDIES, seed=SEED)
    assert _digests(again) == _digests(generated)
    other = synthetic.generate(tmp_path / "c", num_studies=NUM_STUDIES, seed=SEED + 1)
    assert _digests(other) != _digests(generated)


def test_abnormal_views_hold_bright_metal_normal_views_do_not():
    """The signal: abnormal hardware is brighter than anything in a normal view."""
    rng = np.random.default_rng(1)

    def brightest_area(lesion):
        a = np.asarray(synthetic._render_view(rng, "XR_FOREARM", lesion, False), np.float32)
        return (a >= 240).mean()

    normal = [brightest_area(None) for _ in range(6)]
    plates = [brightest_area("plate") for _ in range(6)]
    assert max(normal) < 0.001
    assert min(plates) > 0.01


def test_existing_output_is_reused_or_refused(generated):
    before = _digests(generated)
    assert synthetic.generate(generated.parent, num_studies=NUM_STUDIES, seed=SEED) == generated
    assert _digests(generated) == before
    with pytest.raises(UserError, match="already exists"):
        synthetic.generate(generated.parent, num_studies=NUM_STUDIES + 1, seed=SEED)


def test_cli(tmp_path, capsys):
    assert synthetic.main(["--out", str(tmp_path), "--studies", "4", "--seed", "1"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == str(tmp_path / "MURA-v1.1")
    assert (tmp_path / "MURA-v1.1" / "valid_labeled_studies.csv").is_file()
    assert synthetic.main(["--out", str(tmp_path), "--studies", "1"]) == 2
