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
    return [sys.executable, "launch.py", "--config", "smoke", *flags,
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
    """When to interrupt one attempt.

    kind: 'delay' (SIGKILL ``delay`` seconds after the start, or at logged step ``step`` if
    earlier), 'step' (SIGKILL ``delay`` seconds after step >= ``step`` is logged), 'tmpdir'
    (SIGKILL as soon as orbax's temporary folder of a checkpoint >= ``step`` exists: mid-save),
    'commit' (the child SIGKILLs itself inside the commit of a checkpoint >= ``step``, before the
    rename), 'sigterm' (SIGTERM once step >= ``step`` is logged: the run saves and exits 0).
    """

    kind: str
    step: int
    delay: float = 0.0
    launch: bool = False  # run this attempt through launch.py instead of the driver


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


def _tmp_folders(workdir, step=0) -> set[tuple[str, int]]:
    """(name, inode) of orbax's temporary checkpoint folders of steps >= ``step``."""
    found = set()
    try:
        with os.scandir(Path(workdir) / "checkpoints") as entries:
            for entry in entries:
                head = entry.name.split(".")[0]
                if TMP_SUFFIX in entry.name and head.isdigit() and int(head) >= step:
                    found.add((entry.name, entry.inode()))
    except FileNotFoundError:
        pass
    return found


def _attempt(kill: Kill, command, env, workdir, log_path) -> tuple[int, int]:
    """Runs one attempt until ``kill`` fires: (return code, step logged by then)."""
    if kill.kind == "commit":
        env = {**env, "RELIABILITY_KILL_IN_COMMIT": str(kill.step)}
    watcher = _LogWatcher(log_path)
    leftovers = _tmp_folders(workdir)  # of earlier killed saves: not this attempt's
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
            if kill.kind in ("step", "sigterm") and step >= kill.step and fire_at is None:
                fire_at = now + kill.delay
            if kill.kind == "delay" and step >= kill.step:
                fire_at = min(fire_at, now)
            if kill.kind == "tmpdir" and _tmp_folders(workdir, kill.step) - leftovers:
                fire_at = now
            if fire_at is not None and now >= fire_at:
                if kill.kind == "sigterm":
                    child.send_signal(signal.SIGTERM)
                    child.wait(timeout=ATTEMPT_TIMEOUT_S)
                else:
                    child.send_signal(signal.SIGKILL)
                    child.wait()
                break
            time.sleep(0.005)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    expected = 0 if kill.kind == "sigterm" else -signal.SIGKILL
    assert child.returncode == expected, (
        f"attempt {kill} ended with {child.returncode}, expected {expected}:\n"
        f"{_tail(log_path)}")
    return child.returncode, watcher.poll()


def _stored_state_digest(checkpoint: Path) -> str:
    """Digest of the state as orbax reads it back, bypassing murajax's own digest check."""
    import warnings

    import orbax.checkpoint as ocp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sharding info not provided": fine on one host
        return checkpoints.state_digest(ocp.PyTreeCheckpointer().restore(checkpoint / "state"))


def _corrupt_array_data(checkpoint: Path) -> Path:
    """Flips one byte of the checkpoint's largest array-data file so that orbax reads it without
    complaint but returns different numbers: the silent damage the saved digest is there for.

    Some bytes of a data file are never read back (flipping the last ~10% of the file changed
    nothing in an experiment), and where the arrays lie depends on how the save's writes were
    scheduled, so candidate bytes are tried from the middle outwards until one changes what is
    restored.
    """
    data_files = [p for p in (checkpoint / "state").glob("ocdbt.process_*/d/*") if p.is_file()]
    target = max(data_files, key=lambda p: p.stat().st_size)
    original = target.read_bytes()
    reference = _stored_state_digest(checkpoint)
    for fraction in (0.5, 0.25, 0.4, 0.6, 0.1, 0.3, 0.7, 0.2, 0.05):
        data = bytearray(original)
        data[int(len(data) * fraction)] ^= 0xFF
        target.write_bytes(bytes(data))
        try:
            if _stored_state_digest(checkpoint) != reference:
                return target
        except Exception:  # noqa: BLE001 - a flip orbax notices is not the damage wanted here
            pass
    target.write_bytes(original)
    raise AssertionError(f"no single-byte flip in {target} changed the restored state")


def _run_kill_chain(root, env, workdir):
    """The attempts of _kill_plan() in one workdir (the newest checkpoint damaged before attempt
    CORRUPT_BEFORE), then a run to the end."""
    overrides = _overrides(root)
    logs, reached, corrupted = [], [], None
    for i, kill in enumerate(_kill_plan()):
        if i == CORRUPT_BEFORE:
            # keep_best=1: the epoch-end checkpoint 9 (scored) and the newest, usually 12 (15
            # was killed mid-write), 15 if the previous attempt got that far.
            committed = _committed_steps(workdir)
            assert len(committed) == 2 and committed[0] == STEPS_PER_EPOCH, committed
            corrupted = committed[-1]
            _corrupt_array_data(workdir / "checkpoints" / str(corrupted))
        these = _overrides(root, checkpoint_every_steps=100) if kill.kind == "sigterm" \
            else overrides  # the interval changes what is saved, never the numbers
        command = (_launch_command if kill.launch else _driver_command)(workdir, these)
        log_path = workdir / f"attempt{i}.log"
        reached.append(_attempt(kill, command, env, workdir, log_path)[1])
        logs.append(log_path)
    final_log = workdir / "final.log"
    rc = _run(_driver_command(workdir, overrides), env, final_log)
    assert rc == 0, _tail(final_log)
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
    _assert_same_tree(_final_variables(tmp_path), expected_variables)
    assert _records(tmp_path) == expected_records
    assert max(chain["reached"]) >= 15, chain["reached"]  # kills all over the run

    # kill -9 inside a save's commit: nothing half-written is visible; leftovers are cleaned.
    for i, kill in enumerate(plan):
        if kill.kind == "commit":
            assert "SIGKILL inside the commit of checkpoint" in logs[i].read_text()
    names = os.listdir(tmp_path / "checkpoints")
    assert names and not [n for n in names if TMP_SUFFIX in n], names

    # SIGTERM mid-epoch through launch.py: checkpoint at the next step, exit 0 (checked by
    # _attempt), and the next attempt resumes from exactly that step.
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
    w = np.random.default_rng(value).normal(size=4096).astype(np.float32)  # incompressible
    return {"w": jax.numpy.asarray(w), "n": jax.numpy.asarray(value, jax.numpy.int32)}


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
        _corrupt_array_data(latest)
    else:
        (latest / "progress" / "metadata").unlink()
    with caplog.at_level(logging.WARNING):
        step, state, loader, progress = checkpointer.restore_latest_good(
            _abstract(_tiny_state(0)))
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


def test_failing_background_save_surfaces_at_the_final_wait(tmp_path, monkeypatch):
    """The last save of a run fails after save() returned: wait() (which train_and_evaluate
    calls on every exit) raises the same clear error."""
    from orbax.checkpoint._src.path import atomicity

    commit = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self, *args, **kwargs):
        if self.get().name.startswith("2."):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return await commit(self, *args, **kwargs)

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", finalize)
    checkpointer = checkpoints.Checkpointer(tmp_path, keep_best=1)
    checkpointer.save(1, _tiny_state(1), {}, {"epoch": 0})
    checkpointer.save(2, _tiny_state(2), {}, {"epoch": 0})  # returns; the commit fails later
    with pytest.raises(checkpoints.CheckpointWriteError,
                       match=r"could not write checkpoint .*checkpoints/2: OSError: .*Read-only "
                             r"file system.*intact \(steps 1\)"):
        checkpointer.wait()
    checkpointer.wait()  # reported once
    checkpointer.close()
    assert _committed_steps(tmp_path) == [1]


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
    _corrupt_array_data(root / "2")
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
