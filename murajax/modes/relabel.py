"""``murajax --mode=relabel``: new train labels where a trained run's ensemble is confident the
given ones are wrong.

``relabel_workdir(overrides, workdir)`` scores the train split with the run's best-k ensemble
(``modes.audit.score_split``; the run's config with ``overrides``, as ``--mode=evaluate``
takes them) and writes ``<workdir>/relabel/``:

* ``train_labeled_studies.csv``: the train split's study-label CSV the run read
  (``<root>/train_labeled_studies.csv``, or the run's ``config.data.labels_csv``), byte for
  byte (rows, order, path spelling, line endings) except the label of each flipped study;
* ``flips.csv``: ``study,study_type,given_label,new_label,probability``, one row per flipped
  study in the CSV's order; ``study`` as the CSV spells it (``MURA-v1.1/train/.../``).

The flip rule (``relabel_labels``), at ``c = config.relabel.confidence`` in (0.5, 1): a study
given 0 becomes 1 when its probability is >= c, one given 1 becomes 0 when it is <= 1 - c;
studies the run did not score (outside ``data.fraction`` / ``data.study_types``, or without
a label) keep theirs. Train on the new labels with ``--config.data.labels_csv=<that file>``
(the reader then accepts a changed label that disagrees with the study folder's suffix), e.g.
head-only from this run: ``--config.optim.trainable=head --config.init_from=<workdir>``.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import ml_collections
import numpy as np
from absl import logging

from murajax import evaluation
from murajax.data import mura
from murajax.errors import UserError
from murajax.modes.audit import score_split

FLIP_COLUMNS = ("study", "study_type", "given_label", "new_label", "probability")
DEFAULT_CONFIDENCE = 0.95  # configs/default.py's config.relabel.confidence
SPLIT = "train"


def check_confidence(confidence) -> float:
    """``config.relabel.confidence`` as a float in (0.5, 1); a UserError naming it otherwise."""
    try:
        value = float(confidence)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(confidence, bool) or not 0.5 < value < 1.0:
        raise UserError(f"config.relabel.confidence must be in (0.5, 1) (a label flips when the "
                        f"ensemble gives the other label at least this probability), got "
                        f"{confidence!r}")
    return value


def relabel_labels(labels, probabilities, confidence: float) -> np.ndarray:
    """The flip rule: ``labels`` (0/1; -1 unknown, kept) with 0 -> 1 where ``probabilities``
    >= ``confidence`` and 1 -> 0 where they are <= 1 - ``confidence``."""
    confidence = check_confidence(confidence)
    labels = np.asarray(labels, np.int64)
    probabilities = np.asarray(probabilities, np.float64)
    new = labels.copy()
    new[(labels == 0) & (probabilities >= confidence)] = 1
    new[(labels == 1) & (probabilities <= 1.0 - confidence)] = 0
    return new


def _take_relabel_overrides(overrides, workdir) -> tuple[object, float]:
    """(the other overrides, config.relabel.confidence): the run's saved value (configs older
    than the field: the default) unless ``overrides`` give ``relabel.confidence``."""
    if isinstance(overrides, ml_collections.ConfigDict):
        section = overrides.get("relabel")
        return overrides, section.confidence if section is not None else DEFAULT_CONFIDENCE
    others, confidence = {}, None
    for field, value in (overrides or {}).items():
        if field == "relabel.confidence":
            confidence = value
        elif field.startswith("relabel."):
            raise UserError(f"--config.{field}: no such field (config.relabel has confidence)")
        else:
            others[field] = value
    if confidence is None:
        from murajax import checkpoints

        section = checkpoints.load_run_config(workdir).get("relabel")
        confidence = section.get("confidence", DEFAULT_CONFIDENCE) if section else DEFAULT_CONFIDENCE
    return others, confidence


def _study_id(path_field: str) -> str:
    """A study row's path as the reader's study id: its last four components
    (``train/XR_WRIST/patient00001/study1_positive``; the reader checked the depth)."""
    parts = [p for p in path_field.replace("\\", "/").strip().strip("/").split("/")
             if p not in ("", ".")]
    return "/".join(parts[-4:])


def rewrite_labels(source: Path, new_labels: dict[str, int]) -> tuple[str, list[tuple[str, str]]]:
    """The text of ``source`` (a MURA study-label CSV) with the label of every row whose study
    id is in ``new_labels`` replaced, and (path field, old label field) of each changed row;
    every other byte is kept."""
    text = source.read_text(encoding="utf-8")
    out, changed = [], []
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\r\n")
        ending = line[len(body):]
        fields = next(csv.reader([body.lstrip("\ufeff")]), []) if body.strip() else []
        if len(fields) == 2 and _study_id(fields[0]) in new_labels:
            label = str(new_labels[_study_id(fields[0])])
            if fields[1].strip() != label:
                changed.append((fields[0].strip(), fields[1].strip()))
                line = body[:body.rindex(",") + 1] + label + ending
        out.append(line)
    return "".join(out), changed


def relabel_workdir(overrides, workdir: str | os.PathLike) -> Path:
    """Writes ``<workdir>/relabel/train_labeled_studies.csv`` and ``flips.csv`` (see the module
    docstring); returns that folder. Raises UserError for a confidence outside (0.5, 1)."""
    overrides, confidence = _take_relabel_overrides(overrides, workdir)
    confidence = check_confidence(confidence)  # before any checkpoint is loaded
    scored = score_split(overrides, workdir, split=SPLIT)
    studies = scored.studies
    new = relabel_labels(studies.label, studies.probability, confidence)
    flipped = np.flatnonzero(new != studies.label)
    flips = {studies.study[i]: int(new[i]) for i in flipped}
    source = mura.study_labels_file(scored.config.data, SPLIT)
    text, changed = rewrite_labels(source, flips)
    rewritten = {_study_id(path) for path, _ in changed}
    if rewritten != set(flips):
        missing = sorted(set(flips) - rewritten)[:3]
        raise UserError(f"{source}: no row for the flipped studies {missing}; was the CSV "
                        "changed since the run read it?")
    out_dir = Path(workdir) / "relabel"
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / f"{SPLIT}_labeled_studies.csv", "w", encoding="utf-8", newline="") as f:
        f.write(text)
    row = {s: i for i, s in enumerate(studies.study)}
    with open(out_dir / "flips.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(FLIP_COLUMNS)
        seen = set()
        for path, _ in changed:
            study = _study_id(path)
            if study in seen:  # a duplicated row: one diff line
                continue
            seen.add(study)
            i = row[study]
            writer.writerow([path, evaluation.study_type_name(int(studies.study_type[i])),
                             int(studies.label[i]), int(new[i]), f"{studies.probability[i]:.6f}"])
    to_abnormal = int(np.sum(new[flipped] == 1))
    logging.info("relabel at confidence %.3f: %d of %d scored train studies flipped (%d 0 -> 1, "
                 "%d 1 -> 0) -> %s", confidence, len(flipped), len(studies), to_abnormal,
                 len(flipped) - to_abnormal, out_dir)
    return out_dir
