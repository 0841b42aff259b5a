"""Checkpoints: one orbax CheckpointManager per run, in ``<workdir>/checkpoints``.

Each checkpoint holds three items saved together, asynchronously and atomically (orbax writes to
a temporary folder and renames it on commit, so a crash never leaves a half-written checkpoint
that looks finished):

* ``state``: the TrainState pytree (params, BatchNorm statistics, Adam state with the current
  learning rate, plateau tracker, step, PRNG key, loss weights);
* ``loader``: the train input iterator's state, so a restart continues with exactly the next batch;
* ``progress``: JSON bookkeeping: epoch, validation history, best validation loss.

Kept: the latest checkpoint, plus the ``keep_best`` checkpoints with the lowest validation loss
(only epoch-end checkpoints carry one; mid-epoch ones live until the next save). The run's config
sits beside them in ``<workdir>/config.json`` so a workdir can be evaluated or served on its own.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation

from murajax.errors import UserError

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
# Config fields that decide the shape of the state: resuming with others cannot work.
_ARCHITECTURE_FIELDS = ("model.name",)


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


class Checkpointer:
    """Saves and restores a run's (state, loader state, progress) triples."""

    def __init__(self, workdir: str | Path, keep_best: int = 5, *, read_only: bool = False):
        self.directory = Path(workdir).absolute() / CHECKPOINT_DIR
        if read_only and not self.directory.is_dir():
            raise UserError(
                f"no checkpoints in {self.directory}: train first "
                f"(python launch.py --workdir {Path(workdir)}) or point --workdir at a trained run"
            )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=LatestAndBest(n=max(int(keep_best), 1)),
            enable_async_checkpointing=not read_only,
            read_only=read_only,
            create=not read_only,
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

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, loader_state: dict, progress: dict, val_loss=None) -> None:
        """Starts an asynchronous save; the state must already be checked finite."""
        metrics = None if val_loss is None else {"val_loss": float(val_loss)}
        self.manager.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                loader=ocp.args.JsonSave(loader_state),
                progress=ocp.args.JsonSave(progress),
            ),
            metrics=metrics,
            force=True,
        )

    def restore(self, step: int, abstract_state) -> tuple[Any, dict, dict]:
        restored = self.manager.restore(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                loader=ocp.args.JsonRestore(),
                progress=ocp.args.JsonRestore(),
            ),
        )
        return restored.state, restored.loader, restored.progress

    def restore_latest_good(self, abstract_state) -> tuple[int, Any, dict, dict] | None:
        """The newest checkpoint that restores; broken ones are skipped with a warning naming them."""
        for step in reversed(self.all_steps()):
            try:
                return (step, *self.restore(step, abstract_state))
            except Exception as e:  # noqa: BLE001 - any failure to read means "not usable"
                logging.warning(
                    "checkpoint %s is unreadable (%s: %s); falling back to the previous one",
                    self.directory / str(step), type(e).__name__, e,
                )
        return None

    def restore_progress(self, step: int) -> dict:
        return self.manager.restore(
            int(step), args=ocp.args.Composite(progress=ocp.args.JsonRestore())
        ).progress

    def restore_variables(self, step: int) -> dict:
        """Params and BatchNorm statistics of one checkpoint, on this process's first device.

        Works whatever topology saved the checkpoint (a pod's checkpoint on a workstation): the
        target layout comes from the checkpoint's metadata, not from how it was saved.
        """
        metadata = self.manager.item_metadata(int(step))["state"]
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
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
        return {"params": raw["params"], "batch_stats": raw["batch_stats"]}

    def wait(self) -> None:
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
    """Refuses to resume a run whose checkpoints belong to another architecture."""
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


def restore_variables(workdir: str | Path, step: int) -> dict:
    return Checkpointer(workdir, read_only=True).restore_variables(step)
