"""CheXpert (Irvin et al., AAAI 2019): its folder and CSVs, read into image records.

This module owns CheXpert's file format. The folder (``CheXpert-v1.0`` or
``CheXpert-v1.0-small``) holds ``train.csv`` and ``valid.csv``, one row per image::

    Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,...,Support Devices
    CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,Female,68,Frontal,AP,1.0,,...

Paths start with the folder's name and resolve from the folder that contains it; a study is an
image's folder (``train/patient00001/study1``). Each of the 14 observations (``OBSERVATIONS``) is
1.0 (positive), 0.0 (negative), -1.0 (uncertain: the report-mining labeller could not decide) or
blank (not mentioned), read as ``None``: what a blank or an uncertain label means is a training
policy (U-Ignore, U-Zeros, U-Ones, ...: ``../shared/RESEARCH.md``), decided by a task, not here.
Today the image cache (``murajax.data.cache``) reads CheXpert folders with it; a multi-label
CheXpert task builds its index on the same records.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

from murajax.data import mura
from murajax.errors import UserError

SPLITS = ("train", "valid")
CSV_FILES = ("train.csv", "valid.csv")
METADATA = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA")
OBSERVATIONS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Pleural Other", "Fracture", "Support Devices",
)
_LABELS = {"1.0": 1.0, "1": 1.0, "0.0": 0.0, "0": 0.0, "-1.0": -1.0, "-1": -1.0, "": None}


@dataclasses.dataclass(frozen=True)
class ChexpertImage:
    """One row of a split CSV: ``path`` the image file; ``key`` its path relative to the
    CheXpert folder (``train/patient00001/study1/view1_frontal.jpg``); ``csv_path`` as the CSV
    spells it; ``labels`` one value per ``OBSERVATIONS`` (1.0, 0.0, -1.0 or None); ``age`` None
    when blank; ``view`` 'Frontal' or 'Lateral'; ``projection`` 'AP', 'PA', ... or ''."""

    path: str
    key: str
    csv_path: str
    study: str
    labels: tuple[float | None, ...]
    sex: str
    age: int | None
    view: str
    projection: str


def is_folder(path) -> bool:
    """Whether ``path`` is a CheXpert folder: it holds a ``train.csv`` whose header starts with
    ``Path``."""
    csv_file = pathlib.Path(path) / CSV_FILES[0]
    if not csv_file.is_file():
        return False
    with open(csv_file, encoding="utf-8-sig", errors="replace") as f:
        return f.readline().startswith("Path,")


def _header_error(header: list[str]) -> str | None:
    expected = list(METADATA + OBSERVATIONS)
    if header == expected:
        return None
    missing = [c for c in expected if c not in header]
    if missing:
        return f"its header lacks the column(s) {', '.join(missing)}"
    return "its columns are not in CheXpert's order (" + ",".join(expected) + ")"


def _parse_label(where: str, column: str, value: str) -> float | None:
    if value not in _LABELS:
        raise UserError(f"{where}: column {column!r} is {value!r}; CheXpert labels are 1.0, "
                        "0.0, -1.0 (uncertain) or blank. Restore the row from the download.")
    return _LABELS[value]


def _parse_age(where: str, value: str) -> int | None:
    if not value:
        return None
    try:
        return int(float(value))
    except ValueError:
        raise UserError(f"{where}: column 'Age' is {value!r}, not a number. Restore the row "
                        "from the download.") from None


def _key(where: str, path_field: str, split: str) -> str:
    """The path relative to the CheXpert folder: the CSV's path without its first component
    (the folder's name as downloaded, whatever the folder is called now)."""
    parts = pathlib.PurePosixPath(path_field.replace("\\", "/")).parts
    if parts and parts[0] not in SPLITS:
        parts = parts[1:]
    if len(parts) != 4 or parts[0] != split:
        raise UserError(f"{where}: path {path_field!r} is not of the form "
                        f"CheXpert-v1.0/{split}/<patient>/<study>/<image>. Restore the row from "
                        "the download.")
    return "/".join(parts)


def read_split(root, split: str, *, on_missing: str = "error") -> tuple[list[ChexpertImage], int]:
    """The images ``<root>/<split>.csv`` lists, in row order, and how many listed images were
    missing and skipped (``on_missing='skip'``; 'error' raises a UserError naming the first).
    A CSV of another shape is a UserError naming the file, the line and what is wrong."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    on_missing = mura.check_on_missing(on_missing, "on_missing")
    root = pathlib.Path(root)
    csv_file = root / f"{split}.csv"
    if not csv_file.is_file():
        raise UserError(f"{csv_file}: file missing. A CheXpert folder holds train.csv and "
                        "valid.csv; restore it from the download.")
    rows = mura.read_csv_rows(csv_file, download="CheXpert")
    if not rows:
        raise UserError(f"{csv_file}: empty; it needs CheXpert's header and one row per image")
    header_line, header = rows[0]
    problem = _header_error(header)
    if problem:
        raise UserError(f"{csv_file}, line {header_line}: {problem}. Restore it from the "
                        "download.")
    images, skipped = [], 0
    for line, fields in rows[1:]:
        where = f"{csv_file}, line {line}"
        if len(fields) != len(header):
            raise UserError(f"{where}: {len(fields)} fields, the header has {len(header)}. "
                            "Restore the row from the download.")
        key = _key(where, fields[0], split)
        path = root / key
        if not path.is_file():
            if on_missing == "error":
                raise UserError(f"{where}: image {path} missing. Restore it, remove the row, "
                                "or set on_missing to 'skip' (--on_missing=skip).")
            skipped += 1
            continue
        labels = tuple(_parse_label(where, column, value) for column, value in
                       zip(OBSERVATIONS, fields[len(METADATA):]))
        images.append(ChexpertImage(
            path=os.fspath(path), key=key, csv_path=fields[0],
            study=key.rsplit("/", 1)[0], labels=labels, sex=fields[1],
            age=_parse_age(where, fields[2]), view=fields[3], projection=fields[4]))
    return images, skipped
