"""Evaluation as in the MURA paper: study-level metrics, bootstrap CIs, reports, reader comparison.

Everything here is numpy-only and pure (no JAX, no checkpoints): ``murajax --mode=evaluate``
restores the checkpoints, runs the model to get one probability per image, and hands the result
to these functions.

Pipeline::

    probs = ensemble_probabilities([model_a_probs, model_b_probs, ...])   # per image
    studies = aggregate_studies(study_ids, probs, labels, study_types)    # per study (mean of views)
    report = build_report(studies, 0.5, num_samples=10000, seed=0, checkpoints=[...])
    write_outputs(out_dir, report, studies)

Conventions (the paper's):

* A study's probability is the arithmetic mean of its views' probabilities; it is called
  abnormal when the probability is strictly greater than the threshold (0.5).
* 95% confidence intervals are the 2.5th and 97.5th percentiles of the metric over
  ``num_samples`` bootstrap resamples of *studies* (drawn with replacement, same size as the
  data). Resamples on which a metric is undefined (e.g. AUROC of a resample holding one class
  only) are left out of that metric's percentiles.
* A difference is significant when its bootstrap CI excludes 0.
* Undefined metrics (AUROC with one class, precision with no positive predictions, ...) are NaN
  in Python results and ``null`` in report.json.

The bootstrap is vectorised: a chunk of resamples is a ``(chunk, n)`` matrix of multiplicities
(how often each study was drawn), every confusion count is a matrix product with 0/1 indicator
vectors, and AUROC is the Mann-Whitney statistic computed from the multiplicities of the studies
sorted by probability.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

# The seven study types; an index into this tuple is an integer study type (-1: unknown).
from murajax.data.mura import STUDY_TYPES
from murajax.errors import UserError

UNKNOWN_STUDY_TYPE = "unknown"

# Metrics with a bootstrap CI, in report order.
RATE_METRICS = ("auroc", "kappa", "f1", "precision", "sensitivity", "specificity", "accuracy")
COUNT_KEYS = ("n", "n_positive", "n_negative", "tp", "fp", "tn", "fn")

# Bound on the number of elements of one (chunk, n) multiplicity matrix: ~16 MiB in float64.
_MAX_CHUNK_ELEMENTS = 1 << 21


# ----------------------------------------------------------------------------------------------
# Studies


@dataclasses.dataclass
class StudyPredictions:
    """One row per study, in first-appearance order of the per-image inputs."""

    study: list[str]
    study_type: np.ndarray  # int, index into STUDY_TYPES, -1 unknown
    label: np.ndarray  # int, 0 normal / 1 abnormal
    probability: np.ndarray  # float64, mean of the study's views
    n_views: np.ndarray  # int

    def __len__(self) -> int:
        return len(self.study)

    def subset(self, mask: np.ndarray) -> StudyPredictions:
        mask = np.asarray(mask, dtype=bool)
        return StudyPredictions(
            study=[s for s, keep in zip(self.study, mask) if keep],
            study_type=self.study_type[mask],
            label=self.label[mask],
            probability=self.probability[mask],
            n_views=self.n_views[mask],
        )


def study_type_index(name_or_path: str) -> int:
    """Index into STUDY_TYPES of a type name ("XR_WRIST") or of a path containing one; -1 if none."""
    if name_or_path in STUDY_TYPES:
        return STUDY_TYPES.index(name_or_path)
    for part in re.split(r"[\\/]", str(name_or_path)):
        if part in STUDY_TYPES:
            return STUDY_TYPES.index(part)
    return -1


def study_type_name(index: int) -> str:
    return STUDY_TYPES[index] if 0 <= index < len(STUDY_TYPES) else UNKNOWN_STUDY_TYPE


def _as_study_type_indices(study_types: Any, study_ids: Sequence[str]) -> np.ndarray:
    if study_types is None:
        return np.array([study_type_index(s) for s in study_ids], dtype=np.int64)
    arr = np.asarray(study_types)
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64)
    if arr.dtype.kind in "UOS":
        return np.array([study_type_index(str(s)) for s in arr], dtype=np.int64)
    raise ValueError(f"study_types must be integers or names, got dtype {arr.dtype}")


def _check_labels(labels: Any, name: str = "labels", allow_unknown: bool = False) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    ok = (arr == 0) | (arr == 1) | ((arr == -1) if allow_unknown else False)
    if arr.size and not np.all(ok):
        bad = arr[~ok][:5]
        raise ValueError(f"{name} must be 0 (normal) or 1 (abnormal)"
                         f"{' or -1 (unknown)' if allow_unknown else ''}; found {bad.tolist()}"
                         f"{'' if allow_unknown else ' (metrics need labelled studies)'}")
    return arr.astype(np.int64)


def _check_probabilities(probabilities: Any, n: int, name: str = "probabilities") -> np.ndarray:
    arr = np.asarray(probabilities, dtype=np.float64)
    if arr.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite; found {int((~np.isfinite(arr)).sum())} non-finite")
    return arr


def aggregate_studies(
    study_ids: Sequence[str],
    probabilities: np.ndarray,
    labels: np.ndarray,
    study_types: np.ndarray | Sequence[str] | None = None,
) -> StudyPredictions:
    """Per-image predictions to per-study predictions (mean of each study's views).

    ``study_types`` holds one integer index into STUDY_TYPES (or a type name) per image; None
    infers it from the study id (a path containing e.g. ``XR_WRIST``). Labels are 0/1, or -1
    for unlabelled studies (kept for predictions.csv; ``build_report`` needs labels). A study's
    views must agree on the label and the study type (ValueError otherwise). Studies come out
    in the order in which they first appear.
    """
    ids = [str(s) for s in study_ids]
    n = len(ids)
    labels_arr = _check_labels(labels, allow_unknown=True)
    if labels_arr.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {labels_arr.shape}")
    probs = _check_probabilities(probabilities, n)
    types = _as_study_type_indices(study_types, ids)
    if types.shape != (n,):
        raise ValueError(f"study_types must have shape ({n},), got {types.shape}")
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return StudyPredictions([], empty, empty.copy(), np.zeros(0), empty.copy())

    uniq, first, inverse = np.unique(np.asarray(ids, dtype=object).astype(str), return_index=True,
                                     return_inverse=True)
    # Renumber the studies in first-appearance order.
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    group = rank[inverse.reshape(-1)]
    k = len(uniq)

    n_views = np.bincount(group, minlength=k)
    prob_sum = np.bincount(group, weights=probs, minlength=k)
    first_idx = first[order]
    label = labels_arr[first_idx]
    if np.any(labels_arr != label[group]):
        bad_rows = np.flatnonzero(labels_arr != label[group])[:5]
        raise ValueError(f"views of one study disagree on the label: {[ids[i] for i in bad_rows]}")
    study_type = types[first_idx]
    if np.any(types != study_type[group]):
        bad_rows = np.flatnonzero(types != study_type[group])[:5]
        raise ValueError(f"views of one study disagree on the study type: {[ids[i] for i in bad_rows]}")
    return StudyPredictions(
        study=[ids[i] for i in first_idx],
        study_type=study_type.astype(np.int64),
        label=label.astype(np.int64),
        probability=prob_sum / n_views,
        n_views=n_views.astype(np.int64),
    )


def ensemble_probabilities(per_model: Sequence[np.ndarray]) -> np.ndarray:
    """The ensemble's probabilities: the mean over models (the paper's 5 best checkpoints)."""
    arrays = [np.asarray(p, dtype=np.float64) for p in per_model]
    if not arrays:
        raise ValueError("ensemble_probabilities needs at least one model's probabilities")
    shape = arrays[0].shape
    for i, a in enumerate(arrays):
        if a.shape != shape:
            raise ValueError(f"model {i} has probabilities of shape {a.shape}, model 0 has {shape}")
    return np.mean(np.stack(arrays), axis=0)


# ----------------------------------------------------------------------------------------------
# Metrics (vectorised over rows of a multiplicity matrix)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den != 0, num / np.where(den != 0, den, 1.0), np.nan)


def _metrics_from_counts(tp, fp, tn, fn) -> dict[str, np.ndarray]:
    """Rate metrics from confusion counts (arrays of any shape); NaN where undefined."""
    tp, fp, tn, fn = (np.asarray(x, dtype=np.float64) for x in (tp, fp, tn, fn))
    n = tp + fp + tn + fn
    # Cohen's kappa for two binary raters, closed form of (p_o - p_e) / (1 - p_e).
    kappa_den = (tp + fp) * (fp + tn) + (tp + fn) * (fn + tn)
    return {
        "kappa": _safe_div(2.0 * (tp * tn - fn * fp), kappa_den),
        "f1": _safe_div(2.0 * tp, 2.0 * tp + fp + fn),
        "precision": _safe_div(tp, tp + fp),
        "sensitivity": _safe_div(tp, tp + fn),
        "specificity": _safe_div(tn, tn + fp),
        "accuracy": _safe_div(tp + tn, n),
    }


def _confusion(weights: np.ndarray, truth: np.ndarray, pred: np.ndarray):
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
        return _safe_div(u, pos.sum(axis=1) * neg.sum(axis=1))


def _weighted_metrics(
    weights: np.ndarray, labels: np.ndarray, predicted: np.ndarray, auroc: _AurocPrep
) -> dict[str, np.ndarray]:
    tp, fp, tn, fn = _confusion(weights, labels, predicted)
    out = {"auroc": auroc(weights)}
    out.update(_metrics_from_counts(tp, fp, tn, fn))
    out.update(tp=tp, fp=fp, tn=tn, fn=fn)
    return out


def _check_pair(labels, probabilities, threshold) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y = _check_labels(labels)
    p = _check_probabilities(probabilities, y.shape[0])
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
    out.update(n=n, n_positive=int(y.sum()), n_negative=int(n - y.sum()), tp=tp, fp=fp, tn=tn, fn=fn)
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


def _bootstrap_weights(n: int, num_samples: int, seed: int, chunk_size: int | None = None):
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
    for w in _bootstrap_weights(n, num_samples, seed, chunk_size):
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


def _estimate(value: float, samples: np.ndarray) -> dict[str, float]:
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
    return {k: _estimate(point[k], dist[k]) for k in RATE_METRICS}


# ----------------------------------------------------------------------------------------------
# Report


def _group_report(labels, probabilities, threshold, num_samples, seed, n_views) -> dict[str, Any]:
    point = binary_metrics(labels, probabilities, threshold)
    group: dict[str, Any] = bootstrap_metrics(labels, probabilities, threshold,
                                              num_samples=num_samples, seed=seed)
    for k in COUNT_KEYS:
        group[k] = int(point[k])
    group["n_images"] = int(np.sum(n_views))
    return group


def build_report(
    studies: StudyPredictions,
    threshold: float = 0.5,
    *,
    num_samples: int = 10000,
    seed: int = 0,
    checkpoints: Sequence[Any] = (),
    reader_comparison: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The evaluation report: overall and per study type metrics with bootstrap CIs.

    ``reader_comparison`` (from ``compare_with_readers``) is included as is when given.
    """
    unlabelled = int(np.sum(studies.label < 0))
    if unlabelled:
        raise UserError(f"{unlabelled} of {len(studies)} studies have no label (-1, e.g. "
                        f"folders named 'studyN' without _positive/_negative); metrics need a "
                        f"labelled split (config.eval.split).")
    report: dict[str, Any] = {
        "threshold": float(threshold),
        "num_bootstrap": int(num_samples),
        "seed": int(seed),
        "checkpoints": [str(c) for c in checkpoints],
        "aggregate": _group_report(studies.label, studies.probability, threshold, num_samples,
                                   seed, studies.n_views),
        "by_study_type": {},
    }
    present = sorted(set(int(t) for t in studies.study_type), key=lambda t: (t < 0, t))
    for t in present:
        mask = studies.study_type == t
        report["by_study_type"][study_type_name(t)] = _group_report(
            studies.label[mask], studies.probability[mask], threshold, num_samples, seed,
            studies.n_views[mask])
    if reader_comparison is not None:
        report["reader_comparison"] = dict(reader_comparison)
    return report


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(float(x)) else None
    return x


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def _fmt_ci(est: Mapping[str, Any]) -> str:
    value = _fmt(est.get("value"))
    if value == "n/a":
        return value
    return f"{value} [{_fmt(est.get('ci_low'))}, {_fmt(est.get('ci_high'))}]"


def _markdown(report: Mapping[str, Any]) -> str:
    agg = report["aggregate"]
    lines = [
        "# MURA evaluation",
        "",
        f"{agg['n']} studies ({agg['n_positive']} abnormal, {agg['n_negative']} normal; "
        f"{agg.get('n_images', 'n/a')} images). A study's probability is the mean of its views' "
        f"probabilities; it is called abnormal when the probability is > {report['threshold']:g}.",
        f"Values are point estimates on all studies; square brackets hold 95% bootstrap confidence "
        f"intervals (2.5th-97.5th percentiles over {report['num_bootstrap']} resamples of "
        f"studies, seed {report.get('seed', 'n/a')}). n/a: undefined (e.g. one class only).",
        "",
    ]
    ckpts = report.get("checkpoints") or []
    if ckpts:
        lines.append(f"Model: ensemble (mean probability) of {len(ckpts)} checkpoint(s):")
        lines += [f"- `{c}`" for c in ckpts]
        lines.append("")
    rows = list(report["by_study_type"].items()) + [("**Overall**", agg)]
    lines += [
        "| Study type | Studies (abnormal/normal) | AUROC | Kappa | F1 | Sensitivity | Specificity |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, g in rows:
        lines.append(
            f"| {name} | {g['n']} ({g['n_positive']}/{g['n_negative']}) | {_fmt_ci(g['auroc'])} | "
            f"{_fmt_ci(g['kappa'])} | {_fmt_ci(g['f1'])} | {_fmt_ci(g['sensitivity'])} | "
            f"{_fmt_ci(g['specificity'])} |")
    lines += [
        "",
        f"Confusion counts at threshold {report['threshold']:g} (positive = abnormal):",
        "",
        "| Study type | TP | FP | TN | FN | Precision | Accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, g in rows:
        lines.append(f"| {name} | {g['tp']} | {g['fp']} | {g['tn']} | {g['fn']} | "
                     f"{_fmt_ci(g['precision'])} | {_fmt_ci(g['accuracy'])} |")
    lines.append("")
    if report.get("reader_comparison"):
        lines += _reader_markdown(report["reader_comparison"])
    lines += [
        "Files: `predictions.csv` (one row per study), `report.json` (these numbers), "
        "`roc.png` (ROC curves, operating point marked), `calibration.png` (reliability diagram).",
        "",
    ]
    return "\n".join(lines)


def _reader_markdown(comparison: Mapping[str, Any]) -> list[str]:
    lines = ["## Comparison with radiologists", ""]
    for key in ("protocol_a", "protocol_b"):
        proto = comparison.get(key)
        if not proto:
            continue
        lines += [f"### {proto['name']}", "", proto["gold_standard"], "",
                  f"{proto['n_studies']} studies, {proto['num_bootstrap']} bootstrap resamples.", ""]
        lines += ["| Rater | " + " | ".join(m.upper() if m == "f1" else m.capitalize()
                                           for m in proto["metrics"]) + " |",
                  "|---|" + "---|" * len(proto["metrics"])]
        metrics = proto["metrics"]
        first = next(iter(metrics.values()))
        for reader in first["readers"]:
            lines.append(f"| {reader} | " + " | ".join(_fmt_ci(metrics[m]["readers"][reader])
                                                       for m in metrics) + " |")
        lines.append("| Readers' mean | " + " | ".join(_fmt_ci(metrics[m]["readers_mean"])
                                                       for m in metrics) + " |")
        lines.append("| **Model** | " + " | ".join(_fmt_ci(metrics[m]["model"]) for m in metrics) + " |")
        lines.append("| Model - readers' mean | " + " | ".join(
            _fmt_ci(metrics[m]["model_minus_readers_mean"])
            + (" *" if metrics[m]["model_minus_readers_mean"]["significant"] else "")
            for m in metrics) + " |")
        lines += ["", "\\* significant: the 95% CI of the difference excludes 0.", ""]
    return lines


def _roc_curve(labels: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-probabilities, kind="stable")
    p = probabilities[order]
    y = labels[order]
    last = np.r_[np.flatnonzero(p[1:] != p[:-1]), len(p) - 1]
    tps = np.cumsum(y)[last]
    fps = (last + 1) - tps
    n_pos, n_neg = max(int(y.sum()), 1), max(int(len(y) - y.sum()), 1)
    return np.r_[0.0, fps / n_neg], np.r_[0.0, tps / n_pos]


def _plot_roc(path: str, report: Mapping[str, Any], studies: StudyPredictions) -> None:
    from matplotlib.figure import Figure  # object-oriented API: Agg canvas, no pyplot state

    fig = Figure(figsize=(7, 6.5))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="0.7", lw=1, ls="--")
    t = report["threshold"]
    groups = [(name, studies.study_type == study_type_index(name) if name != UNKNOWN_STUDY_TYPE
               else studies.study_type < 0, g) for name, g in report["by_study_type"].items()]
    groups.append(("Overall", np.ones(len(studies), dtype=bool), report["aggregate"]))
    for name, mask, g in groups:
        y, p = studies.label[mask], studies.probability[mask]
        if y.min(initial=0) == y.max(initial=0):
            continue  # ROC undefined with one class
        fpr, tpr = _roc_curve(y, p)
        overall = name == "Overall"
        line, = ax.plot(fpr, tpr, lw=2.5 if overall else 1.1, color="k" if overall else None,
                        label=f"{name} (AUROC {_fmt(g['auroc']['value'])})", zorder=3 if overall else 2)
        sens, spec = g["sensitivity"]["value"], g["specificity"]["value"]
        if sens is not None and spec is not None and not (math.isnan(sens) or math.isnan(spec)):
            ax.plot([1 - spec], [sens], marker="o", ms=8 if overall else 5, color=line.get_color(),
                    markeredgecolor="k", zorder=4)
    ax.plot([], [], "o", color="w", markeredgecolor="k", label=f"operating point (threshold {t:g})")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="False positive rate (1 - specificity)",
           ylabel="True positive rate (sensitivity)", title="ROC by study type")
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _plot_calibration(path: str, studies: StudyPredictions, num_bins: int = 10) -> None:
    from matplotlib.figure import Figure

    p, y = studies.probability, studies.label
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, num_bins - 1)
    count = np.bincount(which, minlength=num_bins)
    mean_p = _safe_div(np.bincount(which, weights=p, minlength=num_bins), count)
    frac_pos = _safe_div(np.bincount(which, weights=y, minlength=num_bins), count)
    ece = float(np.nansum(count * np.abs(mean_p - frac_pos)) / max(len(p), 1))

    fig = Figure(figsize=(6, 7))
    ax, hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], color="0.6", ls="--", lw=1, label="perfectly calibrated")
    keep = count > 0
    ax.plot(mean_p[keep], frac_pos[keep], "o-", color="C0", label=f"model (ECE {ece:.3f})")
    ax.set(ylim=(0, 1), ylabel="Fraction of studies abnormal",
           title=f"Reliability diagram ({len(p)} studies, {num_bins} bins)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    hist.bar((edges[:-1] + edges[1:]) / 2, count, width=1.0 / num_bins, color="C0", alpha=0.6,
             edgecolor="k")
    hist.set(xlim=(0, 1), xlabel="Mean predicted probability of abnormality", ylabel="Studies")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_outputs(out_dir: str | os.PathLike, report: Mapping[str, Any], studies: StudyPredictions) -> None:
    """Write report.json, report.md, predictions.csv, roc.png and calibration.png to out_dir."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(_jsonable(report), f, indent=2, allow_nan=False)
        f.write("\n")
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(_markdown(_jsonable(report)))
    with open(os.path.join(out_dir, "predictions.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["study", "study_type", "label", "probability", "n_views"])
        for s, t, y, p, v in zip(studies.study, studies.study_type, studies.label,
                                 studies.probability, studies.n_views):
            writer.writerow([s, study_type_name(int(t)), int(y), repr(float(p)), int(v)])
    _plot_roc(os.path.join(out_dir, "roc.png"), _jsonable(report), studies)
    _plot_calibration(os.path.join(out_dir, "calibration.png"), studies)


# ----------------------------------------------------------------------------------------------
# Reader comparison


def read_reader_labels(path: str | os.PathLike) -> tuple[list[str], list[str], np.ndarray]:
    """Read per-study reader labels: a CSV with header ``study,<reader1>,<reader2>,...`` and one
    row per study of 0 (normal) / 1 (abnormal) labels. Returns (studies, reader_names,
    labels[n_studies, n_readers]). Bad input raises UserError naming the file and row."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"{path}: reader labels file not found (config.eval.readers).")
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = [(i, row) for i, row in enumerate(csv.reader(f), start=1)
                if row and any(cell.strip() for cell in row)]
    if not rows:
        raise UserError(f"{path}: empty; expected a header 'study,<reader1>,<reader2>,...'.")
    line, header = rows[0]
    header = [h.strip() for h in header]
    if header[0].lower() != "study":
        raise UserError(f"{path}, row {line}: the header must start with 'study', got "
                        f"{header[0]!r}; expected 'study,<reader1>,<reader2>,...'.")
    readers = header[1:]
    if len(readers) < 2:
        raise UserError(f"{path}, row {line}: needs at least 2 reader columns, got {len(readers)}.")
    if any(not r for r in readers):
        raise UserError(f"{path}, row {line}: a reader column has an empty name.")
    if len(set(readers)) != len(readers):
        dup = sorted({r for r in readers if readers.count(r) > 1})
        raise UserError(f"{path}, row {line}: duplicate reader names {dup}.")
    studies: list[str] = []
    seen: dict[str, int] = {}
    labels = []
    for line, row in rows[1:]:
        if len(row) != len(header):
            raise UserError(f"{path}, row {line}: {len(row)} fields, the header has {len(header)}.")
        study = row[0].strip()
        if not study:
            raise UserError(f"{path}, row {line}: empty study id.")
        if study in seen:
            raise UserError(f"{path}, row {line}: study {study!r} already listed in row {seen[study]}.")
        seen[study] = line
        values = []
        for reader, cell in zip(readers, row[1:]):
            cell = cell.strip()
            if cell not in ("0", "1"):
                raise UserError(f"{path}, row {line}: reader {reader!r} has label {cell!r} for "
                                f"study {study!r}; labels must be 0 (normal) or 1 (abnormal).")
            values.append(int(cell))
        studies.append(study)
        labels.append(values)
    if not studies:
        raise UserError(f"{path}: no study rows after the header.")
    return studies, readers, np.asarray(labels, dtype=np.int64)


def _norm_study(s: str) -> str:
    """Study ids compare without surrounding blanks, trailing slashes, backslashes or a leading
    ``[...]MURA-v1.1/`` (murajax's ids are relative to that folder: "valid/XR_WRIST/p1/study1")."""
    s = str(s).strip().replace("\\", "/").rstrip("/")
    marker = "MURA-v1.1/"
    if marker in s:
        s = s[s.index(marker) + len(marker):]
    return s.removeprefix("./")


def align_to_readers(studies: StudyPredictions, reader_studies: Sequence[str]) -> np.ndarray:
    """Indices into ``studies`` of each reader-labelled study (ids compared without trailing
    slashes). UserError when a reader-labelled study has no prediction."""
    where = {_norm_study(s): i for i, s in enumerate(studies.study)}
    missing = [s for s in reader_studies if _norm_study(s) not in where]
    if missing:
        raise UserError(f"{len(missing)} reader-labelled studies have no model prediction, e.g. "
                        f"{missing[:3]}; the readers' CSV must use the same study ids as the "
                        f"evaluated split.")
    return np.array([where[_norm_study(s)] for s in reader_studies], dtype=np.int64)


def majority_vote(labels: np.ndarray) -> np.ndarray:
    """Majority of the columns of ``labels`` (n_studies, k). Ties (possible for even k) count as
    abnormal: a study is abnormal when at least half of the readers call it abnormal."""
    labels = np.asarray(labels)
    return (2 * labels.sum(axis=1) >= labels.shape[1]).astype(np.int64)


_READER_METRICS = ("f1", "kappa")


def _pair_scores(weights: np.ndarray, truth: np.ndarray, pred: np.ndarray) -> dict[str, np.ndarray]:
    """F1 and kappa of pred against truth (both (n, k)) on every row of weights: (m, k) each."""
    values = _metrics_from_counts(*_confusion(weights, truth, pred))
    return {k: values[k] for k in _READER_METRICS}


def _protocol(
    truth: np.ndarray, reader_pred: np.ndarray, model_pred: np.ndarray, readers: list[str],
    *, groups: list[str] | None, num_samples: int, seed: int,
) -> dict[str, Any]:
    """Score readers and the model against gold standards; bootstrap everything together.

    truth: (n, k) gold standards; reader_pred: (n, k) the reader scored against each column;
    model_pred: (n,). Column j pairs ``readers[j]`` with ``truth[:, j]``; the model is scored
    against every column. Averages over columns are the readers' mean and the model.
    """
    n, k = truth.shape
    truth_all = np.concatenate([truth, truth], axis=1)
    pred_all = np.concatenate([reader_pred, np.repeat(model_pred[:, None], k, axis=1)], axis=1)

    def summarise(weights: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
        scores = _pair_scores(weights, truth_all, pred_all)
        out = {}
        for metric, s in scores.items():
            reader_s, model_s = s[:, :k], s[:, k:]
            out[metric] = {
                "readers": reader_s,
                "model_by_gold": model_s,
                "readers_mean": reader_s.mean(axis=1),
                "model": model_s.mean(axis=1),
            }
            out[metric]["model_minus_readers_mean"] = out[metric]["model"] - out[metric]["readers_mean"]
            out[metric]["model_minus_reader"] = model_s - reader_s
        return out

    point = summarise(np.ones((1, n)))
    dists: list[dict] = [summarise(w) for w in _bootstrap_weights(n, num_samples, seed)] if n else []

    def cat(metric: str, key: str) -> np.ndarray:
        if not dists:
            return np.full((0,) + point[metric][key].shape[1:], np.nan)
        return np.concatenate([d[metric][key] for d in dists], axis=0)

    def significant(est: dict) -> dict:
        est["significant"] = bool(est["ci_low"] > 0 or est["ci_high"] < 0)
        return est

    metrics: dict[str, Any] = {}
    for metric in _READER_METRICS:
        p = point[metric]
        m: dict[str, Any] = {
            "readers": {r: _estimate(p["readers"][0, j], cat(metric, "readers")[:, j])
                        for j, r in enumerate(readers)},
            "readers_mean": _estimate(p["readers_mean"][0], cat(metric, "readers_mean")),
            "model": _estimate(p["model"][0], cat(metric, "model")),
            "model_minus_readers_mean": significant(_estimate(
                p["model_minus_readers_mean"][0], cat(metric, "model_minus_readers_mean"))),
            "model_minus_reader": {r: significant(_estimate(
                p["model_minus_reader"][0, j], cat(metric, "model_minus_reader")[:, j]))
                for j, r in enumerate(readers)},
        }
        if groups is not None:
            m["model_by_gold"] = {g: _estimate(p["model_by_gold"][0, j], cat(metric, "model_by_gold")[:, j])
                                  for j, g in enumerate(groups)}
        metrics[metric] = m
    return {"n_studies": int(n), "num_bootstrap": int(num_samples), "metrics": metrics}


def compare_with_readers(
    model_probabilities: np.ndarray,
    reader_labels: np.ndarray,
    *,
    reader_names: Sequence[str] | None = None,
    threshold: float = 0.5,
    num_samples: int = 10000,
    seed: int = 0,
    gold_subset: Sequence[str] | None = None,
    study_types: np.ndarray | None = None,
) -> dict[str, Any]:
    """Compare the model with radiologists as in the paper (F1 and Cohen's kappa).

    ``model_probabilities`` (n,) are aligned with the rows of ``reader_labels`` (n, N) (see
    ``align_to_readers``); the model calls a study abnormal when its probability is > threshold
    (0/1 model labels work too with the default 0.5).

    Protocol A (the paper's first): for each reader i, the gold standard is the majority vote of
    the other N-1 readers; reader i and the model are scored against it; scores are averaged over
    the N gold standards ("readers' mean" and "model").
    Protocol B (``gold_subset``, the later protocol): the gold standard is the majority vote of
    the named readers; the model and each remaining reader are scored against it.
    Majority ties (an even number of voters) count as abnormal (>= half abnormal).

    Every point estimate comes with a 95% bootstrap CI (resampled studies, everything
    recomputed on each resample); the differences model - readers' mean and model - each
    reader are significant when their CI excludes 0. ``study_types`` (n,) ints adds the same
    comparison per study type under "by_study_type".
    """
    labels = np.asarray(reader_labels)
    if labels.ndim != 2:
        raise ValueError(f"reader_labels must be (n_studies, n_readers), got shape {labels.shape}")
    n, n_readers = labels.shape
    if labels.size and not np.all((labels == 0) | (labels == 1)):
        raise ValueError("reader labels must be 0 or 1")
    labels = labels.astype(np.int64)
    probs = _check_probabilities(model_probabilities, n, "model_probabilities")
    names = [str(r) for r in reader_names] if reader_names is not None else \
        [f"reader{j + 1}" for j in range(n_readers)]
    if len(names) != n_readers:
        raise ValueError(f"{len(names)} reader names for {n_readers} reader columns")
    if n_readers < 2:
        raise UserError(f"the reader comparison needs at least 2 readers, got {n_readers}.")
    subset_idx: list[int] | None = None
    if gold_subset is not None:
        unknown = [g for g in gold_subset if g not in names]
        if unknown or not gold_subset:
            raise UserError(f"gold_subset {list(gold_subset)} must name readers among {names}.")
        subset_idx = [names.index(g) for g in gold_subset]
        if len(set(subset_idx)) != len(subset_idx) or len(subset_idx) >= n_readers:
            raise UserError(f"gold_subset {list(gold_subset)} must name distinct readers and leave "
                            f"at least one of {names} to compare with the model.")

    def run(rows: np.ndarray, seed: int) -> dict[str, Any]:
        lab, model_pred = labels[rows], (probs[rows] > threshold).astype(np.int64)
        gold_a = np.stack([majority_vote(np.delete(lab, j, axis=1)) for j in range(n_readers)], axis=1)
        out = {"protocol_a": {
            "name": "Protocol A: each reader against the majority of the others",
            "gold_standard": (f"For each of the {n_readers} readers, the gold standard is the majority "
                              f"vote of the other {n_readers - 1} readers (ties: abnormal); that reader "
                              f"and the model are scored against it, and scores are averaged over "
                              f"the {n_readers} gold standards."),
            **_protocol(gold_a, lab, model_pred, names, groups=[f"without {r}" for r in names],
                        num_samples=num_samples, seed=seed),
        }}
        if subset_idx is not None:
            rest = [j for j in range(n_readers) if j not in subset_idx]
            gold_b = majority_vote(lab[:, subset_idx])
            out["protocol_b"] = {
                "name": "Protocol B: against the majority of a fixed panel",
                "gold_standard": (f"Gold standard: majority vote of {[names[j] for j in subset_idx]} "
                                  f"(ties: abnormal); the model and the other readers are scored "
                                  f"against it."),
                "gold_readers": [names[j] for j in subset_idx],
                **_protocol(np.repeat(gold_b[:, None], len(rest), axis=1), lab[:, rest], model_pred,
                            [names[j] for j in rest], groups=None, num_samples=num_samples, seed=seed),
            }
        return out

    result: dict[str, Any] = {"threshold": float(threshold), "readers": names, "seed": int(seed),
                              **run(np.arange(n), seed)}
    if study_types is not None:
        types = np.asarray(study_types, dtype=np.int64)
        if types.shape != (n,):
            raise ValueError(f"study_types must have shape ({n},), got {types.shape}")
        result["by_study_type"] = {
            study_type_name(t): run(np.flatnonzero(types == t), seed)
            for t in sorted(set(types.tolist()), key=lambda t: (t < 0, t))}
    return result


__all__ = [
    "STUDY_TYPES",
    "StudyPredictions",
    "aggregate_studies",
    "align_to_readers",
    "binary_metrics",
    "bootstrap_distribution",
    "bootstrap_indices",
    "bootstrap_metrics",
    "build_report",
    "compare_with_readers",
    "ensemble_probabilities",
    "majority_vote",
    "read_reader_labels",
    "study_type_index",
    "study_type_name",
    "write_outputs",
]


# ---- evaluating a trained run (murajax --mode=evaluate) ----------------------------------------


def evaluation_config(overrides, workdir: str | os.PathLike):
    """The run's saved config (``<workdir>/config.json``) with ``overrides`` on top.

    ``overrides`` maps dotted field names to values, e.g. ``{"eval.ensemble_top_k": 3}``: the
    command line passes the ``--config.<field>`` flags given explicitly, so a run trained with
    ``eval.ensemble_top_k=3`` evaluates with 3 unless that flag is given. Model fields cannot
    be overridden (the checkpoints hold the run's model). A ``ConfigDict`` (the Python API's
    older form) contributes its whole ``eval`` section and a non-empty ``data.root``.
    """
    import ml_collections

    from murajax import checkpoints

    config = checkpoints.load_run_config(workdir)
    if isinstance(overrides, ml_collections.ConfigDict):
        config.eval = overrides.eval
        if overrides.data.root:
            config.data.root = overrides.data.root
        return config
    saved = os.path.join(str(workdir), checkpoints.CONFIG_FILE)
    for field, value in (overrides or {}).items():
        *parents, leaf = field.split(".")
        if parents and parents[0] == "model":
            raise UserError(f"--config.{field}: evaluation uses the model the run was trained "
                            f"with ({saved}); model fields cannot be overridden")
        section = config
        for name in parents:
            section = section.get(name) if isinstance(section, ml_collections.ConfigDict) else None
        if not isinstance(section, ml_collections.ConfigDict) or leaf not in section:
            raise UserError(f"--config.{field}: no such field in the run's config ({saved})")
        try:
            section[leaf] = value
        except TypeError as e:
            raise UserError(f"--config.{field}={value!r}: {e}") from None
    return config


def predict_split(predictor, index, data_config, batch_size: int) -> np.ndarray:
    """Per-member probabilities ``[members, images]`` for every image of ``index``."""
    import jax

    from murajax.data import pipeline

    probabilities = np.full((len(predictor.variables), len(index.images)), np.nan, np.float32)
    for batch in pipeline.eval_loader(index, data_config, global_batch_size=batch_size):
        logits, _ = predictor.predict_logits(batch["image"])
        real = batch["mask"] > 0  # not padding, not an image skipped as unreadable
        probabilities[:, batch["index"][real]] = np.asarray(jax.nn.sigmoid(logits))[:, real]
    return probabilities


def evaluate_workdir(overrides, workdir: str | os.PathLike, readers: str = "") -> str:
    """Scores a run's best checkpoint (or top-k ensemble) on ``config.eval.split`` and writes
    ``<workdir>/eval/<split>/``: report.json, report.md, predictions.csv, roc.png,
    calibration.png. Returns that folder. The config is the run's own with ``overrides``
    (dotted field -> value, or None) applied: see ``evaluation_config``."""
    from absl import logging

    from murajax import inference
    from murajax.data import mura

    config = evaluation_config(overrides, workdir)
    top_k = int(config.eval.ensemble_top_k)
    if top_k < 1:
        raise UserError(f"config.eval.ensemble_top_k must be >= 1, got {top_k}")
    predictor = inference.Predictor.from_workdir(workdir, top_k=top_k,
                                                 batch_size=int(config.eval_batch_size))
    from murajax import checkpoints

    steps = checkpoints.best_steps(workdir, top_k)
    index = mura.index_from_config(config.data, config.eval.split)
    logging.info("evaluating checkpoints %s on %s: %d images in %d studies", steps,
                 config.eval.split, len(index.images), len(index.studies))
    members = predict_split(predictor, index, config.data, int(config.eval_batch_size))
    probabilities = ensemble_probabilities(list(members))
    scored = np.isfinite(probabilities)  # images skipped as unreadable have no probability
    records = [r for r, keep in zip(index.images, scored) if keep]
    studies = aggregate_studies(
        [r.study for r in records], probabilities[scored], np.array([r.label for r in records]),
        np.array([r.study_type for r in records]),
    )
    comparison = None
    readers = readers or config.eval.readers
    if readers:
        reader_studies, names, labels = read_reader_labels(readers)
        rows = align_to_readers(studies, reader_studies)
        gold = [g.strip() for g in str(config.eval.reader_gold).split(",") if g.strip()]
        comparison = compare_with_readers(
            studies.probability[rows], labels, reader_names=names,
            threshold=float(config.eval.threshold), num_samples=int(config.eval.bootstrap_samples),
            seed=int(config.seed), gold_subset=gold or None, study_types=studies.study_type[rows],
        )
    report = build_report(
        studies, float(config.eval.threshold), num_samples=int(config.eval.bootstrap_samples),
        seed=int(config.seed), checkpoints=[f"step {s}" for s in steps],
        reader_comparison=comparison,
    )
    out_dir = os.path.join(str(workdir), "eval", str(config.eval.split))
    write_outputs(out_dir, report, studies)
    aggregate = report["aggregate"]
    logging.info("%s: study AUROC %.4f, kappa %.4f over %d studies -> %s", config.eval.split,
                 aggregate["auroc"]["value"], aggregate["kappa"]["value"], len(studies), out_dir)
    return out_dir
