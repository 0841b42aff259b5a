"""Fault injection: kill -9 at ten moments, SIGTERM, corrupt checkpoints, failing saves, and
run-to-run determinism. See docs/reliability.md for the table of cases.

The kill tests run training in subprocesses on one CPU device (so checkpoint saves are cheap) and
compare with an uninterrupted subprocess run on one device. They share the session's persistent
compilation cache, which the reference run warms, so each restart costs a few seconds. The
driver, the interruptions and the checkpoint damage are tests/harness.py's.
"""

import errno
import gc
import json
import logging
import os
import random
import re
from pathlib import Path

import jax
import numpy as np
import pytest

from murajax import checkpoints, synthetic, train
from tests import harness, helpers
from tests.harness import TMP_SUFFIX, Kill, corrupt_array_data, committed_steps

STEPS_PER_EPOCH = 9  # 75 synthetic training images // batch 8
TOTAL_STEPS = 2 * STEPS_PER_EPOCH


# ---- shared fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mura_root(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("data"), num_studies=40, seed=3)


def _overrides(root, **extra):
    """The run's config overrides: for the driver (JSON), launch.py (flags) and in-process."""
    return {"data.root": str(root), "data.synthetic_studies": 0, "data.image_size": 32,
            "batch_size": 8, "eval_batch_size": 16, "num_epochs": 2,
            "checkpoint_every_steps": 3, "log_every_steps": 1, "keep_best": 1, **extra}


@pytest.fixture(scope="module")
def subprocess_env():
    """One CPU device in every subprocess (reference included), and the tests' compile cache."""
    return harness.subprocess_env(jax.config.jax_compilation_cache_dir)


def _final_variables(workdir):
    return checkpoints.restore_variables(workdir, TOTAL_STEPS)


def _records(workdir):
    """metrics.jsonl without the wall-clock fields."""
    records = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "images_per_second"} for r in records]


@pytest.fixture(scope="module")
def reference(mura_root, subprocess_env, tmp_path_factory):
    """An uninterrupted one-device subprocess run: its workdir, final variables and metrics."""
    workdir = tmp_path_factory.mktemp("reference")
    rc = harness.run(harness.driver_command(workdir, _overrides(mura_root)), subprocess_env,
                     workdir / "log.txt")
    assert rc == 0, harness.tail(workdir / "log.txt")
    records = _records(workdir)
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, TOTAL_STEPS + 1))
    return workdir, _final_variables(workdir), records


# ---- kill -9 at ten moments ----------------------------------------------------------------------


def _kill_plan(seed=8) -> list[Kill]:
    """Ten SIGKILLs and one SIGTERM over the 18 steps, with seeded delays and steps."""
    rng = random.Random(seed)
    return [
        Kill("delay", 2, rng.uniform(1.0, 5.0)),  # start-up: imports, tracing, first steps
        Kill("step", rng.randint(2, 4), rng.uniform(0.0, 0.4), launch=True),
        Kill("tmpdir", 3),  # while checkpoint 3 or 6 is being written
        # Mid-epoch, with no periodic checkpoints: saves at the next step, exits 0.
        Kill("sigterm", 4, launch=True),
        Kill("commit", 6),  # checkpoint 6 or 9 written, not yet renamed
        Kill("step", STEPS_PER_EPOCH, rng.uniform(0.0, 0.6)),  # validation / epoch-end save
        Kill("delay", 11, rng.uniform(2.0, 8.0)),  # restore, start of epoch 2
        Kill("step", rng.randint(12, 14), rng.uniform(0.0, 0.4)),
        Kill("tmpdir", 15),  # checkpoint 15 mid-write: so 9 and 12 are committed
        # Here the test damages the newest checkpoint: the next attempt must fall back to 9.
        Kill("step", STEPS_PER_EPOCH + 1, rng.uniform(0.0, 0.4)),
        Kill("commit", TOTAL_STEPS),  # the last checkpoint's commit
    ]


CORRUPT_BEFORE = 9  # index in _kill_plan() of the attempt that finds the newest one damaged


def _run_kill_chain(root, env, workdir):
    """The attempts of _kill_plan() in one workdir (the newest checkpoint damaged before attempt
    CORRUPT_BEFORE), then a run to the end."""
    overrides = _overrides(root)
    logs, reached, corrupted = [], [], None
    for i, kill in enumerate(_kill_plan()):
        if i == CORRUPT_BEFORE:
            # keep_best=1: the epoch-end checkpoint 9 (scored) and the newest, usually 12 (15
            # was killed mid-write), 15 if the previous attempt got that far.
            committed = committed_steps(workdir)
            assert len(committed) == 2 and committed[0] == STEPS_PER_EPOCH, committed
            corrupted = committed[-1]
            corrupt_array_data(workdir / "checkpoints" / str(corrupted))
        these = _overrides(root, checkpoint_every_steps=100) if kill.kind == "sigterm" \
            else overrides  # the interval changes what is saved, never the numbers
        command = (harness.launch_command if kill.launch else harness.driver_command)(
            workdir, these)
        log_path = workdir / f"attempt{i}.log"
        reached.append(harness.attempt(kill, command, env, workdir, log_path)[1])
        logs.append(log_path)
    final_log = workdir / "final.log"
    rc = harness.run(harness.driver_command(workdir, overrides), env, final_log)
    assert rc == 0, harness.tail(final_log)
    logs.append(final_log)
    return {"workdir": workdir, "logs": logs, "reached": reached, "corrupted": corrupted}


def test_killed_preempted_and_corrupted_run_ends_bit_identical(mura_root, subprocess_env,
                                                               reference, tmp_path):
    """One test (one xdist worker) for the whole chain; each block below checks one case of
    docs/reliability.md."""
    plan = _kill_plan()
    chain = _run_kill_chain(mura_root, subprocess_env, tmp_path)
    logs = chain["logs"]
    _, expected_variables, expected_records = reference

    # kill -9 at ten moments (launch.py among them), then completion: bit-identical params,
    # and metrics.jsonl reads as one uninterrupted run.
    assert sum(k.kind != "sigterm" for k in plan) == 10
    assert any(k.launch and k.kind != "sigterm" for k in plan)
    helpers.assert_same_tree(_final_variables(tmp_path), expected_variables)
    assert _records(tmp_path) == expected_records
    assert max(chain["reached"]) >= 15, chain["reached"]  # kills all over the run

    # kill -9 inside a save's commit: nothing half-written is visible; leftovers are cleaned.
    for i, kill in enumerate(plan):
        if kill.kind == "commit":
            assert "SIGKILL inside the commit of checkpoint" in logs[i].read_text()
    names = os.listdir(tmp_path / "checkpoints")
    assert names and not [n for n in names if TMP_SUFFIX in n], names

    # SIGTERM mid-epoch through launch.py: checkpoint at the next step, exit 0 (checked by
    # harness.attempt), and the next attempt resumes from exactly that step.
    i = next(i for i, k in enumerate(plan) if k.kind == "sigterm")
    output = logs[i].read_text()
    assert "SIGTERM received: saving a checkpoint at the next step" in output
    stopped = int(re.search(r"stopped early at step (\d+)", output).group(1))
    assert stopped % STEPS_PER_EPOCH, stopped  # mid-epoch
    assert f"resumed from step {stopped} " in logs[i + 1].read_text()

    # A corrupt latest checkpoint: detected, named in a warning, set aside; the run falls back
    # to the previous one (and still ends bit-identical, above).
    log = logs[CORRUPT_BEFORE].read_text()
    bad = tmp_path / "checkpoints" / str(chain["corrupted"])
    assert f"checkpoint {bad} is unreadable (CorruptCheckpointError" in log
    assert "falling back to the previous one" in log
    assert f"resumed from step {STEPS_PER_EPOCH} " in log
    aside = list((tmp_path / checkpoints.UNREADABLE_DIR).iterdir())
    assert [p.name.split("-")[0] for p in aside] == [str(chain["corrupted"])]


# ---- in-process: determinism, truncated checkpoints, failing saves --------------------------------


def test_two_runs_with_the_same_seed_write_identical_metrics(mura_root, tmp_path):
    config = dict(num_epochs=1, checkpoint_every_steps=100)
    train.train_and_evaluate(helpers.tiny_config(**_overrides(mura_root, **config)),
                             tmp_path / "a")
    train.train_and_evaluate(helpers.tiny_config(**_overrides(mura_root, **config)),
                             tmp_path / "b")
    records = _records(tmp_path / "a")
    assert len(records) == STEPS_PER_EPOCH + 1
    assert records == _records(tmp_path / "b")
    helpers.assert_same_tree(helpers.final_variables(tmp_path / "a"),
                      helpers.final_variables(tmp_path / "b"))


def _tiny_state(value):
    w = np.random.default_rng(value).normal(size=4096).astype(np.float32)  # incompressible
    return {"w": jax.numpy.asarray(w), "n": jax.numpy.asarray(value, jax.numpy.int32)}


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        state)


# Orbax leaves the other reads of a step it failed to restore as unfinished coroutines; their
# finalisers raise the read's error again, which pytest reports wherever the collector runs.
@pytest.mark.filterwarnings("ignore:Exception ignored in.*_read_array_index_and_device_put"
                            ":pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["truncate", "flip", "delete_progress"])
def test_damaged_latest_checkpoint_is_detected_named_and_set_aside(tmp_path, damage,
                                                                    caplog):
    checkpointer = checkpoints.Checkpointer(tmp_path, keep_best=1)
    checkpointer.save(1, _tiny_state(1), {"step": 1}, {"epoch": 0}, val_loss=1.0)
    checkpointer.save(2, _tiny_state(2), {"step": 2}, {"epoch": 0})
    checkpointer.wait()
    latest = tmp_path / "checkpoints" / "2"
    if damage == "truncate":
        target = max((p for p in (latest / "state").rglob("*") if p.is_file()),
                     key=lambda p: p.stat().st_size)
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    elif damage == "flip":
        corrupt_array_data(latest)
    else:
        (latest / "progress" / "metadata").unlink()
    with caplog.at_level(logging.WARNING):
        step, state, loader, progress = checkpointer.restore_latest_good(
            _abstract(_tiny_state(0)))
    gc.collect()  # orbax's reads of the damaged step, abandoned: finalised here, not later
    assert step == 1 and loader == {"step": 1} and progress == {"epoch": 0}
    np.testing.assert_array_equal(state["w"], _tiny_state(1)["w"])
    cause = {"truncate": "", "flip": "CorruptCheckpointError", "delete_progress": "FileNotFoundError"}
    assert f"checkpoint {latest} is unreadable ({cause[damage]}" in caplog.text
    assert "falling back to the previous one" in caplog.text
    assert checkpointer.all_steps() == [1]
    # The damaged step is out of the way: saving it again works.
    checkpointer.save(2, _tiny_state(2), {"step": 2}, {"epoch": 0})
    checkpointer.wait()
    assert checkpointer.all_steps() == [1, 2]
    checkpointer.close()


def _fail_commit_of(step: int, error: int, monkeypatch) -> None:
    """The commit of checkpoint ``step`` raises ``OSError(error)`` (disk full, read-only)."""
    def fail(folder_name):
        if folder_name.startswith(f"{step}."):
            raise OSError(error, os.strerror(error))

    harness.install_commit_hook(fail, monkeypatch)


def test_failing_save_raises_a_clear_error_and_keeps_earlier_checkpoints(mura_root, tmp_path,
                                                                          monkeypatch):
    _fail_commit_of(4, errno.ENOSPC, monkeypatch)
    config = helpers.tiny_config(**_overrides(mura_root, num_epochs=1, checkpoint_every_steps=2))
    with pytest.raises(checkpoints.CheckpointWriteError) as info:
        train.train_and_evaluate(config, tmp_path)
    message = str(info.value)
    assert f"could not write checkpoint {tmp_path / 'checkpoints' / '4'}" in message
    assert "No space left on device" in message
    assert "intact (steps 2)" in message
    # The checkpoint before the failure is untouched and restores.
    assert committed_steps(tmp_path) == [2]
    variables = checkpoints.restore_variables(tmp_path, 2)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(variables["params"]))


def test_failing_background_save_surfaces_at_the_final_wait(tmp_path, monkeypatch):
    """The last save of a run fails after save() returned: wait() (which train_and_evaluate
    calls on every exit) raises the same clear error."""
    _fail_commit_of(2, errno.EROFS, monkeypatch)
    checkpointer = checkpoints.Checkpointer(tmp_path, keep_best=1)
    checkpointer.save(1, _tiny_state(1), {}, {"epoch": 0})
    checkpointer.save(2, _tiny_state(2), {}, {"epoch": 0})  # returns; the commit fails later
    with pytest.raises(checkpoints.CheckpointWriteError,
                       match=r"could not write checkpoint .*checkpoints/2: OSError: .*Read-only "
                             r"file system.*intact \(steps 1\)"):
        checkpointer.wait()
    checkpointer.wait()  # reported once
    checkpointer.close()
    assert committed_steps(tmp_path) == [1]


def _tiny_variables_state(value):
    """A dict state holding what evaluation restores: params and BatchNorm statistics."""
    rng = np.random.default_rng(value)
    return {"params": {"w": jax.numpy.asarray(rng.normal(size=4096).astype(np.float32))},
            "batch_stats": {"mean": jax.numpy.asarray(rng.normal(size=64).astype(np.float32))}}


def test_evaluation_restore_checks_the_variables_digest(tmp_path):
    """restore_variables (evaluation, inference) restores only params and batch_stats, so it
    checks their own digest: damaged files are refused, intact ones and checkpoints saved before
    the digest existed are read."""
    checkpointer = checkpoints.Checkpointer(tmp_path, keep_best=3)
    for step in (1, 2, 3):
        checkpointer.save(step, _tiny_variables_state(step), {}, {"epoch": 0}, val_loss=1.0)
    checkpointer.wait()
    root = tmp_path / "checkpoints"
    # 1: intact. 2: a byte of its array data flipped (orbax reads it without complaint).
    # 3: saved before variables digests were kept.
    corrupt_array_data(root / "2")
    progress_file = root / "3" / "progress" / "metadata"
    progress = json.loads(progress_file.read_text())
    del progress["variables_sha256"]
    progress_file.write_text(json.dumps(progress))

    reader = checkpoints.Checkpointer(tmp_path, read_only=True)
    intact = reader.restore_variables(1)
    np.testing.assert_array_equal(intact["params"]["w"], _tiny_variables_state(1)["params"]["w"])
    with pytest.raises(checkpoints.CorruptCheckpointError, match=f"checkpoint {root / '2'}:"):
        reader.restore_variables(2)
    legacy = reader.restore_variables(3)
    np.testing.assert_array_equal(legacy["batch_stats"]["mean"],
                                  _tiny_variables_state(3)["batch_stats"]["mean"])
    checkpointer.close()
