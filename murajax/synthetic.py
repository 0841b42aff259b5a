"""Synthetic MURA: a small dataset in the exact MURA-v1.1 layout, for demos and tests.

    python -m murajax.synthetic --out DIR [--num_studies N] [--seed S] [--valid_fraction F]
        [--label_noise P [--noise_mode symmetric|asymmetric]] [--unlabeled_fraction Q]
        [--workers W]

(``--studies`` is the older name of ``--num_studies``) writes ``DIR/MURA-v1.1/`` with
``{train,valid}_image_paths.csv``, ``{train,valid}_labeled_studies.csv`` and
``{train,valid}/XR_<TYPE>/patient<NNNNN>/study<K>_{positive,negative}/image<V>.png``.

Each view is a stylised radiograph: dark background, soft tissue, bones shaped by study type
(two forearm bones, phalanges, carpals, a humeral head, ...), the limb rotated and shifted at
random. Abnormal studies show orthopaedic hardware (a saturated metal plate with screws, or a
cluster of screws) and/or a healing fracture (a dense fusiform callus crossed by a thick dark
line) at a random place along a bone, sized to stay visible at 64x64; about 10% of an abnormal
study's views (never all) do not show it, as in real studies. Normal studies never contain
either. Distractors in both classes: burned-in laterality letters 'R'/'L' (bright, boxed or
not, in any corner), collimation borders, joints (natural gaps across bones), varying exposure,
contrast, gamma and noise. Most PNGs are 8-bit grayscale, about 12% RGB; longest side 320-512,
some as narrow as ~90 px. Patients do not overlap between train and valid; every study type
appears in train once there are at least 7 train studies; each split holds both (true) labels.
The bytes are a function of (num_studies, seed, valid_fraction, label_noise, noise_mode,
unlabeled_fraction) only; with the defaults (no noise, no unlabeled studies) they are exactly
those of the sets written before the noise options existed.

Noisy labels (the benchmark of learning from noisy and missing labels). ``label_noise`` P
gives a wrong label to round(P * L) of the L labelled *train* studies (all train studies when
``unlabeled_fraction`` is 0): ``noise_mode='symmetric'`` picks them among all of them (either
direction), ``'asymmetric'`` only among the abnormal ones (abnormal -> normal, as a missed
finding is; P may not ask for more flips than there are abnormal train studies, less one, so
train keeps a labelled abnormal study). The valid split stays clean. The images always show
the TRUE label: the abnormality is drawn exactly as without noise (a flipped study's PNGs are
byte-identical to the clean set's), only the label the dataset *gives* changes. In MURA that
label lives in two places, the study folder's suffix (``study1_positive``) and
``train_labeled_studies.csv``, and murajax.data.mura refuses a row whose label disagrees with
its folder suffix. A flipped study is therefore written as a mislabelled real study would be:
the given label in BOTH the folder name and the CSV (an abnormal study flipped to normal lives
in ``study1_negative/`` with label 0), so murajax reads the given label without error and
nothing in the MURA files tells the flip apart. The truth is in
``MURA-v1.1/flipped_train_studies.csv`` (header ``study,true_label,given_label``, then one row
a flipped study in plan order; ``study`` is the folder as the MURA CSVs spell it, e.g.
``MURA-v1.1/train/XR_WRIST/patient00001/study1_negative/``, i.e. with the given suffix).

Missing labels. ``unlabeled_fraction`` Q marks round(Q * T) of the T train studies as
unlabeled and lists them in ``MURA-v1.1/unlabeled_train_studies.csv`` (header
``study,true_label``). In ``train_labeled_studies.csv`` their label is empty (murajax reads
them with label -1: out of the supervised loss, seen by BatchNorm and by a mean teacher,
``config.teacher``); their images and folders are those of the clean set, and they are never
flipped. Unlabeled and flipped studies are drawn from their own random
streams (``[seed, 3]`` and ``[seed, 2]``, apart from the plan's and the images'), so turning
either on changes no image and no valid file; the unlabeled studies do not depend on P. The
two files are written only when their option is non-zero (the defaults write exactly the
files they always did).

This module owns the synthetic set: the plan of studies (``_plan``) and its given labels
(``_corrupt_labels``), the drawing of one view (``_render_view`` and its steps, which draw from
one random stream in a fixed order), the layout on disk and the command line.

A tiny DenseNet (``densenet_tiny``) trained at 64x64 (batch 32, Adam 3e-3) on the default 400
studies reaches a study-level validation AUROC above 0.9 within a few epochs (about a minute
of CPU).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import multiprocessing as mp
import os
import pathlib
import shutil
import sys
import tempfile
from typing import NamedTuple

import numpy as np
from absl import flags
from PIL import Image, ImageDraw

from murajax import command_flags
from murajax.data.mura import STUDY_TYPES
from murajax.errors import UserError

# Train studies per type in MURA-v1.1: the type mix of the synthetic set.
_TYPE_WEIGHTS = np.asarray([1754, 1935, 877, 2018, 592, 2821, 3460], dtype=np.float64)
_ABNORMAL_FRACTION = 0.4
_VIEWS_P = np.asarray([0.15, 0.35, 0.35, 0.15])  # 1..4 views
_RGB_FRACTION = 0.12
_MARKER = ".synthetic.json"
_VERSION = 1
NOISE_MODES = ("symmetric", "asymmetric")
FLIPPED_CSV = "flipped_train_studies.csv"
UNLABELED_CSV = "unlabeled_train_studies.csv"
_NOISE_STREAM = 2  # np.random.default_rng([seed, _NOISE_STREAM]): which studies flip
_UNLABELED_STREAM = 3  # ... which studies are unlabeled (0: the plan, 1: the images)


# ------------------------------------------------------------------------------------------
# Drawing helpers (PIL ImageDraw on 'L' masks).


def _capsule(draw: ImageDraw.ImageDraw, p0, p1, width, fill=255):
    w = max(1, int(round(width)))
    draw.line([tuple(p0), tuple(p1)], fill=fill, width=w)
    r = width / 2.0
    for x, y in (p0, p1):
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)


def _quad(draw, center, axis, normal, half_len, half_width, fill=255):
    c, a, n = np.asarray(center), np.asarray(axis), np.asarray(normal)
    pts = [c + a * half_len + n * half_width, c + a * half_len - n * half_width,
           c - a * half_len - n * half_width, c - a * half_len + n * half_width]
    draw.polygon([tuple(p) for p in pts], fill=fill)


def _letter(draw, letter, x, y, h, stroke, fill):
    """Draws 'R' or 'L' with strokes (no fonts: identical bytes everywhere)."""
    w = 0.62 * h
    s = max(1, int(round(stroke)))
    if letter == "L":
        draw.line([(x, y), (x, y + h)], fill=fill, width=s)
        draw.line([(x - s / 2, y + h - s / 2), (x + w, y + h - s / 2)], fill=fill, width=s)
    else:
        draw.line([(x, y), (x, y + h)], fill=fill, width=s)
        bowl = [x - s / 2, y, x + w, y + 0.55 * h]
        draw.arc(bowl, start=-90, end=90, fill=fill, width=s)
        draw.line([(x, y + s / 2), (x + w / 2, y + s / 2)], fill=fill, width=s)
        draw.line([(x, y + 0.55 * h - s / 2), (x + w / 2, y + 0.55 * h - s / 2)], fill=fill,
                  width=s)
        draw.line([(x + 0.3 * w, y + 0.55 * h), (x + w, y + h)], fill=fill, width=s)


def _mask(size):
    image = Image.new("L", size, 0)
    return image, ImageDraw.Draw(image)


# ------------------------------------------------------------------------------------------
# Anatomy.


def _bone_segments(rng, study_type: str, length: float, short: float):
    """Bone segments of ``study_type`` as (t0, s0, t1, s1, width) tuples (see ``_Bone``)."""
    L, S = length, short
    bones = []
    if study_type == "XR_HUMERUS":
        bones.append((-0.8 * L, 0.0, 0.8 * L, 0.0, rng.uniform(0.14, 0.2) * S))
    elif study_type == "XR_FOREARM":
        gap = rng.uniform(0.09, 0.13) * S
        bones.append((-0.8 * L, -gap, 0.8 * L, -gap * 0.8, rng.uniform(0.08, 0.11) * S))
        bones.append((-0.8 * L, gap, 0.8 * L, gap * 1.1, rng.uniform(0.07, 0.1) * S))
    elif study_type == "XR_WRIST":
        gap = rng.uniform(0.08, 0.11) * S
        t_joint = rng.uniform(-0.1, 0.1) * L
        bones.append((-0.8 * L, -gap, t_joint, -gap, rng.uniform(0.09, 0.12) * S))
        bones.append((-0.8 * L, gap, t_joint - 0.03 * L, gap, rng.uniform(0.07, 0.1) * S))
        for k in range(6):  # carpals
            t = t_joint + (0.06 + 0.07 * (k // 3)) * L
            s = (-1 + (k % 3)) * 0.1 * S
            r = rng.uniform(0.04, 0.06) * S
            bones.append((t, s, t + 0.01 * L, s, 2 * r))
        for k in range(4):  # metacarpals
            s = (-1.5 + k) * 0.11 * S
            bones.append((t_joint + 0.28 * L, s, 0.8 * L, s * 1.4, rng.uniform(0.05, 0.07) * S))
    elif study_type == "XR_HAND":
        base = rng.uniform(-0.45, -0.3) * L
        for k in range(5):
            s0 = (-2 + k) * 0.09 * S
            spread = (-2 + k) * rng.uniform(0.05, 0.09) * S
            w = rng.uniform(0.045, 0.06) * S
            t = base
            seg_lengths = [0.3, 0.2, 0.14, 0.1] if k else [0.25, 0.18, 0.12]
            for j, seg in enumerate(seg_lengths):
                t1 = t + seg * L
                bones.append((t, s0 + spread * j, t1 - 0.02 * L, s0 + spread * (j + 1), w))
                t = t1
    elif study_type == "XR_FINGER":
        w = rng.uniform(0.13, 0.2) * S
        t = -0.8 * L
        for seg in (0.55, 0.4, 0.3, 0.25):
            t1 = t + seg * L
            bones.append((t, 0.0, t1 - 0.03 * L, 0.0, w))
            t = t1
            w *= 0.85
    elif study_type == "XR_ELBOW":
        bend = math.radians(rng.uniform(15, 80)) * rng.choice([-1, 1])
        bones.append((-0.8 * L, 0.0, 0.0, 0.0, rng.uniform(0.14, 0.19) * S))
        bones.append((-0.03 * L, 0.0, 0.03 * L, 0.0, rng.uniform(0.25, 0.3) * S))  # condyles
        for s_off, w in ((-0.06, 0.09), (0.06, 0.08)):
            t1 = 0.8 * L * math.cos(bend)
            s1 = 0.8 * L * math.sin(bend)
            bones.append((0.02 * L, s_off * S, t1, s1 + s_off * S, w * S))
    else:  # XR_SHOULDER
        bones.append((-0.1 * L, 0.0, 0.8 * L, 0.0, rng.uniform(0.16, 0.22) * S))
        r = rng.uniform(0.16, 0.22) * S
        bones.append((-0.12 * L, 0.0, -0.1 * L, 0.0, 2 * r))  # humeral head
        bones.append((-0.3 * L, -0.5 * S, -0.25 * L, 0.5 * S, rng.uniform(0.06, 0.09) * S))
        bones.append((-0.55 * L, -0.8 * S, -0.45 * L, 0.8 * S, rng.uniform(0.05, 0.08) * S))
    return bones


class _Bone(NamedTuple):
    """A bone segment in limb coordinates: from (t0, s0) to (t1, s1), ``width`` across.

    t runs along the limb axis (0 = limb centre), s across it; units are half-resolution
    pixels.
    """

    t0: float
    s0: float
    t1: float
    s1: float
    width: float

    def at(self, f: float) -> tuple[float, float]:
        """The limb coordinates of the point a fraction ``f`` along the bone."""
        return self.t0 + f * (self.t1 - self.t0), self.s0 + f * (self.s1 - self.s0)

    def direction(self) -> np.ndarray:
        """The unit vector along the bone, in limb coordinates."""
        dt, ds = self.t1 - self.t0, self.s1 - self.s0
        return np.asarray([dt, ds]) / max(1e-6, math.hypot(dt, ds))


def _bones(rng, study_type: str, length: float, short: float) -> list[_Bone]:
    """The bones of ``study_type``'s limb in limb coordinates (see ``_Bone``)."""
    return [_Bone(*segment) for segment in _bone_segments(rng, study_type, length, short)]


@dataclasses.dataclass(frozen=True)
class _Limb:
    """Where the limb lies in one view, at half resolution: the view's size, the limb's
    length and width scales, its centre and its axis (and the normal to it) in pixels."""

    width: int  # the view's full-resolution size
    height: int
    hw: int  # half resolution
    hh: int
    length: float
    short: float
    center: np.ndarray
    axis: np.ndarray
    normal: np.ndarray

    def point(self, t, s) -> np.ndarray:
        """Half-resolution pixel coordinates of limb coordinates (t, s)."""
        return self.center + self.axis * t + self.normal * s

    def fpoint(self, t, s) -> np.ndarray:
        """Full-resolution pixel coordinates of limb coordinates (t, s)."""
        return self.point(t, s) * 2.0


def _view_size(rng, study_type: str) -> tuple[int, int]:
    """(width, height): longest side up to 512; some narrow (fingers, forearms)."""
    longest = int(rng.integers(320, 513))
    if rng.random() < 0.12 or (study_type == "XR_FINGER" and rng.random() < 0.4):
        shortest = int(rng.integers(88, 160))
    else:
        shortest = int(longest * rng.uniform(0.65, 1.0))
    if rng.random() < 0.75:
        return shortest, longest
    return longest, shortest


def _place_limb(rng, width: int, height: int) -> _Limb:
    """The limb along the view's long side, rotated by up to 35 degrees (either way up) and
    shifted at random. The anatomy is drawn at half resolution (soft shapes)."""
    hw, hh = (width + 1) // 2, (height + 1) // 2
    base_angle = math.pi / 2 if height >= width else 0.0
    phi = base_angle + math.radians(rng.uniform(-35, 35)) + (math.pi if rng.random() < 0.5 else 0)
    axis = np.asarray([math.cos(phi), math.sin(phi)])
    normal = np.asarray([-axis[1], axis[0]])
    center = np.asarray([hw / 2, hh / 2]) + rng.uniform(-0.12, 0.12, 2) * np.asarray([hw, hh])
    return _Limb(width, height, hw, hh, float(max(hw, hh)), float(min(hw, hh)), center, axis,
                 normal)


@dataclasses.dataclass
class _AnatomyMasks:
    """The half-resolution 'L' masks of one view's anatomy, with their drawing handles."""

    soft: Image.Image  # soft tissue
    bone: Image.Image
    extra: Image.Image  # denser bone: fracture callus
    marrow: Image.Image
    soft_draw: ImageDraw.ImageDraw
    bone_draw: ImageDraw.ImageDraw
    extra_draw: ImageDraw.ImageDraw
    marrow_draw: ImageDraw.ImageDraw


def _draw_anatomy(rng, study_type: str, limb: _Limb) -> tuple[_AnatomyMasks, list[_Bone]]:
    """Soft tissue, bones and marrow of the limb; returns the masks and the bones."""
    point, short, length = limb.point, limb.short, limb.length
    size = (limb.hw, limb.hh)
    soft, soft_draw = _mask(size)
    _capsule(soft_draw, point(-1.2 * length, 0), point(1.2 * length, 0),
             rng.uniform(0.5, 0.8) * short)
    if study_type in ("XR_HAND", "XR_WRIST"):
        soft_draw.ellipse(_bbox(point(0.15 * length, 0), 0.45 * short), fill=255)
    bone, bone_draw = _mask(size)
    extra, extra_draw = _mask(size)
    marrow, marrow_draw = _mask(size)
    bones = _bones(rng, study_type, length, short)
    for t0, s0, t1, s1, w in bones:
        _capsule(bone_draw, point(t0, s0), point(t1, s1), w)
        if w > 0.06 * short:
            _capsule(marrow_draw, point(t0, s0), point(t1, s1), 0.45 * w)
    masks = _AnatomyMasks(soft, bone, extra, marrow, soft_draw, bone_draw, extra_draw,
                          marrow_draw)
    return masks, bones


def _main_bone(bones: list[_Bone]) -> _Bone:
    """The bone lesions go on: the longest weighted by width."""
    return max(bones, key=lambda b: math.hypot(b[2] - b[0], b[3] - b[1]) * b[4])


def _visible_fraction(rng, limb: _Limb, bone: _Bone) -> float:
    """A random place along ``bone`` inside the central part of the view."""
    hw, hh = limb.hw, limb.hh
    for _ in range(30):
        f = rng.uniform(0.05, 0.95)
        x, y = limb.point(*bone.at(f))
        if 0.18 * hw <= x <= 0.82 * hw and 0.18 * hh <= y <= 0.82 * hh:
            return f
    a, b = limb.point(bone.t0, bone.s0), limb.point(bone.t1, bone.s1)
    d = b - a
    centre = np.asarray([hw / 2, hh / 2])
    return float(np.clip(np.dot(centre - a, d) / max(1e-6, np.dot(d, d)), 0.0, 1.0))


def _draw_fracture(rng, limb: _Limb, bone: _Bone, masks: _AnatomyMasks) -> None:
    """A healing fracture: a fusiform callus around the bone, crossed by a thick dark jagged
    line."""
    point, short, w = limb.point, limb.short, bone.width
    ft, fs = bone.at(_visible_fraction(rng, limb, bone))
    d = bone.direction()
    along = (d[0], d[1])  # bone axis in limb coordinates
    across = (-d[1], d[0])
    a = max(rng.uniform(1.0, 1.4) * w, 0.1 * short)
    b = max(rng.uniform(0.75, 0.95) * w, 0.06 * short)
    angles = np.linspace(0.0, 2 * math.pi, 24, endpoint=False)
    callus = [tuple(point(ft + a * math.cos(q) * along[0] + b * math.sin(q) * across[0],
                          fs + a * math.cos(q) * along[1] + b * math.sin(q) * across[1]))
              for q in angles]
    masks.bone_draw.polygon(callus, fill=255)
    masks.extra_draw.polygon(callus, fill=255)
    tilt = rng.uniform(-0.5, 0.5)
    pts = []
    for k in range(5):
        u = (-1.0 + 0.5 * k) * 1.1 * b
        v = tilt * u + rng.uniform(-0.1, 0.1) * w
        pts.append(tuple(point(ft + v * along[0] + u * across[0],
                               fs + v * along[1] + u * across[1])))
    thickness = max(3, int(round(rng.uniform(0.07, 0.1) * short)))
    masks.bone_draw.line(pts, fill=0, width=thickness)
    masks.extra_draw.line(pts, fill=0, width=thickness)
    masks.marrow_draw.line(pts, fill=0, width=thickness)


def _expose(rng, limb: _Limb, masks: _AnatomyMasks, fracture: bool) -> np.ndarray:
    """float32 [hh, hw] in [0, 1]: the anatomy's densities over a dark background with a
    gradient, a light collimation border sometimes, then exposure and contrast."""
    hw, hh = limb.hw, limb.hh
    background = rng.uniform(0.02, 0.12)
    tissue = rng.uniform(0.16, 0.28)
    bone_level = rng.uniform(0.35, 0.5)
    canvas = np.full((hh, hw), background, dtype=np.float32)
    gx = np.linspace(-1, 1, hw, dtype=np.float32)[None, :]
    gy = np.linspace(-1, 1, hh, dtype=np.float32)[:, None]
    g = rng.uniform(-0.05, 0.05, 2).astype(np.float32)
    canvas += g[0] * gx + g[1] * gy
    canvas += np.asarray(masks.soft, dtype=np.float32) * (tissue / 255.0)
    canvas += np.asarray(masks.bone, dtype=np.float32) * (bone_level / 255.0)
    if fracture:
        canvas += np.asarray(masks.extra, dtype=np.float32) * (rng.uniform(0.1, 0.15) / 255.0)
    canvas -= np.asarray(masks.marrow, dtype=np.float32) * (rng.uniform(0.08, 0.15) / 255.0)
    _collimate(rng, canvas)
    # Exposure and contrast of the anatomy.
    canvas *= rng.uniform(0.85, 1.15)
    canvas += rng.uniform(-0.04, 0.06)
    np.clip(canvas, 0.0, 1.0, out=canvas)
    return canvas


def _collimate(rng, canvas: np.ndarray) -> None:
    """Collimation, sometimes: the unexposed border along one edge is light grey."""
    hh, hw = canvas.shape
    if rng.random() < 0.3:
        edge = int(rng.integers(0, 4))
        k = int(rng.uniform(0.04, 0.12) * (hw if edge < 2 else hh))
        level = rng.uniform(0.45, 0.7)
        if edge == 0:
            canvas[:, :k] = level
        elif edge == 1:
            canvas[:, hw - k:] = level
        elif edge == 2:
            canvas[:k, :] = level
        else:
            canvas[hh - k:, :] = level


def _tone_map(rng, canvas: np.ndarray, width: int, height: int) -> Image.Image:
    """A gamma curve keeping the anatomy below 0.88 of full scale, then up to full size (the
    anatomy is smooth, so this costs nothing visible and saves time)."""
    curve = (np.linspace(0.0, 1.0, 1024) ** rng.uniform(0.75, 1.3) * (0.88 * 255.0) + 0.5)
    anatomy = curve.astype(np.uint8)[(canvas * 1023.0 + 0.5).astype(np.uint16)]
    return Image.fromarray(anatomy).resize((width, height), Image.BILINEAR)


def _draw_hardware(rng, draw, limb: _Limb, bone: _Bone, lesion: str) -> None:
    """Orthopaedic hardware at full resolution beside a random visible place on ``bone``: a
    saturated metal plate with screws ('plate', 'fracture+plate') or a cluster of screws."""
    width, height, axis, normal, w = limb.width, limb.height, limb.axis, limb.normal, bone.width
    scale = 2.0
    mt, ms = bone.at(_visible_fraction(rng, limb, bone))
    d = bone.direction()
    bone_axis = axis * d[0] + normal * d[1]
    bone_normal = np.asarray([-bone_axis[1], bone_axis[0]])
    side = rng.choice([-1.0, 1.0])
    full_short = min(width, height)
    metal = int(rng.integers(245, 256))
    plate_w = rng.uniform(0.08, 0.11) * full_short
    c = limb.fpoint(mt, ms) + bone_normal * side * (w * scale / 2)
    if lesion != "screws":
        plate_len = rng.uniform(0.3, 0.45) * max(width, height)
        _quad(draw, c, bone_axis, bone_normal, plate_len / 2, plate_w / 2, fill=metal)
        n_screws = int(rng.integers(3, 6))
        offsets = np.linspace(-0.4, 0.4, n_screws) * plate_len
    else:
        n_screws = int(rng.integers(2, 5))
        offsets = (np.arange(n_screws) - (n_screws - 1) / 2) * rng.uniform(1.3, 2.0) * plate_w
    screw_len = w * scale * rng.uniform(1.1, 1.5) + plate_w
    for o in offsets:
        p = c + bone_axis * o
        tip = p - bone_normal * side * screw_len
        _capsule(draw, p, tip, 0.45 * plate_w, fill=metal)
        draw.ellipse(_bbox(p, 0.55 * plate_w), fill=metal)


def _draw_marker(rng, draw, width: int, height: int) -> None:
    """The distractor, usually: a burned-in laterality letter in a corner, nearly as bright as
    metal, boxed or not."""
    if rng.random() < 0.85:
        h = rng.uniform(0.07, 0.12) * min(width, height) + 8
        margin = rng.uniform(0.03, 0.12, 2) * np.asarray([width, height])
        x = margin[0] if rng.random() < 0.5 else width - margin[0] - 0.62 * h
        y = margin[1] if rng.random() < 0.5 else height - margin[1] - h
        _letter(draw, "R" if rng.random() < 0.5 else "L", x, y, h,
                max(2.0, 0.17 * h), int(rng.integers(150, 216)))
        if rng.random() < 0.3:
            pad = 0.25 * h
            draw.rectangle([x - pad, y - pad, x + 0.62 * h + pad, y + h + pad],
                           outline=int(rng.integers(150, 230)), width=max(1, int(0.06 * h)))


def _develop(rng, anatomy: Image.Image, detail: Image.Image, rgb: bool) -> Image.Image:
    """Anatomy and details combined (metal is radio-opaque: it saturates whatever the
    exposure; markers are burned in), noise added, tinted if ``rgb``."""
    image = np.maximum(np.asarray(anatomy), np.asarray(detail)).astype(np.float32)
    sigma = rng.uniform(0.004, 0.02) * 255.0
    image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(sigma)
    pixels = np.clip(image, 0, 255).astype(np.uint8)
    if rgb:
        tint = rng.uniform(0.92, 1.0, 3).astype(np.float32)
        return Image.fromarray((pixels[:, :, None] * tint).astype(np.uint8))
    return Image.fromarray(pixels)


def _render_view(rng: np.random.Generator, study_type: str, lesion: str | None,
                 rgb: bool) -> Image.Image:
    """One view as a PIL 'L' or 'RGB' image.

    The anatomy is drawn at half resolution and scaled up; sharp details (hardware, markers)
    are drawn at full size. The steps draw from ``rng`` in a fixed order: the bytes of a view
    are a function of the generator's state and the arguments.
    """
    width, height = _view_size(rng, study_type)
    limb = _place_limb(rng, width, height)
    masks, bones = _draw_anatomy(rng, study_type, limb)
    main = _main_bone(bones)
    fracture = lesion in ("fracture", "fracture+plate")
    if fracture:
        _draw_fracture(rng, limb, main, masks)
    anatomy = _tone_map(rng, _expose(rng, limb, masks, fracture), width, height)
    detail, detail_draw = _mask((width, height))
    if lesion in ("plate", "fracture+plate", "screws"):
        _draw_hardware(rng, detail_draw, limb, main, lesion)
    _draw_marker(rng, detail_draw, width, height)
    return _develop(rng, anatomy, detail, rgb)


def _bbox(c, r):
    return [c[0] - r, c[1] - r, c[0] + r, c[1] + r]


# ------------------------------------------------------------------------------------------
# Dataset layout.


class _Study(NamedTuple):
    """One planned study: where it goes, its label and how many views it has."""

    split: str  # "train" or "valid"
    study_type: str  # a STUDY_TYPES name
    patient: int  # patient number, unique across the splits
    number: int  # the study's number among the patient's studies of this type (1, 2, ...)
    label: int  # the TRUE label, the one the images show: 1 abnormal, 0 normal
    num_views: int
    given: int | None = None  # the label the dataset gives, if not ``label`` (label noise)
    unlabeled: bool = False  # listed in unlabeled_train_studies.csv

    @property
    def given_label(self) -> int:
        """The label the folder name and the CSVs give."""
        return self.label if self.given is None else self.given

    @property
    def folder(self) -> str:
        """The study folder relative to MURA-v1.1 (its suffix: the given label)."""
        return f"{self.split}/{self.study_type}/patient{self.patient:05d}/study{self.number}_" + (
            "positive" if self.given_label else "negative")

    @property
    def csv_path(self) -> str:
        """The study as the MURA CSVs spell it: ``MURA-v1.1/<folder>/``."""
        return f"MURA-v1.1/{self.folder}/"


def _plan(num_studies: int, seed: int, valid_fraction: float) -> list[_Study]:
    """Every study of the set, in order (train first)."""
    rng = np.random.default_rng([seed, 0])
    n_valid = int(round(num_studies * valid_fraction))
    if valid_fraction > 0 and num_studies >= 4:
        n_valid = min(max(n_valid, 2), num_studies - 2)
    n_train = num_studies - n_valid
    plan = []
    patient = 0
    for split, n in (("train", n_train), ("valid", n_valid)):
        if n == 0:
            continue
        n_abnormal = int(round(n * _ABNORMAL_FRACTION))
        if n >= 2:
            n_abnormal = min(max(n_abnormal, 1), n - 1)
        labels = np.zeros(n, dtype=np.int64)
        labels[:n_abnormal] = 1
        labels = rng.permutation(labels)
        # Every study type appears (when n >= 7), the rest follow MURA's mix.
        types = np.concatenate([
            np.arange(len(STUDY_TYPES)),
            rng.choice(len(STUDY_TYPES), size=n, p=_TYPE_WEIGHTS / _TYPE_WEIGHTS.sum()),
        ])
        types = rng.permutation(types[:n]) if n >= len(STUDY_TYPES) else types[
            len(STUDY_TYPES):]
        views = rng.choice(4, size=n, p=_VIEWS_P) + 1
        i = 0
        while i < n:
            patient += 1
            per_patient = int(rng.choice([1, 2, 3], p=[0.7, 0.25, 0.05]))
            counters: dict[int, int] = {}
            for _ in range(min(per_patient, n - i)):
                t = int(types[i])
                counters[t] = counters.get(t, 0) + 1
                plan.append(_Study(split, STUDY_TYPES[t], patient, counters[t],
                                   int(labels[i]), int(views[i])))
                i += 1
    return plan


def _corrupt_labels(plan: list[_Study], seed: int, label_noise: float, noise_mode: str,
                    unlabeled_fraction: float) -> list[_Study]:
    """``plan`` with round(unlabeled_fraction * T) of its T train studies marked unlabeled and
    round(label_noise * L) of the L others given the wrong label (only abnormal ones if
    ``noise_mode`` is 'asymmetric'). Valid studies are never touched; each choice has its own
    random stream, so the images (streams [seed, 1, position]) do not change."""
    plan = list(plan)
    train = [i for i, study in enumerate(plan) if study.split == "train"]
    unlabeled: set[int] = set()
    n_unlabeled = int(round(unlabeled_fraction * len(train)))
    if n_unlabeled:
        order = np.random.default_rng([seed, _UNLABELED_STREAM]).permutation(len(train))
        unlabeled = {train[int(k)] for k in order[:n_unlabeled]}
        for i in sorted(unlabeled):
            plan[i] = plan[i]._replace(unlabeled=True)
    labelled = [i for i in train if i not in unlabeled]
    n_flips = int(round(label_noise * len(labelled)))
    if not n_flips:
        return plan
    candidates = labelled
    if noise_mode == "asymmetric":
        candidates = [i for i in labelled if plan[i].label == 1]
        if n_flips > len(candidates) - 1:
            at_most = math.floor(max(0, len(candidates) - 1) / len(labelled) * 1000) / 1000
            raise UserError(
                f"label_noise={label_noise} asks to flip {n_flips} of the {len(labelled)} "
                f"labelled train studies, but asymmetric noise flips only abnormal studies and "
                f"there are {len(candidates)} (one must keep its label). Use a label_noise "
                f"of at most {at_most}, noise_mode='symmetric', or more studies."
            )
    order = np.random.default_rng([seed, _NOISE_STREAM]).permutation(len(candidates))
    for k in sorted(int(k) for k in order[:n_flips]):
        i = candidates[k]
        plan[i] = plan[i]._replace(given=1 - plan[i].label)
    return plan


def _write_study(mura: pathlib.Path, seed: int, position: int, study: _Study) -> None:
    """Renders and writes the views of the ``position``-th study of the plan, from its own
    random stream."""
    rng = np.random.default_rng([seed, 1, position])
    folder = mura / study.folder
    folder.mkdir(parents=True, exist_ok=True)
    n_views = study.num_views
    lesion = None
    if study.label:
        lesion = str(rng.choice(["plate", "screws", "fracture", "fracture+plate"],
                                p=[0.35, 0.2, 0.3, 0.15]))
    shows = rng.random(n_views) < 0.9 if study.label else np.zeros(n_views, dtype=bool)
    if study.label:
        shows[int(rng.integers(n_views))] = True
    for v in range(n_views):
        image = _render_view(rng, study.study_type, lesion if shows[v] else None,
                             rgb=bool(rng.random() < _RGB_FRACTION))
        image.save(folder / f"image{v + 1}.png", format="PNG", compress_level=1)


def _write_studies(mura: str, seed: int, items) -> None:
    """Renders and writes the given (position in the plan, study) studies."""
    for position, study in items:
        _write_study(pathlib.Path(mura), seed, position, study)


def _write(mura: pathlib.Path, plan: list[_Study], seed: int, num_workers: int) -> None:
    """The images (rendered by ``num_workers`` processes) and the CSVs of ``plan``."""
    items = list(enumerate(plan))
    if num_workers <= 1 or len(items) < 32:
        _write_studies(str(mura), seed, items)
    else:
        # Each study has its own random stream: the bytes do not depend on the workers. Spawn
        # (not fork) once JAX is loaded, as forking a multithreaded JAX process is unsafe.
        method = "fork" if "jax" not in sys.modules and "fork" in mp.get_all_start_methods() \
            else "spawn"
        chunks = [items[i::num_workers * 4] for i in range(num_workers * 4)]
        with concurrent.futures.ProcessPoolExecutor(
            num_workers, mp_context=mp.get_context(method)
        ) as pool:
            for future in [pool.submit(_write_studies, str(mura), seed, c) for c in chunks]:
                future.result()
    _write_csvs(mura, plan)


def _write_csvs(mura: pathlib.Path, plan: list[_Study]) -> None:
    """The four CSVs of MURA-v1.1, rows in plan order."""
    rows = {"train": ([], []), "valid": ([], [])}
    for study in plan:
        image_rows, study_rows = rows[study.split]
        image_rows += [f"{study.csv_path}image{v + 1}.png" for v in range(study.num_views)]
        study_rows.append(f"{study.csv_path},{'' if study.unlabeled else study.given_label}")
    for split, (image_rows, study_rows) in rows.items():
        (mura / f"{split}_image_paths.csv").write_text("".join(r + "\n" for r in image_rows))
        (mura / f"{split}_labeled_studies.csv").write_text(
            "".join(r + "\n" for r in study_rows))


def _write_truth_csvs(mura: pathlib.Path, plan: list[_Study], flipped: bool,
                      unlabeled: bool) -> None:
    """``flipped_train_studies.csv`` (if ``flipped``) and ``unlabeled_train_studies.csv`` (if
    ``unlabeled``): a header, then a row a study in plan order."""
    if flipped:
        rows = [f"{s.csv_path},{s.label},{s.given_label}" for s in plan
                if s.given_label != s.label]
        (mura / FLIPPED_CSV).write_text(
            "".join(r + "\n" for r in ["study,true_label,given_label"] + rows))
    if unlabeled:
        rows = [f"{s.csv_path},{s.label}" for s in plan if s.unlabeled]
        (mura / UNLABELED_CSV).write_text("".join(r + "\n" for r in ["study,true_label"] + rows))


def _check_rate(value, name: str) -> float:
    """``value`` as a float in [0, 1), or a UserError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise UserError(f"{name} must be a number in [0, 1), got {value!r}")
    value = float(value)
    if not 0.0 <= value < 1.0:  # NaN fails too
        raise UserError(f"{name} must be in [0, 1) (a fraction of the train studies), got "
                        f"{value!r}")
    return value


def generate(out_dir, num_studies: int = 400, seed: int = 0, valid_fraction: float = 0.2,
             num_workers: int | None = None, *, label_noise: float = 0.0,
             noise_mode: str = "symmetric", unlabeled_fraction: float = 0.0) -> pathlib.Path:
    """Writes synthetic MURA to ``out_dir/MURA-v1.1`` and returns that folder.

    ``num_workers`` processes render the images (default: one per CPU, at most 8); the output
    is the same for any number. ``label_noise`` (in [0, 1)), ``noise_mode`` ('symmetric' or
    'asymmetric') and ``unlabeled_fraction`` (in [0, 1)): noisy and missing train labels, see
    the module docstring; ``noise_mode`` matters only when ``label_noise`` > 0.

    If the folder already holds a synthetic set made with the same arguments, it is reused.
    """
    if isinstance(num_studies, bool) or not isinstance(num_studies, (int, np.integer)) or (
        num_studies < 2
    ):
        raise UserError(f"num_studies must be an integer >= 2, got {num_studies!r}")
    if not 0.0 <= float(valid_fraction) < 1.0:
        raise UserError(f"valid_fraction must be in [0, 1), got {valid_fraction!r}")
    num_studies, seed, valid_fraction = int(num_studies), int(seed), float(valid_fraction)
    if seed < 0:
        raise UserError(f"seed must be >= 0, got {seed}")
    label_noise = _check_rate(label_noise, "label_noise")
    if noise_mode not in NOISE_MODES:
        raise UserError(f"noise_mode must be 'symmetric' or 'asymmetric', got {noise_mode!r}")
    unlabeled_fraction = _check_rate(unlabeled_fraction, "unlabeled_fraction")
    out = pathlib.Path(os.path.expanduser(str(out_dir))).absolute()
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder. Choose another --out folder.")
    mura = out / "MURA-v1.1"
    params = {"version": _VERSION, "num_studies": num_studies, "seed": seed,
              "valid_fraction": valid_fraction}
    # Only non-default options join the marker: a default set's marker (and every other byte)
    # is the one written before these options existed, and such sets are still reused.
    if label_noise:
        params.update(label_noise=label_noise, noise_mode=noise_mode)
    if unlabeled_fraction:
        params["unlabeled_fraction"] = unlabeled_fraction
    if mura.exists():
        try:
            existing = json.loads((mura / _MARKER).read_text())
        except (OSError, ValueError):
            existing = None
        if existing == params:
            return mura
        raise UserError(
            f"{mura}: already exists and is not a synthetic set made with {params}. Remove it "
            "or choose another output folder."
        )
    plan = _corrupt_labels(_plan(num_studies, seed, valid_fraction), seed, label_noise,
                           noise_mode, unlabeled_fraction)  # before any write: may refuse P
    out.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".MURA-v1.1.tmp-", dir=out))
    try:
        if num_workers is None:
            num_workers = min(8, os.cpu_count() or 1)
        _write(tmp, plan, seed, int(num_workers))
        _write_truth_csvs(tmp, plan, flipped=label_noise > 0, unlabeled=unlabeled_fraction > 0)
        (tmp / _MARKER).write_text(json.dumps(params, sort_keys=True) + "\n")
        os.chmod(tmp, 0o755)
        os.replace(tmp, mura)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return mura


def _define_flags(values) -> None:
    flags.DEFINE_string("out", None, "folder to write MURA-v1.1/ into", flag_values=values,
                        required=True)
    flags.DEFINE_integer("num_studies", 400, "number of studies", flag_values=values)
    flags.DEFINE_alias("studies", "num_studies", flag_values=values)
    flags.DEFINE_integer("seed", 0, "seed of the whole set", flag_values=values)
    flags.DEFINE_float("valid_fraction", 0.2, "fraction of the studies in the valid split",
                       flag_values=values)
    flags.DEFINE_float("label_noise", 0.0,
                       "fraction of the labelled train studies given the wrong label, in [0, 1) "
                       f"(listed in MURA-v1.1/{FLIPPED_CSV}); valid stays clean",
                       flag_values=values)
    flags.DEFINE_enum("noise_mode", "symmetric", list(NOISE_MODES),
                      "symmetric: flips either way; asymmetric: abnormal -> normal only (missed "
                      "findings)", flag_values=values)
    flags.DEFINE_float("unlabeled_fraction", 0.0,
                       "fraction of the train studies marked unlabeled, in [0, 1) (listed in "
                       f"MURA-v1.1/{UNLABELED_CSV}; still labelled in the MURA CSVs for now)",
                       flag_values=values)
    flags.DEFINE_integer("workers", None,
                         "processes rendering images (default: one per CPU, at most 8)",
                         flag_values=values)


def main(argv=None) -> int:
    """``python -m murajax.synthetic``: prints the MURA-v1.1 folder written; exit 2 on a bad
    argument (``argv``: the arguments without the program name; default ``sys.argv[1:]``)."""
    args = command_flags.parse(
        "python -m murajax.synthetic",
        "Write a synthetic MURA-v1.1 dataset (same layout as the real one).",
        _define_flags, argv)
    try:
        mura = generate(args.out, num_studies=args.num_studies, seed=args.seed,
                        valid_fraction=args.valid_fraction, num_workers=args.workers,
                        label_noise=args.label_noise, noise_mode=args.noise_mode,
                        unlabeled_fraction=args.unlabeled_fraction)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(mura)
    return 0


if __name__ == "__main__":
    sys.exit(main())
