"""Finding radiographs on disk: the one image finder and the one natural sort order.

* ``find_images(inputs)``: image files, study folders and trees of studies (PNG, JPEG, ...,
  DICOM) -> one ``ImageInput`` per image, in natural order, each with its study (the image's
  folder, relative to what the inputs have in common), its study type (``mura.study_type_from_path``
  on its absolute path) and a unique, file-system-safe name for per-image outputs.
* ``keyed_images(keys)``: the same for images known by their path relative to the MURA-v1.1
  folder (an image cache's keys), nothing on disk.
* ``natural_key(name)``: sorts ``image2`` before ``image10``.

Nothing here decodes an image (a file without a suffix is only checked for the DICOM magic).
The MURA-v1.1 training splits are read from their CSVs instead (``murajax.data.mura``).
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import re
from pathlib import Path
from typing import Iterable

from murajax.data.dicom import DICOM_SUFFIXES, is_dicom
from murajax.data.mura import IMAGE_EXTENSIONS, STUDY_TYPES, study_type_from_path
from murajax.errors import UserError

IMAGE_SUFFIXES = tuple(IMAGE_EXTENSIONS) + DICOM_SUFFIXES
_NATURAL_RE = re.compile(r"(\d+)")


def natural_key(name: str) -> list:
    """Sort key: digit runs compare as numbers, the rest case-insensitively."""
    return [int(t) if t.isdigit() else t.lower() for t in _NATURAL_RE.split(name)]


@dataclasses.dataclass(frozen=True)
class ImageInput:
    """One image to predict: where it is, its study and what to call its outputs."""

    path: str  # as found: the user's input joined with the relative path
    study: str  # the image's folder relative to the inputs' common folder (unique per folder)
    study_type: str  # the XR_* study type its path names (study_type_from_path), or ""
    name: str  # unique, file-system-safe stem for per-image outputs (CAM PNGs)


def _study_type_name(path: str) -> str:
    index = study_type_from_path(path)
    return STUDY_TYPES[index] if index >= 0 else ""


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "image"


def _study_id(folder: Path, base: str) -> str:
    relative = os.path.relpath(os.path.abspath(folder), base)
    return Path(base).name if relative == "." else Path(relative).as_posix()


def find_images(inputs: str | os.PathLike | Iterable[str | os.PathLike]) -> list[ImageInput]:
    """Every image named by ``inputs``: image files, study folders, trees of study folders.

    Folders are walked in natural order, skipping dot-files and dot-folders; a file counts as an
    image by its suffix (PNG, JPEG, ... or ``.dcm``/``.dicom``) or, without a suffix, by the
    DICOM magic. A file named explicitly is always taken (and reported if it cannot be read).
    Raises ``UserError`` for no inputs, a missing input, or when no image is found.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = [str(p) for p in inputs]
    if not inputs:
        raise UserError("no input given: pass image files, study folders or a tree of studies")

    for given in inputs:
        if not os.path.exists(os.path.expanduser(given)):
            raise UserError(f"{os.path.expanduser(given)}: no such file or folder")
    # Study ids are folders relative to what the inputs have in common, so 'a/study1' and
    # 'b/study1' stay two studies while a single tree gives 'XR_WRIST/patient1/study1'.
    base = os.path.commonpath([
        os.path.abspath(os.path.expanduser(g)) if os.path.isdir(os.path.expanduser(g))
        else os.path.dirname(os.path.abspath(os.path.expanduser(g))) for g in inputs
    ])
    found: list[tuple[str, str, str]] = []  # (path, study, relative name)
    for given in inputs:
        given = os.path.expanduser(given)
        if not os.path.exists(given):
            raise UserError(f"{given}: no such file or folder")
        if os.path.isfile(given):
            study = _study_id(Path(os.path.abspath(given)).parent, base)
            found.append((given, study, f"{Path(os.path.abspath(given)).parent.name}/"
                                        f"{os.path.basename(given)}"))
            continue
        root = Path(given)
        root_name = Path(os.path.abspath(given)).name
        for folder, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted((d for d in dirnames if not d.startswith(".")), key=natural_key)
            folder_path = Path(folder)
            study = _study_id(folder_path, base)
            for name in sorted(filenames, key=natural_key):
                path = folder_path / name
                if _is_image_name(name) or (
                    not name.startswith(".") and "." not in name and is_dicom(path)
                ):
                    found.append((str(path), study, f"{root_name}/{path.relative_to(root)}"))

    unique, seen_paths = [], set()
    for path, study, rel in found:
        key = os.path.realpath(path)
        if key not in seen_paths:
            seen_paths.add(key)
            unique.append((path, study, _study_type_name(os.path.abspath(path)), rel))
    images = _named(unique)
    if not images:
        raise UserError(
            f"no images found in {', '.join(inputs)}: expected image files "
            f"({', '.join(IMAGE_SUFFIXES)}) or folders holding them"
        )
    return images


def keyed_images(keys: Iterable[str]) -> list[ImageInput]:
    """Images known by their path relative to the MURA-v1.1 folder (an image cache's keys,
    ``murajax.data.cache.record_key``): the key is the image, its folder the study, and the
    outputs are named as ``find_images`` names them."""
    return _named([(key, posixpath.dirname(key), _study_type_name(key), key) for key in keys])


def _named(found: Iterable[tuple[str, str, str, str]]) -> list[ImageInput]:
    """``(path, study, study type, relative name)`` -> ``ImageInput``s named by the relative
    name made file-system-safe, unique case-insensitively (``_2``, ``_3``, ... on a clash)."""
    images, seen_names = [], set()
    for path, study, study_type, rel in found:
        stem = _safe("__".join(Path(rel).with_suffix("").parts))
        name, n = stem, 1
        while name.lower() in seen_names:
            n += 1
            name = f"{stem}_{n}"
        seen_names.add(name.lower())
        images.append(ImageInput(path, study, study_type, name))
    return images
