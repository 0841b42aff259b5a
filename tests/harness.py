"""The fault-injection harness of tests/test_reliability.py: a training driver run in
subprocesses, the plan of when to interrupt one (``Kill``), watching and interrupting it
(``attempt``), checkpoint damage, and the one hook into orbax's commit.

As a program it is the driver::

    python -m tests.harness WORKDIR OVERRIDES_JSON

runs ``train.train_and_evaluate(helpers.tiny_config(**overrides), WORKDIR)``. With
``RELIABILITY_KILL_IN_COMMIT=N`` in the environment it SIGKILLs itself inside orbax's commit of
the first checkpoint of a step >= N: the files are written, the temporary folder not yet
renamed.

The imports of murajax, JAX and orbax are inside the functions: the driver blocks torch before
anything imports it (tensorboardX imports torch when it can: seconds per start).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
ATTEMPT_TIMEOUT_S = 300  # one subprocess; generous because a cold compile cache compiles
TMP_SUFFIX = ".orbax-checkpoint-tmp"
KILL_IN_COMMIT = "RELIABILITY_KILL_IN_COMMIT"


# ---- the one hook into orbax ----------------------------------------------------------------


def commit_hook(before: Callable[[str], None]):
    """A replacement for the commit of orbax's temporary checkpoint folders (the rename that
    makes a save visible) that first calls ``before(folder name)``, e.g. with
    ``"4.orbax-checkpoint-tmp-..."``; ``before`` may raise (a failing save) or kill.

    Why not a public API: orbax offers no hook into a save's commit, and the tests need to act
    exactly there (after the files are written, before the rename). The class is public
    (``orbax.checkpoint.path.atomicity.AtomicRenameTemporaryPath``, the default temporary path
    of a save); its ``finalize`` method, wrapped here, is not part of that API, so a newer orbax
    may need this function, and only it, changed.
    """
    from orbax.checkpoint.path import atomicity

    commit = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self, *args, **kwargs):
        before(self.get().name)
        return await commit(self, *args, **kwargs)

    return finalize


def install_commit_hook(before: Callable[[str], None], monkeypatch=None) -> None:
    """Puts ``commit_hook(before)`` in place: with pytest's ``monkeypatch`` (undone after the
    test), or for good (the driver)."""
    from orbax.checkpoint.path import atomicity

    hook = commit_hook(before)
    if monkeypatch is not None:
        monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", hook)
    else:
        atomicity.AtomicRenameTemporaryPath.finalize = hook


def _drive(workdir: str, overrides_json: str) -> None:
    sys.modules["torch"] = None  # tensorboardX imports torch when it can: seconds per start
    from absl import logging

    from murajax import train, writers
    from tests import helpers

    logging.use_absl_handler()
    logging.set_verbosity(logging.INFO)
    writers.quiet_library_logs()
    kill_at = int(os.environ.get(KILL_IN_COMMIT, "-1"))
    if kill_at >= 0:
        def kill_in_commit(folder_name):
            name = folder_name.split(".")[0]
            if name.isdigit() and int(name) >= kill_at:
                logging.warning("RELIABILITY: SIGKILL inside the commit of checkpoint %s", name)
                os.kill(os.getpid(), signal.SIGKILL)

        install_commit_hook(kill_in_commit)
    train.train_and_evaluate(helpers.tiny_config(**json.loads(overrides_json)), workdir)


# ---- subprocesses -----------------------------------------------------------------------------


def subprocess_env(compilation_cache: str) -> dict[str, str]:
    """One CPU device in every subprocess, and the given persistent compilation cache."""
    from murajax import xla_cache

    env = dict(os.environ)
    env.update({
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
        "JAX_PLATFORMS": "cpu",
        **xla_cache.subprocess_env(compilation_cache, min_compile_seconds=0.5),
        "MURAJAX_COMPILATION_CACHE": compilation_cache,  # launch.py's own setting
        "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        "PYTHONUNBUFFERED": "1",
    })
    env.pop(KILL_IN_COMMIT, None)
    return env


def driver_command(workdir, overrides) -> list[str]:
    return [sys.executable, "-m", "tests.harness", str(workdir), json.dumps(overrides)]


def launch_command(workdir, overrides) -> list[str]:
    flags = [f"--config.{key}={value}" for key, value in overrides.items()]
    return [sys.executable, "launch.py", "--config", "smoke", *flags, f"--workdir={workdir}"]


def run(command, env, log_path, timeout=ATTEMPT_TIMEOUT_S) -> int:
    """Runs ``command`` to the end in the repository, output to ``log_path``: its exit code."""
    with open(log_path, "w") as log:
        result = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                timeout=timeout)
    return result.returncode


def tail(path, n=40) -> str:
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])


# ---- interrupting an attempt ------------------------------------------------------------------


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


class LogWatcher:
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


def tmp_folders(workdir, step=0) -> set[tuple[str, int]]:
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


def attempt(kill: Kill, command, env, workdir, log_path) -> tuple[int, int]:
    """Runs one attempt until ``kill`` fires: (return code, step logged by then)."""
    if kill.kind == "commit":
        env = {**env, KILL_IN_COMMIT: str(kill.step)}
    watcher = LogWatcher(log_path)
    leftovers = tmp_folders(workdir)  # of earlier killed saves: not this attempt's
    with open(log_path, "w") as log:
        child = subprocess.Popen(command, cwd=REPO, env=env, stdout=log,
                                 stderr=subprocess.STDOUT)
    start = time.monotonic()
    fire_at = start + kill.delay if kill.kind == "delay" else None
    try:
        while child.poll() is None:
            now = time.monotonic()
            assert now - start < ATTEMPT_TIMEOUT_S, f"attempt {kill} hung:\n{tail(log_path)}"
            step = watcher.poll()
            if kill.kind in ("step", "sigterm") and step >= kill.step and fire_at is None:
                fire_at = now + kill.delay
            if kill.kind == "delay" and step >= kill.step:
                fire_at = min(fire_at, now)
            if kill.kind == "tmpdir" and tmp_folders(workdir, kill.step) - leftovers:
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
        f"{tail(log_path)}")
    return child.returncode, watcher.poll()


# ---- checkpoints --------------------------------------------------------------------------


def killed_and_uninterrupted(tmp_path, overrides: dict, env,
                             kill: Kill | None = None) -> tuple[Path, Path]:
    """Two one-device driver runs of ``overrides`` under ``tmp_path``: one killed (by default
    SIGKILL at step 7) and rerun to the end, one never interrupted. Returns their workdirs
    (killed, uninterrupted), both finished; the rerun is checked to have resumed."""
    reference = tmp_path / "reference"
    rc = run(driver_command(reference, overrides), env, tmp_path / "ref.log")
    assert rc == 0, tail(tmp_path / "ref.log")
    killed = tmp_path / "killed"
    attempt(kill or Kill("step", 7, 0.0), driver_command(killed, overrides), env, killed,
            tmp_path / "attempt.log")
    rc = run(driver_command(killed, overrides), env, tmp_path / "final.log")
    assert rc == 0, tail(tmp_path / "final.log")
    assert "resumed from step" in (tmp_path / "final.log").read_text()
    return killed, reference


def metric_records(workdir) -> list[dict]:
    """``metrics.jsonl`` without the timing field, which differs run to run."""
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "images_per_second"}
            for line in lines]


def committed_steps(workdir) -> list[int]:
    folder = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def stored_state_digest(checkpoint: Path) -> str:
    """Digest of the state as orbax reads it back, bypassing murajax's own digest check."""
    import warnings

    import orbax.checkpoint as ocp

    from murajax import checkpoints

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sharding info not provided": fine on one host
        return checkpoints.state_digest(ocp.PyTreeCheckpointer().restore(checkpoint / "state"))


def corrupt_array_data(checkpoint: Path) -> Path:
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
    reference = stored_state_digest(checkpoint)
    for fraction in (0.5, 0.25, 0.4, 0.6, 0.1, 0.3, 0.7, 0.2, 0.05):
        data = bytearray(original)
        data[int(len(data) * fraction)] ^= 0xFF
        target.write_bytes(bytes(data))
        try:
            if stored_state_digest(checkpoint) != reference:
                return target
        except Exception:  # noqa: BLE001 - a flip orbax notices is not the damage wanted here
            pass
    target.write_bytes(original)
    raise AssertionError(f"no single-byte flip in {target} changed the restored state")


if __name__ == "__main__":
    _drive(sys.argv[1], sys.argv[2])
