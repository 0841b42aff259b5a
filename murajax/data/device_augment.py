"""Augmentation on the device (``config.data.augment_on='device'``): flips and rotations of
uint8 batches inside the jitted step, then ImageNet normalisation.

This module owns the device side of the input: the check of ``config.data.augment_on``, the
settings the train state carries (``DeviceAugment``, static), the per-example draws, the warp
and the normalisation. With ``augment_on='device'`` the pipeline ships images resized as on the
host path but neither flipped, rotated nor normalised (uint8, a quarter of the float32 bytes);
``murajax.steps`` calls ``train_batch`` (augment + normalise) and ``eval_batch`` (normalise).
With ``augment_on='host'`` the pipeline ships uint8 too, flipped and rotated: only the
normalisation happens here. Either way the batch's pixels arrive channels first,
``[b, 3, S, S]`` with a grey image in plane 0 only (its row's ``grey`` flag set), or
``[b, 1, S, S]`` with ``config.data.colour='grey'``; ``channels_last`` turns either into the
model's ``[b, S, S, 3]``, repeating one plane. The warp and the normalisation work on
``[..., H, W, 3]``.

Every function is pure. The draws of an example are keyed by ``fold_in(fold_in(key, step),
index)``, ``index`` being the image's position in its split: they depend neither on the batch's
order nor on how it is split across devices or processes (the warped pixels then differ by
float32 rounding at most), and a resumed run repeats them bit for bit. A
second, differently augmented view (e.g. a mean teacher's) is ``augment`` with another key,
e.g. ``jax.random.fold_in(key, 1)``.

The warp is ``jax.scipy.ndimage.map_coordinates`` (bilinear, black outside the image, as PIL's
``fillcolor=0`` on the host) at coordinates of the same affine map as the host's
(``murajax.data.images._affine_coefficients``: rotate counter-clockwise on screen about the
centre, then mirror). Unlike the host it resamples the already resized image and keeps the
sub-grey-level values instead of rounding to uint8. Not dm-pix: its interpolation
(``flat_nd_linear_interpolate_constant`` per channel, or ``affine_transform``, which
interpolates in 3-D) took 10x and 60x as long on CPU (batch 8, 320 px, jitted:
409 and 2405 ms against 40 ms; 2 cores shared with other jobs, so relative figures only).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from murajax.data import images as images_lib
from murajax.errors import UserError

AUGMENT_ON = ("host", "device")


@dataclasses.dataclass(frozen=True)
class DeviceAugment:
    """What the train step draws per example: a left-right flip with probability 1/2 (if
    ``hflip``) and an angle uniform in [-rotation_degrees, rotation_degrees)."""

    hflip: bool = True
    rotation_degrees: float = 30.0

    @property
    def active(self) -> bool:
        return self.hflip or self.rotation_degrees != 0.0


def check_augment_on(value) -> str:
    if value not in AUGMENT_ON:
        raise UserError(f"config.data.augment_on must be 'host' (decode workers flip and "
                        f"rotate) or 'device' (the train step does), got {value!r}")
    return value


def from_config(config) -> DeviceAugment | None:
    """The train state's settings: None for ``config.data.augment_on='host'`` (and configs
    saved before the field existed), else ``config.data.hflip`` and ``.rotation_degrees``."""
    data = config.data
    if check_augment_on(data.get("augment_on", "host")) == "host":
        return None
    from murajax.data import pipeline  # the pipeline's check of the range, one message

    return DeviceAugment(hflip=bool(data.hflip),
                         rotation_degrees=pipeline._check_rotation(data.rotation_degrees))


def normalise(images) -> jax.Array:
    """uint8 (or float pixel values in [0, 255]) ``[..., 3]`` -> float32, ImageNet-normalised
    (one plane, ``[..., 1]``, becomes three, as ``images.normalize`` does).

    uint8 pixels are looked up in the host's own table (``images.NORMALISE_TABLE``), so they
    equal ``images.normalize`` bit for bit: XLA contracts a multiply-add into an FMA, which
    rounds differently in about half the values. (The look-up is also the faster of the two on
    CPU: 3.5 against 6.2 ms for 16 x 320 x 320 x 3.) Float pixel values (the warp's, which are
    not whole grey levels) take the multiply-add with the same constants.
    """
    images = jnp.asarray(images)
    if images.dtype == jnp.uint8:
        table = jnp.asarray(images_lib.NORMALISE_TABLE)  # [256, 3]
        return table[images.astype(jnp.int32), jnp.arange(3)]
    scale = jnp.asarray(images_lib.NORMALISE_SCALE)
    offset = jnp.asarray(images_lib.NORMALISE_OFFSET)
    return images.astype(jnp.float32) * scale + offset


def draw(key: jax.Array, index, step, settings: DeviceAugment):
    """Per-example ``(flips bool [b], angles float32 [b] in degrees)`` from ``key``, ``step``
    and each example's ``index`` [b] (padding rows, index -1, draw too; callers ignore them)."""
    step_key = jax.random.fold_in(key, step)

    def one(i):
        flip_key, angle_key = jax.random.split(jax.random.fold_in(step_key, i))
        flip = jax.random.bernoulli(flip_key) & settings.hflip
        angle = jax.random.uniform(angle_key, (), jnp.float32, -1.0, 1.0)
        return flip, angle * jnp.float32(settings.rotation_degrees)

    return jax.vmap(one)(jnp.asarray(index, jnp.int32))


def _cos_sin_degrees(angle):
    """cos and sin of ``angle`` degrees, exact at multiples of 90 (a half turn is an exact
    point reflection, not off by sin(float32(pi)) = -8.7e-8)."""
    quarter = jnp.round(angle / 90.0)
    theta = jnp.deg2rad(angle - 90.0 * quarter)
    c, s = jnp.cos(theta), jnp.sin(theta)
    k = quarter.astype(jnp.int32) % 4
    cos = jnp.select([k == 0, k == 1, k == 2], [c, -s, -c], s)
    sin = jnp.select([k == 0, k == 1, k == 2], [s, c, -s], -c)
    return cos, sin


def _warp_one(image, flip, angle):
    height, width = image.shape[0], image.shape[1]
    cos, sin = _cos_sin_degrees(angle)
    mirror = jnp.where(flip, -1.0, 1.0).astype(jnp.float32)
    cy, cx = (height - 1) / 2.0, (width - 1) / 2.0
    rows, cols = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32),
                              jnp.arange(width, dtype=jnp.float32), indexing="ij")
    u, v = mirror * (cols - cx), rows - cy  # undo the mirror, then the rotation
    coordinates = jnp.stack([cy + sin * u + cos * v, cx + cos * u - sin * v])

    def channel(plane):  # 2-D: four neighbours (one 3-D warp of HWC would read 8)
        return jax.scipy.ndimage.map_coordinates(plane, list(coordinates), order=1,
                                                 mode="constant", cval=0.0)

    return jax.vmap(channel, in_axes=2, out_axes=2)(image)


def transform(images, flips, angles) -> jax.Array:
    """``[b, H, W, C]`` pixels -> float32 pixel values (not normalised), example i mirrored
    left-right if ``flips[i]`` after a rotation by ``angles[i]`` degrees, counter-clockwise on
    screen, about the image centre; black outside the source."""
    images = jnp.asarray(images).astype(jnp.float32)
    return jax.vmap(_warp_one)(images, jnp.asarray(flips, bool),
                               jnp.asarray(angles, jnp.float32))


def augment(images, key: jax.Array, index, step, settings: DeviceAugment) -> jax.Array:
    """uint8 ``[b, H, W, 3]`` -> float32, each example flipped and rotated as ``draw`` says,
    then normalised. Inactive settings (no flip, no rotation) give ``normalise(images)``."""
    if not settings.active:  # static
        return normalise(images)
    flips, angles = draw(key, index, step, settings)
    return normalise(transform(images, flips, angles))


def _real_rows(image, mask):
    """Rows of padding or skipped images (mask 0) as the host path has them: all zeros."""
    return jnp.where(jnp.reshape(mask > 0, (-1, 1, 1, 1)), image, jnp.zeros((), image.dtype))


def channels_last(image, grey) -> jax.Array:
    """The pipeline's uint8 ``[b, C, S, S]`` (channels first; C 3, or 1 for a grey batch) ->
    ``[b, S, S, 3]``, one plane repeated three times. ``grey`` (bool ``[b]``, the batch's
    ``'grey'``, no default so that no caller forgets it): rows whose pixels are in plane 0 only
    (their planes 1 and 2 hold leftovers, never read); None: every row is whole (the images of a
    batch made without the pipeline, which always sets it). Repeated here, before the warp:
    warping one plane and repeating the float result made XLA:CPU's train-step input 1.7x
    slower than warping three (16 against 10 ms at batch 8, 320 px; the repeat fuses into the
    warp's gathers)."""
    image = jnp.transpose(jnp.asarray(image), (0, 2, 3, 1))
    if grey is not None and image.shape[-1] == 3:
        image = jnp.where(jnp.reshape(jnp.asarray(grey), (-1, 1, 1, 1)), image[..., :1], image)
    return jnp.broadcast_to(image, image.shape[:3] + (3,))


def train_batch(batch: dict, key: jax.Array, step, settings: DeviceAugment | None) -> dict:
    """The train step's batch with the pipeline's uint8 ``image`` (``[b, C, S, S]``) augmented
    and normalised to float32 ``[b, S, S, 3]`` (``settings``: the state's; None only normalises;
    a float32 batch, already ``[b, S, S, 3]`` and normalised, passes as it is)."""
    image = batch["image"]
    if settings is None:
        return eval_batch(batch)
    if image.dtype != jnp.uint8:
        raise ValueError(f"augmentation on the device needs uint8 images (the pipeline's with "
                         f"config.data.augment_on='device'), got {image.dtype}")
    image = augment(channels_last(image, batch.get("grey")), key, batch["index"], step,
                    settings)
    return {**batch, "image": _real_rows(image, batch["mask"])}


def eval_batch(batch: dict) -> dict:
    """The batch with the pipeline's uint8 ``image`` (``[b, C, S, S]``) normalised to float32
    ``[b, S, S, 3]``; a float32 one (already normalised) as it is."""
    if batch["image"].dtype != jnp.uint8:
        return batch
    image = normalise(channels_last(batch["image"], batch.get("grey")))
    return {**batch, "image": _real_rows(image, batch["mask"])}
