"""Test setup: four host CPU devices (so sharding code is exercised) and shared tiny fixtures."""

import os

# Must happen before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import gc  # noqa: E402
import tempfile  # noqa: E402
import warnings  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

from murajax import xla_cache  # noqa: E402
from tests.helpers import memory_mappings  # noqa: E402

# Tests build the same tiny programs many times (every train_and_evaluate compiles its steps);
# a persistent compilation cache shared by the session turns most compiles into loads.
# Capped, so jax locks it: the two xdist workers and their subprocesses write it concurrently.
xla_cache.enable(
    os.environ.get("MURAJAX_TEST_CACHE", os.path.join(tempfile.gettempdir(), "murajax-test-xla")),
    min_compile_seconds=0.5,
)


# Linux refuses a process more than vm.max_map_count (65,530 by default) memory mappings.
_RELEASE_ABOVE = 30_000  # mappings; one test module has added up to about 11,000


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops every compiled program when a test module ends with many memory mappings held.

    Each XLA:CPU executable keeps a few memory mappings for its code, and jax keeps an
    executable for as long as its function lives. The tests jit module-level functions such
    as ``steps.train_step`` directly, and jax keeps every pmapped function (murajax's
    ``JitStrategy`` frees its own: ``test_parallel.py`` checks). Without this, a worker of
    this suite held about 60,000 mappings by its end, near the limit, where loading the next
    executable from the persistent cache segfaulted inside ``deserialize_executable``.
    Releasing only above a threshold keeps the programs modules share in memory otherwise.
    """
    yield
    if not os.path.exists("/proc/self/maps") or memory_mappings() < _RELEASE_ABOVE:
        return
    jax.clear_caches()
    gc.collect()
    if (held := memory_mappings()) > _RELEASE_ABOVE // 2:
        warnings.warn(f"{held} memory mappings are still held after the module's "
                      "programs were released: something keeps compiled programs alive",
                      stacklevel=1)
