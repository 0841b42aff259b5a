"""DICOM radiographs -> 8-bit display images, the form the rest of murajax reads.

``read_dicom(path)`` applies, in the order DICOM prescribes (PS3.3 C.11):

1. the modality LUT: ``RescaleSlope`` / ``RescaleIntercept`` (default 1 and 0);
2. the VOI LUT: the first ``WindowCenter`` / ``WindowWidth`` pair when both are present, using
   ``VOILUTFunction`` (LINEAR, the default; LINEAR_EXACT; SIGMOID); otherwise a min-max stretch of
   the rescaled values to 0..255 (an explicit VOI LUT Sequence is not applied: min-max instead);
3. for MONOCHROME1 (white = low values), an inversion, so bone is bright as in MURA's PNGs.

8-, 12- and 16-bit, signed or unsigned, stored values are mapped through a lookup table built
once per file over the stored range (float32 arithmetic), so a 3000x2500 16-bit radiograph only
ever exists as its 15 MB of stored values and its 7.5 MB result; float pixel data is transformed
directly. Colour images (RGB, YBR_*; pydicom
converts YBR to RGB) come back HxWx3. Of a multi-frame file only the first frame is used.

Anything that keeps a file from decoding raises ``murajax.errors.UserError`` naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from murajax.errors import UserError

DICOM_SUFFIXES = (".dcm", ".dicom")
_MAGIC_OFFSET = 128
_MAGIC = b"DICM"


def is_dicom(path: str | os.PathLike) -> bool:
    """True for a ``.dcm``/``.dicom`` name or a file carrying ``DICM`` at byte 128."""
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            f.seek(_MAGIC_OFFSET)
            return f.read(4) == _MAGIC
    except OSError:
        return False


def _first(value) -> float:
    """A DICOM numeric element that may be multi-valued (several windows): its first value."""
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        value = value[0]
    return float(value)


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """float values on the 0..255 scale -> uint8 (rounded, clipped). Modifies ``values``."""
    np.clip(values, 0.0, 255.0, out=values)
    np.rint(values, out=values)
    return values.astype(np.uint8)


def _min_max(values: np.ndarray) -> np.ndarray:
    """Stretches values to 0..255 (a constant image: all 0). Modifies ``values``."""
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(values.shape, np.uint8)
    values -= np.float32(lo)
    values *= np.float32(255.0 / (hi - lo))
    return _to_uint8(values)


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """The VOI window of PS3.3 C.11.2.1.2 mapped onto 0..255. Modifies ``values``."""
    function = function.upper().strip() or "LINEAR"
    if function == "SIGMOID":
        values -= np.float32(center)
        values *= np.float32(-4.0 / width)
        np.exp(values, out=values)
        values += np.float32(1.0)
        np.divide(np.float32(255.0), values, out=values)
        return _to_uint8(values)
    if function == "LINEAR_EXACT":
        lo, span = center - width / 2.0, width
    else:  # LINEAR: the standard's half-pixel-shifted ramp, defined for width >= 1
        lo, span = center - 0.5 - (width - 1.0) / 2.0, width - 1.0
    if span <= 0:  # a degenerate window: a hard threshold at its centre
        return np.where(values > np.float32(center), 255, 0).astype(np.uint8)
    values -= np.float32(lo)
    values *= np.float32(255.0 / span)
    return _to_uint8(values)


def _display(values: np.ndarray, slope: float, intercept: float, window, invert: bool):
    """Stored values (float32, modified) -> uint8: rescale, window or min-max, inversion."""
    if slope != 1.0:
        values *= np.float32(slope)
    if intercept != 0.0:
        values += np.float32(intercept)
    image = _window(values, *window) if window is not None else _min_max(values)
    if invert:
        np.subtract(np.uint8(255), image, out=image)
    return image


def read_dicom(path: str | os.PathLike) -> np.ndarray:
    """Reads a DICOM image as uint8, HxW for grayscale or HxWx3 for colour (see module doc)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = Path(path)
    try:
        try:
            ds = pydicom.dcmread(path)
        except InvalidDicomError:
            if path.suffix.lower() not in DICOM_SUFFIXES:
                raise
            ds = pydicom.dcmread(path, force=True)  # a .dcm without the 128-byte preamble
    except (OSError, InvalidDicomError, ValueError, EOFError) as e:
        raise UserError(f"{path}: not a readable DICOM file ({e})") from e

    if "PixelData" not in ds:
        raise UserError(f"{path}: DICOM file holds no image (no PixelData element)")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper().strip()
    if photometric == "PALETTE COLOR" or not (
        photometric.startswith("MONOCHROME") or photometric.startswith(("RGB", "YBR"))
    ):
        raise UserError(
            f"{path}: DICOM PhotometricInterpretation {photometric!r} is not supported "
            "(expected MONOCHROME1, MONOCHROME2, RGB or YBR_*)"
        )
    try:
        pixels = ds.pixel_array
    except Exception as e:  # missing decoder plugin, truncated data, bad attributes
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        hint = ""
        if syntax is not None and getattr(syntax, "is_compressed", False):
            hint = (f"; it is compressed ({syntax.name}): install a pydicom decoder plugin such "
                    "as pylibjpeg or python-gdcm, or convert it to uncompressed DICOM or PNG")
        raise UserError(f"{path}: cannot decode the DICOM pixel data ({e}){hint}") from e

    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    try:
        slope = _first(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = _first(ds.get("RescaleIntercept", 0.0) or 0.0)
        center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
        window = None
        if center is not None and width is not None and str(center) != "" and str(width) != "":
            function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR")
            window = (_first(center), _first(width), function)
    except (TypeError, ValueError, IndexError) as e:
        raise UserError(f"{path}: malformed DICOM rescale/window values ({e})") from e
    del ds  # the file's bytes and pydicom's cached copy of the pixels

    if frames > 1:
        pixels = pixels[0]
    if samples == 1 and pixels.ndim != 2 or samples > 1 and pixels.ndim != 3:
        raise UserError(f"{path}: unexpected DICOM pixel array of shape {pixels.shape}")

    if samples > 1:  # colour: already RGB; 8-bit as is, deeper min-max scaled
        if pixels.dtype == np.uint8:
            return np.ascontiguousarray(pixels[..., :3])
        return _min_max(pixels[..., :3].astype(np.float32))

    invert = photometric == "MONOCHROME1"
    if np.issubdtype(pixels.dtype, np.integer):
        # Integer pixels (8 to 16 bits): transform each stored value once, then look them up;
        # a large radiograph never exists as floats.
        lo, hi = int(pixels.min()), int(pixels.max())
        if hi - lo < 1 << 20:
            lut = _display(np.arange(lo, hi + 1, dtype=np.float32), slope, intercept, window,
                           invert)
            if lo < 0:
                index = pixels.astype(np.int32) - np.int32(lo)
            else:
                index = pixels - pixels.dtype.type(lo) if lo else pixels
            return lut[index]
    return _display(pixels.astype(np.float32), slope, intercept, window, invert)
