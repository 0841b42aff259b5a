"""The task seam: config.task selects what the data means; MURA is the first task."""

import ml_collections
import numpy as np
import pytest

from murajax import evaluation, synthetic, tasks
from murajax.errors import UserError
from tests import helpers


def test_config_selects_mura_and_a_run_saved_before_the_field_still_does():
    assert tasks.from_config(helpers.tiny_config()) is tasks.MURA
    legacy = ml_collections.ConfigDict({"seed": 0})  # a config.json written before config.task
    assert tasks.from_config(legacy) is tasks.MURA


def test_unknown_task_is_refused_with_the_known_names():
    config = helpers.tiny_config()
    config.task = "chexpert_typo"
    with pytest.raises(UserError, match=r"config.task='chexpert_typo' .* known: mura"):
        tasks.from_config(config)


def test_mura_validation_metrics_score_studies_as_the_mean_of_their_views(tmp_path):
    root = synthetic.generate(tmp_path, num_studies=12, seed=2)
    config = helpers.tiny_config(**{"data.root": str(root)})
    index = tasks.MURA.read_split(config.data, "valid")
    probabilities = np.random.default_rng(0).uniform(size=len(index.images)).astype(np.float32)
    probabilities[0] = np.nan  # an image skipped as unreadable: not part of its study
    metrics = tasks.MURA.validation_metrics(index, probabilities, threshold=0.5)

    views = {}
    for record, p in zip(index.images, probabilities):
        if np.isfinite(p):
            views.setdefault(record.study, (record.label, []))[1].append(float(p))
    labels = np.array([label for label, _ in views.values()])
    study_probabilities = np.array([np.mean(ps) for _, ps in views.values()])
    expected = evaluation.binary_metrics(labels, study_probabilities, 0.5)
    assert metrics == pytest.approx({"auroc": expected["auroc"], "kappa": expected["kappa"]})
    assert tasks.MURA.loss_weights(index).shape == (7, 2)
