"""``murajax --mode=predict``: a trained run's ensemble on new radiographs -> files.

``run_predict(workdir, inputs, output_dir)`` finds the input images once (failing on bad inputs
before any checkpoint is loaded), builds the run's ``Predictor`` and writes, under
``output_dir``, ``predictions.csv``, ``errors.csv`` (unreadable inputs, failed overlays) and,
with ``cam``, ``cam/<name>.png`` overlays at each image's original size. ``write_predictions``
does the same with a ``Predictor`` already at hand. With an image cache (``cache=``, the
``--config.data.cache`` field) instead of inputs it predicts the cache's images of a split.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from pathlib import Path
from typing import Any, Sequence

from absl import logging
from PIL import Image

from murajax.data.files import ImageInput, find_images, keyed_images
from murajax.errors import UserError
from murajax.inference.cam import as_rgb, cam_box, load_original, overlay
from murajax.inference.predictor import (DECODE_ERRORS, PredictionRow, Predictor,
                                         describe_unreadable)

PREDICTION_COLUMNS = ("study", "image", "study_type", "view_probability", "study_probability",
                      "decision")
ERROR_COLUMNS = ("image", "error")


@dataclasses.dataclass
class PredictRun:
    """What ``run_predict`` wrote."""

    rows: list[PredictionRow]
    errors: list[tuple[str, str]]  # (image, message): unreadable inputs, and failed overlays
    predictions_csv: Path
    errors_csv: Path | None  # written only when there were errors
    cam_dir: Path | None


def csv_row(row: PredictionRow) -> dict[str, Any]:
    """A row of predictions.csv (``PREDICTION_COLUMNS``; probabilities to 6 decimals)."""
    return {
        "study": row.study,
        "image": row.image,
        "study_type": row.study_type,
        "view_probability": f"{row.view_probability:.6f}",
        "study_probability": f"{row.study_probability:.6f}",
        "decision": row.decision,
    }


def write_overlays(predictor: Predictor, rows: Sequence[PredictionRow], cam_dir, *,
                   alpha: float = 0.4, cmap: str = "jet",
                   original=load_original) -> list[tuple[str, str]]:
    """Writes ``cam_dir/<row.name>.png``: each row's CAM (``predict(..., cam=True)``) over its
    image at the original size (``original(row.image)``: uint8 HxWx3). Returns ``(image,
    message)`` for each overlay that failed."""
    cam_dir = Path(cam_dir)
    cam_dir.mkdir(parents=True, exist_ok=True)
    errors = []
    for row in rows:
        try:  # decode again, one image at a time: overlays are at the original size
            original_image = original(row.image)
            box = cam_box(original_image.shape[0], original_image.shape[1],
                          predictor.image_size, predictor.resize, row.cam.shape[0],
                          row.cam.shape[1])
            Image.fromarray(overlay(original_image, row.cam, alpha, cmap, cam_box=box)).save(
                cam_dir / f"{row.name}.png"
            )
            del original_image
        except DECODE_ERRORS as e:
            message = describe_unreadable(row.image, e)
            logging.warning("No CAM overlay: %s", message)
            errors.append((row.image, f"CAM overlay failed: {message}"))
    return errors


def write_predictions(predictor: Predictor, inputs, output_dir: str | os.PathLike, *,
                      cam: bool = False, alpha: float = 0.4, cmap: str = "jet") -> PredictRun:
    """Runs ``predictor`` on ``inputs`` (paths, see ``find_images``) and writes the outputs
    (see ``run_predict``)."""
    return _write(predictor, find_images(inputs), output_dir, cam=cam, alpha=alpha, cmap=cmap)


def _write(predictor: Predictor, items: Sequence[ImageInput], output_dir: str | os.PathLike, *,
           cam: bool, alpha: float = 0.4, cmap: str = "jet", load=None,
           original=load_original) -> PredictRun:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    predictions = predictor.predict_images(items, cam=cam, load=load)
    rows, errors = predictions.rows, list(predictions.errors)

    predictions_csv = output_dir / "predictions.csv"
    with open(predictions_csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=PREDICTION_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow(csv_row(row))

    cam_dir = None
    if cam:
        cam_dir = output_dir / "cam"
        errors += write_overlays(predictor, rows, cam_dir, alpha=alpha, cmap=cmap,
                                 original=original)

    errors_csv = None
    if errors:
        errors_csv = output_dir / "errors.csv"
        with open(errors_csv, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(ERROR_COLUMNS)
            writer.writerows(errors)
    studies = len({row.study for row in rows})
    logging.info("Predicted %d images in %d studies -> %s%s.", len(rows), studies,
                 predictions_csv, f" (CAM overlays in {cam_dir})" if cam_dir else "")
    if errors:
        logging.warning("%d file(s) could not be used; listed in %s:\n  %s", len(errors),
                        errors_csv, "\n  ".join(message for _, message in errors))
    if not rows:
        raise UserError(f"none of the {len(items)} images could be read; see {errors_csv}")
    return PredictRun(list(rows), errors, predictions_csv, errors_csv, cam_dir)


def run_predict(workdir: str | os.PathLike, inputs, output_dir: str | os.PathLike, *,
        cam: bool = False, top_k: int | None = None, cache: str = "", split: str | None = None,
        **kwargs) -> PredictRun:
    """Predicts with a trained run's ensemble and writes, under ``output_dir``:

    * ``predictions.csv``: study, image, study_type, view_probability, study_probability,
      decision (1 abnormal / 0 normal), one row per readable image;
    * ``errors.csv`` (image, error) when some inputs could not be read (they are skipped);
    * with ``cam``, ``cam/<relative path>.png``: each image's CAM overlay at its original size.

    ``inputs`` are image files, study folders or trees. Or, with ``cache`` (an image cache,
    ``murajax.data.cache``) and no inputs, the cached images of ``split`` (default: the run's
    ``config.eval.split``): each row's image is its key in the cache (its path relative to the
    MURA-v1.1 folder), the pixels are the cached ones (exactly what evaluation feeds the
    model) and the overlays are drawn on them, at the cache's size.

    Raises ``UserError`` for no inputs/images, both inputs and a cache, a cache that does not
    fit the run, a workdir without checkpoints, or when no image could be read at all.
    ``kwargs`` go to ``Predictor.from_workdir`` (batch_size, threshold, use_ema).
    """
    if not cache:
        if not inputs:
            raise UserError("--mode=predict needs --input PATH (an image file, a study folder or "
                            "a tree of studies; repeat it for several) or --config.data.cache=DIR"
                            " (to predict the cached images of config.eval.split)")
        items = find_images(inputs)  # fail on bad inputs before loading any checkpoint
        predictor = Predictor.from_workdir(workdir, top_k=top_k, **kwargs)
        return _write(predictor, items, output_dir, cam=cam)
    if list(inputs):
        raise UserError("--mode=predict takes either --input (image files, study folders) or "
                        "--config.data.cache (the cached images of config.eval.split), not both")
    from murajax import checkpoints
    from murajax.data import cache as cache_lib
    from murajax.data import images

    config = checkpoints.load_run_config(workdir)
    split = str(config.eval.split) if split is None else str(split)
    pixels, keys = cache_lib.split_for_prediction(cache, split,
                                                  image_size=int(config.data.image_size),
                                                  resize=str(config.data.resize),
                                                  colour=images.colour_from(config.data))
    logging.info("Predicting the %d cached images of the %r split of %s.", len(keys), split,
                 cache)
    predictor = Predictor.from_workdir(workdir, top_k=top_k, **kwargs)
    return _write(predictor, keyed_images(keys), output_dir, cam=cam, **cached_sources(pixels))


def cached_sources(pixels) -> dict:
    """``{'load', 'original'}`` for ``_write`` (``Predictor.predict_images``' ``load`` and
    ``write_overlays``' ``original``): an image named by one of ``pixels.paths`` (a
    ``murajax.data.cache.CachedPixels``) as the model's input and as RGB for its overlay,
    both from the cached pixels, so no original file is read."""
    from murajax.data import images

    position = {path: i for i, path in enumerate(pixels.paths)}
    return {"load": lambda item: images.normalize(pixels.pixels(position[item.path])),
            "original": lambda path: as_rgb(pixels.pixels(position[path]))}
