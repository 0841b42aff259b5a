"""The training loop: ``train_and_evaluate(config, workdir)``.

Owns the order of things and nothing else: read the data, build (or restore) the state, run
epochs of ``train_step``, evaluate on the validation split at each epoch end, apply the plateau
rule, save checkpoints, log. Numerics live in ``steps``, layouts in ``parallel``, persistence in
``checkpoints``.

Resuming is automatic: if ``<workdir>/checkpoints`` holds a checkpoint, the run continues from
the newest readable one, mid-epoch included, and ends with the same params, bit for bit, as a run
that was never interrupted. SIGTERM or SIGINT make the loop save at the next step boundary, wait
for the save to land, and return.
"""

from __future__ import annotations

import dataclasses
import functools
import signal
import threading
from pathlib import Path

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metrics as clu_metrics
from clu import parameter_overview
from jax.experimental import multihost_utils

from murajax import (checkpoints, evaluate, optim, parallel, steps, train_state, workdir_lock,
                     writers)
from murajax.data import mura, pipeline
from murajax.errors import UserError

MIN_IMAGE_SIZE = 32  # smaller inputs pool to nothing: the network outputs NaN


class NonFiniteLossError(UserError):
    """Training diverged: the loss became NaN or infinite."""


@dataclasses.dataclass
class DataSplits:
    root: Path
    train: mura.MuraIndex
    valid: mura.MuraIndex


def prepare_data(config: ml_collections.ConfigDict, workdir: Path) -> DataSplits:
    """Resolves ``config.data.root`` (generating synthetic MURA if asked) and reads both splits."""
    data_config = config.data
    if not data_config.root:
        if data_config.synthetic_studies <= 0:
            raise UserError(
                "config.data.root is empty: set --config.data.root=/path/to/MURA-v1.1, or "
                "--config.data.synthetic_studies=N to train on generated MURA-format data"
            )
        root = workdir / "data" / "MURA-v1.1"
        if jax.process_index() == 0 and not (root / "valid_labeled_studies.csv").is_file():
            from murajax import synthetic

            logging.info("writing %d synthetic studies to %s", data_config.synthetic_studies, root)
            synthetic.generate(root.parent, num_studies=data_config.synthetic_studies,
                               seed=config.seed)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("synthetic data written")
        with data_config.unlocked():
            data_config.root = str(root)
    root = Path(data_config.root)
    splits = DataSplits(
        root=root,
        train=mura.index_from_config(data_config, "train"),
        valid=mura.index_from_config(data_config, config.eval.split),
    )
    for name, index in (("train", splits.train), ("valid", splits.valid)):
        logging.info("%s: %d images in %d studies%s", name, len(index.images), len(index.studies),
                     f"; skipped {index.skipped}" if index.skipped else "")
    return splits


def _finite_loss(metrics, step: int, epoch: int, last_saved: int | None) -> float:
    loss = float(metrics.loss.compute())
    if not np.isfinite(loss):
        saved = f"step {last_saved}" if last_saved is not None else "none yet"
        raise NonFiniteLossError(
            f"the training loss became {loss} at step {step} (epoch {epoch}); this state was not "
            f"saved (last checkpoint: {saved}). Lower --config.optim.learning_rate, or check the "
            "input data, then restart (the run resumes from the last checkpoint)."
        )
    return loss


def evaluate_split(strategy, state, index: mura.MuraIndex, config) -> dict:
    """Validation loss and accuracy over images; AUROC and kappa over studies."""
    probabilities = np.full(len(index.images), np.nan, np.float32)
    collection = None
    for batch in pipeline.eval_loader(
        index, config.data, global_batch_size=config.eval_batch_size,
        process_index=jax.process_index(), process_count=jax.process_count(),
    ):
        metrics, probs, positions = strategy.eval_step(state, strategy.shard_batch(batch))
        metrics = strategy.host_state(metrics)
        collection = metrics if collection is None else collection.merge(metrics)
        probs, positions = strategy.gather(probs), strategy.gather(positions)
        real = positions >= 0
        probabilities[positions[real]] = probs[real]
    if collection is None:
        raise UserError(f"the {config.eval.split} split has no images to evaluate")
    result = {k: float(v) for k, v in collection.compute().items()}
    scored = np.isfinite(probabilities)  # images skipped as unreadable have no probability
    records = [r for r, keep in zip(index.images, scored) if keep]
    studies = evaluate.aggregate_studies(
        [r.study for r in records], probabilities[scored], np.array([r.label for r in records]),
        np.array([r.study_type for r in records]),
    )
    study_metrics = evaluate.binary_metrics(studies.label, studies.probability,
                                            config.eval.threshold)
    result.update(auroc=study_metrics["auroc"], kappa=study_metrics["kappa"],
                  probabilities=probabilities)
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


def _log_train(writer, progress_line, strategy, state, window, step, epoch, last_saved):
    loss = _finite_loss(window, step, epoch, last_saved)
    rate = float(optim.learning_rate(strategy.host_state(state).opt_state))
    ips = progress_line.images_per_second(step)
    progress_line.report(step, epoch, loss, rate, ips)
    writer.write(step, "train", epoch=epoch, loss=loss, learning_rate=rate,
                 accuracy=float(window.accuracy.compute()),
                 images_per_second=ips)


def _window_to_json(window) -> dict | None:
    """The train metrics accumulated since the last log line, so a resumed run logs the same."""
    if window is None:
        return None
    window = jax.device_get(window)
    return {name: [float(getattr(window, name).total), int(getattr(window, name).count)]
            for name in steps.TrainMetrics.__annotations__}


def _window_from_json(saved: dict | None):
    if not saved:
        return None
    return steps.TrainMetrics.empty().replace(**{
        name: clu_metrics.Average(total=np.float32(total), count=np.int32(count))
        for name, (total, count) in saved.items()
    })


def _load_pretrained(config, strategy, state):
    from murajax import pretrained

    if abs(config.model.bn_epsilon - 1.001e-5) > 1e-12:
        logging.warning("config.model.bn_epsilon=%g, but Keras weights expect 1.001e-5",
                        config.model.bn_epsilon)
    host = jax.device_get(strategy.host_state(state))
    variables = pretrained.load_keras_weights(config.init_from, host.variables)
    logging.info("initialised the backbone from %s", config.init_from)
    return strategy.place_state(
        host.replace(params=variables["params"], batch_stats=variables["batch_stats"])
    )


def _restore_or_start(config, workdir: Path, strategy, checkpointer, model, tx, loss_weights):
    """The state to train from, the loader position in its epoch, and the run's bookkeeping:
    from the newest readable checkpoint, else fresh (with ImageNet weights if configured)."""
    state = strategy.init_state(functools.partial(
        train_state.create_train_state, jax.random.key(config.seed), model, tx,
        config.data.image_size, loss_weights,
    ))
    if checkpointer.all_steps():
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            strategy.host_state(state),
        )
        restored = checkpointer.restore_latest_good(abstract)
        if restored is None:
            raise UserError(f"no checkpoint in {checkpointer.directory} could be read (see the "
                            "warnings above); if they belong to another model, use another "
                            "--workdir, else move that folder away to start afresh")
        step, host_state, loader_state, progress = restored
        writers.truncate_metrics(workdir, step)
        logging.info("resumed from step %d (epoch %d)", step, progress["epoch"])
        return strategy.place_state(host_state), loader_state, progress
    writers.truncate_metrics(workdir, 0)  # records of an attempt killed before its first save
    if config.init_from:
        state = _load_pretrained(config, strategy, state)
    parameter_overview.log_parameter_overview(jax.device_get(strategy.host_state(state).params))
    return state, {}, {"epoch": 0, "history": [], "val_loss": None}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Trains (or resumes) a run in ``workdir``; returns a summary of the last validation.

    Holds the workdir's lock (``workdir_lock``) throughout: a second run on it is refused."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with workdir_lock.hold_workdir(workdir):
        return _train_and_evaluate_locked(config, workdir)


def _train_and_evaluate_locked(config: ml_collections.ConfigDict, workdir: Path) -> dict:
    checkpoints.check_compatible(workdir, config)
    if config.data.image_size < MIN_IMAGE_SIZE:  # source images of any size are resized to it
        raise UserError(
            f"config.data.image_size={config.data.image_size} is too small: DenseNet halves the "
            f"input five times and needs at least {MIN_IMAGE_SIZE} px (the paper uses 320)"
        )
    strategy = parallel.create_strategy(config.parallelism, config.batch_size,
                                        config.eval_batch_size)
    data = prepare_data(config, workdir)
    checkpoints.save_run_config(workdir, config)

    loss_weights = mura.class_weights(data.train)
    model = train_state.create_model(config, bn_axis_name=strategy.bn_axis_name)
    tx = optim.create_optimizer(config.optim)
    checkpointer = checkpoints.Checkpointer(workdir, keep_best=config.keep_best)
    state, loader_state, progress = _restore_or_start(
        config, workdir, strategy, checkpointer, model, tx, loss_weights)

    steps_per_epoch = pipeline.steps_per_epoch(len(data.train.images), config.batch_size)
    if steps_per_epoch == 0:
        raise UserError(
            f"the train split has {len(data.train.images)} images, fewer than one batch "
            f"(config.batch_size={config.batch_size})"
        )
    total_steps = steps_per_epoch * config.num_epochs
    writer = writers.MetricWriter(workdir)
    step = start_step = int(strategy.host_state(state).step)
    progress_line = writers.Progress(total_steps, step, config.batch_size)
    last_saved = checkpointer.latest_step()
    summary = {"workdir": str(workdir), "checkpoints": str(checkpointer.directory),
               "metrics": str(workdir / writers.METRICS_FILE), "preempted": False}
    if progress["history"]:  # a finished (or resumed) run reports its last validation
        last = progress["history"][-1]
        summary.update(step=last["step"], epoch=last["epoch"], val_loss=last["val_loss"],
                       auroc=last["auroc"], kappa=last["kappa"],
                       learning_rate=last["learning_rate"])

    try:
        with _StopRequest() as stop:
            epoch = progress["epoch"]
            while epoch < config.num_epochs:
                loader = pipeline.train_loader(
                    data.train, config.data, global_batch_size=config.batch_size,
                    seed=config.seed, epoch=epoch, process_index=jax.process_index(),
                    process_count=jax.process_count(),
                )
                if loader_state:
                    loader.set_state(loader_state)
                loader_state = {}
                pending, stopping = None, False
                window = _window_from_json(progress.get("window"))
                for batch in loader:
                    state, metrics = strategy.train_step(state, strategy.shard_batch(batch))
                    # One logical copy (pmap returns one per device), as a restored window is.
                    metrics = strategy.host_state(metrics)
                    if pending is not None:  # check the previous step while this one runs
                        _finite_loss(pending, step, epoch, last_saved)
                    step += 1
                    pending = metrics
                    window = metrics if window is None else window.merge(metrics)
                    end_of_epoch = step % steps_per_epoch == 0
                    if step % config.log_every_steps == 0 or end_of_epoch:
                        _log_train(writer, progress_line, strategy, state, window, step, epoch,
                                   last_saved)
                        window = None
                    stopping = stop.requested(checkpointer, step) or (
                        config.stop_after_steps > 0 and step - start_step >= config.stop_after_steps)
                    if end_of_epoch:
                        break  # the epoch-end checkpoint follows validation
                    if stopping or step % config.checkpoint_every_steps == 0:
                        _finite_loss(pending, step, epoch, last_saved)
                        checkpointer.save(step, strategy.host_state(state), loader.get_state(),
                                          {**progress, "epoch": epoch, "val_loss": None,
                                           "window": _window_to_json(window)})
                        last_saved = step
                    if stopping:
                        break
                if stopping and step % steps_per_epoch:
                    summary.update(preempted=True, step=step)
                    logging.warning("stopped at step %d (%s); rerun with the same --workdir to "
                                    "resume", step, stop.signal_name or "stop_after_steps")
                    break

                # End of epoch: validate, adjust the rate, save with the validation loss.
                _finite_loss(pending, step, epoch, last_saved)
                val = evaluate_split(strategy, state, data.valid, config)
                host = strategy.host_state(state)
                host = steps.apply_plateau(host, val["loss"], config.optim)
                state = strategy.place_state(host)
                rate = float(optim.learning_rate(host.opt_state))
                epoch += 1
                record = {"epoch": epoch, "step": step, "val_loss": val["loss"],
                          "auroc": val["auroc"], "kappa": val["kappa"], "learning_rate": rate}
                progress = {"epoch": epoch, "history": progress["history"] + [record],
                            "val_loss": val["loss"]}
                # Log before saving: a crash in between then redoes (and relogs) the epoch end.
                writer.write(step, "valid", epoch=epoch, loss=val["loss"],
                             accuracy=val["accuracy"], auroc=val["auroc"], kappa=val["kappa"],
                             learning_rate=rate)
                checkpointer.save(step, host, {}, progress, val_loss=val["loss"])
                last_saved = step
                logging.info("epoch %d/%d: val loss %.4f  accuracy %.3f  study AUROC %.4f  "
                             "kappa %.4f  next lr %.2e", epoch, config.num_epochs, val["loss"],
                             val["accuracy"], val["auroc"], val["kappa"], rate)
                progress_line.restart(step)
                summary.update(step=step, epoch=epoch, val_loss=val["loss"], auroc=val["auroc"],
                               kappa=val["kappa"], learning_rate=rate)
                if stopping:
                    summary.update(preempted=True)
                    break
    finally:
        try:
            checkpointer.wait()  # raises CheckpointWriteError if the last save failed
        finally:
            checkpointer.close()
            writer.close()
    summary["history"] = progress["history"]
    summary["params"] = jax.device_get(strategy.host_state(state).params)
    summary["batch_stats"] = jax.device_get(strategy.host_state(state).batch_stats)
    return summary
