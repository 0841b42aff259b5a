"""Test setup: four host CPU devices (so sharding code is exercised) and shared tiny fixtures."""

import os

# Must happen before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import tempfile  # noqa: E402

from murajax import xla_cache  # noqa: E402

# Tests build the same tiny programs many times (every train_and_evaluate compiles its steps);
# a persistent compilation cache shared by the session turns most compiles into loads.
# Capped, so jax locks it: the two xdist workers and their subprocesses write it concurrently.
xla_cache.enable(
    os.environ.get("MURAJAX_TEST_CACHE", os.path.join(tempfile.gettempdir(), "murajax-test-xla")),
    min_compile_seconds=0.5,
)
