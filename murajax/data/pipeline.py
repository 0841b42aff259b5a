"""Grain input pipelines: training (shuffled, augmented) and evaluation (every image once).

This module owns the batches: the epoch plan, building batches from an index, the iterators'
checkpointable state, and the checks of the ``config.data`` fields it reads (read as they are:
the defaults live in murajax/configs/default.py) and of the batch sizes, including the one
check that the train split holds at least one batch.

Batches are dicts of numpy arrays with local batch size ``b = global_batch_size / process_count``::

    image       uint8   [b, C, S, S]  resized, and flipped and rotated unless
                                  ``data.augment_on='device'``; channels first (the cheapest
                                  layout to fill from grey images); C = 3, or 1 with
                                  ``data.colour='grey'`` (every image one luminance plane, a
                                  third of the bytes); the step transposes, repeats one plane
                                  to three and normalises (``murajax.data.device_augment``,
                                  bit-identical to the host's table): a quarter of the float32
                                  bytes
    grey        bool    [b]           the row's image is grey and fills plane 0 only: its planes
                                  1 and 2 are not written (whatever the buffer held). Read
                                  the pixels through ``device_augment.channels_last(image,
                                  grey)`` (the steps and the predictor do) or ``whole_planes``
    label       int32   [b]           1 abnormal, 0 normal, -1 unknown
    study_type  int32   [b]           index into STUDY_TYPES, -1 unknown
    mask        float32 [b]           1 real example; 0 padding or an unreadable image (skipped)
    index       int32   [b]           position in ``index.images``; -1 for padding

An example with ``mask == 0`` and ``index >= 0`` is an unreadable image skipped under
``data.on_bad_image='skip'``; the iterators count and log those in the main process.

Determinism and multi-host: the epoch's order is a numpy permutation of all images drawn from
``(seed, epoch)``; the remainder is dropped to a multiple of the global batch ``B``; augmentation
(flip, angle) is drawn from ``(seed, epoch)`` per *global position* in the epoch. Process ``p`` of
``P`` takes ``[p*b:(p+1)*b]`` of every global batch. So concatenating the P processes' k-th local
batches gives exactly the k-th batch of the single-process pipeline, whatever the number of
processes or workers. (With ``data.augment_on='device'`` the plan's flips and angles go unused:
the train step draws its own per image, ``murajax.data.device_augment``.)

Worker processes (``data.num_workers > 0``) use Grain's ``mp_prefetch``; each worker builds whole
batches. With ``num_workers == 0`` batches are built in the main process (one background thread
when ``data.prefetch > 0``). ``num_workers='auto'`` and ``prefetch='auto'`` are resolved here
(``resolve_num_workers``, ``resolve_prefetch``).

Pixels come from the image files (decoded and resized per use) or, with ``data.cache`` set, from
the image cache (``murajax.data.cache``: decoded and resized once; flips and rotations applied
to the cached image). Either way a source's ``image(pos, flip=, angle=)`` gives the resized uint8
pixels of index position ``pos`` (a PIL image, or an array).

Checkpointing: ``TrainIterator.get_state()`` is a small JSON-serialisable dict holding the number
of global batches already returned; ``set_state`` on a fresh iterator of the same epoch restarts
the pipeline right after it, so a restored iterator yields exactly the remaining batches of the
uninterrupted one (with or without workers, even with a different number of processes).
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import grain
import numpy as np
from absl import flags, logging

from murajax.data import cache as cache_lib
from murajax.data import device_augment
from murajax.data import images as images_lib
from murajax.data.mura import MuraIndex
from murajax.errors import UserError

STATE_VERSION = 1
_MAX_LOGGED_BAD = 20


def steps_per_epoch(num_images: int, global_batch_size: int) -> int:
    """Training batches in one epoch (the remainder is dropped); may be 0."""
    if global_batch_size <= 0:
        raise UserError(f"config.batch_size must be positive, got {global_batch_size}")
    return int(num_images) // int(global_batch_size)


def train_steps_per_epoch(num_images: int, global_batch_size: int) -> int:
    """``steps_per_epoch``, refusing a train split of fewer than one batch (the one place
    that is checked: ``train_loader`` calls it, and so can a training loop up front)."""
    steps = steps_per_epoch(num_images, global_batch_size)
    if steps == 0:
        raise UserError(
            f"the train split has {num_images} images, fewer than one batch "
            f"(config.batch_size={global_batch_size}). Use a smaller batch size or more data "
            "(config.data.fraction, config.data.study_types)."
        )
    return steps


def num_eval_batches(num_images: int, global_batch_size: int) -> int:
    """Evaluation batches covering every image once (the last one padded)."""
    if global_batch_size <= 0:
        raise UserError(f"config.eval_batch_size must be positive, got {global_batch_size}")
    return -(-int(num_images) // int(global_batch_size))


# ------------------------------------------------------------------------------------------
# Config checks.


def _check_rotation(value) -> float:
    try:
        rotation = float(value)
    except (TypeError, ValueError):
        rotation = float("nan")
    if not (0.0 <= rotation <= 180.0):
        raise UserError(
            f"config.data.rotation_degrees must be a number in [0, 180], got {value!r}"
        )
    return rotation


def _check_on_bad_image(value) -> str:
    if value not in ("error", "skip"):
        raise UserError(f"config.data.on_bad_image must be 'error' or 'skip', got {value!r}")
    return value


# At most this many 'auto' workers: each holds its own buffers of whole batches, and past this
# the cache (or the decoding of 320 px PNGs) outruns any one host's accelerators.
_MAX_AUTO_WORKERS = 32
_logged_auto: set[tuple[int, int, int]] = set()


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _int_or_auto(value, field: str):
    """``config.data.<field>``, which takes an integer >= 0 or 'auto': 'auto', or the integer
    (a command line's '3' is 3). UserError for anything else."""
    if isinstance(value, str):
        text = value.strip()
        if text == "auto":
            return text
        try:
            value = int(text)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise UserError(f"config.data.{field} must be an integer >= 0 or 'auto', got {value!r}")
    return int(value)


def resolve_num_workers(value, cpus: int | None = None, devices: int | None = None) -> int:
    """``config.data.num_workers``: an integer >= 0 as it is; ``'auto'``: the CPUs this process
    may run on minus one for the training loop and one per local device (each needs a host
    thread feeding it), at most ``_MAX_AUTO_WORKERS``. So 2 CPUs and one device give 0: a worker
    would only compete with the training process. Logged once per process."""
    value = _int_or_auto(value, "num_workers")
    if value != "auto":
        return value
    if devices is None:
        import jax

        devices = jax.local_device_count()
    cpus = _available_cpus() if cpus is None else int(cpus)
    workers = max(0, min(_MAX_AUTO_WORKERS, cpus - 1 - int(devices)))
    if (cpus, int(devices), workers) not in _logged_auto:
        _logged_auto.add((cpus, int(devices), workers))
        logging.info("config.data.num_workers='auto' -> %d worker process(es): %d CPU(s) "
                     "available to this process, minus 1 for the training loop and %d for the "
                     "local device(s)%s.", workers, cpus, devices,
                     f", at most {_MAX_AUTO_WORKERS}" if workers == _MAX_AUTO_WORKERS else "")
    return workers


AUTO_PREFETCH = 2  # batches built ahead with data.prefetch='auto', unless it resolves to 0


def resolve_prefetch(value, *, cache: str, num_workers: int) -> int:
    """``config.data.prefetch``: an integer >= 0 as it is; ``'auto'`` (the default): 0 when a
    process without workers reads the image cache, else ``AUTO_PREFETCH``.

    Why 0 there: a cached batch is 1-2 ms of record reads and copies, and the same batch built
    in a background thread took 20-40% more CPU per image on a 2-CPU host (docs/performance.md,
    issue 15's ninth and eleventh passes), while the training loop, which no longer waits on
    the device at every step, overlaps building it with the queued steps. Decoding image
    files keeps the thread: PIL and OpenCV release the GIL for milliseconds per image."""
    value = _int_or_auto(value, "prefetch")
    if value == "auto":
        return 0 if cache and num_workers == 0 else AUTO_PREFETCH
    return value


class _Options:
    """The validated fields of ``config.data`` that the pipeline uses (picklable).

    The fields are read as they are: ``murajax/configs/default.py`` is the one place their
    defaults live, and every config (and a run's saved ``config.json``) has them.
    """

    def __init__(self, data_config):
        self.image_size = images_lib.check_image_size(data_config.image_size)
        self.resize = images_lib.check_resize(data_config.resize)
        self.hflip = bool(data_config.hflip)
        self.rotation_degrees = _check_rotation(data_config.rotation_degrees)
        self.on_bad_image = _check_on_bad_image(data_config.on_bad_image)
        self.num_workers = resolve_num_workers(data_config.num_workers)
        # Configs saved before the field existed have none: they augmented on the host.
        self.augment_on = device_augment.check_augment_on(data_config.get("augment_on",
                                                                          "host"))
        # .get: the saved config.json of a run from before the cache has no such field.
        self.cache = str(data_config.get("cache", "") or "")
        self.prefetch = resolve_prefetch(data_config.prefetch, cache=self.cache,
                                         num_workers=self.num_workers)
        self.colour = images_lib.colour_from(data_config)


def _check_processes(global_batch_size, process_index, process_count, field):
    if isinstance(global_batch_size, bool) or not isinstance(
        global_batch_size, (int, np.integer)
    ) or global_batch_size <= 0:
        raise UserError(f"{field} must be a positive integer, got {global_batch_size!r}")
    if process_count <= 0 or not 0 <= process_index < process_count:
        raise ValueError(f"bad process_index={process_index} / process_count={process_count}")
    if global_batch_size % process_count:
        raise UserError(
            f"{field} ({global_batch_size}) must be divisible by the number of JAX processes "
            f"({process_count}). Choose a multiple of {process_count}."
        )
    return int(global_batch_size) // int(process_count)


def _seed_words(*values) -> list[int]:
    return [int(v) % (1 << 63) for v in values]


# ------------------------------------------------------------------------------------------
# The per-batch work (runs in Grain workers; must pickle).


class _FilePixels:
    """The image files as a pixel source: decoded and resized (+ flipped, rotated) per use."""

    def __init__(self, index: MuraIndex, options: _Options):
        self.paths = [r.path for r in index.images]
        self.image_size = options.image_size
        self.resize = options.resize
        self.colour = options.colour

    def image(self, pos: int, *, flip: bool = False, angle: float = 0.0):
        image = images_lib.transform(images_lib.decode(self.paths[pos]), self.image_size,
                                     self.resize, flip=flip, angle=angle)
        return images_lib.as_colour(image, self.colour)


def pixel_source(index: MuraIndex, data_config):
    """Where ``index``'s pixels come from: the image cache at ``config.data.cache`` (its
    manifest read and checked here) or the image files. A run makes one per split and hands it
    to every epoch's loader (``pixels=``), so that the manifest is not read again each epoch."""
    options = _Options(data_config)
    if options.cache:
        return cache_lib.pixels_for_index(index, data_config)
    return _FilePixels(index, options)


class _BatchBuilder:
    """Builds local batch k from the precomputed plan: image positions, flips, angles."""

    def __init__(self, index: MuraIndex, options: _Options, positions, flips, angles, pixels):
        self.pixels = pixels  # pixel_source's: the image files or the cache
        self.labels = np.asarray([r.label for r in index.images], dtype=np.int32)
        self.study_types = np.asarray([r.study_type for r in index.images], dtype=np.int32)
        self.options = options
        self.positions = np.asarray(positions, dtype=np.int32)  # [steps, b], -1 padding
        self.flips = np.asarray(flips, dtype=bool)  # [steps, b]
        self.angles = np.asarray(angles, dtype=np.float32)  # [steps, b]

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        o = self.options
        positions = self.positions[step]
        b = positions.shape[0]
        s = o.image_size
        on_device = o.augment_on == "device"  # neither flipped nor rotated here
        # Channels first, normalised in the step. A grey image fills plane 0 only and sets its
        # row's ``grey`` flag; the step repeats the plane (``device_augment.channels_last``).
        # Its other two planes are left as np.empty found them: writing them was a quarter of
        # a cached image's CPU (issue 15). One plane per row when every image is grey
        # (config.data.colour='grey'). Not zeroed first: each row's read planes are written
        # below (padding and unreadable rows: all zeros).
        planes = 1 if o.colour == "grey" else 3
        image = np.empty((b, planes, s, s), dtype=np.uint8)
        grey = np.zeros((b,), dtype=bool)
        mask = np.zeros((b,), dtype=np.float32)
        label = np.full((b,), -1, dtype=np.int32)
        study_type = np.full((b,), -1, dtype=np.int32)
        for i, pos in enumerate(positions):
            if pos < 0:
                image[i] = 0
                continue
            label[i] = self.labels[pos]
            study_type[i] = self.study_types[pos]
            try:
                transformed = self.pixels.image(
                    pos, flip=bool(self.flips[step, i]) and not on_device,
                    angle=0.0 if on_device else float(self.angles[step, i]))
            except UserError:
                if o.on_bad_image == "error":
                    raise
                image[i] = 0
                continue  # mask stays 0; the main process counts and logs it
            pixels = np.asarray(transformed, np.uint8)
            if pixels.ndim == 2:
                image[i, 0] = pixels
                grey[i] = True
            else:
                images_lib.channels_first_into(pixels, image[i])
            mask[i] = 1.0
        return {
            "image": image,
            "grey": grey,
            "label": label,
            "study_type": study_type,
            "mask": mask,
            "index": positions.copy(),
        }


def _build_iterator(builder: _BatchBuilder, start: int, stop: int, options: _Options):
    ds = grain.MapDataset.range(start, stop).map(builder)
    if options.num_workers > 0:
        # Grain reads absl flags when it starts workers; outside an absl app (tests, notebooks,
        # benchmarks) they have not been parsed: use their defaults.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ds = ds.to_iter_dataset(
            grain.ReadOptions(num_threads=1, prefetch_buffer_size=max(1, options.prefetch))
        )
        ds = ds.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=options.num_workers,
                per_worker_buffer_size=max(1, options.prefetch),
            )
        )
    else:
        threads = 1 if options.prefetch > 0 else 0
        ds = ds.to_iter_dataset(
            grain.ReadOptions(num_threads=threads, prefetch_buffer_size=options.prefetch)
        )
    return iter(ds)


def whole_planes(batch: dict) -> np.ndarray:
    """A copy of the batch's ``image`` with every row whole: plane 0 of each ``grey`` row
    repeated into its planes 1 and 2, as the steps see it (before they transpose and normalise).
    For looking at batches on the host; the steps and the predictor read ``grey`` themselves."""
    image = np.array(batch["image"])
    if image.shape[1] > 1:
        grey = np.asarray(batch["grey"], bool)
        image[grey] = image[grey, :1]
    return image


def _plain(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Copies arrays that live in Grain's shared memory (worker outputs) into ordinary numpy
    arrays, so the shared memory is released at once and never outlives the pipeline."""
    return {k: v if type(v) is np.ndarray else np.array(v) for k, v in batch.items()}


class _BadImageLog:
    def __init__(self, index: MuraIndex, what: str):
        self._paths = index.images
        self._what = what
        self.count = 0
        self.paths: set[str] = set()

    def check(self, batch):
        bad = np.nonzero((batch["mask"] == 0) & (batch["index"] >= 0))[0]
        for i in bad:
            path = self._paths[int(batch["index"][i])].path
            self.count += 1
            self.paths.add(path)
            if self.count <= _MAX_LOGGED_BAD:
                logging.warning(
                    "%s: skipping unreadable image %s (on_bad_image=skip; %d skipped so far). "
                    "Remove it from the CSV to silence this.", self._what, path, self.count,
                )
            elif self.count == _MAX_LOGGED_BAD + 1:
                logging.warning("%s: more unreadable images skipped; counting silently from "
                                "here, total at the end of the pass.", self._what)


class TrainIterator:
    """One epoch of training batches; checkpointable with ``get_state``/``set_state``."""

    def __init__(self, index, options, builder, *, seed, epoch, global_batch_size,
                 process_index, process_count, steps):
        self._index = index
        self._options = options
        self._builder = builder
        self._seed = int(seed)
        self._epoch = int(epoch)
        self._global_batch_size = int(global_batch_size)
        self._process_index = process_index
        self._process_count = process_count
        self._steps = steps
        self._step = 0  # global batches already returned
        self._it = None
        self._bad = _BadImageLog(index, f"train epoch {epoch}")

    @property
    def num_bad_images(self) -> int:
        """Unreadable images skipped so far (on_bad_image='skip')."""
        return self._bad.count

    @property
    def bad_images(self) -> set[str]:
        return set(self._bad.paths)

    @property
    def step(self) -> int:
        return self._step

    def __len__(self) -> int:
        return self._steps

    def __iter__(self) -> "TrainIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._step >= self._steps:
            self.close()
            raise StopIteration
        if self._it is None:
            self._it = _build_iterator(self._builder, self._step, self._steps, self._options)
        batch = _plain(next(self._it))
        self._step += 1
        self._bad.check(batch)
        if self._step >= self._steps and self._bad.count:
            logging.warning("train epoch %d: %d unreadable image(s) skipped.", self._epoch,
                            self._bad.count)
        return batch

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position of this iterator."""
        return {
            "version": STATE_VERSION,
            "seed": self._seed,
            "epoch": self._epoch,
            "global_batch_size": self._global_batch_size,
            "num_images": len(self._index.images),
            "step": self._step,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues right after the batches counted in ``state`` (from ``get_state``)."""
        try:
            version = int(state["version"])
            step = int(state["step"])
            saved = {k: int(state[k]) for k in ("seed", "epoch", "global_batch_size",
                                                "num_images")}
        except (KeyError, TypeError, ValueError):
            raise UserError(
                f"The saved input-pipeline state {state!r} is not a murajax train-iterator "
                "state. Restore from a checkpoint written by murajax, or start a fresh run."
            ) from None
        if version != STATE_VERSION:
            raise UserError(
                f"The saved input-pipeline state has version {version}, this murajax reads "
                f"version {STATE_VERSION}. Start a fresh run or use the matching murajax."
            )
        current = {
            "seed": (self._seed, "config.seed"),
            "epoch": (self._epoch, "the epoch passed to train_loader"),
            "global_batch_size": (self._global_batch_size, "config.batch_size"),
            "num_images": (len(self._index.images),
                           "the training images (config.data.root/study_types/fraction)"),
        }
        for key, (value, field) in current.items():
            if saved[key] != value:
                raise UserError(
                    f"The checkpoint's input pipeline was saved with {key}={saved[key]}, but "
                    f"{field} now gives {value}. Restore with the same settings, or start a "
                    "fresh run in a new workdir."
                )
        if not 0 <= step <= self._steps:
            raise UserError(
                f"The saved input-pipeline step {step} is outside this epoch's "
                f"{self._steps} steps. Restore with the same settings."
            )
        self.close()
        self._step = step

    def close(self) -> None:
        it, self._it = self._it, None
        if it is not None and hasattr(it, "close"):
            try:
                it.close()
            except Exception:  # pylint: disable=broad-except
                pass

    def __del__(self):
        try:
            self.close()
        except Exception:  # pylint: disable=broad-except
            pass


def _pixels_of(index: MuraIndex, data_config, pixels):
    if pixels is None:
        return pixel_source(index, data_config)
    if len(pixels.paths) != len(index.images):
        raise ValueError(f"pixels= covers {len(pixels.paths)} images, the index "
                         f"{len(index.images)}: make it with pixel_source(index, data_config)")
    return pixels


def epoch_plan(num_images: int, *, global_batch_size: int, seed: int, epoch: int,
               hflip: bool, rotation_degrees: float):
    """The global plan of one training epoch: positions, flips, angles, each [steps, B].

    A function of (seed, epoch, num_images, B) only.
    """
    steps = steps_per_epoch(num_images, global_batch_size)
    order = np.random.default_rng(_seed_words(seed, epoch, 0)).permutation(num_images)
    positions = order[: steps * global_batch_size].reshape(steps, global_batch_size)
    aug = np.random.default_rng(_seed_words(seed, epoch, 1))
    n = steps * global_batch_size
    flip_draw = aug.random(n)
    angle_draw = aug.uniform(-1.0, 1.0, n)
    flips = (flip_draw < 0.5) if hflip else np.zeros(n, dtype=bool)
    angles = (angle_draw * rotation_degrees).astype(np.float32)
    return (positions, flips.reshape(steps, global_batch_size),
            angles.reshape(steps, global_batch_size))


def train_loader(index: MuraIndex, data_config, *, global_batch_size: int, seed: int,
                 epoch: int, process_index: int = 0, process_count: int = 1,
                 pixels=None) -> TrainIterator:
    """An iterator over one training epoch of this process's local batches.

    Yields exactly ``steps_per_epoch(len(index.images), global_batch_size)`` batches.
    ``pixels``: ``pixel_source(index, data_config)``, made here when None.
    """
    options = _Options(data_config)
    b = _check_processes(global_batch_size, process_index, process_count, "config.batch_size")
    num_images = len(index.images)
    steps = train_steps_per_epoch(num_images, global_batch_size)
    positions, flips, angles = epoch_plan(
        num_images, global_batch_size=global_batch_size, seed=seed, epoch=epoch,
        hflip=options.hflip, rotation_degrees=options.rotation_degrees,
    )
    local = slice(process_index * b, (process_index + 1) * b)
    builder = _BatchBuilder(index, options, positions[:, local], flips[:, local],
                            angles[:, local], _pixels_of(index, data_config, pixels))
    return TrainIterator(index, options, builder, seed=seed, epoch=epoch,
                         global_batch_size=global_batch_size, process_index=process_index,
                         process_count=process_count, steps=steps)


class EvalLoader:
    """Re-iterable evaluation batches: every image exactly once, no augmentation."""

    def __init__(self, index: MuraIndex, options: _Options, builder: _BatchBuilder, steps: int):
        self._index = index
        self._options = options
        self._builder = builder
        self._steps = steps
        self.num_bad_images = 0
        self.bad_images: set[str] = set()

    def __len__(self) -> int:
        return self._steps

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        bad = _BadImageLog(self._index, "eval")
        it = _build_iterator(self._builder, 0, self._steps, self._options)
        try:
            for _ in range(self._steps):
                batch = _plain(next(it))
                bad.check(batch)
                yield batch
        finally:
            if hasattr(it, "close"):
                it.close()
            self.num_bad_images = bad.count
            self.bad_images = set(bad.paths)
            if bad.count:
                logging.warning("eval: %d unreadable image(s) skipped (mask 0).", bad.count)


def eval_loader(index: MuraIndex, data_config, *, global_batch_size: int,
                process_index: int = 0, process_count: int = 1, pixels=None) -> EvalLoader:
    """Batches covering every image exactly once in index order; the last global batch padded
    (mask 0, index -1, label -1); process p takes [p*b:(p+1)*b] of each global batch.
    ``pixels``: ``pixel_source(index, data_config)``, made here when None."""
    options = _Options(data_config)
    b = _check_processes(global_batch_size, process_index, process_count,
                         "config.eval_batch_size")
    num_images = len(index.images)
    steps = num_eval_batches(num_images, global_batch_size)
    positions = np.full(steps * global_batch_size, -1, dtype=np.int64)
    positions[:num_images] = np.arange(num_images)
    positions = positions.reshape(steps, global_batch_size)
    local = slice(process_index * b, (process_index + 1) * b)
    zeros = np.zeros((steps, b))
    builder = _BatchBuilder(index, options, positions[:, local], zeros.astype(bool),
                            zeros.astype(np.float32), _pixels_of(index, data_config, pixels))
    return EvalLoader(index, options, builder, steps)
