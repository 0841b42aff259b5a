"""The persistent XLA compilation cache, made safe to share between concurrent processes.

Without a size cap, jax writes a cache entry in place and without a lock (``lru_cache.put``:
``write_bytes``), so a second process starting the same program - a sweep's runs, the
processes of a multi-host job on one machine, two test workers - can read an entry while it is
being written. Its decompression then fails (entries are zlib or zstd streams, which detect
a torn one), and jax warns and compiles the program again: no crash, but wasted work and a
warning that looks like one. (The test suite's rare segfault in ``deserialize_executable``
was another thing: the process's memory-mapping limit, docs/reliability.md.) With
``jax_compilation_cache_max_size`` set, jax takes a file lock (the ``filelock`` package) around
every read and write and evicts the least recently used entries above the cap. ``enable`` turns
that on.

One repair comes with it: jax's eviction reads an ``<key>-atime`` file for every entry, and
entries written without a cap have none, after which every write fails (jax issue 39880). So
``enable`` gives such entries one, dated by their modification time, under jax's own lock.
"""

from __future__ import annotations

import os
import pathlib

from murajax.errors import UserError

# The cap for murajax's default cache folder: a DenseNet-169 train step's executable is a few
# MB to tens of MB, so this keeps hundreds of programs. MURAJAX_COMPILATION_CACHE_MAX_GB sets it.
DEFAULT_MAX_GB = 8.0
_CACHE_SUFFIX, _ATIME_SUFFIX, _LOCK_FILE = "-cache", "-atime", ".lockfile"  # jax's lru_cache


def max_bytes_from_env(default_gb: float = DEFAULT_MAX_GB) -> int:
    """The cap in bytes: ``$MURAJAX_COMPILATION_CACHE_MAX_GB`` (a positive number), else the
    default. UserError naming the variable for anything else."""
    text = os.environ.get("MURAJAX_COMPILATION_CACHE_MAX_GB", "").strip()
    if not text:
        return int(default_gb * 2**30)
    try:
        gb = float(text)
    except ValueError:
        gb = -1.0
    if not gb > 0:
        raise UserError(f"MURAJAX_COMPILATION_CACHE_MAX_GB must be a positive number of GiB, "
                         f"got {text!r}")
    return int(gb * 2**30)


def date_entries_without_atime(folder) -> int:
    """Writes the ``-atime`` file jax's eviction needs for every entry in ``folder`` that lacks
    one (its modification time, in ns), holding jax's lock; returns how many it wrote."""
    import filelock

    folder = pathlib.Path(folder)
    if not folder.is_dir():
        return 0
    written = 0
    with filelock.FileLock(str(folder / _LOCK_FILE)):
        for entry in folder.glob(f"*{_CACHE_SUFFIX}"):
            atime = folder / (entry.name[: -len(_CACHE_SUFFIX)] + _ATIME_SUFFIX)
            if atime.exists():
                continue
            try:
                stamp = entry.stat().st_mtime_ns
            except FileNotFoundError:  # evicted meanwhile by a process that does not lock
                continue
            atime.write_bytes(stamp.to_bytes(8, "little"))
            written += 1
    return written


def is_local(folder) -> bool:
    """Whether ``folder`` is on this machine's filesystems (not ``gs://...`` and the like)."""
    text = os.fspath(folder)
    return "://" not in text or text.startswith("file://")


def enable(folder, *, max_bytes: int | None = None, min_compile_seconds: float = 1.0) -> None:
    """Points jax's persistent compilation cache at ``folder``: for a local folder with a size
    cap (so with jax's file lock), after dating its entries that lack an ``-atime`` file; a
    remote one (``gs://...``) as jax has it by default, uncapped (no file lock works there).
    Call it before the first compile: jax reads these settings once."""
    import jax

    folder = os.fspath(folder)
    if is_local(folder):
        folder = os.path.abspath(os.path.expanduser(folder.removeprefix("file://")))
        os.makedirs(folder, exist_ok=True)
        date_entries_without_atime(folder)
        jax.config.update("jax_compilation_cache_max_size",
                          max_bytes_from_env() if max_bytes is None else int(max_bytes))
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))


def subprocess_env(folder, *, max_bytes: int | None = None,
                   min_compile_seconds: float = 1.0) -> dict[str, str]:
    """The environment variables that make a child jax process use ``folder`` as ``enable``
    would (for children that do not call it themselves)."""
    return {
        "JAX_COMPILATION_CACHE_DIR": os.fspath(folder),
        "JAX_COMPILATION_CACHE_MAX_SIZE": str(max_bytes_from_env() if max_bytes is None
                                              else int(max_bytes)),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": str(min_compile_seconds),
    }
