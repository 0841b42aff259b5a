"""Binary metrics and the vectorised bootstrap of the MURA paper's evaluation.

Owns the metrics of one set of studies (``binary_metrics``: AUROC, Cohen's kappa, F1,
precision, sensitivity, specificity, accuracy, confusion counts) and their 95% bootstrap CIs
(``bootstrap_indices``, ``bootstrap_distribution``, ``bootstrap_metrics``), plus the weighted
building blocks the reader comparison reuses (``confusion_counts``, ``rates_from_counts``,
``bootstrap_weights``, ``estimate``). numpy only.

Conventions (the paper's):

* A study is called abnormal when its probability is strictly greater than the threshold.
* 95% confidence intervals are the 2.5th and 97.5th percentiles of the metric over
  ``num_samples`` bootstrap resamples of *studies* (drawn with replacement, same size as the
  data). Resamples on which a metric is undefined (e.g. AUROC of a resample holding one class
  only) are left out of that metric's percentiles.
* Undefined metrics (AUROC with one class, precision with no positive predictions, ...) are NaN.

The bootstrap is vectorised: a chunk of resamples is a ``(chunk, n)`` matrix of multiplicities
(how often each study was drawn), every confusion count is a matrix product with 0/1 indicator
vectors, and AUROC is the Mann-Whitney statistic computed from the multiplicities of the studies
sorted by probability.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from murajax.evaluation.studies import check_labels, check_probabilities

# Metrics with a bootstrap CI, in report order.
RATE_METRICS = ("auroc", "kappa", "f1", "precision", "sensitivity", "specificity", "accuracy")
COUNT_KEYS = ("n", "n_positive", "n_negative", "tp", "fp", "tn", "fn")

# Bound on the number of elements of one (chunk, n) multiplicity matrix: ~16 MiB in float64.
_MAX_CHUNK_ELEMENTS = 1 << 21


# ----------------------------------------------------------------------------------------------
# Metrics (vectorised over rows of a multiplicity matrix)


def safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den elementwise, NaN where den is 0."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den != 0, num / np.where(den != 0, den, 1.0), np.nan)


def rates_from_counts(tp, fp, tn, fn) -> dict[str, np.ndarray]:
    """Rate metrics from confusion counts (arrays of any shape); NaN where undefined."""
    tp, fp, tn, fn = (np.asarray(x, dtype=np.float64) for x in (tp, fp, tn, fn))
    n = tp + fp + tn + fn
    # Cohen's kappa for two binary raters, closed form of (p_o - p_e) / (1 - p_e).
    kappa_den = (tp + fp) * (fp + tn) + (tp + fn) * (fn + tn)
    return {
        "kappa": safe_div(2.0 * (tp * tn - fn * fp), kappa_den),
        "f1": safe_div(2.0 * tp, 2.0 * tp + fp + fn),
        "precision": safe_div(tp, tp + fp),
        "sensitivity": safe_div(tp, tp + fn),
        "specificity": safe_div(tn, tn + fp),
        "accuracy": safe_div(tp + tn, n),
    }


def confusion_counts(weights: np.ndarray, truth: np.ndarray, pred: np.ndarray):
    """Confusion counts for each row of ``weights`` (m, n); truth, pred: (n,) or (n, k) 0/1.

    Returns tp, fp, tn, fn of shape (m,) or (m, k).
    """
    truth = truth.astype(np.float64)
    pred = pred.astype(np.float64)
    total = weights.sum(axis=1)
    if truth.ndim == 2:
        total = total[:, None]
    pos = weights @ truth
    predicted = weights @ pred
    tp = weights @ (truth * pred)
    fp = predicted - tp
    fn = pos - tp
    tn = total - pos - fp
    return tp, fp, tn, fn


class _AurocPrep:
    """What AUROC on weighted resamples needs: studies sorted by probability, ties grouped."""

    def __init__(self, labels: np.ndarray, probabilities: np.ndarray):
        self.order = np.argsort(probabilities, kind="stable")
        p_sorted = probabilities[self.order]
        self.y = labels[self.order].astype(np.float64)
        self.tied = bool(np.any(p_sorted[1:] == p_sorted[:-1]))
        self.starts = np.flatnonzero(np.r_[True, p_sorted[1:] != p_sorted[:-1]])

    def __call__(self, weights: np.ndarray) -> np.ndarray:
        """AUROC of each row of ``weights`` (m, n) (Mann-Whitney U / (n_pos * n_neg)); NaN if
        a row holds one class only. Ties count one half, as in scikit-learn."""
        w = weights[:, self.order]
        pos = w * self.y
        neg = w - pos
        if self.tied:
            pos = np.add.reduceat(pos, self.starts, axis=1)
            neg = np.add.reduceat(neg, self.starts, axis=1)
        neg_below = np.cumsum(neg, axis=1)
        neg_below -= 0.5 * neg  # negatives strictly below, plus half of those tied
        u = np.einsum("ij,ij->i", pos, neg_below)
        return safe_div(u, pos.sum(axis=1) * neg.sum(axis=1))


def _weighted_metrics(
    weights: np.ndarray, labels: np.ndarray, predicted: np.ndarray, auroc: _AurocPrep
) -> dict[str, np.ndarray]:
    tp, fp, tn, fn = confusion_counts(weights, labels, predicted)
    out = {"auroc": auroc(weights)}
    out.update(rates_from_counts(tp, fp, tn, fn))
    out.update(tp=tp, fp=fp, tn=tn, fn=fn)
    return out


def _check_pair(labels, probabilities, threshold) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y = check_labels(labels)
    p = check_probabilities(probabilities, y.shape[0])
    if not math.isfinite(float(threshold)):
        raise ValueError(f"threshold must be finite, got {threshold}")
    return y, p, (p > threshold).astype(np.int64)


def binary_metrics(labels, probabilities, threshold: float = 0.5) -> dict[str, float]:
    """AUROC, Cohen's kappa, F1, precision, sensitivity, specificity, accuracy and counts.

    A study is called abnormal when its probability is > threshold. Undefined values are NaN.
    """
    y, p, pred = _check_pair(labels, probabilities, threshold)
    n = y.shape[0]
    ones = np.ones((1, n))
    values = _weighted_metrics(ones, y, pred, _AurocPrep(y, p))
    out: dict[str, float] = {k: float(values[k][0]) for k in RATE_METRICS}
    tp, fp, tn, fn = (int(round(values[k][0])) for k in ("tp", "fp", "tn", "fn"))
    out.update(n=n, n_positive=int(y.sum()), n_negative=int(n - y.sum()),
               tp=tp, fp=fp, tn=tn, fn=fn)
    return out


# ----------------------------------------------------------------------------------------------
# Bootstrap


def _chunk_size(n: int, num_samples: int) -> int:
    return max(1, min(num_samples, _MAX_CHUNK_ELEMENTS // max(n, 1)))


def bootstrap_indices(n: int, num_samples: int, seed: int, chunk_size: int | None = None) -> Iterator[np.ndarray]:
    """The bootstrap's resamples, chunk by chunk: int arrays (chunk, n) of study indices.

    Deterministic in (n, num_samples, seed, chunk_size); every bootstrap here uses it, so a
    resample can be rebuilt (e.g. to recompute a metric with another library).
    """
    rng = np.random.default_rng(seed)
    chunk = chunk_size or _chunk_size(n, num_samples)
    done = 0
    while done < num_samples:
        m = min(chunk, num_samples - done)
        yield rng.integers(0, n, size=(m, n))
        done += m


def _multiplicities(indices: np.ndarray, n: int) -> np.ndarray:
    """(m, n) indices -> (m, n) float64 counts of how often each study was drawn in each row."""
    m = indices.shape[0]
    flat = indices + (np.arange(m) * n)[:, None]
    return np.bincount(flat.ravel(), minlength=m * n).reshape(m, n).astype(np.float64)


def bootstrap_weights(n: int, num_samples: int, seed: int, chunk_size: int | None = None):
    """The resamples of ``bootstrap_indices`` as (chunk, n) float64 multiplicity matrices."""
    for idx in bootstrap_indices(n, num_samples, seed, chunk_size):
        yield _multiplicities(idx, n)


def bootstrap_distribution(
    labels, probabilities, threshold: float = 0.5, *, num_samples: int = 10000, seed: int = 0,
    chunk_size: int | None = None,
) -> dict[str, np.ndarray]:
    """Every rate metric on every resample: {metric: array (num_samples,)}, NaN where undefined."""
    y, p, pred = _check_pair(labels, probabilities, threshold)
    n = y.shape[0]
    out: dict[str, list[np.ndarray]] = {k: [] for k in RATE_METRICS}
    if n == 0 or num_samples <= 0:
        return {k: np.full(max(num_samples, 0), np.nan) for k in RATE_METRICS}
    prep = _AurocPrep(y, p)
    for w in bootstrap_weights(n, num_samples, seed, chunk_size):
        values = _weighted_metrics(w, y, pred, prep)
        for k in RATE_METRICS:
            out[k].append(values[k])
    return {k: np.concatenate(v) for k, v in out.items()}


def _percentile_ci(samples: np.ndarray) -> tuple[float, float]:
    samples = np.asarray(samples, dtype=np.float64)
    samples = samples[~np.isnan(samples)]
    if samples.size == 0:
        return math.nan, math.nan
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return float(lo), float(hi)


def estimate(value: float, samples: np.ndarray) -> dict[str, float]:
    """{"value", "ci_low", "ci_high"}: a point estimate and the 95% percentile CI of its
    bootstrap ``samples`` (NaN samples left out; NaN bounds when none is left)."""
    lo, hi = _percentile_ci(samples)
    return {"value": float(value), "ci_low": lo, "ci_high": hi}


def bootstrap_metrics(
    labels, probabilities, threshold: float = 0.5, *, num_samples: int = 10000, seed: int = 0,
    chunk_size: int | None = None,
) -> dict[str, dict[str, float]]:
    """{metric: {"value", "ci_low", "ci_high"}} for every rate metric: the point estimate on all
    studies and the 95% percentile CI over ``num_samples`` resamples of studies."""
    point = binary_metrics(labels, probabilities, threshold)
    dist = bootstrap_distribution(labels, probabilities, threshold, num_samples=num_samples,
                                  seed=seed, chunk_size=chunk_size)
    return {k: estimate(point[k], dist[k]) for k in RATE_METRICS}
