"""Where metrics go: ``<workdir>/metrics.jsonl``, TensorBoard event files, and the console.

TensorBoard files are written with tensorboardX, which needs no TensorFlow (``clu.metric_writers``
imports TensorFlow). Only process 0 writes. On resume, ``metrics.jsonl`` is cut back to the
restored step so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
from absl import logging

METRICS_FILE = "metrics.jsonl"


def truncate_metrics(workdir: str | Path, last_step: int) -> None:
    """Drops records logged after ``last_step`` (work that a resumed run will redo)."""
    path = Path(workdir) / METRICS_FILE
    if jax.process_index() != 0 or not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a crash mid-write
        if record.get("step", 0) <= last_step:
            kept.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


class MetricWriter:
    """Appends one JSON object per call to metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, workdir: str | Path, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self._file = None
        self._tb = None
        if not self.enabled:
            return
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self._file = open(workdir / METRICS_FILE, "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, split: str, **scalars) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "split": split}
        for key, value in scalars.items():
            record[key] = _plain(value)
        self._file.write(json.dumps(record, allow_nan=True) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("step", "split") and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{split}/{key}", value, int(step))
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def _plain(value):
    """A Python scalar for JSON. NaN and inf are kept (json writes NaN/Infinity): a reader
    then sees the problem rather than a gap."""
    return value.item() if hasattr(value, "item") else value


class Progress:
    """Console line every few steps: step, epoch, loss, rate, images/s and ETA."""

    def __init__(self, total_steps: int, start_step: int, images_per_step: int):
        self.total_steps = total_steps
        self.images_per_step = images_per_step
        self._last_time = time.perf_counter()
        self._last_step = start_step

    def restart(self, step: int) -> None:
        """Starts a new timing window (after validation, which is not training time)."""
        self._last_time, self._last_step = time.perf_counter(), step

    def images_per_second(self, step: int) -> float:
        now = time.perf_counter()
        elapsed = max(now - self._last_time, 1e-9)
        rate = (step - self._last_step) * self.images_per_step / elapsed
        self._last_time, self._last_step = now, step
        return rate

    def report(self, step: int, epoch: int, loss: float, learning_rate: float, ips: float) -> None:
        remaining = max(self.total_steps - step, 0) * self.images_per_step / max(ips, 1e-9)
        logging.info(
            "step %d/%d  epoch %d  loss %.4f  lr %.2e  %.1f img/s  ETA %s",
            step, self.total_steps, epoch, loss, learning_rate, ips, _duration(remaining),
        )


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class _QuietLibraries:
    """A logging filter for orbax's and grain's chatter: their INFO and WARNING lines describe
    internals (thread names, read-only managers), so only their errors pass."""

    _NOISY = ("/orbax/", "/grain/", "/etils/")

    def filter(self, record) -> bool:
        return record.levelno >= 40 or not any(p in record.pathname for p in self._NOISY)


def quiet_library_logs() -> None:
    import logging as std_logging

    from absl import logging as absl_logging

    handler = absl_logging.get_absl_handler()
    if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
        handler.addFilter(_QuietLibraries())
    std_logging.getLogger("absl").addFilter(_QuietLibraries())
