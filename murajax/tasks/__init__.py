"""The task seam: what a dataset means.

A task reads a split into an index of images and studies with their labels, gives the
per-example loss weights the training recipe uses, says how many outputs the model needs, how
an image's views combine into a study, and which study-level metrics validation reports.
``config.task`` selects one from ``TASKS``; the training loop, the evaluate mode and the steps
never branch on a dataset's name. MURA (one binary label per study) is the first task; a
multi-label chest X-ray task is a new file here plus one line below.
"""

from __future__ import annotations

from murajax.errors import UserError
from murajax.tasks.mura import MURA, MuraTask

TASKS = {"mura": MURA}
DEFAULT = "mura"

__all__ = ["DEFAULT", "MURA", "MuraTask", "TASKS", "from_config", "get"]


def get(name: str, field: str = "config.task"):
    """The registered task called ``name``; a UserError naming ``field`` otherwise."""
    if name not in TASKS:
        raise UserError(f"{field}={name!r} is not a known task; known: {', '.join(TASKS)}")
    return TASKS[name]


def from_config(config):
    """The task ``config.task`` names (a run saved before the field existed: MURA)."""
    return get(str(config.get("task", DEFAULT)))
