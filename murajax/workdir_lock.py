"""The workdir lock: one training run per workdir at a time.

Owns ``<workdir>/.murajax.lock`` and nothing else. ``hold_workdir(workdir)`` is a context
manager that a training run holds for its whole life; a second run on the same workdir raises
``WorkdirInUseError`` (a ``UserError``: ``launch.py`` prints it and exits 2) before it reads or
writes anything there. Evaluation and prediction only read a workdir and take no lock.

The lock is an ``fcntl.flock`` on the open file, which the kernel drops when its process dies:
a run killed with ``kill -9`` (or a machine that lost power) leaves no live lock, so staleness
needs no pid guessing. The file holds JSON naming the holder (pid, host, start time in UTC,
argv). A clean release empties the file and then unlocks; the file is never unlinked (unlinking
races with a second run that has it open). A file found non-empty by a run that gets the lock
was therefore left by a run that did not exit cleanly: it is taken over with a warning.

Multi-host runs take one lock per workdir: process 0 tries it, then every process learns the
outcome from a broadcast, so all of them go on or all raise the same error (none hangs).

``MURAJAX_NO_WORKDIR_LOCK=1`` skips the lock (with a warning), for filesystems without
``flock`` support; then nothing stops two runs from writing over each other.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from murajax.errors import UserError

LOCK_FILE = ".murajax.lock"
DISABLE_ENV = "MURAJAX_NO_WORKDIR_LOCK"

# flock's "this filesystem cannot lock": some NFS setups (ENOLCK), FUSE and 9p mounts.
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS}
# The holder may be between taking the lock and writing its record, or between emptying the file
# and unlocking it: retry for this long before reporting a holder without details.
_SETTLE_S = 1.0

# Outcomes that process 0 broadcasts to the others.
_HELD, _IN_USE, _UNSUPPORTED_FS, _DISABLED = 1, 2, 3, 4


class WorkdirInUseError(UserError):
    """Another live run holds the workdir's lock."""


def _unsupported(path: Path, error: OSError) -> UserError:
    return UserError(
        f"cannot lock {path}: the filesystem does not support file locks ({error}). Use a "
        f"--workdir on a local or lock-capable filesystem, or set {DISABLE_ENV}=1 to run "
        "without the lock (then make sure no other run uses this workdir)"
    )


def _in_use(workdir, holder: dict | None) -> WorkdirInUseError:
    if holder:
        who = (f"process {holder.get('pid', '?')} on {holder.get('host', '?')} "
               f"since {holder.get('started', '?')}")
    else:
        who = "another process (it has not recorded its pid yet)"
    return WorkdirInUseError(
        f"{workdir} is in use by {who}; wait for it to finish, stop it (SIGTERM saves a "
        "checkpoint and exits), or use another --workdir"
    )


def _read_record(fd: int) -> dict | None:
    """The holder's JSON record, or None for an empty file; a torn or foreign file reads as {}."""
    size = os.fstat(fd).st_size
    if size == 0:
        return None
    text = os.pread(fd, min(size, 1 << 16), 0).decode("utf-8", errors="replace")
    try:
        record = json.loads(text)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


class _Lock:
    """The flock on ``<workdir>/.murajax.lock``, held from ``acquire`` to ``release``."""

    def __init__(self, workdir: str | Path):
        self.workdir = workdir
        self.path = Path(workdir) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> None:
        deadline = time.monotonic() + _SETTLE_S
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise UserError(f"cannot open the workdir lock {self.path} ({e}); make "
                                f"{self.workdir} writable or use another --workdir") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_record(fd) if e.errno in (errno.EAGAIN, errno.EACCES) else None
                os.close(fd)
                if e.errno in _UNSUPPORTED:
                    raise _unsupported(self.path, e) from None
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if holder or time.monotonic() >= deadline:
                    raise _in_use(self.workdir, holder) from None
                time.sleep(0.05)  # the holder is writing its record or releasing
                continue
            break
        try:
            previous = _read_record(fd)
            if previous is not None:
                logging.warning(
                    "%s: took over the lock of process %s on %s since %s, which is no longer "
                    "running (it was killed or its machine went down before releasing it); "
                    "the run resumes from the newest readable checkpoint",
                    self.workdir, previous.get("pid", "?"), previous.get("host", "?"),
                    previous.get("started", "?"),
                )
            record = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds"),
                "argv": sys.argv,
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
            os.fsync(fd)  # so that a power loss leaves the record for the takeover warning
        except BaseException:
            os.close(fd)  # closing drops the lock
            raise
        self.fd = fd

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)  # empty = released cleanly; never unlink (races with openers)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def _agree(outcome: int) -> int:
    """Process 0's outcome, on every process (a no-op with one process)."""
    if jax.process_count() == 1:
        return outcome
    return int(multihost_utils.broadcast_one_to_all(np.int32(outcome)))


@contextlib.contextmanager
def hold_workdir(workdir: str | Path):
    """Holds ``workdir``'s lock for the body; raises ``WorkdirInUseError`` if a live run has it.

    ``workdir`` must exist. On a multi-host run every process must call this at the same point;
    process 0 takes the lock and the others wait for its outcome.
    """
    lock = _Lock(workdir)
    outcome, error = _HELD, None
    if jax.process_index() == 0:
        if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
            logging.warning("%s=%s: %s is not locked; nothing stops another run from writing "
                            "into it at the same time", DISABLE_ENV, os.environ[DISABLE_ENV],
                            workdir)
            outcome = _DISABLED
        else:
            try:
                lock.acquire()
            except WorkdirInUseError as e:
                outcome, error = _IN_USE, e
            except UserError as e:
                outcome, error = _UNSUPPORTED_FS, e
            except BaseException:
                _agree(_UNSUPPORTED_FS)  # never leave the other processes waiting
                raise
    try:
        outcome = _agree(outcome)
    except BaseException:
        lock.release()
        raise
    if error is not None:
        raise error
    if outcome == _IN_USE:
        raise WorkdirInUseError(
            f"process 0 found {workdir} in use by another run (its error names it); wait for "
            "that run to finish, stop it (SIGTERM saves a checkpoint and exits), or use another "
            "--workdir"
        )
    if outcome == _UNSUPPORTED_FS:
        raise UserError(f"process 0 could not lock {Path(workdir) / LOCK_FILE} (its error says "
                        "why)")
    try:
        yield
    finally:
        lock.release()
