"""Host memory: this process's RSS figures for benchmarks, and huge pages for XLA:CPU.

Imports nothing but the standard library, so that a benchmark process of another framework
(``benchmarks/compare_torch.py``'s PyTorch worker) can measure itself without loading JAX, and
so that the ``murajax`` command can re-execute itself before it loads anything heavy.
"""

from __future__ import annotations

import importlib.util
import os
import resource
import sys

HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
HUGE_PAGES_OPT_OUT = "MURAJAX_HUGE_PAGES"  # =0: never re-execute with the tunable
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc_version() -> tuple[int, int] | None:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # e.g. 'glibc 2.36'
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (AttributeError, ValueError, OSError):
        return None


def huge_pages_requested(environ=None) -> bool:
    """Whether ``GLIBC_TUNABLES`` already sets glibc's huge-page tunable (ours or the user's)."""
    environ = os.environ if environ is None else environ
    return HUGE_PAGES_TUNABLE.split("=")[0] in environ.get("GLIBC_TUNABLES", "")


def huge_pages_environment(environ=None, thp_setting: str = _THP_SETTING) -> dict | None:
    """The environment in which glibc's malloc asks for transparent huge pages, or None where
    that does not apply (already asked for, opted out, not Linux with glibc >= 2.35, THP off,
    or an accelerator plugin installed or JAX_PLATFORMS naming a non-CPU platform).

    XLA:CPU allocates a step's scratch memory afresh on every execution (hundreds of MB: glibc
    ``mmap``s it and unmaps it on free), and faulting it in 4 KB at a time costs 11-18% of a
    DenseNet-169 step (docs/performance.md, experiment 10). The tunable must be set before the
    process starts, hence a re-execution.
    """
    environ = dict(os.environ if environ is None else environ)
    tunables = environ.get("GLIBC_TUNABLES", "")
    platforms = environ.get("JAX_PLATFORMS", "cpu").strip().lower()
    if (environ.get(HUGE_PAGES_OPT_OUT, "1") == "0" or huge_pages_requested(environ)
            or not sys.platform.startswith("linux") or (_glibc_version() or (0, 0)) < (2, 35)
            or not platforms.startswith("cpu") or importlib.util.find_spec("jax_plugins")):
        return None
    try:
        with open(thp_setting) as f:
            if "[never]" in f.read():
                return None
    except OSError:
        return None
    environ["GLIBC_TUNABLES"] = f"{tunables}:{HUGE_PAGES_TUNABLE}" if tunables \
        else HUGE_PAGES_TUNABLE
    environ[HUGE_PAGES_OPT_OUT] = "0"  # never twice, whatever glibc makes of the tunable
    return environ


def reexec_with_huge_pages() -> None:
    """Replaces this process by the same command line with ``huge_pages_environment()``, where
    that applies (same PID, so signals and supervisors are unaffected); else returns."""
    environ = huge_pages_environment()
    if environ is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)


def reset_peak_rss() -> bool:
    """Resets this process's RSS high-water mark (Linux); False where that is not possible.

    Memory that compilation freed is first handed back to the OS (glibc ``malloc_trim``) so
    that the mark measured afterwards is the steps' own.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def vm_hwm_mb() -> float | None:
    """The RSS high-water mark since the last ``reset_peak_rss`` (Linux), else None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """The process's peak RSS since it started."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024.0 / (1024.0 if sys.platform == "darwin" else 1.0)  # macOS reports bytes
