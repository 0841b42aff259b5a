"""murajax.evaluation.metrics: binary metrics against scikit-learn, the vectorised bootstrap."""

import math

import numpy as np
import pytest

from murajax import evaluation as ev
from tests.evaluation_reference import assert_close, random_data, sklearn_metrics


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_binary_metrics_match_sklearn(seed, ties, threshold):
    y, p = random_data(seed, 37 + 29 * seed, ties)
    got = ev.binary_metrics(y, p, threshold)
    want = sklearn_metrics(y, p, threshold)
    for k in ev.RATE_METRICS:
        assert_close(got[k], want[k], k)
    pred = p > threshold
    assert got["tp"] == int(np.sum(pred & (y == 1)))
    assert got["fp"] == int(np.sum(pred & (y == 0)))
    assert got["tn"] == int(np.sum(~pred & (y == 0)))
    assert got["fn"] == int(np.sum(~pred & (y == 1)))
    assert (got["n"], got["n_positive"], got["n_negative"]) == (len(y), y.sum(), len(y) - y.sum())


def test_binary_metrics_undefined_is_nan():
    got = ev.binary_metrics([1, 1, 1], [0.9, 0.2, 0.7])
    assert math.isnan(got["auroc"]) and math.isnan(got["specificity"])
    assert got["sensitivity"] == pytest.approx(2 / 3)
    got = ev.binary_metrics([0, 0], [0.1, 0.2])  # all true negatives: kappa, F1, precision undefined
    for k in ("auroc", "kappa", "f1", "precision", "sensitivity"):
        assert math.isnan(got[k]), k
    assert got["specificity"] == 1.0 and got["accuracy"] == 1.0
    empty = ev.binary_metrics([], [])
    assert empty["n"] == 0 and math.isnan(empty["accuracy"])
    with pytest.raises(ValueError):
        ev.binary_metrics([0, 2], [0.1, 0.2])


@pytest.mark.parametrize("seed", [0, 7])
def test_bootstrap_per_resample_values_match_sklearn(seed):
    y, p = random_data(seed, 40, ties=bool(seed))
    num, chunk = 30, 7  # several chunks, the last one partial
    dist = ev.bootstrap_distribution(y, p, num_samples=num, seed=seed, chunk_size=chunk)
    idx = np.concatenate(list(ev.bootstrap_indices(len(y), num, seed, chunk)))
    assert idx.shape == (num, len(y))
    for r in (0, 6, 7, 13, 29):
        want = sklearn_metrics(y[idx[r]], p[idx[r]])
        for k in ev.RATE_METRICS:
            assert_close(dist[k][r], want[k], f"resample {r} {k}")


def test_bootstrap_ci_contains_estimate_and_narrows():
    widths = []
    for n in (100, 1600):
        y, p = random_data(3, n)
        res = ev.bootstrap_metrics(y, p, num_samples=2000, seed=1)
        point = ev.binary_metrics(y, p)
        for k in ev.RATE_METRICS:
            assert res[k]["value"] == point[k]
            assert res[k]["ci_low"] <= res[k]["value"] <= res[k]["ci_high"], k
        widths.append({k: res[k]["ci_high"] - res[k]["ci_low"] for k in ev.RATE_METRICS})
    for k in ev.RATE_METRICS:
        assert widths[1][k] < 0.6 * widths[0][k], k  # ~1/sqrt(16) = 0.25 in theory
    again = ev.bootstrap_metrics(*random_data(3, 100), num_samples=2000, seed=1)
    y, p = random_data(3, 100)
    assert again == ev.bootstrap_metrics(y, p, num_samples=2000, seed=1)
    assert again != ev.bootstrap_metrics(y, p, num_samples=2000, seed=2)


def test_bootstrap_drops_undefined_resamples():
    # 1 positive in 30: many resamples hold no positive, their AUROC is NaN and left out.
    y = np.zeros(30, dtype=int)
    y[0] = 1
    p = np.linspace(0, 1, 30)
    dist = ev.bootstrap_distribution(y, p, num_samples=500, seed=0)
    assert np.isnan(dist["auroc"]).any() and not np.isnan(dist["auroc"]).all()
    res = ev.bootstrap_metrics(y, p, num_samples=500, seed=0)
    assert res["auroc"]["ci_low"] == res["auroc"]["ci_high"] == 0.0  # the positive scores lowest
