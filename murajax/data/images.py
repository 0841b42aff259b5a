"""Decoding radiographs with PIL and turning them into network inputs.

``load_image`` decodes any PIL mode to uint8 HxWx3. ``preprocess`` resizes (``stretch`` as in the
paper, or ``pad``: aspect ratio kept, centred, black padding), flips and rotates in a single
bilinear affine warp on uint8 (``transform``: PIL's geometry and edge rule, OpenCV's warp), then
normalises with the ImageNet statistics in float32.

The pipeline uses the faster ``decode`` / ``transform``, which keep grayscale images
single-channel, and ships the uint8 result; the train and eval steps normalise it with this
module's table (``NORMALISE_TABLE``, through ``murajax.data.device_augment``), so the numbers are
those of ``normalize`` (identical results).

Mode handling: 8-bit grayscale ('L', '1') as is; 16-bit grayscale ('I;16*', and 'I' as PNG
decodes 16-bit files in older Pillow) scaled linearly from 0..65535 to 0..255; 'F' clipped to
0..255; palette 'P', 'RGB', 'CMYK', 'YCbCr' converted to RGB; alpha ('LA', 'RGBA', 'PA') dropped.
"""

from __future__ import annotations

import math
import os

import cv2
import numpy as np
from PIL import Image

from murajax.errors import UserError

# Sequential OpenCV: loader workers are the parallelism (``config.data.num_workers``), and
# OpenCV's own thread pool spends about 1.4x the CPU per warp for its shorter wall time.
cv2.setNumThreads(0)

IMAGENET_MEAN = np.asarray([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.asarray([0.229, 0.224, 0.225], dtype=np.float32)
# x_uint8 * _SCALE + _OFFSET == (x / 255 - mean) / std
_SCALE = (1.0 / (255.0 * IMAGENET_STD)).astype(np.float32)
_OFFSET = (-IMAGENET_MEAN / IMAGENET_STD).astype(np.float32)
NORMALISE_SCALE, NORMALISE_OFFSET = _SCALE, _OFFSET  # also the device's (data.device_augment)

RESIZE_MODES = ("stretch", "pad")
# config.data.colour: 'keep' (the paper: a colour image stays colour) or 'grey' (every image
# becomes its luminance, one plane; see ``as_colour``).
COLOUR_MODES = ("keep", "grey")

_FIX = (
    "Remove it from the CSV (or the folder), replace it with a readable image, or set "
    "--config.data.on_bad_image=skip to skip unreadable images."
)


def _bad_image(path, reason) -> UserError:
    return UserError(f"{path}: cannot read image ({reason}). {_FIX}")


def without_training_advice(error: BaseException) -> str:
    """The message of a decoding error without the advice the loader adds for training runs
    (remove the CSV row, ``config.data.on_bad_image=skip``), which does not apply outside them
    (prediction): ``"<path>: cannot read image (<reason>)."``. Other messages come back whole;
    an empty one is the error's type name."""
    message = str(error) or type(error).__name__
    if message.endswith(_FIX):
        message = message[: -len(_FIX)].rstrip()
    return message


def _to_l_or_rgb(image: Image.Image, path) -> Image.Image:
    """Any PIL mode -> 'L' (grayscale) or 'RGB', uint8."""
    mode = image.mode
    if mode in ("L", "RGB"):
        return image
    if mode == "1":
        return image.convert("L")
    if mode == "LA" or mode == "La":
        return image.getchannel(0)
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(image)
        if mode == "I":
            a = np.clip(a, 0, 65535)
        a = a.astype(np.uint32)
        # Round(v * 255 / 65535) == (v + 128) // 257 for 0 <= v <= 65535.
        return Image.fromarray(((a + 128) // 257).astype(np.uint8))
    if mode == "F":
        a = np.nan_to_num(np.asarray(image, dtype=np.float32))
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))
    if mode in ("P", "PA"):
        return image.convert("RGB")
    try:
        return image.convert("RGB")  # RGBA, RGBX, CMYK, YCbCr, LAB, HSV, ...
    except (ValueError, OSError) as e:
        raise _bad_image(path, f"unsupported image mode {mode!r}: {e}") from None


def decode(path) -> Image.Image:
    """Decodes ``path`` to a PIL image in mode 'L' or 'RGB' (uint8). UserError if unreadable."""
    path = os.fspath(path)
    try:
        with Image.open(path) as image:
            image.load()
            out = _to_l_or_rgb(image, path)
            if out is image:
                out = image.copy() if image.fp is not None else image
    except FileNotFoundError:
        raise _bad_image(path, "file not found") from None
    except UserError:
        raise
    except Image.DecompressionBombError as e:
        raise _bad_image(path, str(e)) from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
        # UnidentifiedImageError (zero bytes, not an image) is an OSError; truncated files raise
        # OSError("image file is truncated") or SyntaxError / ValueError from the PNG plugin.
        reason = str(e) or type(e).__name__
        if os.path.exists(path) and os.path.getsize(path) == 0:
            reason = "empty file (0 bytes)"
        raise _bad_image(path, reason) from None
    if out.width < 1 or out.height < 1:
        raise _bad_image(path, f"empty image of size {out.width}x{out.height}")
    return out


def load_image(path) -> np.ndarray:
    """Decodes ``path`` with PIL to uint8 HxWx3 (grayscale replicated to 3 channels)."""
    image = decode(path)
    a = np.asarray(image, dtype=np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    return np.ascontiguousarray(a)


def check_resize(resize) -> str:
    if resize not in RESIZE_MODES:
        raise UserError(f"config.data.resize must be 'stretch' or 'pad', got {resize!r}")
    return resize


def check_colour(colour) -> str:
    if colour not in COLOUR_MODES:
        raise UserError(f"config.data.colour must be 'keep' (colour images stay colour, as in "
                        f"the paper) or 'grey' (every image becomes one luminance plane), got "
                        f"{colour!r}")
    return colour


def colour_from(data_config) -> str:
    """``config.data.colour``, checked; 'keep' for a run saved before the field existed."""
    return check_colour(data_config.get("colour", "keep"))


def as_colour(pixels, colour: str) -> np.ndarray:
    """uint8 ``[S, S]`` (grey) or ``[S, S, 3]`` pixels for ``config.data.colour``: with 'grey' a
    colour image becomes its luminance, as PIL's ``convert('L')`` computes it (ITU-R 601-2,
    ``(19595 R + 38470 G + 7471 B + 2**15) >> 16``: exact for a grey image stored as RGB), so
    every image is one plane; with 'keep' the pixels as they are. Applied last, after the
    resize, flip and rotation, wherever pixels are made (files, the cache, prediction)."""
    a = np.asarray(pixels, dtype=np.uint8)
    if colour == "keep" or a.ndim == 2:
        return a
    return np.asarray(Image.fromarray(a).convert("L"))


def check_image_size(image_size) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or (
        image_size < 1
    ):
        raise UserError(f"config.data.image_size must be a positive integer, got {image_size!r}")
    return int(image_size)


def _affine_coefficients(width, height, size, resize, flip, angle):
    """PIL AFFINE data (output pixel centre -> input pixel coordinates).

    Forward map, input -> output: scale about the input centre (per axis for 'stretch', uniform
    min for 'pad'), rotate by ``angle`` degrees (counter-clockwise on screen) about the centre,
    mirror horizontally if ``flip``, translate to the output centre.
    """
    if resize == "stretch":
        sx, sy = size / width, size / height
    else:
        sx = sy = min(size / width, size / height)
    theta = math.radians(angle)
    c, s = math.cos(theta), math.sin(theta)
    # Output (u, v) relative to the output centre; undo flip, then undo rotation (rotation by
    # +theta counter-clockwise on screen, whose y axis points down), then undo scale.
    f = -1.0 if flip else 1.0
    # (u', v') = (f*u, v); rotate back by -theta (screen): x' = c*u' - s*v', y' = s*u' + c*v'
    a = c * f / sx
    b = -s / sx
    d = s * f / sy
    e = c / sy
    ocx = ocy = size / 2.0
    icx, icy = width / 2.0, height / 2.0
    # x_in = a*(X - ocx) + b*(Y - ocy) + icx, in PIL's pixel-corner coordinates.
    return (a, b, icx - a * ocx - b * ocy, d, e, icy - d * ocx - e * ocy)


def _as_pil(image) -> Image.Image:
    return image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))


def transform(image, image_size: int, resize: str, *, flip=False, angle=0.0) -> np.ndarray:
    """Resize (+ flip + rotate) a PIL 'L'/'RGB' image (or uint8 HxW / HxWx3 pixels) to
    ``image_size`` squared in one bilinear affine warp; outside the source: black. Returns
    uint8 ``[S, S]`` or ``[S, S, 3]``.

    The geometry and the edge rule are PIL's ``Image.transform(AFFINE, BILINEAR)``: a sample
    point inside the source (pixel-corner coordinates in ``[0, w) x [0, h)``) interpolates
    with its neighbours clamped to the edge, one outside is black. The warp itself is
    OpenCV's ``warpAffine``, 3-4x cheaper than PIL's on the same CPU (fixed-point weights,
    1/32-pixel positions, and rounding where PIL truncates: PIL's pixels or one grey level
    more; ``test_data_images.py``)."""
    width, height = image.size if isinstance(image, Image.Image) else image.shape[1::-1]
    size = int(image_size)
    scale = min(size / width, size / height) if resize == "pad" else max(
        size / width, size / height
    )
    # Bilinear sampling aliases when shrinking a lot: first reduce by an integer box factor.
    factor = int(1.0 / scale / 1.5) if scale < 1 / 3 else 1
    if factor >= 2:
        factor_x = factor_y = factor
        if resize == "stretch":
            factor_x = max(1, int(width / size / 1.5))
            factor_y = max(1, int(height / size / 1.5))
        if factor_x > 1 or factor_y > 1:
            image = _as_pil(image).reduce((factor_x, factor_y))
            width, height = image.size
    pixels = np.asarray(image, dtype=np.uint8)
    if not flip and not angle and resize == "stretch" and (width, height) == (size, size):
        return pixels
    a, b, c, d, e, f = _affine_coefficients(width, height, size, resize, flip, float(angle))
    # PIL maps an output pixel's centre (x + 0.5, y + 0.5) to corner coordinates; OpenCV maps
    # pixel indices to indices (centres at integers): shift by half a pixel on both sides.
    inverse = np.array([[a, b, (a + b) / 2 + c - 0.5], [d, e, (d + e) / 2 + f - 0.5]])
    out = cv2.warpAffine(pixels, inverse, (size, size),
                         flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                         borderMode=cv2.BORDER_REPLICATE)
    # Nearest-neighbour sampling of an all-white source is white exactly where a sample point
    # lies inside the source, PIL's rule for black; the replicated border is masked off there.
    inside = cv2.warpAffine(np.full((height, width), 255, np.uint8), inverse, (size, size),
                            flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    if out.ndim == 3:
        inside = cv2.merge([inside] * out.shape[2])
    return cv2.bitwise_and(out, inside, dst=out)


def channels_first_into(pixels: np.ndarray, out: np.ndarray) -> None:
    """``out[...] = pixels.transpose(2, 0, 1)`` for uint8 HxWxC pixels and a ``[C, H, W]``
    ``out`` (e.g. a batch's row). OpenCV's de-interleave writes contiguous planes in place: 16
    against 97 µs for numpy's strided write at 320 px here. Numpy's write for other planes, or
    if OpenCV hands back arrays of its own."""
    planes = [out[c] for c in range(out.shape[0])]
    if all(plane.flags.c_contiguous for plane in planes):
        written = cv2.split(pixels, planes)
        if all(a is b for a, b in zip(written, planes)):
            return
    out[...] = pixels.transpose(2, 0, 1)


# _LUT[v, c] == (v / 255 - mean[c]) / std[c]: normalising is a table look-up.
_LUT = (np.arange(256, dtype=np.float32)[:, None] * _SCALE + _OFFSET).astype(np.float32)
_LUT_CHANNELS = [np.ascontiguousarray(_LUT[:, c]) for c in range(3)]
NORMALISE_TABLE = _LUT  # also the device's (data.device_augment.normalise)


def normalize(image) -> np.ndarray:
    """uint8 HxW (grayscale) or HxWx3 -> float32 HxWx3, ImageNet-normalised on [0, 1] values."""
    a = np.asarray(image, dtype=np.uint8)
    out = np.empty(a.shape[:2] + (3,), dtype=np.float32)
    normalize_into(a, out)
    return out


def normalize_into(image, out: np.ndarray) -> None:
    """``out[...] = normalize(image)`` without temporaries (``out``: float32 HxWx3)."""
    a = np.asarray(image, dtype=np.uint8)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 2:
        np.take(_LUT, a, axis=0, out=out)  # a grey channel becomes 3
    else:
        for c in range(3):
            np.take(_LUT_CHANNELS[c], a[:, :, c], out=out[:, :, c])


def preprocess(image_uint8, image_size, resize, *, flip=False, angle=0.0,
               colour: str = "keep") -> np.ndarray:
    """uint8 HxWx3 (or HxW) -> float32 (image_size, image_size, 3), ImageNet-normalised.

    ``resize``: 'stretch' (both sides to ``image_size``, as in the paper) or 'pad' (longest side
    to ``image_size``, aspect ratio kept, centred, black padding). ``flip``: mirror left-right.
    ``angle``: rotation in degrees about the centre (corners filled black). ``colour``:
    ``config.data.colour`` (``as_colour``, after the transform).
    """
    resize = check_resize(resize)
    image_size = check_image_size(image_size)
    a = np.asarray(image_uint8)
    if a.dtype != np.uint8:
        raise ValueError(f"preprocess expects uint8 pixels, got {a.dtype}")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 3)):
        raise ValueError(f"preprocess expects HxW or HxWx3 pixels, got shape {a.shape}")
    transformed = transform(a, image_size, resize, flip=flip, angle=angle)
    return normalize(as_colour(transformed, check_colour(colour)))
