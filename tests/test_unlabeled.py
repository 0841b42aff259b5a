"""Partially labelled data: studies with an empty or -1 label and an extra CSV of unlabelled
images are read with label -1, left out of the loss, the metrics and mixup, and still train."""

import shutil

import jax
import numpy as np
import pytest

from murajax import steps, synthetic, tasks, train
from murajax.data import mura
from murajax.errors import UserError
from murajax.recipes import mixup
from tests import helpers


@pytest.fixture(scope="module")
def clean_root(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("data"), num_studies=30, seed=4)


def _unlabel_studies(root, tmp_path, every=3):
    """A copy of ``root`` whose every ``every``-th train study row has an empty or -1 label."""
    copy = tmp_path / "MURA-v1.1"
    shutil.copytree(root, copy)
    path = copy / "train_labeled_studies.csv"
    rows = path.read_text().splitlines()
    cleared = []
    for i, row in enumerate(rows):
        if i % every == 0:
            study, _ = row.rsplit(",", 1)
            rows[i] = f"{study}," + ("" if i % 2 else "-1")
            cleared.append(study)
    path.write_text("\n".join(rows) + "\n")
    return copy, cleared


def test_empty_and_minus_one_labels_read_as_unlabelled_whatever_the_folder_says(clean_root,
                                                                                tmp_path):
    root, cleared = _unlabel_studies(clean_root, tmp_path)
    index = mura.read_split(root, "train")
    unlabelled = {r.study for r in index.images if r.label == -1}
    assert unlabelled == {mura.relative_path(s, root).rstrip("/") for s in cleared}
    labelled = mura.read_split(clean_root, "train")
    assert len(index.images) == len(labelled.images)
    # The paper's weights come from the labelled images alone.
    keep = [r for r in labelled.images if r.study not in unlabelled]
    np.testing.assert_array_equal(mura.class_weights(index),
                                  mura.class_weights(mura.index_from_records(keep)))


def test_unlabeled_csv_adds_images_without_labels_and_refuses_labelled_ones(clean_root,
                                                                            tmp_path):
    root = tmp_path / "MURA-v1.1"
    shutil.copytree(clean_root, root)
    image_rows = (root / "train_image_paths.csv").read_text().splitlines()
    study_rows = (root / "train_labeled_studies.csv").read_text().splitlines()
    moved = study_rows[0].rsplit(",", 1)[0]  # this study loses its row: its images go unlabelled
    (root / "train_labeled_studies.csv").write_text("\n".join(study_rows[1:]) + "\n")
    extra = [r for r in image_rows if r.startswith(moved)]
    (root / "train_image_paths.csv").write_text(
        "\n".join(r for r in image_rows if not r.startswith(moved)) + "\n")
    (root / "extra.csv").write_text("\n".join(extra) + "\n")

    index = mura.read_split(root, "train", unlabeled_csv="extra.csv")
    added = [r for r in index.images if r.label == -1]
    assert len(added) == len(extra) and {r.study for r in added} == {moved.strip("/")[10:]}
    config = helpers.run_config(root, **{"data.unlabeled_csv": "extra.csv"})
    assert len(tasks.MURA.read_split(config.data, "train").images) == len(index.images)
    assert all(r.label >= 0 for r in tasks.MURA.read_split(config.data, "valid").images)

    (root / "labelled.csv").write_text(image_rows[-1] + "\n")  # a study the CSV labels
    with pytest.raises(UserError, match=r"labelled.csv, row 1: .* which train_labeled_studies"
                                        r".csv labels: list only unlabelled studies"):
        mura.read_split(root, "train", unlabeled_csv="labelled.csv")
    with pytest.raises(UserError, match=r"config.data.unlabeled_csv: .*nope.csv is not a file"):
        mura.read_split(root, "train", unlabeled_csv="nope.csv")


def test_unlabelled_examples_are_left_out_of_the_loss_and_the_metrics():
    state = helpers.tiny_state()
    batch = helpers.random_batch(6, masked=(5,))
    batch["label"][[1, 3]] = -1
    logits, _ = state.apply_fn(state.variables, batch["image"], train=True,
                               mutable=["batch_stats"])
    p = 1 / (1 + np.exp(-np.asarray(logits[:, 0], np.float64)))
    y = np.clip(batch["label"], 0, 1)
    w = helpers.loss_weights()[batch["study_type"], y]
    per_example = -w * (y * np.log(p) + (1 - y) * np.log(1 - p))
    seen = np.array([1, 0, 1, 0, 1, 0], bool)  # labelled and real
    _, metrics = jax.jit(steps.train_step)(state, batch)
    assert int(metrics.loss.count) == 3
    assert float(metrics.loss.compute()) == pytest.approx(per_example[seen].mean(), rel=1e-5)
    eval_metrics, probabilities = jax.jit(steps.eval_step)(state, batch)
    assert int(eval_metrics.loss.count) == 3 and probabilities.shape == (6,)


def test_validation_metrics_ignore_unlabelled_studies(clean_root, tmp_path):
    root, _ = _unlabel_studies(clean_root, tmp_path, every=2)
    config = helpers.run_config(root)
    index = tasks.MURA.read_split(config.data, "train")
    probabilities = np.random.default_rng(1).uniform(size=len(index.images)).astype(np.float32)
    labelled = [i for i, r in enumerate(index.images) if r.label >= 0]
    only_labelled = mura.index_from_records([index.images[i] for i in labelled])
    assert tasks.MURA.validation_metrics(index, probabilities, 0.5) == pytest.approx(
        tasks.MURA.validation_metrics(only_labelled, probabilities[labelled], 0.5))


def test_unlabelled_examples_never_mix():
    batch = helpers.random_batch(8)
    batch["label"][[0, 4]] = -1
    batch["image"][[0, 4]] = 1e6
    batch["image"][[1, 2, 3, 5, 6, 7]] = np.abs(batch["image"][[1, 2, 3, 5, 6, 7]]) / 10

    class State:
        loss_weights = helpers.loss_weights()

    for seed in range(5):
        mixed = mixup.Mixup(alpha=0.4, cutmix_alpha=1.0)(batch, jax.random.key(seed), State())
        images = np.asarray(mixed["image"])
        np.testing.assert_array_equal(images[[0, 4]], batch["image"][[0, 4]])
        assert float(np.max(images[[1, 2, 3, 5, 6, 7]])) < 10
        assert np.all(np.asarray(mixed["target"])[[0, 4]] == -1)


@pytest.mark.slow
def test_a_partly_labelled_set_trains_and_validates(clean_root, tmp_path):
    root, _ = _unlabel_studies(clean_root, tmp_path)
    summary = train.train_and_evaluate(helpers.run_config(root, num_epochs=1), tmp_path / "run")
    assert np.isfinite(summary["val_loss"]) and summary["epoch"] == 1
