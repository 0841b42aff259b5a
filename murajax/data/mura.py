"""Reading MURA: the CSVs of MURA-v1.1 into an index of images; the study type a path names
(``study_type_from_path``, the one rule for it). Folders of new images: ``murajax.data.files``.

MURA-v1.1 layout (see docs / MURA.md)::

    MURA-v1.1/
      train_image_paths.csv      # MURA-v1.1/train/XR_WRIST/patient00001/study1_positive/image1.png
      train_labeled_studies.csv  # "MURA-v1.1/train/XR_WRIST/patient00001/study1_positive/,1"
      valid_image_paths.csv
      valid_labeled_studies.csv
      train/XR_WRIST/patient00001/study1_positive/image1.png

The file list comes from the CSVs, never from listing folders. Every problem with the files
raises ``UserError`` naming the file and row and saying how to fix it; listed images that are
missing on disk may instead be skipped (``on_missing='skip'``), and skips are counted in
``MuraIndex.skipped`` and logged.

Study ids are the study folder relative to the MURA-v1.1 folder, without the trailing slash:
``"valid/XR_WRIST/patient11185/study1_positive"``.

This module owns the index (``ImageRecord``, ``MuraIndex``), reading it from MURA-v1.1's CSVs
(``read_split``: the split's files, then its study rows, then its image rows, each a small
function) or from folders (``read_folder``), the subset options (study types, fraction) and
the per-type class weights.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import math
import os
import pathlib
import re
from typing import Iterable, Sequence

import numpy as np
from absl import logging

from murajax.errors import UserError

STUDY_TYPES = (
    "XR_ELBOW",
    "XR_FINGER",
    "XR_FOREARM",
    "XR_HAND",
    "XR_HUMERUS",
    "XR_SHOULDER",
    "XR_WRIST",
)
NUM_STUDY_TYPES = len(STUDY_TYPES)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")
ON_MISSING = ("error", "skip")
_MAX_LOGGED_SKIPS = 10
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    path: str  # absolute path of the image file
    study: str  # study id, e.g. "valid/XR_WRIST/patient11185/study1_positive"
    study_type: int  # index into STUDY_TYPES, -1 if unknown
    patient: str
    label: int  # 1 abnormal, 0 normal, -1 unknown (unlabeled test-style studies)


@dataclasses.dataclass
class MuraIndex:
    """The images of one split, in file-list order, and their studies."""

    images: list[ImageRecord]
    studies: list[str]  # study ids in first-appearance order
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)  # reason -> count

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_images(self) -> int:
        return len(self.images)

    @property
    def num_studies(self) -> int:
        return len(self.studies)

    def _study_map(self) -> dict[str, list[int]]:
        cache = self.__dict__.get("_views_cache")
        if cache is None or cache[0] != len(self.images):
            views: dict[str, list[int]] = collections.defaultdict(list)
            for i, record in enumerate(self.images):
                views[record.study].append(i)
            cache = (len(self.images), dict(views))
            self.__dict__["_views_cache"] = cache
        return cache[1]

    def views(self, study: str) -> list[int]:
        """Positions in ``images`` of the views of ``study``, in file-list order."""
        try:
            return list(self._study_map()[study])
        except KeyError:
            raise KeyError(f"study {study!r} is not in this index") from None

    def study_of_image(self) -> np.ndarray:
        """int32 [num_images]: position in ``studies`` of each image's study."""
        position = {s: i for i, s in enumerate(self.studies)}
        return np.asarray([position[r.study] for r in self.images], dtype=np.int32)

    def labels(self) -> np.ndarray:
        """int32 [num_images]: each image's (study's) label."""
        return np.asarray([r.label for r in self.images], dtype=np.int32)

    def study_types(self) -> np.ndarray:
        """int32 [num_images]: each image's study type (index into STUDY_TYPES, -1 unknown)."""
        return np.asarray([r.study_type for r in self.images], dtype=np.int32)

    def study_labels(self) -> np.ndarray:
        """int32 [num_studies]: the label of each study, in ``studies`` order."""
        first = {}
        for r in self.images:
            first.setdefault(r.study, r.label)
        return np.asarray([first[s] for s in self.studies], dtype=np.int32)

    def study_study_types(self) -> np.ndarray:
        """int32 [num_studies]: the study type of each study, in ``studies`` order."""
        first = {}
        for r in self.images:
            first.setdefault(r.study, r.study_type)
        return np.asarray([first[s] for s in self.studies], dtype=np.int32)

    def counts(self) -> dict[str, dict[str, int]]:
        """Per study type: images and studies, abnormal and normal (for logs and reports)."""
        out: dict[str, dict[str, int]] = {}
        seen_studies = set()
        for r in self.images:
            name = STUDY_TYPES[r.study_type] if r.study_type >= 0 else "unknown"
            c = out.setdefault(
                name,
                {"images_abnormal": 0, "images_normal": 0, "images_unlabeled": 0,
                 "studies_abnormal": 0, "studies_normal": 0, "studies_unlabeled": 0},
            )
            kind = {1: "abnormal", 0: "normal"}.get(r.label, "unlabeled")
            c["images_" + kind] += 1
            if r.study not in seen_studies:
                seen_studies.add(r.study)
                c["studies_" + kind] += 1
        return out

    def subset(self, studies: Iterable[str]) -> "MuraIndex":
        """The images of the given studies (order of this index kept)."""
        keep = set(studies)
        images = [r for r in self.images if r.study in keep]
        return MuraIndex(
            images=images,
            studies=[s for s in self.studies if s in keep],
            skipped=dict(self.skipped),
        )


def index_from_records(records: Sequence[ImageRecord], skipped=None) -> MuraIndex:
    """A ``MuraIndex`` from in-memory records (studies in first-appearance order)."""
    studies = list(dict.fromkeys(r.study for r in records))
    return MuraIndex(images=list(records), studies=studies, skipped=dict(skipped or {}))


# ------------------------------------------------------------------------------------------
# Options.


def parse_study_types(study_types, field: str = "config.data.study_types") -> tuple[int, ...]:
    """Study types (a comma-separated string, or a sequence of names or STUDY_TYPES indices) ->
    sorted STUDY_TYPES indices.

    Accepts "XR_WRIST", "wrist", "xr_wrist", 6. Empty: all types (returns ()).
    """
    if study_types is None:
        return ()
    if isinstance(study_types, str):
        names = [s.strip() for s in study_types.split(",")]
    else:
        names = [str(s).strip() for s in study_types]
    names = [n for n in names if n]
    out = set()
    if not isinstance(study_types, str):
        for value in study_types:
            if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
                if not 0 <= value < NUM_STUDY_TYPES:
                    raise UserError(f"{field}: study type index {value} is not in 0..6 "
                                    f"({', '.join(STUDY_TYPES)}).")
                out.add(int(value))
        names = [n for n, v in zip(names, study_types) if not isinstance(v, (int, np.integer))]
    for name in names:
        key = name.upper()
        if not key.startswith("XR_"):
            key = "XR_" + key
        if key not in STUDY_TYPES:
            raise UserError(
                f"{field}: unknown study type {name!r}. Use a comma-separated subset of "
                f"{', '.join(STUDY_TYPES)} (e.g. --{field}=XR_WRIST,XR_HAND), or leave it "
                "empty for all."
            )
        out.add(STUDY_TYPES.index(key))
    return tuple(sorted(out))


def _check_fraction(fraction, field="config.data.fraction") -> float:
    try:
        value = float(fraction)
    except (TypeError, ValueError):
        raise UserError(f"{field} must be a number in (0, 1], got {fraction!r}") from None
    if not (0.0 < value <= 1.0) or math.isnan(value):
        raise UserError(f"{field} must be in (0, 1] (1 = all studies), got {fraction!r}")
    return value


def check_on_missing(on_missing, field="config.data.on_missing") -> str:
    """``on_missing`` ('error': a listed image without its file fails the run; 'skip': it is
    left out and counted); a UserError naming ``field`` otherwise."""
    if on_missing not in ON_MISSING:
        raise UserError(f"{field} must be 'error' or 'skip', got {on_missing!r}")
    return on_missing


def select_fraction(index: MuraIndex, fraction: float, seed: int = 0) -> MuraIndex:
    """A deterministic subset of whole studies: ceil(fraction * num_studies), at least 1."""
    fraction = _check_fraction(fraction)
    if fraction >= 1.0 or not index.studies:
        return index
    n = len(index.studies)
    keep_n = max(1, int(math.ceil(fraction * n - 1e-9)))
    rng = np.random.default_rng([int(seed), 0x6D757261])
    chosen = rng.permutation(n)[:keep_n]
    return index.subset(index.studies[i] for i in chosen)


def _filter_types(index: MuraIndex, types: tuple[int, ...]) -> MuraIndex:
    if not types:
        return index
    keep = set(types)
    return index.subset(dict.fromkeys(r.study for r in index.images if r.study_type in keep))


# ------------------------------------------------------------------------------------------
# MURA-v1.1 CSVs.


def _label_from_suffix(folder_name: str) -> int:
    if folder_name.endswith("_positive"):
        return 1
    if folder_name.endswith("_negative"):
        return 0
    return -1


def read_csv_rows(path: pathlib.Path, download: str = "MURA-v1.1") -> list[tuple[int, list[str]]]:
    """(1-based row number, fields) for the non-blank rows of a CSV file (``download``: the
    dataset whose download a bad file is restored from, for the message)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = []
            for row_number, row in enumerate(csv.reader(f), start=1):
                if not row or all(not field.strip() for field in row):
                    continue
                rows.append((row_number, [field.strip() for field in row]))
            return rows
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path}: not a text CSV file ({e}). Restore it from the {download} download."
        ) from None
    except csv.Error as e:
        raise UserError(f"{path}: malformed CSV ({e}). Restore it from the {download} download.")


def _row_path(where: str, fields: list[str], root: pathlib.Path, split: str, *, row_form: str,
              kind: str, path_form: str, depth: int, alias: str = "") -> tuple[str, list[str]]:
    """The row's path relative to the MURA folder and its ``depth`` components (split, study
    type, patient, study[, image]), after checking the row has the columns ``row_form``
    describes (an image row one, a study row a second for its label) and the path the shape of
    ``path_form``."""
    columns = 1 if kind == "image" else 2
    if len(fields) != columns:
        raise UserError(f"{where}: malformed row {','.join(fields)!r}: expected {row_form}. "
                        "Fix or remove the row.")
    rel = relative_path(fields[0], root, alias)
    parts = rel.split("/") if rel else []
    if rel is None or len(parts) != depth or parts[0] != split:
        raise UserError(f"{where}: malformed {kind} path {fields[0]!r}: expected "
                        f"'{path_form}'. Fix or remove the row.")
    return rel, parts


def _check_study_type(where: str, parts: list[str], path_field: str) -> None:
    if parts[1] not in STUDY_TYPES:
        raise UserError(
            f"{where}: unknown study type {parts[1]!r} in {path_field!r}; MURA study types are "
            f"{', '.join(STUDY_TYPES)}. Fix the path or remove the row."
        )


def relative_path(path_field: str, root: pathlib.Path, alias: str = "") -> str | None:
    """A CSV path ("MURA-v1.1/train/...") relative to the MURA-v1.1 folder, or None if it is
    not of that form. The first component may be MURA-v1.1 or the actual folder name (``alias``
    when given: the name of the folder the CSVs were copied from)."""
    p = path_field.replace("\\", "/").strip().strip("/")
    parts = [x for x in p.split("/") if x not in ("", ".")]
    if len(parts) < 2 or ".." in parts:
        return None
    if parts[0] in ("MURA-v1.1", alias or root.name) or parts[0].upper().startswith("MURA"):
        parts = parts[1:]
    return "/".join(parts)


class _Skips:
    """The rows ``read_split`` skips, counted by reason; the first few are logged."""

    def __init__(self):
        self.counts: collections.Counter = collections.Counter()
        self._logged = 0

    def __call__(self, reason: str, message: str) -> None:
        self.counts[reason] += 1
        if self._logged < _MAX_LOGGED_SKIPS:
            logging.warning("Skipping %s", message)
            self._logged += 1


@dataclasses.dataclass(frozen=True)
class _SplitFiles:
    """The two CSVs of one split, checked to exist with the split's image folder. ``available``:
    the images (paths relative to the MURA folder) that exist, when not the files under ``root``
    (an image cache's keys; ``root`` then holds copies of the CSVs only), and ``alias`` the name
    of the folder they were copied from."""

    root: pathlib.Path
    split: str
    images_csv: pathlib.Path
    studies_csv: pathlib.Path
    available: frozenset[str] | None = None
    alias: str = ""


def _split_files(root, split: str, available=None, alias: str = "") -> _SplitFiles:
    if not isinstance(split, str) or not _SPLIT_RE.match(split):
        raise UserError(f"split must be a name such as 'train' or 'valid', got {split!r}")
    root = resolve_root(root)
    files = _SplitFiles(root, split, root / f"{split}_image_paths.csv",
                        root / f"{split}_labeled_studies.csv",
                        None if available is None else frozenset(available), alias)
    for csv_path in (files.studies_csv, files.images_csv):
        if not csv_path.is_file():
            raise UserError(
                f"{csv_path}: CSV file missing. config.data.root must be the MURA-v1.1 folder "
                f"holding {split}_image_paths.csv and {split}_labeled_studies.csv; re-extract "
                "the MURA-v1.1 download there or point --config.data.root at the right folder."
            )
    split_dir = root / split
    if available is None and not split_dir.is_dir():
        raise UserError(
            f"{split_dir}: folder missing (the images of the {split!r} split). Extract the "
            "complete MURA-v1.1 download into config.data.root."
        )
    return files


def _study_label(where: str, fields: list[str], parts: list[str],
                 given: int | None = None) -> int:
    """The label of a study row, checked against the study folder's name; -1 for a study
    without a label (an empty label or -1: its folder's suffix is not a label then)."""
    if fields[1].strip() not in ("0", "1", "", "-1"):
        raise UserError(
            f"{where}: malformed label {fields[1]!r} for {fields[0]!r}: expected 0 (normal), "
            "1 (abnormal), or empty or -1 (no label). Fix or remove the row."
        )
    _check_study_type(where, parts, fields[0])
    if fields[1].strip() in ("", "-1"):
        return -1
    label = int(fields[1])
    suffix_label = _label_from_suffix(parts[3])
    # given: the root's label of a study a config.data.labels_csv relabels; a label that file
    # changes may disagree with the folder's suffix (which still spells the old label).
    relabelled = given is not None and given != label
    if suffix_label >= 0 and suffix_label != label and not relabelled:
        raise UserError(
            f"{where}: label {label} disagrees with the folder name {parts[3]!r} "
            f"(_positive means 1, _negative means 0). Correct the label or the folder name."
        )
    return label


def _read_studies(files: _SplitFiles, skip: _Skips, given: dict[str, int] | None = None,
                  ) -> tuple[dict[str, int], dict[str, int]]:
    """Study rows ("<study dir>/,<label>"): (study id -> label, study id -> CSV row number).
    ``given``: the root's labels when ``files.studies_csv`` is a ``config.data.labels_csv``."""
    split = files.split
    study_label: dict[str, int] = {}
    study_row: dict[str, int] = {}
    for row_number, fields in read_csv_rows(files.studies_csv):
        where = f"{files.studies_csv}, row {row_number}"
        rel, parts = _row_path(
            where, fields, files.root, split, alias=files.alias,
            row_form="'<study folder>/,<label>' (e.g. "
                     f"'MURA-v1.1/{split}/XR_WRIST/patient00001/study1_positive/,1')",
            kind="study", path_form=f"MURA-v1.1/{split}/<study type>/<patient>/<study>/",
            depth=4,
        )
        label = _study_label(where, fields, parts, None if given is None else given.get(rel))
        if rel in study_label:
            if study_label[rel] != label:
                raise UserError(
                    f"{where}: study {fields[0]!r} is listed again with label {label}, but row "
                    f"{study_row[rel]} gives {study_label[rel]}. Keep one row."
                )
            skip("duplicate study row", f"{where}: duplicate of row {study_row[rel]}")
            continue
        study_label[rel] = label
        study_row[rel] = row_number
    return study_label, study_row


def _read_images(files: _SplitFiles, study_label: dict[str, int], on_missing: str,
                 skip: _Skips, unlabeled: bool = False) -> list[ImageRecord]:
    """Image rows (one path a row) of listed studies, in file order, duplicates and (with
    ``on_missing='skip'``) missing files skipped. ``unlabeled``: ``files.images_csv`` lists
    extra images whose studies have no label and no study rows."""
    split, images_csv, studies_csv = files.split, files.images_csv, files.studies_csv
    records: list[ImageRecord] = []
    seen_images: dict[str, int] = {}
    dir_cache: dict[str, set[str] | None] = {}
    for row_number, fields in read_csv_rows(images_csv):
        where = f"{images_csv}, row {row_number}"
        rel, parts = _row_path(
            where, fields, files.root, split, alias=files.alias,
            row_form="one image path such as "
                     f"'MURA-v1.1/{split}/XR_WRIST/patient00001/study1_positive/image1.png'",
            kind="image", depth=5,
            path_form=f"MURA-v1.1/{split}/<study type>/<patient>/<study>/<image>.png",
        )
        _check_study_type(where, parts, fields[0])
        study = "/".join(parts[:4])
        if unlabeled:
            if study_label.get(study, -1) != -1:
                raise UserError(
                    f"{where}: image {fields[0]!r} belongs to study '{study}/', which "
                    f"{studies_csv.name} labels: list only unlabelled studies in {images_csv}."
                )
            study_label[study] = -1
        elif study not in study_label:
            raise UserError(
                f"{where}: image {fields[0]!r} belongs to study '{study}/', which "
                f"{studies_csv.name} does not list. Add the study with its label to "
                f"{studies_csv} or remove the row."
            )
        if rel in seen_images:
            skip("duplicate image row", f"{where}: duplicate of row {seen_images[rel]}")
            continue
        seen_images[rel] = row_number
        path = files.root / rel
        if files.available is not None and rel not in files.available:
            if on_missing == "error":
                raise UserError(
                    f"{where}: image {fields[0]!r} is listed but not in the image cache (its "
                    "build left it out as missing). Set --config.data.root to the MURA-v1.1 "
                    "folder holding it, remove the row, or set --config.data.on_missing=skip "
                    "to skip missing images."
                )
            skip("missing image", f"{where}: image {fields[0]!r} not in the image cache")
            continue
        if files.available is None and not _exists(path, dir_cache):
            if on_missing == "error":
                raise UserError(
                    f"{where}: image {fields[0]!r} is listed but missing: {path}. Restore the "
                    f"file, remove the row from {images_csv.name}, or set "
                    "--config.data.on_missing=skip to skip missing images."
                )
            skip("missing image", f"{where}: missing image {path}")
            continue
        records.append(
            ImageRecord(
                path=str(path),
                study=study,
                study_type=STUDY_TYPES.index(parts[1]),
                patient=parts[2],
                label=study_label[study],
            )
        )
    return records


def _skip_studies_without_images(files: _SplitFiles, study_row: dict[str, int],
                                 records: list[ImageRecord], skip: _Skips) -> None:
    with_images = set(r.study for r in records)
    for study in study_row:
        if study not in with_images:
            skip("study without images", f"{files.studies_csv}, row {study_row[study]}: study "
                 f"'{study}/' has no (existing) images in {files.images_csv.name}")


def read_split(
    root,
    split: str,
    *,
    study_types=(),
    fraction: float = 1.0,
    on_missing: str = "error",
    seed: int = 0,
    unlabeled_csv: str = "",
    labels_csv: str = "",
    available=None,
    alias: str = "",
) -> MuraIndex:
    """Reads one split of MURA-v1.1 from its two CSVs.

    Args:
      root: the MURA-v1.1 folder (the one holding ``train_image_paths.csv``).
      split: "train" or "valid" (any name with ``{split}_image_paths.csv`` and
        ``{split}_labeled_studies.csv`` works).
      study_types: names (comma-separated string or sequence) to keep; empty: all.
      fraction: keep this fraction of whole studies (deterministic from ``seed``).
      on_missing: an image listed in the CSV but absent on disk: 'error' raises, 'skip' counts
        it in ``skipped`` and logs it.
      seed: seed of the fraction subset.
      unlabeled_csv: a CSV of extra images of this split without labels, one MURA path a row
        as in ``{split}_image_paths.csv`` (absolute, or relative to ``root``); label -1.
      labels_csv: a CSV in the format of ``{split}_labeled_studies.csv`` (e.g. written by
        ``--mode=relabel``) whose labels replace it; absolute, or relative to the current
        folder. A study whose label it changes may disagree with its folder's suffix.
      available: the images that exist (paths relative to the MURA folder, e.g. an image
        cache's keys), checked instead of the files; ``root`` then needs only the CSVs.
      alias: the name of the folder the CSVs at ``root`` were copied from (``relative_path``).
    """
    on_missing = check_on_missing(on_missing)
    types = parse_study_types(study_types)
    fraction = _check_fraction(fraction)
    files = _split_files(root, split, available, alias)
    skip = _Skips()
    given = None
    if labels_csv:  # the study labels from that file; the root's CSV is still read and checked
        given, _ = _read_studies(files, _Skips())
        files = dataclasses.replace(files, studies_csv=labels_csv_path(labels_csv))
    study_label, study_row = _read_studies(files, skip, given)
    records = _read_images(files, study_label, on_missing, skip)
    _skip_studies_without_images(files, study_row, records, skip)
    if unlabeled_csv:
        extra = files.root / unlabeled_csv
        if not extra.is_file():
            raise UserError(f"config.data.unlabeled_csv: {extra} is not a file (a CSV of image "
                            f"paths such as 'MURA-v1.1/{split}/XR_WRIST/patient00001/"
                            "study1_negative/image1.png')")
        # Looked for on disk even with a cache (available): it does not hold these images,
        # which the cache's pixel source then refuses by name.
        records += _read_images(dataclasses.replace(files, images_csv=extra, available=None),
                                study_label, on_missing, skip, unlabeled=True)

    skipped = skip.counts
    index = index_from_records(records, skipped)
    index = _filter_types(index, types)
    index = select_fraction(index, fraction, seed)
    if skipped:
        logging.warning(
            "MURA %s split at %s: skipped %s.", split, files.root,
            ", ".join(f"{n} {reason}(s)" for reason, n in sorted(skipped.items())),
        )
    if not index.images:
        raise UserError(
            f"{files.images_csv}: no images left to use (study_types={study_types!r}, "
            f"fraction={fraction}, skipped: {dict(skipped) or 'none'}). Check config.data.root, "
            "config.data.study_types and config.data.fraction."
        )
    logging.info(
        "MURA %s: %d images, %d studies from %s%s.", split, len(index.images),
        len(index.studies), files.root,
        f" (study types {', '.join(STUDY_TYPES[t] for t in types)})" if types else "",
    )
    return index


def _exists(path: pathlib.Path, cache: dict[str, set[str] | None]) -> bool:
    """Whether ``path`` is a file, listing each folder once (faster than a stat per image)."""
    folder = str(path.parent)
    if folder not in cache:
        try:
            cache[folder] = set(os.listdir(folder))
        except OSError:
            cache[folder] = None
    names = cache[folder]
    return names is not None and path.name in names and path.is_file()


def resolve_root(root) -> pathlib.Path:
    """``config.data.root`` as an absolute folder; a UserError naming the fix if it is empty,
    missing or not a folder."""
    if root is None or str(root) == "":
        raise UserError(
            "config.data.root is empty. Set --config.data.root=/path/to/MURA-v1.1 (the folder "
            "holding train_image_paths.csv), or config.data.synthetic_studies>0 for synthetic data."
        )
    path = pathlib.Path(os.path.expanduser(str(root))).absolute()
    if not path.exists():
        raise UserError(
            f"{path}: folder missing. Set --config.data.root to the MURA-v1.1 folder (the one "
            "holding train_image_paths.csv)."
        )
    if not path.is_dir():
        raise UserError(
            f"{path}: not a folder. Set --config.data.root to the MURA-v1.1 folder (the one "
            "holding train_image_paths.csv)."
        )
    if not any(path.glob("*_image_paths.csv")):
        nested = path / "MURA-v1.1"
        if nested.is_dir() and any(nested.glob("*_image_paths.csv")):
            logging.info("Using %s (the MURA-v1.1 folder inside %s).", nested, path)
            return nested
    return path


# ------------------------------------------------------------------------------------------
# Study types from paths.


def study_type_from_path(path) -> int:
    """The study type a path names: the index in STUDY_TYPES of its last component that is an
    ``XR_*`` study type (case-insensitive: ``xr_wrist`` counts), -1 if none.

    The one rule for this everywhere (prediction inputs, evaluation study ids). Components are
    split at ``/`` and ``\\``; the path is taken as given, so pass an absolute path to let the
    folders above a relative one count.
    """
    found = -1
    for part in re.split(r"[\\/]", os.fspath(path)):
        key = part.upper()
        if key in STUDY_TYPES:
            found = STUDY_TYPES.index(key)
    return found


# ------------------------------------------------------------------------------------------
# Loss weights and config.


def class_weights(index: MuraIndex) -> np.ndarray:
    """float32 [7, 2]: weight[T, y] of the paper's weighted cross-entropy, over training images.

    w_T1 = N_T / (A_T + N_T) (abnormal), w_T0 = A_T / (A_T + N_T) (normal), where A_T and N_T
    count the abnormal and normal images of study type T. A type without labelled images gets
    0.5 / 0.5 (it never contributes to the loss).
    """
    counts = np.zeros((NUM_STUDY_TYPES, 2), dtype=np.int64)  # [type, label]
    for r in index.images:
        if 0 <= r.study_type < NUM_STUDY_TYPES and r.label in (0, 1):
            counts[r.study_type, r.label] += 1
    normal = counts[:, 0].astype(np.float64)
    abnormal = counts[:, 1].astype(np.float64)
    total = normal + abnormal
    weights = np.full((NUM_STUDY_TYPES, 2), 0.5, dtype=np.float64)
    has = total > 0
    weights[has, 1] = normal[has] / total[has]
    weights[has, 0] = abnormal[has] / total[has]
    return weights.astype(np.float32)


def csv_source(data_config) -> tuple[str | pathlib.Path, frozenset[str] | None, str]:
    """Where a run's CSVs are: ``config.data.root``, or with it empty and ``config.data.cache``
    set, the cache's copies of them (``cache.csv_copies``); and with a cache, which images
    exist: the cached ones, whose pixels are read from it (the original files are then not
    looked for). (folder, available images or None, alias)."""
    if not data_config.get("cache", ""):
        return data_config.root, None, ""
    from murajax.data import cache  # it imports this module

    if not data_config.root:
        return cache.csv_copies(data_config)
    return data_config.root, cache.cached_keys(data_config), ""


def index_from_config(data_config, split: str) -> MuraIndex:
    """``read_split(config.data.root, split, ...)`` with the subset options from the config
    (from the image cache's copies of the CSVs when the root is empty: ``csv_source``)."""
    root, available, alias = csv_source(data_config)
    return read_split(
        root,
        split,
        study_types=data_config.get("study_types", ""),
        fraction=data_config.get("fraction", 1.0),
        on_missing=data_config.get("on_missing", "error"),
        seed=0,
        unlabeled_csv=data_config.get("unlabeled_csv", "") if split == "train" else "",
        labels_csv=data_config.get("labels_csv", "") if split == "train" else "",
        available=available,
        alias=alias,
    )


def labels_csv_path(labels_csv) -> pathlib.Path:
    """``config.data.labels_csv`` as an existing file (absolute, or relative to the current
    folder); a UserError naming the field otherwise."""
    path = pathlib.Path(os.path.expanduser(str(labels_csv))).absolute()
    if not path.is_file():
        raise UserError(f"config.data.labels_csv: {path} is not a file (a CSV of MURA study rows "
                        "such as 'MURA-v1.1/train/XR_WRIST/patient00001/study1_positive/,1', "
                        "e.g. <workdir>/relabel/train_labeled_studies.csv)")
    return path


def study_labels_file(data_config, split: str) -> pathlib.Path:
    """The study-label CSV ``index_from_config`` reads for ``split``: ``config.data.labels_csv``
    for the train split when set, else ``<root>/<split>_labeled_studies.csv`` (``csv_source``)."""
    labels_csv = data_config.get("labels_csv", "") if split == "train" else ""
    if labels_csv:
        return labels_csv_path(labels_csv)
    return resolve_root(csv_source(data_config)[0]) / f"{split}_labeled_studies.csv"
