"""Studies: per-image probabilities -> one prediction per study (the mean of its views).

Owns ``StudyPredictions``, the aggregation of views into studies (``aggregate_studies``, and
``score_studies``, the one place that turns a model's per-image probabilities into study
predictions: train's validation, ``--mode=evaluate`` and prediction all call it), the
ensemble's mean over members, study type names, and the input checks every evaluation
function shares. numpy only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

# The seven study types; an index into this tuple is an integer study type (-1: unknown).
from murajax.data.mura import STUDY_TYPES, study_type_from_path

UNKNOWN_STUDY_TYPE = "unknown"


@dataclasses.dataclass
class StudyPredictions:
    """One row per study, in first-appearance order of the per-image inputs."""

    study: list[str]
    study_type: np.ndarray  # int, index into STUDY_TYPES, -1 unknown
    label: np.ndarray  # int, 0 normal / 1 abnormal / -1 unknown
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


def study_type_name(index: int) -> str:
    """The STUDY_TYPES name of an integer study type; "unknown" for -1 (or out of range)."""
    return STUDY_TYPES[index] if 0 <= index < len(STUDY_TYPES) else UNKNOWN_STUDY_TYPE


def _as_study_type_indices(study_types: Any, study_ids: Sequence[str]) -> np.ndarray:
    if study_types is None:
        return np.array([study_type_from_path(s) for s in study_ids], dtype=np.int64)
    arr = np.asarray(study_types)
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64)
    if arr.dtype.kind in "UOS":
        return np.array([study_type_from_path(str(s)) for s in arr], dtype=np.int64)
    raise ValueError(f"study_types must be integers or names, got dtype {arr.dtype}")


def check_labels(labels: Any, name: str = "labels", allow_unknown: bool = False) -> np.ndarray:
    """``labels`` as int64, 1-D, every value 0 or 1 (or -1 with ``allow_unknown``); ValueError
    otherwise."""
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


def check_probabilities(probabilities: Any, n: int, name: str = "probabilities") -> np.ndarray:
    """``probabilities`` as float64 of shape (n,), all finite; ValueError otherwise."""
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
    infers it from the study id (``mura.study_type_from_path``: the last ``XR_*`` component).
    Labels are 0/1, or -1 for unlabelled studies (kept for predictions.csv; ``build_report``
    needs labels). A study's views must agree on the label and the study type (ValueError
    otherwise). Studies come out in the order in which they first appear.
    """
    ids = [str(s) for s in study_ids]
    n = len(ids)
    labels_arr = check_labels(labels, allow_unknown=True)
    if labels_arr.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {labels_arr.shape}")
    probs = check_probabilities(probabilities, n)
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


def _record_study_type(record: Any) -> int:
    study_type = getattr(record, "study_type", None)
    if study_type is None:
        return study_type_from_path(str(record.study))
    if isinstance(study_type, (int, np.integer)):
        return int(study_type)
    return study_type_from_path(str(study_type))


def score_studies(records: Sequence[Any], probabilities: np.ndarray) -> StudyPredictions:
    """A model's per-image probabilities -> its study predictions: the study-level scoring.

    ``records`` are the images, e.g. ``MuraIndex.images`` (``mura.ImageRecord``): anything
    with ``.study`` (the study id), and ``.label`` (0/1, -1 unknown; missing: -1) and
    ``.study_type`` (an index into STUDY_TYPES or a type name; missing or None: taken from the
    study id) where known. ``probabilities`` holds one probability per record; NaN marks an
    image without one (skipped as unreadable), which is left out. A study's probability is the
    mean of its scored views (``aggregate_studies``); a study without any scored view is absent.
    """
    probs = np.asarray(probabilities, dtype=np.float64)
    if probs.shape != (len(records),):
        raise ValueError(f"probabilities must have shape ({len(records)},), got {probs.shape}")
    scored = np.isfinite(probs)  # images skipped as unreadable have no probability
    kept = [r for r, keep in zip(records, scored) if keep]
    return aggregate_studies(
        [r.study for r in kept], probs[scored],
        np.array([getattr(r, "label", -1) for r in kept], dtype=np.int64),
        np.array([_record_study_type(r) for r in kept], dtype=np.int64),
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
