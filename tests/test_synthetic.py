"""Synthetic MURA: exact MURA-v1.1 layout, read back by the reader, deterministic bytes."""

import hashlib
import json
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


# ------------------------------------------------------------------------------------------
# Noisy and missing labels.

NOISY_STUDIES = 40
NOISE = 0.25
UNLABELED = 0.2


@pytest.fixture(scope="module")
def clean40(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("clean40"), num_studies=NOISY_STUDIES,
                              seed=SEED, num_workers=1)


@pytest.fixture(scope="module")
def symmetric40(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("sym40"), num_studies=NOISY_STUDIES,
                              seed=SEED, num_workers=1, label_noise=NOISE)


@pytest.fixture(scope="module")
def asymmetric40(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("asym40"), num_studies=NOISY_STUDIES,
                              seed=SEED, num_workers=1, label_noise=NOISE,
                              noise_mode="asymmetric", unlabeled_fraction=UNLABELED)


def _csv_rows(path: pathlib.Path, header: str) -> list[list[str]]:
    lines = path.read_text().splitlines()
    assert lines[0] == header
    return [line.split(",") for line in lines[1:]]


def _study_id(csv_path: str) -> str:
    """'MURA-v1.1/train/.../study1_negative/' -> the reader's id 'train/.../study1_negative'."""
    assert csv_path.startswith("MURA-v1.1/") and csv_path.endswith("/")
    return csv_path[len("MURA-v1.1/"):-1]


def _plan_key(study_id: str) -> tuple[str, str, int, int]:
    """(split, type, patient, study number): a study whatever its folder suffix says."""
    split, study_type, patient, folder = study_id.split("/")
    return split, study_type, int(patient[len("patient"):]), int(folder[5:folder.index("_")])


def _true_labels() -> dict:
    """What the generator draws: the true label of every study, from its plan."""
    return {(s.split, s.study_type, s.patient, s.number): s.label
            for s in synthetic._plan(NOISY_STUDIES, SEED, 0.2)}


def _train_labels(mura_root) -> dict[str, int]:
    index = mura.read_split(mura_root, "train")
    assert index.skipped == {}
    return dict(zip(index.studies, index.study_labels().tolist()))


def _suffixless_digests(root: pathlib.Path) -> dict[str, str]:
    """Image digests keyed by path with the study folder's label suffix removed."""
    return {re.sub(r"_(positive|negative)/", "/", k): v for k, v in _digests(root).items()
            if k.endswith(".png")}


def test_symmetric_noise_flips_round_p_of_train_studies_both_ways(clean40, symmetric40):
    n_train = len(mura.read_split(clean40, "train").studies)
    rows = _csv_rows(symmetric40 / synthetic.FLIPPED_CSV, "study,true_label,given_label")
    assert len(rows) == round(NOISE * n_train) > 0
    assert all(r[0].startswith("MURA-v1.1/train/") for r in rows)  # only train flips
    assert all(r[1] != r[2] and {r[1], r[2]} == {"0", "1"} for r in rows)
    assert {(r[1], r[2]) for r in rows} == {("0", "1"), ("1", "0")}  # symmetric: both ways
    assert not (symmetric40 / synthetic.UNLABELED_CSV).exists()


def test_flipped_rows_are_what_the_reader_reads_and_what_the_images_show(symmetric40):
    truth = _true_labels()
    read = _train_labels(symmetric40)  # reads the noisy set without error
    rows = _csv_rows(symmetric40 / synthetic.FLIPPED_CSV, "study,true_label,given_label")
    flipped = {_study_id(r[0]): (int(r[1]), int(r[2])) for r in rows}
    for study, label in read.items():
        true_label = truth[_plan_key(study)]
        if study in flipped:
            assert flipped[study] == (true_label, label)  # given = what murajax reads
            assert study.endswith("_positive" if label else "_negative")
        else:
            assert label == true_label
    assert set(flipped) <= set(read)


def test_noise_changes_no_image_and_no_valid_file(clean40, symmetric40, asymmetric40):
    clean = _digests(clean40)
    for noisy in (symmetric40, asymmetric40):
        digests = _digests(noisy)
        valid = {k: v for k, v in clean.items() if k.startswith("valid")}
        assert valid and valid == {k: v for k, v in digests.items() if k.startswith("valid")}
        # The images keep showing the true label: same bytes, only folder suffixes moved.
        assert _suffixless_digests(noisy) == _suffixless_digests(clean40)
        assert _digests(noisy) != clean
        mura.read_split(noisy, "valid")


def test_asymmetric_noise_only_abnormal_to_normal_and_unlabeled_list(clean40, asymmetric40):
    n_train = len(mura.read_split(clean40, "train").studies)
    unlabeled = _csv_rows(asymmetric40 / synthetic.UNLABELED_CSV, "study,true_label")
    assert len(unlabeled) == round(UNLABELED * n_train) > 0
    rows = _csv_rows(asymmetric40 / synthetic.FLIPPED_CSV, "study,true_label,given_label")
    assert len(rows) == round(NOISE * (n_train - len(unlabeled))) > 0
    assert all(r[1:] == ["1", "0"] for r in rows)
    assert all(r[0].startswith("MURA-v1.1/train/") for r in rows + unlabeled)
    assert not {r[0] for r in rows} & {r[0] for r in unlabeled}  # an unlabeled study never flips
    # Unlabeled studies have an empty label in the MURA files (read as -1); the list keeps
    # their true label.
    truth, read = _true_labels(), _train_labels(asymmetric40)
    for path, true_label in unlabeled:
        study = _study_id(path)
        assert read[study] == -1 and int(true_label) == truth[_plan_key(study)]


def test_corrupt_labels_counts_streams_and_modes():
    plan = synthetic._plan(200, 5, 0.2)
    train = [s for s in plan if s.split == "train"]
    fields = [s[:6] for s in plan]

    def chosen(p, mode="symmetric", q=0.0):
        out = synthetic._corrupt_labels(plan, 5, p, mode, q)
        assert [s[:6] for s in out] == fields  # nothing the images depend on changes
        assert all(s.given is None and not s.unlabeled for s in out if s.split == "valid")
        flips = [i for i, s in enumerate(out) if s.given_label != s.label]
        return out, flips, [i for i, s in enumerate(out) if s.unlabeled]

    assert chosen(0.0, "asymmetric")[0] == plan
    for p in (0.05, 0.1, 0.3, 0.39):  # 0.39 * 160 = 62 of the 64 abnormal train studies
        out, flips, unlabeled = chosen(p, q=0.25)
        assert len(unlabeled) == round(0.25 * len(train))
        assert len(flips) == round(p * (len(train) - len(unlabeled)))
        assert unlabeled == chosen(0.1, q=0.25)[2]  # unlabeled studies do not depend on P
        assert not set(flips) & set(unlabeled)
        out, flips, _ = chosen(p, "asymmetric")
        assert len(flips) == round(p * len(train))
        assert all(out[i].label == 1 and out[i].given_label == 0 for i in flips)


def test_default_arguments_change_nothing(generated, tmp_path):
    explicit = synthetic.generate(tmp_path / "e", num_studies=NUM_STUDIES, seed=SEED,
                                  label_noise=0.0, noise_mode="symmetric",
                                  unlabeled_fraction=0.0)
    assert _digests(explicit) == _digests(generated)  # file list and every byte
    for name in ("train_labeled_studies.csv", "train_image_paths.csv", ".synthetic.json"):
        assert (explicit / name).read_bytes() == (generated / name).read_bytes()
    # Today's default layout: the four MURA CSVs and the marker beside the split folders, the
    # marker with today's four keys (so sets written before the noise options are reused).
    assert {p.name for p in generated.iterdir()} == {
        ".synthetic.json", "train", "valid", "train_image_paths.csv",
        "train_labeled_studies.csv", "valid_image_paths.csv", "valid_labeled_studies.csv"}
    assert (generated / ".synthetic.json").read_text() == json.dumps(
        {"num_studies": NUM_STUDIES, "seed": SEED, "valid_fraction": 0.2, "version": 1}) + "\n"
    # noise_mode does nothing without noise.
    quiet = synthetic.generate(tmp_path / "q", num_studies=NUM_STUDIES, seed=SEED,
                               noise_mode="asymmetric")
    assert _digests(quiet) == _digests(generated)
    assert synthetic.generate(generated.parent, num_studies=NUM_STUDIES, seed=SEED,
                              label_noise=0.0) == generated  # the old set is reused


def test_marker_holds_the_noise_options(symmetric40):
    marker = json.loads((symmetric40 / ".synthetic.json").read_text())
    assert marker["label_noise"] == NOISE and marker["noise_mode"] == "symmetric"
    out = symmetric40.parent
    assert synthetic.generate(out, num_studies=NOISY_STUDIES, seed=SEED,
                              label_noise=NOISE) == symmetric40
    for other in ({"label_noise": 0.1}, {"label_noise": NOISE, "noise_mode": "asymmetric"},
                  {"label_noise": NOISE, "unlabeled_fraction": 0.1}, {}):
        with pytest.raises(UserError, match="already exists"):
            synthetic.generate(out, num_studies=NOISY_STUDIES, seed=SEED, **other)


@pytest.mark.parametrize("kwargs, name", [
    ({"label_noise": -0.1}, "label_noise"),
    ({"label_noise": 1.0}, "label_noise"),
    ({"label_noise": float("nan")}, "label_noise"),
    ({"label_noise": "0.1"}, "label_noise"),
    ({"label_noise": True}, "label_noise"),
    ({"noise_mode": "uniform"}, "noise_mode"),
    ({"noise_mode": None}, "noise_mode"),
    ({"unlabeled_fraction": 1.0}, "unlabeled_fraction"),
    ({"unlabeled_fraction": -0.01}, "unlabeled_fraction"),
    ({"label_noise": 0.6, "noise_mode": "asymmetric"}, "label_noise"),  # > abnormal studies
])
def test_bad_noise_arguments_are_refused(tmp_path, kwargs, name):
    with pytest.raises(UserError, match=name):
        synthetic.generate(tmp_path / "out", num_studies=NUM_STUDIES, seed=SEED, **kwargs)
    assert not (tmp_path / "out").exists()


def test_cli_noise_flags(tmp_path, capsys):
    argv = ["--out", str(tmp_path), "--num_studies", "12", "--seed", "1", "--label_noise",
            "0.3", "--noise-mode", "asymmetric", "--unlabeled_fraction", "0.2"]
    assert synthetic.main(argv) == 0
    mura_root = pathlib.Path(capsys.readouterr().out.strip())
    marker = json.loads((mura_root / ".synthetic.json").read_text())
    assert marker == {"version": 1, "num_studies": 12, "seed": 1, "valid_fraction": 0.2,
                      "label_noise": 0.3, "noise_mode": "asymmetric",
                      "unlabeled_fraction": 0.2}
    assert (mura_root / synthetic.FLIPPED_CSV).is_file()
    assert (mura_root / synthetic.UNLABELED_CSV).is_file()
    assert synthetic.main(["--out", str(tmp_path / "b"), "--studies", "4",
                           "--label_noise", "1.5"]) == 2
    assert "label_noise" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        synthetic.main(["--out", str(tmp_path / "c"), "--noise_mode", "sideways"])
    assert e.value.code == 2
    assert "noise_mode" in capsys.readouterr().err
