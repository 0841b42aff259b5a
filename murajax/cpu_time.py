"""CPU seconds of a whole process tree: this process, its threads and every descendant.

This module owns that accounting, for the input-pipeline benchmarks (``murajax.bench
--pipeline-only`` and ``benchmarks/torch_pipeline.py``, which imports it from a PyTorch venv:
it needs the standard library only, psutil where installed, and never JAX).

A tree's CPU time is the sum, over the process and its live descendants, of user + system +
the user + system of their reaped children. That sum does not change when a descendant exits
and its parent (a tree member) reaps it: its seconds move from its own entry into the parent's
children entry. So the difference of two readings is the CPU the tree spent between them,
worker processes included, whether they were started, still running or already reaped by then.
Without psutil it falls back to ``resource.getrusage`` of this process and its reaped children
(live workers uncounted; ``method`` says so).
"""

from __future__ import annotations

import resource

try:
    import psutil
except ImportError:  # pragma: no cover - both of murajax's venvs have it
    psutil = None

METHOD = "psutil process tree" if psutil is not None else (
    "getrusage self + reaped children (live workers not counted)")


def _times_seconds(times) -> float:
    return (times.user + times.system + getattr(times, "children_user", 0.0)
            + getattr(times, "children_system", 0.0))


def tree_seconds() -> float:
    """CPU seconds used so far by this process tree (see the module docstring)."""
    if psutil is None:
        own = resource.getrusage(resource.RUSAGE_SELF)
        reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + reaped.ru_utime + reaped.ru_stime
    root = psutil.Process()
    total = _times_seconds(root.cpu_times())
    for child in root.children(recursive=True):
        try:
            total += _times_seconds(child.cpu_times())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass  # exited between listing and reading: counted once its parent reaps it
    return total


class Stopwatch:
    """Wall and process-tree CPU seconds since ``start()`` (or construction)."""

    def __init__(self, clock=None):
        import time

        self._clock = clock or time.perf_counter
        self.start()

    def start(self) -> None:
        self._wall, self._cpu = self._clock(), tree_seconds()

    def read(self) -> tuple[float, float]:
        """(wall seconds, CPU seconds of the tree) since the start."""
        return self._clock() - self._wall, tree_seconds() - self._cpu
