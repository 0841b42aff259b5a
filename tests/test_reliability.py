"""Fault injection: kill -9 at ten moments, SIGTERM, corrupt checkpoints, failing saves, and
run-to-run determinism. See docs/reliability.md for the table of cases.

The kill tests run training in subprocesses on one CPU device (so checkpoint saves are cheap) and
compare with an uninterrupted subprocess run on one device. They share the session's persistent
compilation cache, which the reference run warms, so each restart costs a few seconds.
"""

import dataclasses
import errno
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from murajax import checkpoints, synthetic, train
from tests import helpers

REPO = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 9  # 75 synthetic training images // batch 8
TOTAL_STEPS = 2 * STEPS_PER_EPOCH
ATTEMPT_TIMEOUT_S = 300  # one subprocess; generous because a cold compile cache compiles
TMP_SUFFIX = ".orbax-checkpoint-tmp"

# Runs train_and_evaluate(tiny_config(**json overrides), workdir). With
# RELIABILITY_KILL_IN_COMMIT=N it SIGKILLs itself inside orbax's commit of the first checkpoint of
# a step >= N: the files are written, the temporary folder not yet renamed.
_DRIVER = r"""
import json, os, sys
sys.modules["torch"] = None  # tensorboardX imports torch when it can: seconds per start
from absl import logging
from murajax import train, writers
from tests import helpers
logging.use_absl_handler()
logging.set_verbosity(logging.INFO)
writers.quiet_library_logs()
kill_at = int(os.environ.get("RELIABILITY_KILL_IN_COMMIT", "-1"))
if kill_at >= 0:
    import signal
    from orbax.checkpoint._src.path import atomicity
    commit = atomicity.AtomicRenameTemporaryPath.finalize
    async def finalize(self, *args, **kwargs):
        name = self.get().name.split(".")[0]
        if name.isdigit() and int(name) >= kill_at:
            logging.warning("RELIABILITY: SIGKILL inside the commit of checkpoint %s", name)
            os.kill(os.getpid(), signal.SIGKILL)
        return await commit(self, *args, **kwargs)
    atomicity.AtomicRenameTemporaryPath.finalize = finalize
train.train_and_evaluate(helpers.tiny_config(**json.loads(sys.argv[2])), sys.argv[1])
"""


# ---- shared fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mura_root(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("data"), num_studies=40, seed=3)


def _overrides(root, **extra):
    return {"data.root": str(root), "data.synthetic_studies": 0, "data.image_size": 32,
            "batch_size": 8, "eval_batch_size": 16, "num_epochs": 2,
            "checkpoint_every_steps": 3, "log_every_steps": 1, "keep_best": 1, **extra}


@pytest.fixture(scope="module")
def subprocess_env():
    """One CPU device in every subprocess (reference included), and the tests' compile cache."""
    cache = jax.config.jax_compilation_cache_dir
    env = dict(os.environ)
    env.update({
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": cache,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5",
        "MURAJAX_COMPILATION_CACHE": cache,  # launch.py's own setting
        "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        "PYTHONUNBUFFERED": "1",
    })
    env.pop("RELIABILITY_KILL_IN_COMMIT", None)
    return env


def _driver_command(workdir, overrides):
    return [sys.executable, "-c", _DRIVER, str(workdir), json.dumps(overrides)]


def _launch_command(workdir, overrides):
    flags = [f"--config.{key}={value}" for key, value in overrides.items()]
    return [sys.executable, "launch.py", "--config", "configs/smoke.py", *flags,
            f"--workdir={workdir}"]


def _run(command, env, log_path, timeout=ATTEMPT_TIMEOUT_S):
    with open(log_path, "w") as log:
        result = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                timeout=timeout)
    return result.returncode


def _tail(path, n=40):
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])


def _committed_steps(workdir) -> list[int]:
    folder = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def _final_variables(workdir):
    return checkpoints.restore_variables(workdir, TOTAL_STEPS)


def _assert_same_tree(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _records(workdir):
    """metrics.jsonl without the wall-clock fields."""
    records = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "images_per_second"} for r in records]


@pytest.fixture(scope="module")
def reference(mura_root, subprocess_env, tmp_path_factory):
    """An uninterrupted one-device subprocess run: its workdir, final variables and metrics."""
    workdir = tmp_path_factory.mktemp("reference")
    rc = _run(_driver_command(workdir, _overrides(mura_root)), subprocess_env, workdir / "log.txt")
    assert rc == 0, _tail(workdir / "log.txt")
    records = _records(workdir)
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, TOTAL_STEPS + 1))
    return workdir, _final_variables(workdir), records


# ---- kill -9 at ten moments ----------------------------------------------------------------------


@dataclasses.dataclass
class Kill:
    """When to SIGKILL one attempt.

    kind: 'delay' (``delay`` seconds after the start, or at logged step ``step`` if earlier),
    'step' (``delay`` seconds after step >= ``step`` is logged), 'tmpdir' (as soon as orbax's
    temporary folder of a checkpoint >= ``step`` exists: mid-save), 'commit' (the child kills
    itself inside the commit of a checkpoint >= ``step``, before the rename).
    """

    kind: str
    step: int
    delay: float = 0.0
    launch: bool = False  # run this attempt through launch.py instead of the driver


def _kill_plan(seed=8) -> list[Kill]:
    rng = random.Random(seed)
    return [
        Kill("delay", 2, rng.uniform(1.0, 5.0)),  # start-up: imports, tracing, first steps
        Kill("step", rng.randint(2, 4), rng.uniform(0.0, 0.4), launch=True),
        Kill("tmpdir", 3),  # while checkpoint 3 or 6 is being written
        Kill("step", rng.randint(5, 7), rng.uniform(0.0, 0.4)),
        Kill("commit", 6),  # checkpoint 6 or 9 written, not yet renamed
        Kill("step", STEPS_PER_EPOCH, rng.uniform(0.0, 0.6)),  # validation / epoch-end save
        Kill("delay", 11, rng.uniform(2.0, 8.0)),  # restore, start of epoch 2
        Kill("step", rng.randint(12, 14), rng.uniform(0.0, 0.4)),
        Kill("tmpdir", 15),  # checkpoint 15 mid-write: so 9 and 12 are committed
        Kill("commit", TOTAL_STEPS),  # the last checkpoint's commit
    ]


class _LogWatcher:
    """The highest 'step N/M' progress line an attempt has logged so far."""

    _STEP = re.compile(rb"\] step (\d+)/\d+ ")

    def __init__(self, path):
        self.path, self.offset, self.step, self._rest = Path(path), 0, 0, b""

    def poll(self) -> int:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return self.step
        self.offset += len(chunk)
        lines = (self._rest + chunk).split(b"\n")
        self._rest = lines.pop()
        for line in lines:
            m = self._STEP.search(line)
            if m:
                self.step = max(self.step, int(m.group(1)))
        return self.step


def _tmp_folder_at_least(workdir, step) -> bool:
    try:
        names = os.listdir(Path(workdir) / "checkpoints")
    except FileNotFoundError:
        return False
    for name in names:
        head = name.split(".")[0]
        if TMP_SUFFIX in name and head.isdigit() and int(head) >= step:
            return True
    return False


def _attempt(kill: Kill, command, env, workdir, log_path):
    """Runs one attempt until ``kill`` fires; returns the step the child had logged by then."""
    if kill.kind == "commit":
        env = {**env, "RELIABILITY_KILL_IN_COMMIT": str(kill.step)}
    watcher = _LogWatcher(log_path)
    with open(log_path, "w") as log:
        child = subprocess.Popen(command, cwd=REPO, env=env, stdout=log,
                                 stderr=subprocess.STDOUT)
    start = time.monotonic()
    fire_at = start + kill.delay if kill.kind == "delay" else None
    try:
        while child.poll() is None:
            now = time.monotonic()
            assert now - start < ATTEMPT_TIMEOUT_S, f"attempt {kill} hung:\n{_tail(log_path)}"
            step = watcher.poll()
            if kill.kind in ("delay", "step") and step >= kill.step and fire_at is None:
                fire_at = now + kill.delay
            if kill.kind == "delay" and step >= kill.step:
                fire_at = min(fire_at, now)
            if kill.kind == "tmpdir" and _tmp_folder_at_least(workdir, kill.step):
                fire_at = now
            if fire_at is not None and now >= fire_at:
                child.send_signal(signal.SIGKILL)
                child.wait()
                break
            time.sleep(0.005)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL, (
        f"attempt {kill} ended with {child.returncode} instead of being killed:\n"
        f"{_tail(log_path)}")
    return watcher.poll()


def _corrupt_largest_file(folder: Path) -> Path:
    """Flips one byte in the middle of the checkpoint's largest file (its array data)."""
    target = max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    return target


@pytest.fixture(scope="module")
def kill_chain(mura_root, subprocess_env, reference, tmp_path_factory):
    """Ten attempts each killed with SIGKILL (one of them through launch.py), the newest
    checkpoint corrupted before the last killed attempt, then a run to the end."""
    workdir = tmp_path_factory.mktemp("killed")
    overrides = _overrides(mura_root)
    plan = _kill_plan()
    logs, reached, corrupted = [], [], None
    for i, kill in enumerate(plan):
        if kill.kind == "commit" and kill.step == TOTAL_STEPS:
            # Before the last killed attempt: damage the newest checkpoint (9 and 12 are
            # committed, 15 was killed mid-write), so the attempt must fall back to 9.
            committed = _committed_steps(workdir)
            assert committed == [STEPS_PER_EPOCH, 12], committed
            corrupted = committed[-1]
            _corrupt_largest_file(workdir / "checkpoints" / str(corrupted))
        command = (_launch_command if kill.launch else _driver_command)(workdir, overrides)
        log_path = workdir / f"attempt{i}.log"
        reached.append(_attempt(kill, command, subprocess_env, workdir, log_path))
        logs.append(log_path)
    final_log = workdir / "final.log"
    rc = _run(_driver_command(workdir, overrides), subprocess_env, final_log)
    assert rc == 0, _tail(final_log)
    logs.append(final_log)
    return {"workdir": workdir, "logs": logs, "reached": reached, "corrupted": corrupted}


def test_ten_sigkills_then_completion_give_bit_identical_params(kill_chain, reference):
    workdir = kill_chain["workdir"]
    _, expected, _ = reference
    _assert_same_tree(_final_variables(workdir), expected)
    # The kills landed all over the run, not only at its start.
    assert max(kill_chain["reached"]) >= 15, kill_chain["reached"]
    assert len(kill_chain["logs"]) == 11


def test_sigkill_inside_a_save_leaves_no_visible_checkpoint(kill_chain):
    logs = kill_chain["logs"]
    commit_kills = [i for i, k in enumerate(_kill_plan()) if k.kind == "commit"]
    for i in commit_kills:
        assert "SIGKILL inside the commit of checkpoint" in logs[i].read_text()
    # Temporary folders of killed saves were cleaned up; only committed checkpoints remain.
    names = os.listdir(kill_chain["workdir"] / "checkpoints")
    assert not [n for n in names if TMP_SUFFIX in n], names


def test_metrics_of_a_killed_run_read_as_one_run(kill_chain, reference):
    _, _, expected = reference
    assert _records(kill_chain["workdir"]) == expected


def test_corrupt_latest_checkpoint_falls_back_with_a_warning(kill_chain):
    corrupted = kill_chain["corrupted"]
    log = kill_chain["logs"][-2].read_text()  # the attempt after the corruption
    bad = kill_chain["workdir"] / "checkpoints" / str(corrupted)
    assert f"checkpoint {bad} is unreadable (CorruptCheckpointError" in log
    assert "falling back to the previous one" in log
    assert f"resumed from step {STEPS_PER_EPOCH} " in log
    # Set aside, so the step could be saved again.
    aside = list((kill_chain["workdir"] / checkpoints.UNREADABLE_DIR).iterdir())
    assert [p.name.split("-")[0] for p in aside] == [str(corrupted)]


# ---- SIGTERM through launch.py ----------------------------------------------------------------------


def test_sigterm_saves_mid_epoch_exits_zero_and_resumes_exactly(mura_root, subprocess_env,
                                                                reference, tmp_path):
    overrides = _overrides(mura_root, checkpoint_every_steps=100)
    log_path = tmp_path / "terminated.log"
    watcher = _LogWatcher(log_path)
    with open(log_path, "w") as log:
        child = subprocess.Popen(_launch_command(tmp_path, overrides), cwd=REPO,
                                 env=subprocess_env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + ATTEMPT_TIMEOUT_S
        while watcher.poll() < 4 and child.poll() is None:
            assert time.monotonic() < deadline, _tail(log_path)
            time.sleep(0.005)
        child.send_signal(signal.SIGTERM)
        rc = child.wait(timeout=ATTEMPT_TIMEOUT_S)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    output = log_path.read_text()
    assert rc == 0, _tail(log_path)
    assert "SIGTERM received" in output
    stopped = int(re.search(r"stopped early at step (\d+)", output).group(1))
    assert 4 <= stopped < STEPS_PER_EPOCH  # mid-epoch, at no checkpoint_every_steps multiple
    assert _committed_steps(tmp_path) == [stopped]

    rc = _run(_launch_command(tmp_path, overrides), subprocess_env, tmp_path / "resumed.log")
    assert rc == 0, _tail(tmp_path / "resumed.log")
    assert f"resumed from step {stopped} " in (tmp_path / "resumed.log").read_text()
    _, expected, records = reference
    _assert_same_tree(_final_variables(tmp_path), expected)
    assert _records(tmp_path) == records


# ---- in-process: determinism, truncated checkpoints, failing saves --------------------------------


def _config(root, **overrides):
    values = _overrides(root, **overrides)
    values.pop("data.image_size")
    return helpers.tiny_config(**values)


def test_two_runs_with_the_same_seed_write_identical_metrics(mura_root, tmp_path):
    config = dict(num_epochs=1, checkpoint_every_steps=100)
    first = train.train_and_evaluate(_config(mura_root, **config), tmp_path / "a")
    second = train.train_and_evaluate(_config(mura_root, **config), tmp_path / "b")
    records = _records(tmp_path / "a")
    assert len(records) == STEPS_PER_EPOCH + 1
    assert records == _records(tmp_path / "b")
    _assert_same_tree(first["params"], second["params"])


def _tiny_state(value):
    return {"w": jax.numpy.full((64,), value, jax.numpy.float32),
            "n": jax.numpy.asarray(value, jax.numpy.int32)}


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        state)


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
        _corrupt_largest_file(latest / "state")
    else:
        (latest / "progress" / "metadata").unlink()
    with caplog.at_level(logging.WARNING):
        step, state, loader, progress = checkpointer.restore_latest_good(
            _abstract(_tiny_state(0)))
    assert step == 1 and loader == {"step": 1} and progress == {"epoch": 0}
    np.testing.assert_array_equal(state["w"], np.ones(64, np.float32))
    assert f"checkpoint {latest} is unreadable" in caplog.text
    assert "falling back to the previous one" in caplog.text
    assert checkpointer.all_steps() == [1]
    # The damaged step is out of the way: saving it again works.
    checkpointer.save(2, _tiny_state(2), {"step": 2}, {"epoch": 0})
    checkpointer.wait()
    assert checkpointer.all_steps() == [1, 2]
    checkpointer.close()


def test_failing_save_raises_a_clear_error_and_keeps_earlier_checkpoints(mura_root, tmp_path,
                                                                          monkeypatch):
    from orbax.checkpoint._src.path import atomicity

    commit = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self, *args, **kwargs):
        if self.get().name.startswith("4."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return await commit(self, *args, **kwargs)

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", finalize)
    config = _config(mura_root, num_epochs=1, checkpoint_every_steps=2)
    with pytest.raises(checkpoints.CheckpointWriteError) as info:
        train.train_and_evaluate(config, tmp_path)
    message = str(info.value)
    assert f"could not write checkpoint {tmp_path / 'checkpoints' / '4'}" in message
    assert "No space left on device" in message
    assert "intact (steps 2)" in message
    # The checkpoint before the failure is untouched and restores.
    assert _committed_steps(tmp_path) == [2]
    variables = checkpoints.restore_variables(tmp_path, 2)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(variables["params"]))
