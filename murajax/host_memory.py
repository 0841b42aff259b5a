"""This process's host memory figures (RSS) for benchmarks.

Imports nothing but the standard library, so that a benchmark process of another framework
(``benchmarks/compare_torch.py``'s PyTorch worker) can measure itself without loading JAX.
"""

from __future__ import annotations

import resource
import sys


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
