"""The workdir lock: a second run on a live workdir is refused, a killed run's lock is taken over.

The holders are real processes (a subprocess of this test, or this test process while a
``launch.py`` subprocess tries the workdir): flock conflicts between processes are what the
lock is for. No test trains; the refused ``launch.py`` must stop before JAX compiles anything.
See docs/reliability.md (Faults: "Two runs in one workdir").
"""

import datetime
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from murajax import train, workdir_lock
from murajax.errors import UserError
from tests import helpers

REPO = Path(__file__).resolve().parents[1]
# The --config argument of launch.py for the smoke config, in this one place (configs may move
# into the package, where the name alone selects it).
SMOKE_CONFIG = (["--config", "configs/smoke.py"] if (REPO / "configs" / "smoke.py").is_file()
                else ["--config", "smoke"])
START_TIMEOUT_S = 120  # a subprocess importing JAX on a loaded 2-core machine

# Holds argv[1]'s lock, writes argv[2] when it has it, releases cleanly on a line on stdin.
_HOLDER = r"""
import sys
from pathlib import Path
from murajax import workdir_lock
with workdir_lock.hold_workdir(sys.argv[1]):
    Path(sys.argv[2]).write_text("locked")
    sys.stdin.readline()
"""


def _env(**extra):
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
            "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
            "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            **extra}


def _start_holder(workdir: Path, tmp_path: Path) -> subprocess.Popen:
    ready = tmp_path / "holder-ready"
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(workdir), str(ready)], cwd=REPO,
                            env=_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready.exists():
        if proc.poll() is not None:
            pytest.fail(f"the holder exited with {proc.returncode}:\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the holder did not take the lock in time")
        time.sleep(0.05)
    return proc


def _record(workdir: Path) -> str:
    return (workdir / workdir_lock.LOCK_FILE).read_text()


def _assert_recent_iso_time(text: str):
    started = datetime.datetime.fromisoformat(text)
    assert started.tzinfo is not None, text
    age = datetime.datetime.now(datetime.timezone.utc) - started
    assert datetime.timedelta(seconds=-5) <= age <= datetime.timedelta(minutes=10), text


def _takeover_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and "took over the lock" in r.getMessage()]


def test_live_holder_is_named_and_refused_then_admitted_after_a_clean_release(tmp_path, caplog):
    workdir = tmp_path / "run"
    workdir.mkdir()
    holder = _start_holder(workdir, tmp_path)
    try:
        with pytest.raises(workdir_lock.WorkdirInUseError) as refused:
            with workdir_lock.hold_workdir(workdir):
                pytest.fail("the body ran while another process held the lock")
        message = str(refused.value)
        assert isinstance(refused.value, UserError)  # launch.py: exit 2, no traceback
        found = re.fullmatch(
            rf"{re.escape(str(workdir))} is in use by process (\d+) on (\S+) since (\S+); wait "
            r"for it to finish, stop it \(SIGTERM saves a checkpoint and exits\), or use "
            r"another --workdir", message)
        assert found, message
        assert int(found.group(1)) == holder.pid
        assert found.group(2) == socket.gethostname()
        _assert_recent_iso_time(found.group(3))
        # The refused attempt left the holder's record alone.
        assert json.loads(_record(workdir))["pid"] == holder.pid
    finally:
        out, _ = holder.communicate("release\n", timeout=START_TIMEOUT_S)
    assert holder.returncode == 0, out
    assert _record(workdir) == ""  # released cleanly: emptied, not unlinked

    caplog.set_level(logging.INFO)
    with workdir_lock.hold_workdir(workdir):
        record = json.loads(_record(workdir))
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        _assert_recent_iso_time(record["started"])
        assert record["argv"] == sys.argv
    assert _takeover_warnings(caplog) == []
    assert _record(workdir) == ""


def test_lock_of_a_killed_run_is_taken_over_with_a_warning_naming_it(tmp_path, caplog):
    workdir = tmp_path / "run"
    workdir.mkdir()
    holder = _start_holder(workdir, tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.communicate(timeout=START_TIMEOUT_S)
    assert holder.returncode == -signal.SIGKILL
    left = json.loads(_record(workdir))  # kill -9: no release ran
    assert left["pid"] == holder.pid

    caplog.set_level(logging.INFO)
    with workdir_lock.hold_workdir(workdir):
        assert json.loads(_record(workdir))["pid"] == os.getpid()
    warnings = _takeover_warnings(caplog)
    assert len(warnings) == 1, warnings
    assert (f"took over the lock of process {holder.pid} on {socket.gethostname()} since "
            f"{left['started']}, which is no longer running") in warnings[0]
    assert str(workdir) in warnings[0]

    caplog.clear()
    with workdir_lock.hold_workdir(workdir):  # that release was clean: no warning again
        pass
    assert _takeover_warnings(caplog) == []


def test_train_holds_the_lock_before_reading_the_workdir_and_releases_it_on_error(
        tmp_path, monkeypatch, caplog):
    """train_and_evaluate takes the lock before its first look into the workdir
    (check_compatible) and releases it cleanly when the run raises."""
    seen = []

    def probe(workdir, config):
        try:
            with workdir_lock.hold_workdir(workdir):
                seen.append("not locked")
        except workdir_lock.WorkdirInUseError as e:
            seen.append(str(e))
        raise UserError("stop here")

    monkeypatch.setattr(train.checkpoints, "check_compatible", probe)
    with pytest.raises(UserError, match="stop here"):
        train.train_and_evaluate(helpers.tiny_config(), tmp_path / "run")
    assert len(seen) == 1 and f"is in use by process {os.getpid()} on " in seen[0], seen
    assert _record(tmp_path / "run") == ""
    caplog.set_level(logging.INFO)
    with workdir_lock.hold_workdir(tmp_path / "run"):
        pass
    assert _takeover_warnings(caplog) == []


def _launch(workdir, *flags, env=None):
    command = [sys.executable, "launch.py", *SMOKE_CONFIG, f"--workdir={workdir}",
               "--config.data.synthetic_studies=20", "--config.data.image_size=32", *flags]
    return subprocess.Popen(command, cwd=REPO, env=env or _env(JAX_LOG_COMPILES="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _assert_refused_before_compiling(out: str, err: str):
    assert "Traceback" not in err, err
    # JAX_LOG_COMPILES=1 logs every trace and compile ("Finished tracing + transforming ...",
    # "Compiling ..."); the refusal comes before the first.
    assert not re.search(r"Finished tracing|Compiling |Finished XLA compilation", out + err), err


@pytest.mark.slow
def test_launch_on_a_workdir_in_use_exits_2_at_once_and_writes_nothing(tmp_path):
    workdir = tmp_path / "conc"
    workdir.mkdir()
    with workdir_lock.hold_workdir(workdir):  # this test process is the live run
        start = time.monotonic()
        proc = _launch(workdir)
        out, err = proc.communicate(timeout=START_TIMEOUT_S)
        elapsed = time.monotonic() - start
        assert proc.returncode == 2, err[-3000:]
        assert f"murajax: error: {workdir} is in use by process {os.getpid()} on " \
               f"{socket.gethostname()} since " in err, err[-3000:]
        _assert_refused_before_compiling(out, err)
        # Nothing written: no synthetic data, checkpoints, metrics or config; the record is ours.
        assert sorted(p.name for p in workdir.iterdir()) == [workdir_lock.LOCK_FILE]
        assert json.loads(_record(workdir))["pid"] == os.getpid()
    # Python, JAX and murajax's imports, then the refusal (measured: seconds, on 2 busy cores).
    assert elapsed < 30, elapsed


@pytest.mark.slow
def test_multi_host_run_on_a_workdir_in_use_is_refused_by_every_process(tmp_path):
    """Process 0 tries the lock, the others learn its outcome: all exit 2, none hangs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = tmp_path / "conc"
    workdir.mkdir()
    with workdir_lock.hold_workdir(workdir):
        procs = [_launch(workdir, "--config.distributed.enabled=True",
                         f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                         "--config.distributed.num_processes=2",
                         f"--config.distributed.process_id={i}") for i in range(2)]
        try:
            results = [p.communicate(timeout=START_TIMEOUT_S) for p in procs]
        finally:
            for p in procs:
                p.kill()
        for p, (_, err) in zip(procs, results):
            assert p.returncode == 2, err[-3000:]
            assert "Traceback" not in err, err[-3000:]
        assert f"murajax: error: {workdir} is in use by process {os.getpid()} on " \
               in results[0][1], results[0][1][-3000:]
        assert f"murajax: error: process 0 found {workdir} in use by another run" \
               in results[1][1], results[1][1][-3000:]
        assert sorted(p.name for p in workdir.iterdir()) == [workdir_lock.LOCK_FILE]
        assert json.loads(_record(workdir))["pid"] == os.getpid()


@pytest.mark.slow
def test_evaluation_reads_a_workdir_in_use_without_the_lock(tmp_path):
    """`--mode=evaluate` only reads: a live training run's lock does not refuse it (here it
    stops for its own reason, a workdir without a finished run, and leaves the record alone)."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    with workdir_lock.hold_workdir(workdir):
        result = subprocess.run([sys.executable, "launch.py", "--mode=evaluate",
                                 f"--workdir={workdir}"], cwd=REPO, env=_env(),
                                capture_output=True, text=True, timeout=START_TIMEOUT_S)
        assert result.returncode == 2, result.stderr[-3000:]
        assert "murajax: error: " in result.stderr and "in use" not in result.stderr, \
            result.stderr[-3000:]
        assert json.loads(_record(workdir))["pid"] == os.getpid()


def test_filesystem_without_locks_is_named_and_the_escape_hatch_skips_the_lock(
        tmp_path, monkeypatch, caplog):
    import errno

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(workdir_lock.fcntl, "flock", no_locks)
    with pytest.raises(UserError, match=rf"cannot lock {re.escape(str(tmp_path))}/"
                                        r"\.murajax\.lock: the filesystem does not support file "
                                        r"locks.*MURAJAX_NO_WORKDIR_LOCK=1"):
        with workdir_lock.hold_workdir(tmp_path):
            pytest.fail("ran without a lock")

    monkeypatch.setenv(workdir_lock.DISABLE_ENV, "1")
    caplog.set_level(logging.INFO)
    ran = []
    with workdir_lock.hold_workdir(tmp_path):
        ran.append(True)
    assert ran
    assert any("MURAJAX_NO_WORKDIR_LOCK=1" in r.getMessage() and "is not locked" in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING)
