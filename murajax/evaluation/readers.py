"""Radiologists: reader labels and the paper's reader-comparison protocols.

Owns reading the per-study reader labels CSV (``read_reader_labels``), matching its study ids
to the model's studies (``align_to_readers``), majority-vote gold standards (``majority_vote``)
and ``compare_with_readers``: F1 and Cohen's kappa of each reader and of the model against
gold standards (protocol A: each reader against the majority of the others; protocol B: against
a fixed panel), every number with a bootstrap CI over resampled studies; a difference is
significant when its CI excludes 0. numpy only.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from murajax.errors import UserError
from murajax.evaluation.metrics import (bootstrap_weights, confusion_counts, estimate,
                                        rates_from_counts)
from murajax.evaluation.studies import StudyPredictions, check_probabilities, study_type_name


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
    values = rates_from_counts(*confusion_counts(weights, truth, pred))
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
    dists: list[dict] = [summarise(w) for w in bootstrap_weights(n, num_samples, seed)] if n else []

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
            "readers": {r: estimate(p["readers"][0, j], cat(metric, "readers")[:, j])
                        for j, r in enumerate(readers)},
            "readers_mean": estimate(p["readers_mean"][0], cat(metric, "readers_mean")),
            "model": estimate(p["model"][0], cat(metric, "model")),
            "model_minus_readers_mean": significant(estimate(
                p["model_minus_readers_mean"][0], cat(metric, "model_minus_readers_mean"))),
            "model_minus_reader": {r: significant(estimate(
                p["model_minus_reader"][0, j], cat(metric, "model_minus_reader")[:, j]))
                for j, r in enumerate(readers)},
        }
        if groups is not None:
            m["model_by_gold"] = {g: estimate(p["model_by_gold"][0, j], cat(metric, "model_by_gold")[:, j])
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
    probs = check_probabilities(model_probabilities, n, "model_probabilities")
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
