"""The ``Predictor``: a trained ensemble, loaded once, scoring radiographs.

A model plus one set of variables per ensemble member (``Predictor.from_workdir``: a run's best-k
checkpoints and its saved config). ``predict(paths)`` finds the images once
(``murajax.data.files.find_images``); ``predict_images(images)`` decodes and preprocesses them
one by one (a few threads, at most two batches in memory, never a stack of full-size images),
runs fixed-size batches (the last one padded, so one compile per input shape) through one jitted
forward per member, and averages the members' probabilities. A study is an image's folder; its
probability is the mean of its views' (``murajax.evaluation.studies.score_studies``); abnormal
when above the threshold. Unreadable files are reported in ``Predictions.errors``, not raised.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import os
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from murajax.data.dicom import is_dicom, read_dicom
from murajax.data.files import ImageInput, find_images
from murajax.errors import UserError
from murajax.evaluation.studies import score_studies
from murajax.inference.cam import class_activation_maps

# What a corrupt or unsupported file may raise while decoding; anything else is a bug.
DECODE_ERRORS = (UserError, OSError, ValueError, SyntaxError)


def load_preprocessed(path: str | os.PathLike, image_size: int, resize: str,
                      colour: str = "keep") -> np.ndarray:
    """One image as the network sees it at evaluation: float32 ``[S, S, 3]``, normalised
    (``colour``: ``config.data.colour``)."""
    from murajax.data import images

    # Grayscale DICOMs stay single-channel: preprocess replicates the channel after resizing.
    image = read_dicom(path) if is_dicom(path) else images.load_image(path)
    return np.asarray(images.preprocess(image, image_size, resize, colour=colour), np.float32)


def describe_unreadable(path: str, error: BaseException) -> str:
    """A decoding error as prediction reports it: naming the file, without the training advice
    (CSV rows, ``config.data.on_bad_image``) the image loader adds."""
    from murajax.data import images

    message = images.without_training_advice(error)
    return message if path in message else f"{path}: {message}"


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


@dataclasses.dataclass
class Predictions:
    """What ``Predictor.predict`` returns: one row per readable image, in input order, and
    ``(path, message)`` for every file that could not be read (and so has no row).

    Iterating over it, and ``len``, go over the rows.
    """

    rows: list[PredictionRow]
    errors: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def __iter__(self) -> Iterator[PredictionRow]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)


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
      model: the DenseNet (``murajax.train_state.model_from_config(config)``).
      variables: one ``{'params', 'batch_stats'}`` per ensemble member.
      image_size, resize, colour: the evaluation transform (``config.data.image_size``,
        ``.resize``, ``.colour``).
      threshold: a study is abnormal when its probability exceeds it.
      batch_size: images per forward pass; the last batch is padded to it.
      num_workers: decoding threads (decoding and resizing release the GIL).

    ``steps`` are the checkpoint steps of the members, best first (``from_workdir``; None when
    the variables were given directly).
    """

    def __init__(self, model, variables: Sequence[dict], image_size: int,
                 resize: str = "stretch", threshold: float = 0.5, batch_size: int = 16,
                 num_workers: int | None = None, colour: str = "keep"):
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
        self.colour = images.check_colour(colour)
        self.threshold = float(threshold)
        self.batch_size = int(batch_size)
        if num_workers == "auto":  # config.data.num_workers's default: threads, not processes
            num_workers = None
        self.num_workers = max(1, num_workers if num_workers else min(4, os.cpu_count() or 1))
        self.steps: list[int] | None = None
        self.use_ema = False  # from_workdir: whether the members are the checkpoints' EMAs

    @classmethod
    def from_workdir(cls, workdir: str | os.PathLike, *, top_k: int | None = None,
                     batch_size: int | None = None, threshold: float | None = None,
                     num_workers: int | None = None,
                     use_ema: bool | None = None) -> "Predictor":
        """The ensemble of a trained run: its ``top_k`` lowest-validation-loss checkpoints
        (default ``config.eval.ensemble_top_k``), with the run's saved config. Their steps are
        in ``.steps`` (so callers need not ask ``checkpoints.best_steps`` again). ``use_ema``
        (default ``config.eval.use_ema``, False for runs from before it existed): each member is
        its checkpoint's EMA weights (a UserError if the run kept no EMA)."""
        from murajax import checkpoints, models, train_state
        from murajax.data import images

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
        if use_ema is None:
            use_ema = bool(config.eval.get("use_ema", False))
        variables = [checkpoints.restore_variables(workdir, step, use_ema=True) if use_ema
                     else checkpoints.restore_variables(workdir, step) for step in steps]
        model = train_state.model_from_config(config)
        predictor = cls(
            model,
            # Each in the model's layout: a run resumed with another block_impl keeps
            # checkpoints of both.
            [models.in_layout(model, v) for v in variables],
            image_size=int(config.data.image_size),
            resize=str(config.data.resize),
            colour=images.colour_from(config.data),
            threshold=float(config.eval.threshold if threshold is None else threshold),
            batch_size=int(batch_size or config.get("eval_batch_size", 16)),
            num_workers=num_workers,
        )
        predictor.steps = list(steps)
        predictor.use_ema = bool(use_ema)
        return predictor

    # -- arrays -------------------------------------------------------------------------------

    def predict_batch(self, batch: dict) -> np.ndarray:
        """An eval batch of the pipeline (``murajax.data.pipeline``: uint8 images, channels
        first, grey rows in plane 0 only) -> per-member logits ``[M, b]``."""
        from murajax.data import device_augment

        return self.predict_logits(device_augment.eval_batch(batch)["image"])[0]

    def predict_logits(self, images: np.ndarray, *, cam: bool = False):
        """Preprocessed ``[N, S, S, 3]`` images -> per-member logits ``[M, N]`` (and per-member
        logit maps ``[M, N, h, w]`` with ``cam``), in fixed-size padded batches. uint8 images
        (``[N, 3, S, S]`` or one plane ``[N, 1, S, S]``, channels first, every plane written;
        a pipeline batch's go through ``predict_batch``) are normalised first."""
        if np.asarray(images).dtype == np.uint8:
            from murajax.data import device_augment

            images = device_augment.normalise(device_augment.channels_last(images, None))
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

    def _load(self, item: ImageInput, load=None):
        """``load(item)`` (default: decode and preprocess ``item.path``), or the UserError
        describing why it could not be read."""
        try:
            if load is not None:
                return load(item)
            return load_preprocessed(item.path, self.image_size, self.resize, self.colour)
        except DECODE_ERRORS as e:
            return UserError(describe_unreadable(item.path, e))

    def predict(self, paths, *, cam: bool = False) -> Predictions:
        """Scores image files / study folders / trees of studies (found with ``find_images``;
        a list of ``ImageInput`` is taken as already found).

        Returns one ``PredictionRow`` per readable image, in input order, plus ``.errors`` for
        the unreadable ones (each logged; the rest are still predicted). Raises ``UserError`` for
        missing inputs or when no image is found.
        """
        if not isinstance(paths, (str, os.PathLike)):
            paths = list(paths)
            if paths and all(isinstance(p, ImageInput) for p in paths):
                return self.predict_images(paths, cam=cam)
        return self.predict_images(find_images(paths), cam=cam)

    def predict_images(self, items: Sequence[ImageInput], *, cam: bool = False,
                       load=None) -> Predictions:
        """``predict`` on images already found (``find_images``). ``load(item)`` gives an
        item's preprocessed float32 ``[S, S, 3]`` (default: decode ``item.path``) or raises one
        of ``DECODE_ERRORS`` for an unreadable one (e.g. the image cache's pixels,
        ``murajax.modes.predict``)."""
        loader = functools.partial(self._load, load=load)
        chunks = [items[i:i + self.batch_size] for i in range(0, len(items), self.batch_size)]
        views: list[tuple[ImageInput, float, np.ndarray | None]] = []
        errors: list[tuple[str, str]] = []
        with concurrent.futures.ThreadPoolExecutor(self.num_workers) as pool:
            pending = list(pool.map(loader, chunks[0])) if chunks else []
            for i, chunk in enumerate(chunks):
                loaded = pending
                # Decode the next chunk while this one runs: at most two batches in memory.
                upcoming = pool.map(loader, chunks[i + 1]) if i + 1 < len(chunks) else None
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

        # A study's probability: the mean of its views' (the one study scoring, in evaluation).
        studies = score_studies([item for item, _, _ in views],
                                np.array([probability for _, probability, _ in views]))
        study_probability = collections.defaultdict(
            lambda: float("nan"),  # a study whose views all had non-finite probabilities
            zip(studies.study, (float(p) for p in studies.probability)))
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
