"""The training loop: ``train_and_evaluate(config, workdir)``.

Owns the order of things and nothing else: read the data, build (or restore) the state, run
epochs of ``train_step``, evaluate on the validation split at each epoch end, apply the plateau
rule, save checkpoints, log. What the data means lives in ``tasks``, the loss in ``recipes``,
numerics in ``steps``, layouts in ``parallel``, persistence in ``checkpoints``.

Resuming is automatic: if ``<workdir>/checkpoints`` holds a checkpoint, the run continues from
the newest readable one, mid-epoch included, and ends with the same params, bit for bit, as a run
that was never interrupted. SIGTERM or SIGINT make the loop save at the next step boundary, wait
for the save to land, and return.

The loop never waits for a step to finish between log lines: the train metrics window is summed
on the device and read on the host only at log steps, before every save and at the epoch end;
a NaN or infinite loss at any step makes that sum non-finite, so a diverged state is still never
saved (``NonFiniteLossError`` names the steps read, the last checkpoint and the fix).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import threading
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metrics as clu_metrics
from clu import parameter_overview
from jax.experimental import multihost_utils

from murajax import (checkpoints, models, optim, parallel, recipes, steps, tasks,
                     train_state, workdir_lock, writers)
from murajax.data import device_augment, images, mura, pipeline
from murajax.errors import UserError
from murajax.recipes import reweight, teacher

MIN_IMAGE_SIZE = 32  # smaller inputs pool to nothing: the network outputs NaN


class NonFiniteLossError(UserError):
    """Training diverged: the loss became NaN or infinite."""


@dataclasses.dataclass
class DataSplits:
    """Both splits' indexes and where their pixels come from (``pipeline.pixel_source``, made
    once per run: every epoch's loaders share them)."""

    train: mura.MuraIndex
    valid: mura.MuraIndex
    train_pixels: Any
    valid_pixels: Any


def prepare_data(config: ml_collections.ConfigDict, workdir: Path, task) -> DataSplits:
    """Resolves ``config.data.root`` (the image cache's copies of the CSVs when it is empty and
    ``config.data.cache`` is set, else synthetic MURA if asked), reads both splits as
    ``task`` defines them, and makes each split's pixel source once for the whole run (with a
    cache: its manifest read and checked here, not again at every epoch's loaders)."""
    data_config = config.data
    if not data_config.root and not data_config.get("cache", ""):
        if data_config.synthetic_studies <= 0:
            raise UserError(
                "config.data.root is empty: set --config.data.root=/path/to/MURA-v1.1, or "
                "--config.data.synthetic_studies=N to train on generated MURA-format data"
            )
        # Absolute, as config.json records it: evaluate and predict may run from another folder.
        root = workdir.absolute() / "data" / "MURA-v1.1"
        if jax.process_index() == 0 and not (root / "valid_labeled_studies.csv").is_file():
            from murajax import synthetic

            logging.info("writing %d synthetic studies to %s", data_config.synthetic_studies, root)
            synthetic.generate(root.parent, num_studies=data_config.synthetic_studies,
                               seed=config.seed)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("synthetic data written")
        with data_config.unlocked():
            data_config.root = str(root)
    train = task.read_split(data_config, "train")
    valid = task.read_split(data_config, config.eval.split)
    splits = DataSplits(train=train, valid=valid,
                        train_pixels=pipeline.pixel_source(train, data_config),
                        valid_pixels=pipeline.pixel_source(valid, data_config))
    for name, index in (("train", splits.train), ("valid", splits.valid)):
        logging.info("%s: %d images in %d studies%s", name, len(index.images), len(index.studies),
                     f"; skipped {index.skipped}" if index.skipped else "")
    return splits


def _finite_loss(window, first_step: int, step: int, epoch: int,
                 last_saved: int | None) -> float:
    """The mean train loss of ``window``, the metrics of steps ``first_step``..``step``
    accumulated on the device; a NonFiniteLossError if it is NaN or infinite (a sum is once any
    of its terms is), i.e. if any of those steps' loss was. The loop reads it only at log
    steps, saves and epoch ends, so that steps stay queued ahead in between."""
    loss = float(window.loss.compute())
    if not np.isfinite(loss):
        saved = f"step {last_saved}" if last_saved is not None else "none yet"
        steps_read = f"step {step}" if first_step >= step else f"steps {first_step}..{step}"
        raise NonFiniteLossError(
            f"the training loss became {loss} in {steps_read} (epoch {epoch}); this state was "
            f"not saved (last checkpoint: {saved}). Lower --config.optim.learning_rate, or check "
            "the input data, then restart (the run resumes from the last checkpoint)."
        )
    return loss


@jax.jit
def _merge(window, metrics):
    """One dispatch per step for the window's running sums, not one per field."""
    return window.merge(metrics)


def evaluate_split(strategy, state, index: mura.MuraIndex, config, task, pixels=None) -> dict:
    """Validation loss and accuracy over images; AUROC and kappa over studies. ``pixels``:
    ``pipeline.pixel_source(index, config.data)``, made here when None."""
    probabilities = np.full(len(index.images), np.nan, np.float32)
    collection = None
    for batch in pipeline.eval_loader(
        index, config.data, global_batch_size=config.eval_batch_size,
        process_index=jax.process_index(), process_count=jax.process_count(), pixels=pixels,
    ):
        metrics, probs, positions = strategy.eval_step(state, strategy.shard_batch(batch))
        metrics = strategy.one_copy(metrics)
        collection = metrics if collection is None else collection.merge(metrics)
        probs, positions = strategy.gather(probs), strategy.gather(positions)
        real = positions >= 0
        probabilities[positions[real]] = probs[real]
    if collection is None:
        raise UserError(f"the {config.eval.split} split has no images to evaluate")
    result = {k: float(v) for k, v in collection.compute().items()}
    # Images skipped as unreadable keep NaN: the task leaves them out of their studies.
    result.update(task.validation_metrics(index, probabilities, config.eval.threshold))
    result["probabilities"] = probabilities
    return result


class _StopRequest:
    """Set by SIGTERM/SIGINT; the loop checks it between steps."""

    def __init__(self):
        self.event = threading.Event()
        self.signal_name = ""
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.event.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means now
        self.signal_name = signal.Signals(signum).name
        logging.warning("%s received: saving a checkpoint at the next step, then stopping",
                        self.signal_name)
        self.event.set()

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def requested(self, checkpointer, step: int) -> bool:
        if self.event.is_set():
            return True
        # On a pod, JAX's preemption notice reaches every process at the same step.
        return jax.process_count() > 1 and checkpointer.manager.reached_preemption(step)


@dataclasses.dataclass
class RunProgress:
    """The run's bookkeeping, saved as JSON beside the state in every checkpoint."""

    epoch: int = 0  # epochs completed
    history: list[dict] = dataclasses.field(default_factory=list)  # a record per epoch end
    val_loss: float | None = None  # this checkpoint's validation loss (epoch ends only)
    window: dict | None = None  # train metrics since the last log line (mid-epoch saves)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, saved: dict) -> "RunProgress":
        return cls(epoch=int(saved["epoch"]), history=list(saved.get("history", [])),
                   val_loss=saved.get("val_loss"), window=saved.get("window"))


def _window_to_json(window) -> dict | None:
    """The train metrics accumulated since the last log line, so a resumed run logs the same."""
    if window is None:
        return None
    window = jax.device_get(window)
    return {name: [float(getattr(window, name).total), int(getattr(window, name).count)]
            for name in steps.StepMetrics.__annotations__}


def _window_from_json(saved: dict | None):
    if not saved:
        return None
    return steps.StepMetrics.empty().replace(**{
        name: clu_metrics.Average(total=np.float32(total), count=np.int32(count))
        for name, (total, count) in saved.items()
    })


def _variables_from_run(config, like: dict) -> dict:
    """``config.init_from`` a murajax workdir: the params and BatchNorm statistics of its best
    checkpoint (the latest when no epoch finished; its EMA's if that run evaluates with
    ``eval.use_ema``), checked to be ``config.model.name``'s and shaped like ``like``."""
    source = Path(os.path.expanduser(str(config.init_from)))
    if not ((source / checkpoints.CONFIG_FILE).is_file()
            and (source / checkpoints.CHECKPOINT_DIR).is_dir()):
        raise UserError(f"config.init_from={str(config.init_from)!r} is a folder but not a "
                        f"murajax workdir (no {checkpoints.CONFIG_FILE} and "
                        f"{checkpoints.CHECKPOINT_DIR}/ in it): give a trained run's workdir or "
                        "a Keras .h5 weight file")
    saved = checkpoints.load_run_config(source)
    if saved.model.name != config.model.name:
        raise UserError(f"config.init_from={str(config.init_from)!r} is a run of "
                        f"config.model.name={saved.model.name!r}, but this run has "
                        f"config.model.name={config.model.name!r}: use the same model")
    step = checkpoints.best_steps(source, 1)[0]
    use_ema = bool(saved.get("eval", {}).get("use_ema", False))
    variables = checkpoints.restore_variables(source, step, use_ema=use_ema)
    variables = models.in_layout(train_state.model_from_config(config), {
        "params": variables["params"], "batch_stats": variables["batch_stats"]})
    want = jax.tree_util.tree_flatten_with_path(like)[0]
    got = dict(jax.tree_util.tree_flatten_with_path(variables)[0])
    for path, leaf in want:
        if path not in got or np.shape(got[path]) != np.shape(leaf):
            found = "missing" if path not in got else f"shape {np.shape(got[path])}"
            raise UserError(f"config.init_from={str(config.init_from)!r}: "
                            f"{jax.tree_util.keystr(path)} is {found} there, this model needs "
                            f"shape {np.shape(leaf)} (another task or model setting?)")
    if len(got) != len(want):
        raise UserError(f"config.init_from={str(config.init_from)!r}: its checkpoint has "
                        f"{len(got)} variables, this model {len(want)}")
    logging.info("initialised from %s, checkpoint step %d%s", source, step,
                 " (EMA weights)" if use_ema else "")
    return jax.tree.map(lambda x, ref: np.asarray(x, dtype=np.asarray(ref).dtype),
                        variables, like)


def _load_pretrained(config, strategy, state):
    """``state`` with the variables ``config.init_from`` names: a murajax workdir's best
    checkpoint (``_variables_from_run``), or else a weight file read by the importer that
    ``config.model.name`` registered (``murajax.models``); it checks the model's settings too
    (the DenseNets' Keras importer refuses a ``config.model.bn_epsilon`` other than Keras's)."""
    host = jax.device_get(strategy.one_copy(state))
    if Path(os.path.expanduser(str(config.init_from))).is_dir():
        variables = _variables_from_run(config, host.variables)
        return _with_variables(strategy, host, variables)
    backbone = models.get(config.model.name)
    if backbone.load_weights is None:
        raise UserError(f"config.init_from is set, but config.model.name={backbone.name!r} has "
                        "no weight importer; leave config.init_from empty")
    model = train_state.model_from_config(config)
    variables = backbone.load_weights(config.init_from, host.variables, model=model)
    logging.info("initialised the backbone from %s", config.init_from)
    return _with_variables(strategy, host, variables)


def _with_variables(strategy, host, variables):
    host = host.replace(params=variables["params"], batch_stats=variables["batch_stats"])
    if host.ema is not None:  # the EMA starts from the imported weights too
        host = host.replace(ema=jax.tree.map(np.array, {
            "params": variables["params"], "batch_stats": variables["batch_stats"]}))
    return strategy.place_state(host)


def _check_running_loss_size(checkpointer, num_images: int) -> None:
    """A UserError if the newest checkpoint's running loss has another number of train images
    than this run's train split (its data settings changed)."""
    try:
        saved = checkpointer.manager.item_metadata(checkpointer.latest_step())["state"]
        shape = tuple(saved["running_loss"].shape)
    except Exception:  # noqa: BLE001 - unreadable: restore_latest_good reports it
        return
    if shape != (num_images,):
        raise UserError(f"{checkpointer.directory} holds the running loss (config.reweight) of "
                        f"{shape[0] if shape else 0} train images, but this run's train split "
                        f"has {num_images}: keep the data settings of the run, or use another "
                        "--workdir")


def _restore_or_start(config, workdir: Path, strategy, checkpointer, model, tx, loss_weights,
                      num_images: int = 0, steps_per_epoch: int = 1):
    """The state to train from, the loader position in its epoch, and the run's bookkeeping:
    from the newest readable checkpoint, else fresh (with ImageNet weights if configured).
    ``num_images``, ``steps_per_epoch``: the train split's, for ``config.reweight``'s running
    loss (one entry per train image) and its start step."""
    state = strategy.init_state(functools.partial(
        train_state.create_train_state, jax.random.key(config.seed), model, tx,
        config.data.image_size, loss_weights, recipes.from_config(config),
        ema_decay=train_state.ema_decay_from_config(config),
        reweight=reweight.from_config(config, steps_per_epoch), num_images=num_images,
        teacher=teacher.from_config(config, steps_per_epoch),
        augment=device_augment.from_config(config),
    ))
    if optim.trainable_from_config(config.optim) == "head":  # the backbone frozen, eval mode
        state = state.replace(apply_fn=optim.head_only_apply(state.apply_fn))
    if checkpointer.all_steps():
        if strategy.one_copy(state).running_loss is not None:
            _check_running_loss_size(checkpointer, num_images)
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            strategy.one_copy(state),
        )
        # A checkpoint written with another config.model.block_impl resumes too.
        restored = checkpointer.restore_latest_good(abstract, functools.partial(
            train_state.relayout, model))
        if restored is None:
            raise UserError(f"no checkpoint in {checkpointer.directory} could be read (see the "
                            "warnings above); if they belong to another model, use another "
                            "--workdir, else move that folder away to start afresh")
        step, restored_state, loader_state, progress = restored
        writers.truncate_metrics(workdir, step)
        progress = RunProgress.from_json(progress)
        logging.info("resumed from step %d (epoch %d)", step, progress.epoch)
        return strategy.place_state(restored_state), loader_state, progress
    writers.truncate_metrics(workdir, 0)  # records of an attempt killed before its first save
    if config.init_from:
        state = _load_pretrained(config, strategy, state)
    parameter_overview.log_parameter_overview(jax.device_get(strategy.one_copy(state).params))
    return state, {}, RunProgress()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Trains (or resumes) a run in ``workdir``; returns a summary of the last validation.

    Holds the workdir's lock (``workdir_lock``) throughout: a second run on it is refused."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with workdir_lock.hold_workdir(workdir):
        return _train_and_evaluate_locked(config, workdir)


def _train_and_evaluate_locked(config: ml_collections.ConfigDict, workdir: Path) -> dict:
    checkpoints.check_compatible(workdir, config)
    train_state.ema_decay_from_config(config)  # a bad config.ema.decay fails before any work
    reweight.from_config(config)  # so does a bad config.reweight field
    teacher.from_config(config)  # and a bad config.teacher field
    device_augment.from_config(config)  # and a bad config.data.augment_on
    images.colour_from(config.data)  # and a bad config.data.colour
    if config.data.image_size < MIN_IMAGE_SIZE:  # source images of any size are resized to it
        raise UserError(
            f"config.data.image_size={config.data.image_size} is too small: DenseNet halves the "
            f"input five times and needs at least {MIN_IMAGE_SIZE} px (the paper uses 320)"
        )
    strategy = parallel.create_strategy(config.parallelism, config.batch_size,
                                        config.eval_batch_size)
    task = tasks.from_config(config)
    data = prepare_data(config, workdir, task)
    checkpoints.save_run_config(workdir, config)

    loss_weights = task.loss_weights(data.train)
    model = train_state.model_from_config(config, bn_axis_name=strategy.bn_axis_name)
    checkpointer = checkpoints.Checkpointer(workdir, keep_best=config.keep_best)
    steps_per_epoch = pipeline.train_steps_per_epoch(len(data.train.images), config.batch_size)
    tx = optim.create_optimizer(config.optim, steps_per_epoch)
    state, loader_state, progress = _restore_or_start(
        config, workdir, strategy, checkpointer, model, tx, loss_weights,
        num_images=len(data.train.images), steps_per_epoch=steps_per_epoch)
    writer = writers.MetricWriter(workdir)
    run = _Training(config, task, strategy, checkpointer, writer, state, steps_per_epoch)
    summary = {"workdir": str(workdir), "checkpoints": str(checkpointer.directory),
               "metrics": str(workdir.absolute() / writers.METRICS_FILE), "preempted": False}
    if progress.history:  # a finished (or resumed) run reports its last validation
        summary.update(_summary_of(progress.history[-1]))
    try:
        with _StopRequest() as stop:
            for epoch in range(progress.epoch, config.num_epochs):
                finished = run.train_epoch(epoch, data.train, loader_state, progress, stop,
                                         pixels=data.train_pixels)
                loader_state = {}
                if not finished:
                    summary.update(preempted=True, step=run.step)
                    logging.warning("stopped at step %d (%s); rerun with the same --workdir to "
                                    "resume", run.step, stop.signal_name or "stop_after_steps")
                    break
                progress = run.end_epoch(epoch, data.valid, progress, pixels=data.valid_pixels)
                summary.update(_summary_of(progress.history[-1]))
                if run.stopping:
                    summary.update(preempted=True)
                    break
    finally:
        try:
            checkpointer.wait()  # raises CheckpointWriteError if the last save failed
        finally:
            checkpointer.close()
            writer.close()
    summary["history"] = progress.history
    return summary


def _summary_of(record: dict) -> dict:
    keys = ("step", "epoch", "val_loss", "auroc", "kappa", "learning_rate",
            "ema_val_loss", "ema_auroc", "ema_kappa")  # ema_*: runs with an EMA only
    return {key: record[key] for key in keys if key in record}


class _Training:
    """One run's moving parts: the state, the step counter and the last save, advanced by
    ``train_epoch`` (the steps of an epoch, with logging and mid-epoch checkpoints) and
    ``end_epoch`` (validation, the plateau rule, the epoch-end checkpoint), in that order."""

    def __init__(self, config, task, strategy, checkpointer, writer, state, steps_per_epoch: int):
        self.config = config
        self.task = task
        self.strategy = strategy
        self.checkpointer = checkpointer
        self.writer = writer
        self.state = state
        self.steps_per_epoch = steps_per_epoch
        self.step = self.start_step = int(strategy.one_copy(state).step)
        self.last_saved = checkpointer.latest_step()
        self.progress_line = writers.Progress(steps_per_epoch * config.num_epochs, self.step,
                                              config.batch_size)
        self.stopping = False  # a stop was requested (signal, preemption, stop_after_steps)
        self._checked = self.step  # the loss of every step up to this one was read finite

    def train_epoch(self, epoch: int, index, loader_state: dict, progress: RunProgress,
                    stop: "_StopRequest", pixels=None) -> bool:
        """Runs ``epoch``'s steps from ``loader_state``'s position. True when its last step
        ran; False when a stop request ended it early (after saving a checkpoint)."""
        config = self.config
        loader = pipeline.train_loader(
            index, config.data, global_batch_size=config.batch_size, seed=config.seed,
            epoch=epoch, process_index=jax.process_index(), process_count=jax.process_count(),
            pixels=pixels,
        )
        if loader_state:
            loader.set_state(loader_state)
        window = _window_from_json(progress.window)
        for batch in loader:
            self.state, metrics = self.strategy.train_step(self.state,
                                                           self.strategy.shard_batch(batch))
            # One logical copy (pmap returns one per device), as a restored window is.
            metrics = self.strategy.one_copy(metrics)
            self.step += 1
            window = metrics if window is None else _merge(window, metrics)
            end_of_epoch = self.step % self.steps_per_epoch == 0
            if self.step % config.log_every_steps == 0 or end_of_epoch:
                self._log_train(window, epoch)
                window = None
            budget = config.stop_after_steps
            self.stopping = stop.requested(self.checkpointer, self.step) or (
                budget > 0 and self.step - self.start_step >= budget)
            if end_of_epoch:
                return True  # the epoch-end checkpoint follows validation
            if self.stopping or self.step % config.checkpoint_every_steps == 0:
                self._check_finite(window, epoch)  # a diverged state is never saved
                self._save(loader.get_state(), dataclasses.replace(
                    progress, val_loss=None, window=_window_to_json(window)))
            if self.stopping:
                return False
        self._check_finite(window, epoch)  # a loader that ended early: before validation
        return True

    def end_epoch(self, epoch: int, index, progress: RunProgress, pixels=None) -> RunProgress:
        """Validates (the raw weights, and the EMA's if the state keeps one), applies the plateau
        rule, logs and saves; the progress after ``epoch``. The plateau rule and the best
        checkpoints read the raw weights' validation loss, the EMA's with
        ``config.eval.use_ema``."""
        val = evaluate_split(self.strategy, self.state, index, self.config, self.task, pixels)
        ema_val, ema_logged = None, {}
        if self.state.ema is not None:
            ema_val = evaluate_split(self.strategy, self.state.with_ema_weights(), index,
                                     self.config, self.task, pixels)
            ema_logged = {f"ema_{key}": ema_val[key]
                          for key in ("loss", "accuracy", "auroc", "kappa")}
        selected = ema_val if bool(self.config.eval.get("use_ema", False)) else val
        host = steps.apply_plateau(self.strategy.one_copy(self.state), selected["loss"],
                                   self.config.optim)
        self.state = self.strategy.place_state(host)
        rate = float(optim.learning_rate(host.opt_state))
        record = {"epoch": epoch + 1, "step": self.step, "val_loss": val["loss"],
                  "auroc": val["auroc"], "kappa": val["kappa"], "learning_rate": rate}
        if ema_val is not None:
            record.update(ema_val_loss=ema_val["loss"], ema_auroc=ema_val["auroc"],
                          ema_kappa=ema_val["kappa"])
        progress = RunProgress(epoch=epoch + 1, history=progress.history + [record],
                               val_loss=selected["loss"])
        # Log before saving: a crash in between then redoes (and relogs) the epoch end.
        self.writer.write(self.step, "valid", epoch=epoch + 1, loss=val["loss"],
                          accuracy=val["accuracy"], auroc=val["auroc"], kappa=val["kappa"],
                          learning_rate=rate, **ema_logged)
        self._save({}, progress, val_loss=selected["loss"])
        logging.info("epoch %d/%d: val loss %.4f  accuracy %.3f  study AUROC %.4f  kappa %.4f  "
                     "next lr %.2e", epoch + 1, self.config.num_epochs, val["loss"],
                     val["accuracy"], val["auroc"], val["kappa"], rate)
        if ema_val is not None:
            logging.info("epoch %d/%d: EMA val loss %.4f  accuracy %.3f  study AUROC %.4f  "
                         "kappa %.4f%s", epoch + 1, self.config.num_epochs, ema_val["loss"],
                         ema_val["accuracy"], ema_val["auroc"], ema_val["kappa"],
                         "  (config.eval.use_ema: these drive the plateau rule and the best "
                         "checkpoints)" if selected is ema_val else "")
        self.progress_line.restart(self.step)
        return progress

    def _check_finite(self, window, epoch: int) -> float | None:
        """``window`` (the metrics since the last check) read on the host: its mean loss, or a
        NonFiniteLossError naming the steps, the last checkpoint and the fix."""
        if window is None:
            return None
        loss = _finite_loss(window, self._checked + 1, self.step, epoch, self.last_saved)
        self._checked = self.step
        return loss

    def _save(self, loader_state: dict, progress: RunProgress, val_loss=None) -> None:
        self.checkpointer.save(self.step, self.strategy.one_copy(self.state), loader_state,
                               progress.to_json(), val_loss=val_loss)
        self.last_saved = self.step

    def _log_train(self, window, epoch: int) -> None:
        loss = self._check_finite(window, epoch)
        rate = float(optim.applied_learning_rate(self.strategy.one_copy(self.state).opt_state,
                                                 self.config.optim, self.steps_per_epoch))
        images_per_second = self.progress_line.images_per_second(self.step)
        self.progress_line.report(self.step, epoch, loss, rate, images_per_second)
        self.writer.write(self.step, "train", epoch=epoch, loss=loss, learning_rate=rate,
                          accuracy=float(window.accuracy.compute()),
                          images_per_second=images_per_second)
