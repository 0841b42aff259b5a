"""Inference: predictions for new radiographs, class activation maps and their overlays.

* ``class_activation_maps(features, kernel, bias)``: M(X) = sum_k w_k f_k(X) per output, from the
  last stage's feature maps and the head's weights (Zhou et al. 2016). With the bias added the map
  is a *logit map*: its spatial mean is exactly the model's logit.
* ``overlay(image, cam)``: the CAM bilinearly upsampled to the original image's size, min-max
  normalised, colour-mapped and alpha-blended onto the image.
* ``Predictor``: a model plus one set of variables per ensemble member. ``predict(paths)`` finds
  the images (image files, study folders, trees of studies; PNG, JPEG, DICOM), decodes and
  preprocesses them one by one (a few threads, at most two batches in memory, never a stack of
  full-size images), runs fixed-size batches (the last one padded, so one compile per input
  shape) through one jitted forward per member, and averages the members' probabilities. A
  study is an image's parent folder; its probability is the mean of its views'; abnormal when
  above the threshold.
* ``run_predict(workdir, inputs, output_dir)``: the ``--mode predict`` entry: a trained run's
  ensemble -> ``predictions.csv`` (+ ``errors.csv`` for unreadable files, + ``cam/*.png``).
"""

from __future__ import annotations

import collections
import concurrent.futures
import csv
import dataclasses
import functools
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from PIL import Image

from murajax.data.dicom import DICOM_SUFFIXES, is_dicom, read_dicom
from murajax.data.mura import IMAGE_EXTENSIONS as _IMAGE_EXTENSIONS
from murajax.data.mura import STUDY_TYPES
from murajax.errors import UserError

IMAGE_SUFFIXES = tuple(_IMAGE_EXTENSIONS) + DICOM_SUFFIXES
PREDICTION_COLUMNS = ("study", "image", "study_type", "view_probability", "study_probability",
                      "decision")
ERROR_COLUMNS = ("image", "error")
# What a corrupt or unsupported file may raise while decoding; anything else is a bug.
_DECODE_ERRORS = (UserError, OSError, ValueError, SyntaxError)
_NATURAL_RE = re.compile(r"(\d+)")


# ---- class activation maps ----------------------------------------------------------------------


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


# ---- inputs -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ImageInput:
    """One image to predict: where it is, its study and what to call its outputs."""

    path: str  # as found: the user's input joined with the relative path
    study: str  # the image's folder relative to the inputs' common folder (unique per folder)
    study_type: str  # an XR_* component of the path, or ""
    name: str  # unique, file-system-safe stem for per-image outputs (CAM PNGs)


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t.lower() for t in _NATURAL_RE.split(name)]


def study_type_of(path: str | os.PathLike) -> str:
    """The last ``XR_*`` component of the (absolute) path that names a MURA study type, or ''."""
    found = ""
    for part in Path(os.path.abspath(path)).parts:
        if part.upper() in STUDY_TYPES:
            found = part.upper()
    return found


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
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = list(inputs)
    if inputs and all(isinstance(p, ImageInput) for p in inputs):
        return inputs  # already found
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
            dirnames[:] = sorted((d for d in dirnames if not d.startswith(".")), key=_natural_key)
            folder_path = Path(folder)
            study = _study_id(folder_path, base)
            for name in sorted(filenames, key=_natural_key):
                path = folder_path / name
                if _is_image_name(name) or (
                    not name.startswith(".") and "." not in name and is_dicom(path)
                ):
                    found.append((str(path), study, f"{root_name}/{path.relative_to(root)}"))

    images, seen_paths, seen_names = [], set(), set()
    for path, study, rel in found:
        key = os.path.realpath(path)
        if key in seen_paths:
            continue
        seen_paths.add(key)
        stem = _safe("__".join(Path(rel).with_suffix("").parts))
        name, n = stem, 1
        while name.lower() in seen_names:
            n += 1
            name = f"{stem}_{n}"
        seen_names.add(name.lower())
        images.append(ImageInput(path, study, study_type_of(path), name))
    if not images:
        raise UserError(
            f"no images found in {', '.join(inputs)}: expected image files "
            f"({', '.join(IMAGE_SUFFIXES)}) or folders holding them"
        )
    return images


def load_original(path: str | os.PathLike) -> np.ndarray:
    """Decodes an image file at full size as uint8 HxWx3 (DICOM through ``read_dicom``)."""
    if is_dicom(path):
        return as_rgb(read_dicom(path))
    from murajax.data import images

    return as_rgb(images.load_image(path))


def load_preprocessed(path: str | os.PathLike, image_size: int, resize: str) -> np.ndarray:
    """One image as the network sees it at evaluation: float32 ``[S, S, 3]``, normalised."""
    from murajax.data import images

    # Grayscale DICOMs stay single-channel: preprocess replicates the channel after resizing.
    image = read_dicom(path) if is_dicom(path) else images.load_image(path)
    return np.asarray(images.preprocess(image, image_size, resize), np.float32)


def _describe(path: str, error: BaseException) -> str:
    from murajax.data import images

    message = str(error) or type(error).__name__
    # The loader's advice is about training CSVs and config.data.on_bad_image: not ours.
    advice = getattr(images, "_FIX", None)
    if advice and message.endswith(advice):
        message = message[: -len(advice)].rstrip()
    return message if path in message else f"{path}: {message}"


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


# ---- prediction ---------------------------------------------------------------------------------


@dataclasses.dataclass
class PredictionRow:
    """One image's prediction and its study's (repeated on every view of the study)."""

    study: str
    image: str
    study_type: str
    view_probability: float
    study_probability: float
    decision: int  # 1: abnormal (study_probability > threshold), 0: normal
    name: str = ""  # unique stem for per-image outputs
    cam: np.ndarray | None = None  # [h, w] ensemble-mean logit map (see class_activation_maps)

    def csv_row(self) -> dict[str, Any]:
        return {
            "study": self.study,
            "image": self.image,
            "study_type": self.study_type,
            "view_probability": f"{self.view_probability:.6f}",
            "study_probability": f"{self.study_probability:.6f}",
            "decision": self.decision,
        }


class Predictions(list):
    """The rows of ``Predictor.predict`` (a list), with ``errors``: ``(path, message)`` for every
    file that could not be read and so has no row."""

    def __init__(self, rows=(), errors=()):
        super().__init__(rows)
        self.errors: list[tuple[str, str]] = list(errors)


def _forward(model, variables, images, with_cam: bool):
    logits, features = model.apply(variables, images, train=False, return_features=True)
    logits = logits[:, 0].astype(jnp.float32)
    if not with_cam:
        return logits, None
    head = variables["params"]["head"]
    return logits, class_activation_maps(features, head["kernel"], head["bias"])[..., 0]


# Module level with the model static: every Predictor (and member) of one architecture, batch
# size and image size shares a single compiled program.
_forward_jit = jax.jit(_forward, static_argnums=(0, 3))


class Predictor:
    """An ensemble ready to score radiographs.

    Args:
      model: the DenseNet (``murajax.train_state.create_model(config)``).
      variables: one ``{'params', 'batch_stats'}`` per ensemble member.
      image_size, resize: the evaluation transform (``config.data.image_size`` / ``.resize``).
      threshold: a study is abnormal when its probability exceeds it.
      batch_size: images per forward pass; the last batch is padded to it.
      num_workers: decoding threads (decoding and resizing release the GIL).
    """

    def __init__(self, model, variables: Sequence[dict], image_size: int,
                 resize: str = "stretch", threshold: float = 0.5, batch_size: int = 16,
                 num_workers: int | None = None):
        if isinstance(variables, dict):
            variables = [variables]
        if not variables:
            raise UserError("a Predictor needs at least one set of variables")
        if int(batch_size) < 1:
            raise UserError(f"batch size must be >= 1, got {batch_size}")
        from murajax.data import images

        self.model = model
        image_size = images.check_image_size(image_size)
        resize = images.check_resize(resize)
        self._device = jax.local_devices()[0]
        self.variables = [jax.device_put(dict(v), self._device) for v in variables]
        self.image_size = int(image_size)
        self.resize = str(resize)
        self.threshold = float(threshold)
        self.batch_size = int(batch_size)
        self.num_workers = max(1, num_workers if num_workers else min(4, os.cpu_count() or 1))

    @classmethod
    def from_workdir(cls, workdir: str | os.PathLike, *, top_k: int | None = None,
                     batch_size: int | None = None, threshold: float | None = None,
                     num_workers: int | None = None) -> "Predictor":
        """The ensemble of a trained run: its ``top_k`` lowest-validation-loss checkpoints
        (default ``config.eval.ensemble_top_k``), with the run's saved config."""
        from murajax import checkpoints, train_state

        config = checkpoints.load_run_config(workdir)
        if top_k is None:
            top_k = int(config.eval.ensemble_top_k)
        if int(top_k) < 1:
            raise UserError(f"top_k must be >= 1, got {top_k}")
        steps = checkpoints.best_steps(workdir, int(top_k))
        if len(steps) < int(top_k):
            logging.warning("%s: asked for %d checkpoints, found %d; ensembling those.",
                            workdir, top_k, len(steps))
        logging.info("%s: ensemble of checkpoints at steps %s.", workdir, steps)
        variables = [checkpoints.restore_variables(workdir, step) for step in steps]
        return cls(
            train_state.create_model(config),
            variables,
            image_size=int(config.data.image_size),
            resize=str(config.data.resize),
            threshold=float(config.eval.threshold if threshold is None else threshold),
            batch_size=int(batch_size or config.get("eval_batch_size", 16)),
            num_workers=num_workers,
        )

    # -- arrays -------------------------------------------------------------------------------

    def predict_logits(self, images: np.ndarray, *, cam: bool = False):
        """Preprocessed ``[N, S, S, 3]`` images -> per-member logits ``[M, N]`` (and per-member
        logit maps ``[M, N, h, w]`` with ``cam``), in fixed-size padded batches."""
        images = np.asarray(images, np.float32)
        n = images.shape[0]
        logits, cams = [], []
        for start in range(0, n, self.batch_size):
            batch = images[start:start + self.batch_size]
            count = batch.shape[0]
            if count < self.batch_size:
                batch = np.concatenate(
                    [batch, np.zeros((self.batch_size - count,) + batch.shape[1:], np.float32)]
                )
            batch = jax.device_put(batch, self._device)  # once for all members
            outputs = [_forward_jit(self.model, v, batch, cam) for v in self.variables]
            logits.append(np.stack([np.asarray(o[0])[:count] for o in outputs]))
            if cam:
                cams.append(np.stack([np.asarray(o[1])[:count] for o in outputs]))
        logits = np.concatenate(logits, axis=1) if logits else np.zeros((len(self.variables), 0))
        if not cam:
            return logits, None
        return logits, np.concatenate(cams, axis=1) if cams else None

    def predict_arrays(self, images: np.ndarray, *, cam: bool = False):
        """Preprocessed images -> ensemble probabilities ``[N]`` (mean of the members'
        sigmoids) and, with ``cam``, ensemble logit maps ``[N, h, w]`` (mean of the members')."""
        logits, cams = self.predict_logits(images, cam=cam)
        probabilities = np.mean(1.0 / (1.0 + np.exp(-logits.astype(np.float64))), axis=0)
        return probabilities, None if cams is None else np.mean(cams, axis=0)

    # -- files --------------------------------------------------------------------------------

    def _load(self, item: ImageInput):
        try:
            return load_preprocessed(item.path, self.image_size, self.resize)
        except _DECODE_ERRORS as e:
            return UserError(_describe(item.path, e))

    def predict(self, paths, *, cam: bool = False) -> Predictions:
        """Scores image files / study folders / trees of studies (see ``find_images``).

        Returns one ``PredictionRow`` per readable image, in input order, plus ``.errors`` for
        the unreadable ones (each logged; the rest are still predicted). Raises ``UserError`` for
        missing inputs or when no image is found.
        """
        items = find_images(paths)
        chunks = [items[i:i + self.batch_size] for i in range(0, len(items), self.batch_size)]
        views: list[tuple[ImageInput, float, np.ndarray | None]] = []
        errors: list[tuple[str, str]] = []
        with concurrent.futures.ThreadPoolExecutor(self.num_workers) as pool:
            pending = list(pool.map(self._load, chunks[0])) if chunks else []
            for i, chunk in enumerate(chunks):
                loaded = pending
                # Decode the next chunk while this one runs: at most two batches in memory.
                upcoming = pool.map(self._load, chunks[i + 1]) if i + 1 < len(chunks) else None
                good = []
                for item, result in zip(chunk, loaded):
                    if isinstance(result, UserError):
                        logging.warning("Skipping unreadable image: %s", result)
                        errors.append((item.path, str(result)))
                    else:
                        good.append((item, result))
                if good:
                    probabilities, maps = self.predict_arrays(
                        np.stack([image for _, image in good]), cam=cam
                    )
                    for j, (item, _) in enumerate(good):
                        views.append((item, float(probabilities[j]),
                                      None if maps is None else maps[j]))
                pending = list(upcoming) if upcoming is not None else []

        by_study: dict[str, list[float]] = collections.defaultdict(list)
        for item, probability, _ in views:
            by_study[item.study].append(probability)
        study_probability = {s: float(np.mean(p)) for s, p in by_study.items()}
        rows = [
            PredictionRow(
                study=item.study,
                image=item.path,
                study_type=item.study_type,
                view_probability=probability,
                study_probability=study_probability[item.study],
                decision=int(study_probability[item.study] > self.threshold),
                name=item.name,
                cam=cam_map,
            )
            for item, probability, cam_map in views
        ]
        return Predictions(rows, errors)


# ---- the predict mode ---------------------------------------------------------------------------


@dataclasses.dataclass
class PredictRun:
    """What ``run_predict`` wrote."""

    rows: list[PredictionRow]
    errors: list[tuple[str, str]]  # (image, message): unreadable inputs, and failed overlays
    predictions_csv: Path
    errors_csv: Path | None  # written only when there were errors
    cam_dir: Path | None


def write_predictions(predictor: Predictor, inputs, output_dir: str | os.PathLike, *,
                      cam: bool = False, alpha: float = 0.4, cmap: str = "jet") -> PredictRun:
    """Runs ``predictor`` on ``inputs`` and writes the outputs (see ``run_predict``)."""
    items = find_images(inputs)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    predictions = predictor.predict(items, cam=cam)
    errors = list(predictions.errors)

    predictions_csv = output_dir / "predictions.csv"
    with open(predictions_csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=PREDICTION_COLUMNS)
        writer.writeheader()
        for row in predictions:
            writer.writerow(row.csv_row())

    cam_dir = None
    if cam:
        cam_dir = output_dir / "cam"
        cam_dir.mkdir(exist_ok=True)
        for row in predictions:
            try:  # decode again, one image at a time: overlays are at the original size
                original = load_original(row.image)
                box = cam_box(original.shape[0], original.shape[1], predictor.image_size,
                              predictor.resize, row.cam.shape[0], row.cam.shape[1])
                Image.fromarray(overlay(original, row.cam, alpha, cmap, cam_box=box)).save(
                    cam_dir / f"{row.name}.png"
                )
                del original
            except _DECODE_ERRORS as e:
                message = _describe(row.image, e)
                logging.warning("No CAM overlay: %s", message)
                errors.append((row.image, f"CAM overlay failed: {message}"))

    errors_csv = None
    if errors:
        errors_csv = output_dir / "errors.csv"
        with open(errors_csv, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(ERROR_COLUMNS)
            writer.writerows(errors)
    studies = len({row.study for row in predictions})
    logging.info("Predicted %d images in %d studies -> %s%s.", len(predictions), studies,
                 predictions_csv, f" (CAM overlays in {cam_dir})" if cam_dir else "")
    if errors:
        logging.warning("%d file(s) could not be used; listed in %s:\n  %s", len(errors),
                        errors_csv, "\n  ".join(message for _, message in errors))
    if not predictions:
        raise UserError(f"none of the {len(items)} images could be read; see {errors_csv}")
    return PredictRun(list(predictions), errors, predictions_csv, errors_csv, cam_dir)


def run_predict(workdir: str | os.PathLike, inputs, output_dir: str | os.PathLike, *,
                cam: bool = False, top_k: int | None = None, **kwargs) -> PredictRun:
    """Predicts with a trained run's ensemble and writes, under ``output_dir``:

    * ``predictions.csv``: study, image, study_type, view_probability, study_probability,
      decision (1 abnormal / 0 normal), one row per readable image;
    * ``errors.csv`` (image, error) when some inputs could not be read (they are skipped);
    * with ``cam``, ``cam/<relative path>.png``: each image's CAM overlay at its original size.

    Raises ``UserError`` for no inputs/images, a workdir without checkpoints, or when no image
    could be read at all. ``kwargs`` go to ``Predictor.from_workdir`` (batch_size, threshold).
    """
    items = find_images(inputs)  # fail on bad inputs before loading any checkpoint
    predictor = Predictor.from_workdir(workdir, top_k=top_k, **kwargs)
    return write_predictions(predictor, items, output_dir, cam=cam)
