"""Checkpoints: one orbax CheckpointManager per run, in ``<workdir>/checkpoints``.

Each checkpoint holds three items saved together, asynchronously and atomically (orbax writes to
a temporary folder and renames it on commit, so a crash never leaves a half-written checkpoint
that looks finished):

* ``state``: the TrainState pytree (params, BatchNorm statistics, Adam state with the current
  learning rate, plateau tracker, step, PRNG key, loss weights; with ``config.ema.decay`` > 0,
  ``ema``: the moving average of params and BatchNorm statistics; with ``config.reweight``,
  ``running_loss``: each train image's running loss);
* ``loader``: the train input iterator's state, so a restart continues with exactly the next batch;
* ``progress``: JSON bookkeeping: epoch, validation history, best validation loss.

Kept: the latest checkpoint, plus the ``keep_best`` checkpoints with the lowest validation loss
(only epoch-end checkpoints carry one; mid-epoch ones live until the next save). The run's config
sits beside them in ``<workdir>/config.json`` so a workdir can be evaluated or served on its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation

from murajax import optim
from murajax.errors import UserError

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
# Config fields that decide the shape of the state: resuming with others cannot work.
_ARCHITECTURE_FIELDS = ("model.name",)
UNREADABLE_DIR = "checkpoints-unreadable"  # where unreadable checkpoints are moved on fallback
_DIGEST = "state_sha256"  # progress key: digest of the saved state, checked on restore
# progress key: digest of params + batch_stats alone, checked when only those are restored
# (evaluation, inference)
_VARIABLES_DIGEST = "variables_sha256"
# progress key (runs with an EMA only): digest of the EMA's params + batch_stats, checked when
# evaluation restores those
_EMA_VARIABLES_DIGEST = "ema_variables_sha256"
# progress key (runs with config.reweight only): digest of the running loss, checked when the
# audit restores it alone
_RUNNING_LOSS_DIGEST = "running_loss_sha256"
# Failures of the storage, not of the program: reported as CheckpointWriteError.
_STORAGE_ERRORS = re.compile(
    r"No space left|Disk quota|Read-only file system|Permission denied|Input/output error",
    re.IGNORECASE)


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (disk full, permissions, I/O error)."""


class CorruptCheckpointError(UserError):
    """A checkpoint's restored state does not match the digest written with it."""


def state_digest(state) -> str:
    """SHA-256 over the state's leaves (path, dtype, shape, bytes): detects silent corruption."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(state)
    values = jax.device_get([
        jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x
        for _, x in leaves
    ])
    digest = hashlib.sha256()
    for (path, _), value in zip(leaves, values):
        value = np.ascontiguousarray(value)
        digest.update(f"{jax.tree_util.keystr(path)}:{value.dtype}:{value.shape};".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def _evaluation_variables(state, use_ema: bool = False) -> dict | None:
    """``{'params', 'batch_stats'}`` of a TrainState or of a dict holding both (None if it
    lacks them): what evaluation restores, in the one layout its digest is taken over. With
    ``use_ema``, those of the state's EMA (``state.ema`` / ``state['ema']``)."""
    if use_ema:
        ema = state.get("ema") if isinstance(state, dict) else getattr(state, "ema", None)
        return None if ema is None else _evaluation_variables(ema)
    if isinstance(state, dict):
        params, batch_stats = state.get("params"), state.get("batch_stats")
    else:
        params, batch_stats = getattr(state, "params", None), getattr(state, "batch_stats", None)
    if params is None or batch_stats is None:
        return None
    return {"params": params, "batch_stats": batch_stats}


def _running_loss(state) -> dict | None:
    """``{'running_loss': array}`` of a TrainState or dict that keeps one, else None: the one
    layout its digest is taken over."""
    value = state.get("running_loss") if isinstance(state, dict) else getattr(
        state, "running_loss", None)
    return None if value is None else {"running_loss": value}


def _on_disk(state):
    """The tree written for ``state``: a TrainState (any dataclass) as the dict of its pytree
    fields, without ``ema`` or ``running_loss`` when None (off); other trees as they are.

    orbax records a None field as an entry of its own, so a TrainState without EMA saved as it
    is would no longer have the tree of the checkpoints written before the EMA existed (which
    then would not restore). Fields and dict entries are the same to orbax, so this writes
    exactly the files a TrainState always did."""
    if not dataclasses.is_dataclass(state) or isinstance(state, type):
        return state
    tree = {field.name: getattr(state, field.name) for field in dataclasses.fields(state)
            if field.metadata.get("pytree_node", True)}
    for optional in ("ema", "running_loss"):  # None when off: no entry at all
        if tree.get(optional, 0) is None:
            del tree[optional]
    return tree


def _from_disk(restored, abstract_state):
    """``_on_disk`` undone: the restored dict back in ``abstract_state``'s dataclass (with its
    static fields: apply_fn, tx, recipe, ...)."""
    if not dataclasses.is_dataclass(abstract_state) or isinstance(abstract_state, type):
        return restored
    return abstract_state.replace(**restored)


@dataclasses.dataclass
class LatestAndBest(preservation.PreservationPolicy):
    """Keeps the newest checkpoint and the ``n`` with the lowest validation loss.

    Checkpoints without a validation loss (mid-epoch saves) live only while they are the newest.
    (orbax's BestN keeps everything while there are at most ``n`` checkpoints, mid-epoch ones
    included, so we say exactly what we mean here.)
    """

    n: int

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        if not checkpoints:
            return []
        scored = [i for i, info in enumerate(checkpoints) if info.metrics]
        best = sorted(scored, key=lambda i: float(checkpoints[i].metrics["val_loss"]))[: self.n]
        newest = max(range(len(checkpoints)), key=lambda i: checkpoints[i].step)
        keep = set(best) | {newest}
        return [i in keep for i in range(len(checkpoints))]


def _val_loss(metrics) -> float:
    return float((metrics or {}).get("val_loss", float("inf")))


class Checkpointer:
    """Saves and restores a run's (state, loader state, progress) triples."""

    def __init__(self, workdir: str | Path, keep_best: int = 5, *, read_only: bool = False):
        self.directory = Path(workdir).absolute() / CHECKPOINT_DIR
        self.read_only = read_only
        if read_only and not self.directory.is_dir():
            raise UserError(
                f"no checkpoints in {self.directory}: train first "
                f"(murajax --workdir {Path(workdir)}) or point --workdir at a trained run"
            )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=LatestAndBest(n=max(int(keep_best), 1)),
            enable_async_checkpointing=not read_only,
            read_only=read_only,
            create=not read_only,
            # Saves cut short by a crash leave <step>.orbax-checkpoint-tmp folders: remove them.
            cleanup_tmp_directories=not read_only,
            # With a best_fn orbax writes each checkpoint's metrics to disk, so LatestAndBest
            # still knows the validation losses after a restart (without, it sees none and
            # deletes every epoch-end checkpoint but the newest at the next save).
            best_fn=_val_loss,
            best_mode="min",
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                # Readers restore parts of the state (params, batch_stats), which needs the
                # PyTree handler; it reads what the Standard handler writes.
                "state": ocp.PyTreeCheckpointHandler() if read_only
                else ocp.StandardCheckpointHandler(),
                "loader": ocp.JsonCheckpointHandler(),
                "progress": ocp.JsonCheckpointHandler(),
            },
        )
        self._pending: int | None = None  # the step whose save runs in the background

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, loader_state: dict, progress: dict, val_loss=None) -> None:
        """Starts an asynchronous save; the state must already be checked finite.

        A failure to write (this save's, or the previous one's, which surfaces here) raises
        ``CheckpointWriteError``; the checkpoints written before it are left as they were.
        """
        self.wait()  # the previous save's errors belong to the previous step
        metrics = {} if val_loss is None else {"val_loss": float(val_loss)}  # {}: unscored
        progress = {**progress, _DIGEST: state_digest(state)}
        variables = _evaluation_variables(state)
        if variables is not None:
            progress[_VARIABLES_DIGEST] = state_digest(variables)
        ema_variables = _evaluation_variables(state, use_ema=True)
        if ema_variables is not None:  # absent without an EMA: progress as it always was
            progress[_EMA_VARIABLES_DIGEST] = state_digest(ema_variables)
        running_loss = _running_loss(state)
        if running_loss is not None:  # absent without re-weighting
            progress[_RUNNING_LOSS_DIGEST] = state_digest(running_loss)
        with self._reporting_write_errors(int(step)):
            self.manager.save(
                int(step),
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(_on_disk(state)),
                    loader=ocp.args.JsonSave(loader_state),
                    progress=ocp.args.JsonSave(progress),
                ),
                metrics=metrics,
                force=True,
            )
        self._pending = int(step)

    @contextlib.contextmanager
    def _reporting_write_errors(self, step: int | None):
        """Storage failures (OSError: disk full, permissions, I/O) -> CheckpointWriteError."""
        try:
            yield
        except UserError:
            raise
        except Exception as error:  # noqa: BLE001 - filtered below
            if not (isinstance(error, OSError) or _STORAGE_ERRORS.search(str(error))):
                raise
            folder = self.directory / str(step) if step is not None else self.directory
            # From the disk: the manager may already have dropped steps due for deletion.
            good = sorted(int(p.name) for p in self.directory.iterdir()
                          if p.name.isdigit() and int(p.name) != step)
            raise CheckpointWriteError(
                f"could not write checkpoint {folder}: {type(error).__name__}: {error}. "
                "The checkpoints written before it are intact "
                f"({'steps ' + ', '.join(map(str, good)) if good else 'none yet'}). Free disk "
                "space or fix the folder's permissions, then rerun the same command to resume."
            ) from error

    def restore(self, step: int, abstract_state, relayout=None) -> tuple[Any, dict, dict]:
        """State, loader state and progress of ``step``; CorruptCheckpointError if the state
        differs from what was saved (checkpoints from before digests were kept are trusted).

        ``relayout(state, like)``: ``state`` with its model variables in the layout of
        ``like`` (a params tree; None: the model's own), for a model that stores its variables
        in more than one layout (``models.in_layout``): the checkpoint is read in the layout
        it was written in, then converted."""
        target = abstract_state
        if relayout is not None:
            saved = self.manager.item_metadata(int(step))["state"]["params"]
            target = relayout(abstract_state, saved)
        restored = self.manager.restore(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_on_disk(target)),
                loader=ocp.args.JsonRestore(),
                progress=ocp.args.JsonRestore(),
            ),
        )
        progress = dict(restored.progress)
        progress.pop(_VARIABLES_DIGEST, None)
        progress.pop(_EMA_VARIABLES_DIGEST, None)
        progress.pop(_RUNNING_LOSS_DIGEST, None)
        state = _from_disk(restored.state, target)
        self._check_digest(step, state, progress.pop(_DIGEST, None))
        if relayout is not None:
            state = relayout(state, None)
        return state, restored.loader, progress

    def _check_digest(self, step: int, restored, expected: str | None) -> None:
        """CorruptCheckpointError unless ``restored`` hashes to ``expected`` (None: not recorded,
        as in checkpoints from before digests were kept, which are trusted)."""
        if expected is not None and state_digest(restored) != expected:
            raise CorruptCheckpointError(
                f"checkpoint {self.directory / str(step)}: the restored state does not match "
                "the digest saved with it (the files were damaged after writing)"
            )

    def restore_latest_good(self, abstract_state,
                            relayout=None) -> tuple[int, Any, dict, dict] | None:
        """The newest checkpoint that restores (``relayout``: as for ``restore``); broken ones
        are skipped with a warning naming them.

        Broken checkpoints newer than the one restored are moved to
        ``<workdir>/checkpoints-unreadable`` (so the run can save those steps again), unless the
        manager is read-only.
        """
        unreadable = []
        for step in reversed(self.all_steps()):
            try:
                restored = (step, *self.restore(step, abstract_state, relayout))
            except Exception as e:  # noqa: BLE001 - any failure to read means "not usable"
                logging.warning(
                    "checkpoint %s is unreadable (%s: %s); falling back to the previous one",
                    self.directory / str(step), type(e).__name__, e,
                )
                unreadable.append(step)
                continue
            if unreadable and not self.read_only:
                self._set_aside(unreadable)
            return restored
        return None

    def _set_aside(self, steps: list[int]) -> None:
        if jax.process_index() == 0:
            target = self.directory.parent / UNREADABLE_DIR
            target.mkdir(exist_ok=True)
            for step in steps:
                destination = target / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
                shutil.move(str(self.directory / str(step)), str(destination))
                logging.warning("moved unreadable checkpoint %s to %s",
                                self.directory / str(step), destination)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("unreadable checkpoints set aside")
        self.manager.reload()

    def restore_progress(self, step: int) -> dict:
        return self.manager.restore(
            int(step), args=ocp.args.Composite(progress=ocp.args.JsonRestore())
        ).progress

    def restore_variables(self, step: int, use_ema: bool = False) -> dict:
        """Params and BatchNorm statistics of one checkpoint, on this process's first device;
        with ``use_ema``, those of its EMA (UserError if the run kept none).

        Works whatever topology saved the checkpoint (a pod's checkpoint on a workstation): the
        target layout comes from the checkpoint's metadata, not from how it was saved. Checked
        against the digest saved with them (CorruptCheckpointError), where there is one.
        """
        metadata = self.manager.item_metadata(int(step))["state"]
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        if use_ema:
            if not isinstance(metadata.get("ema"), dict):
                raise UserError(
                    f"checkpoint {self.directory / str(step)} holds no EMA weights (the run was "
                    "trained with config.ema.decay=0): evaluate without "
                    "--config.eval.use_ema=True")
            wanted = {"ema": {key: metadata["ema"][key] for key in ("params", "batch_stats")}}
        else:
            wanted = {key: metadata[key] for key in ("params", "batch_stats")}
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), wanted
        )
        raw = self.manager.restore(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=target,
                    restore_args=jax.tree.map(
                        lambda _: ocp.ArrayRestoreArgs(sharding=device), target),
                    partial_restore=True,
                )
            ),
        ).state
        variables = _evaluation_variables(raw, use_ema=use_ema)
        digest = _EMA_VARIABLES_DIGEST if use_ema else _VARIABLES_DIGEST
        self._check_digest(step, variables, self.restore_progress(step).get(digest))
        return variables

    def restore_running_loss(self, step: int) -> np.ndarray | None:
        """float32 [train images]: checkpoint ``step``'s running loss per train image (NaN: never
        seen), checked against its digest; None if the run kept none (config.reweight off)."""
        metadata = self.manager.item_metadata(int(step))["state"]
        if metadata.get("running_loss") is None:
            return None
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        m = metadata["running_loss"]
        target = {"running_loss": jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device)}
        raw = self.manager.restore(
            int(step),
            args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                item=target, restore_args={"running_loss": ocp.ArrayRestoreArgs(sharding=device)},
                partial_restore=True)),
        ).state
        restored = {"running_loss": raw["running_loss"]}
        self._check_digest(step, restored,
                           self.restore_progress(step).get(_RUNNING_LOSS_DIGEST))
        return np.asarray(jax.device_get(restored["running_loss"]))

    def wait(self) -> None:
        """Waits for the background save; CheckpointWriteError if it failed."""
        step, self._pending = self._pending, None
        with self._reporting_write_errors(step):
            self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


# ---- the run's config, saved beside the checkpoints ---------------------------------------------


def save_run_config(workdir: str | Path, config: ml_collections.ConfigDict) -> None:
    if jax.process_index() != 0:
        return
    path = Path(workdir) / CONFIG_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(config.to_json_best_effort(indent=2, sort_keys=True))
    tmp.replace(path)


def load_run_config(workdir: str | Path) -> ml_collections.ConfigDict:
    path = Path(workdir) / CONFIG_FILE
    if not path.is_file():
        raise UserError(
            f"{path} not found: {workdir} is not a murajax run directory (train into it first)"
        )
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def check_compatible(workdir: str | Path, config: ml_collections.ConfigDict) -> None:
    """Refuses (UserError) to resume the run in ``workdir`` with a config whose state its
    checkpoints would not fit: another architecture, an EMA or a running loss added or
    dropped, and once it has checkpoints, another ``optim.trainable`` or a warm-up added or
    dropped (another optimizer state). Also checks ``config.optim.trainable`` itself."""
    trainable = optim.trainable_from_config(config.optim)
    path = Path(workdir) / CONFIG_FILE
    if not path.is_file():
        return
    saved = load_run_config(workdir)
    for field in _ARCHITECTURE_FIELDS:
        section, name = field.split(".")
        before, now = saved[section][name], config[section][name]
        if before != now:
            raise UserError(
                f"{workdir} holds checkpoints of a run with {field}={before!r}, but this run has "
                f"{field}={now!r}: use another --workdir, or the same {field}"
            )
    # An EMA in the state or none: a checkpoint of the one cannot resume as the other.
    before, now = _ema_decay(saved), _ema_decay(config)
    if (before > 0) != (now > 0):
        raise UserError(
            f"{workdir} holds checkpoints of a run with config.ema.decay={before!r}, but this "
            f"run has config.ema.decay={now!r}: an EMA cannot be added to or dropped from a run "
            "mid-way; use another --workdir, or keep the EMA on (or off) as it was")
    # A running loss in the state or none: likewise.
    before, now = _reweighting(saved), _reweighting(config)
    if (before == "none") != (now == "none"):
        raise UserError(
            f"{workdir} holds checkpoints of a run with config.reweight.mode={before!r}, but "
            f"this run has config.reweight.mode={now!r}: a running loss cannot be added to or "
            "dropped from a run mid-way; use another --workdir, or keep re-weighting on (or "
            "off) as it was")
    _check_same_optimizer_state(Path(workdir), saved, config, trainable)


def _check_same_optimizer_state(workdir: Path, saved, config, trainable: str) -> None:
    """Refuses another ``optim.trainable``, or a warm-up added or dropped, than those of the
    run whose checkpoints ``workdir`` holds: its optimizer state would not fit them."""
    if not any((workdir / CHECKPOINT_DIR).glob("[0-9]*")):
        return
    saved = saved.optim
    before = saved.get("trainable", "all")
    if before != trainable:
        raise UserError(f"{workdir} holds checkpoints of a run with "
                        f"config.optim.trainable={before!r}, but this run has {trainable!r}: "
                        "use another --workdir (with --config.init_from="
                        f"{workdir} to start from that run's weights)")
    if optim.has_warmup(saved) != optim.has_warmup(config.optim):  # another optimizer state
        fields = ("warmup_steps", "warmup_epochs")
        raise UserError(f"{workdir} holds checkpoints of a run with " + ", ".join(
            f"config.optim.{f}={saved.get(f, 0)}" for f in fields) + ", but this run has " +
            ", ".join(f"{f}={config.optim.get(f, 0)}" for f in fields) + ": a warm-up cannot be "
            "added to or dropped from a run mid-way (its length may change); use another "
            "--workdir, or keep the warm-up on (or off) as it was")


def _reweighting(config: ml_collections.ConfigDict) -> str:
    section = config.get("reweight")  # configs from before re-weighting existed have none
    return str(section.get("mode", "none")) if section is not None else "none"


def _ema_decay(config: ml_collections.ConfigDict) -> float:
    ema = config.get("ema")  # configs from before the EMA existed have none
    return float(ema.get("decay", 0.0)) if ema is not None else 0.0


# ---- read-only access for evaluation and inference --------------------------------------------


def best_steps(workdir: str | Path, k: int) -> list[int]:
    """The steps of the ``k`` epoch-end checkpoints with the lowest validation loss, best first.

    Falls back to the latest checkpoint when no epoch has finished yet.
    """
    checkpointer = Checkpointer(workdir, read_only=True)
    steps = checkpointer.all_steps()
    if not steps:
        raise UserError(f"no checkpoints in {checkpointer.directory}: train first")
    scored = []
    for step in steps:
        val_loss = checkpointer.restore_progress(step).get("val_loss")
        if val_loss is not None:
            scored.append((val_loss, step))
    if not scored:
        return [steps[-1]]
    return [step for _, step in sorted(scored)[: max(int(k), 1)]]


def restore_variables(workdir: str | Path, step: int, use_ema: bool = False) -> dict:
    """Params and BatchNorm statistics of checkpoint ``step`` (with ``use_ema``: its EMA's)."""
    return Checkpointer(workdir, read_only=True).restore_variables(step, use_ema=use_ema)
