"""Class activation maps and their overlays on the original radiographs.

* ``class_activation_maps(features, kernel, bias)``: M(X) = sum_k w_k f_k(X) per output, from the
  last stage's feature maps and the head's weights (Zhou et al. 2016). With the bias added the map
  is a *logit map*: its spatial mean is exactly the model's logit.
* ``overlay(image, cam)``: the CAM bilinearly upsampled to the original image's size, min-max
  normalised, colour-mapped (any matplotlib colormap) and alpha-blended onto the image.
* ``cam_box(...)``: the part of a CAM that covers the original image when it was padded.
* ``load_original(path)``: an image at full size, as the overlay is drawn on it.
"""

from __future__ import annotations

import functools
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from murajax.data.dicom import is_dicom, read_dicom
from murajax.errors import UserError


def class_activation_maps(features, head_kernel, head_bias=None) -> jax.Array:
    """M_o(X) = sum_k w_ko f_k(X) for every output o: ``[..., h, w, C] -> [..., h, w, O]``.

    ``features`` are the last stage's maps after its final BN+ReLU (``DenseNet(...,
    return_features=True)``), ``head_kernel`` the head's ``[C, O]`` kernel. Since the head acts on
    the spatial mean of the features, mean_hw M_o + b_o = logit_o. Given ``head_bias``, it is
    added at every position, so the map's spatial mean is the logit itself.
    """
    features = jnp.asarray(features, jnp.float32)
    kernel = jnp.asarray(head_kernel, jnp.float32)
    if features.shape[-1] != kernel.shape[0]:
        raise ValueError(
            f"features have {features.shape[-1]} channels but the head kernel expects "
            f"{kernel.shape[0]}"
        )
    cams = jnp.einsum("...hwc,co->...hwo", features, kernel,
                      precision=jax.lax.Precision.HIGHEST)
    if head_bias is not None:
        cams = cams + jnp.asarray(head_bias, jnp.float32)
    return cams


@functools.lru_cache(maxsize=8)
def _colormap_lut(cmap: str) -> np.ndarray:
    import matplotlib

    try:
        colormap = matplotlib.colormaps[cmap]
    except KeyError:
        raise UserError(f"unknown colormap {cmap!r}; use a matplotlib name such as 'jet'") from None
    rgb = colormap(np.linspace(0.0, 1.0, 256))[:, :3]
    return np.rint(rgb * 255.0).astype(np.uint8)


def as_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 HxW, HxWx1, HxWx3 or HxWx4 -> uint8 HxWx3."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}")
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim == 3 and image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    if image.ndim == 3 and image.shape[2] in (3, 4):
        return np.ascontiguousarray(image[:, :, :3])
    raise ValueError(f"expected an HxW or HxWxC image, got shape {image.shape}")


def overlay(image_uint8: np.ndarray, cam, alpha: float = 0.4, cmap: str = "jet", *,
            cam_box: Sequence[float] | None = None) -> np.ndarray:
    """The CAM as a heat map over the image: uint8 RGB of the image's own height and width.

    ``cam`` is ``[h, w]`` (or ``[h, w, 1]``) at any resolution; it is min-max normalised to
    [0, 1] (a constant map gives 0 everywhere), bilinearly resized to the image, colour-mapped
    with ``cmap`` and blended as ``(1 - alpha) * image + alpha * heat``. ``cam_box``
    ``(left, top, right, bottom)``, in CAM pixels, is the part of the CAM the image covers (the
    whole CAM by default; less when the image was padded to a square before the network).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    rgb = as_rgb(image_uint8)
    height, width = rgb.shape[:2]
    cam = np.asarray(cam, np.float32)
    if cam.ndim == 3 and cam.shape[2] == 1:
        cam = cam[:, :, 0]
    if cam.ndim != 2:
        raise ValueError(f"expected an [h, w] CAM, got shape {cam.shape}")
    lo, hi = float(np.min(cam)), float(np.max(cam))
    normalised = (cam - lo) / (hi - lo) if hi > lo else np.zeros_like(cam)
    box = None if cam_box is None else tuple(float(v) for v in cam_box)
    upsampled = Image.fromarray(np.ascontiguousarray(normalised, np.float32)).resize(
        (width, height), Image.Resampling.BILINEAR, box=box
    )
    levels = np.rint(np.clip(np.asarray(upsampled), 0.0, 1.0) * 255.0).astype(np.uint8)
    del upsampled
    heat = _colormap_lut(cmap)[levels]
    del levels
    blended = Image.blend(Image.fromarray(rgb), Image.fromarray(heat), float(alpha))
    return np.asarray(blended)


def cam_box(image_height: int, image_width: int, image_size: int, resize: str,
            cam_height: int, cam_width: int) -> tuple[float, float, float, float] | None:
    """The part of a CAM that covers the original image, in CAM pixels (None: all of it).

    With ``resize='pad'`` the image was scaled to fit the square and centred on it, so only
    the matching part of the CAM belongs to the image.
    """
    if resize != "pad":
        return None
    scale = image_size / max(image_height, image_width)
    content_h, content_w = image_height * scale, image_width * scale
    top, left = (image_size - content_h) / 2.0, (image_size - content_w) / 2.0
    sy, sx = cam_height / image_size, cam_width / image_size
    return (left * sx, top * sy, (left + content_w) * sx, (top + content_h) * sy)


def load_original(path: str | os.PathLike) -> np.ndarray:
    """Decodes an image file at full size as uint8 HxWx3 (DICOM through ``read_dicom``)."""
    if is_dicom(path):
        return as_rgb(read_dicom(path))
    from murajax.data import images

    return as_rgb(images.load_image(path))
