"""scikit-learn references for the evaluation tests (the package itself never imports it)."""

import math
import warnings

import numpy as np
import pytest
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    accuracy_score,
    cohen_kappa_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)


def sklearn_metrics(y, p, threshold=0.5):
    pred = (np.asarray(p) > threshold).astype(int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        warnings.simplefilter("ignore", UserWarning)
        return {
            "auroc": roc_auc_score(y, p) if len(set(y)) == 2 else math.nan,
            "kappa": cohen_kappa_score(y, pred),
            "f1": f1_score(y, pred, zero_division=np.nan),
            "precision": precision_score(y, pred, zero_division=np.nan),
            "sensitivity": recall_score(y, pred, zero_division=np.nan),
            "specificity": recall_score(y, pred, pos_label=0, zero_division=np.nan),
            "accuracy": accuracy_score(y, pred),
        }


def random_data(seed, n, ties=False):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = np.clip(0.35 * y + 0.65 * rng.random(n), 0, 1)
    if ties:
        p = np.round(p, 1)  # many exact ties, some exactly at the threshold 0.5
    return y, p


def assert_close(a, b, what=""):
    if math.isnan(b):
        assert math.isnan(a), what
    else:
        assert a == pytest.approx(b, abs=1e-12), what
