"""How the pure steps run on many devices: ``jax.jit`` over a mesh, or ``jax.pmap``.

Both strategies expose the same small surface, so the training loop never branches on which one
is in use:

* ``init_state(init_fn)``: build the state directly in its distributed layout;
* ``place_state(state)``: put a host/restored state into that layout;
* ``one_copy(tree)``: the single logical copy of a state or of step outputs (for checkpoints,
  logging, evaluation): the global arrays themselves under jit, device 0's replica under pmap;
* ``shard_batch(local_batch)``: this process's batch -> the step's input;
* ``train_step`` and ``eval_step``: compiled once each, state donated to ``train_step``.

'jit' (the default) keeps one global array per leaf on a mesh with a ``data`` axis: batches are
sharded along it, the state is replicated, and BatchNorm statistics are those of the global batch
because XLA inserts the reductions. 'pmap' maps the steps over local devices; gradients, metrics
and BatchNorm statistics are combined with collectives over the axis ``batch``.
"""

from __future__ import annotations

import functools
import os
import re
import time
from typing import Callable

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from murajax import steps
from murajax.errors import UserError

PMAP_AXIS = "batch"
# The coordination service's barrier, unlike a device collective, may wait this long.
_BARRIER_TIMEOUT_MS = 30 * 60 * 1000


def _wait_for_other_processes(name: str) -> None:
    """A barrier on JAX's coordination service, which may wait ``_BARRIER_TIMEOUT_MS``.

    The one private JAX API murajax uses: the public barrier
    (``multihost_utils.sync_global_devices``) is a device collective, which CPU collectives
    (gloo) abandon after 30 s, and one process's compile can be minutes later than another's.
    JAX exposes the coordination client only as ``jax._src.distributed.global_state``.
    """
    if jax.process_count() > 1:
        from jax._src import distributed

        distributed.global_state.client.wait_at_barrier(f"murajax: {name}", _BARRIER_TIMEOUT_MS)


def xla_compiler_options() -> dict[str, str]:
    """XLA options every murajax step is compiled with, for the default backend.

    XLA:CPU expands ``jax.checkpoint``'s optimization barriers away before its last CSE pass,
    which then merges the recomputed forward pass back into the saved one: ``remat`` would keep
    every activation and save nothing (docs/performance.md, experiment 8). Keeping the barriers
    (XLA:CPU runs them as no-ops) makes remat work; a program without remat has none, so this
    changes nothing else. Passes disabled in ``XLA_FLAGS`` stay disabled (a per-program option
    would otherwise replace them).
    """
    if jax.default_backend() != "cpu":
        return {}
    flags = re.findall(r"--xla_disable_hlo_passes=(\S+)", os.environ.get("XLA_FLAGS", ""))
    passes = [p for value in flags for p in value.split(",") if p] + ["cse_barrier_expander"]
    return {"xla_disable_hlo_passes": ",".join(dict.fromkeys(passes))}


def _owned_by_the_caller(fn: Callable) -> Callable:
    """``fn`` as a new function object, so that jax's caches, which are keyed by the function
    object, keep the programs compiled from it only as long as the caller keeps it. Jitting a
    module-level function directly keeps every program compiled from it, one per run's
    configuration, until the process ends: a sweep in one process (or a long test session)
    then piles up XLA:CPU code mappings until the kernel's ``vm.max_map_count`` stops it."""

    @functools.wraps(fn)
    def owned(*args, **kwargs):
        return fn(*args, **kwargs)

    return owned


class CompiledOnFirstCall:
    """A jitted or pmapped step, compiled ahead of its first call and then reused.

    Compiling explicitly lets the compile time be logged, and on several processes lets every
    process finish compiling before any of them runs the step: CPU collectives (gloo) give up
    on a peer that is more than 30 s late, which a slow compile easily is. ``lower`` is the
    wrapped function's and ``compile(lowered)`` compiles with ``xla_compiler_options``, for
    callers that time or inspect the two apart (``murajax.bench``).
    """

    def __init__(self, step, name: str):
        self._step = step
        self._name = name
        self._compiled = None

    def lower(self, *args):
        return self._step.lower(*args)

    @staticmethod
    def compile(lowered):
        return lowered.compile(xla_compiler_options())

    def __call__(self, *args):
        if self._compiled is None:
            start = time.perf_counter()
            self._compiled = self.compile(self._step.lower(*args))
            logging.info("compiled %s in %.1f s", self._name, time.perf_counter() - start)
            _wait_for_other_processes(f"{self._name} compiled")
        return self._compiled(*args)


def _eval_with_positions(state, batch, axis_name=None):
    """eval_step, plus each example's image position (-1 for padding and skipped images) so
    every host can place every probability."""
    metrics, probabilities = steps.eval_step(state, batch, axis_name)
    return metrics, probabilities, jax.numpy.where(batch["mask"] > 0, batch["index"], -1)


def check_batch_size(global_batch_size: int, field: str = "config.batch_size") -> None:
    devices = jax.device_count()
    processes = jax.process_count()
    if global_batch_size <= 0 or global_batch_size % devices:
        raise UserError(
            f"{field}={global_batch_size} must be a positive multiple of the number of devices "
            f"({devices}: {jax.local_device_count()} per process x {processes} processes); "
            f"set it to e.g. {max(devices, global_batch_size // devices * devices)}"
        )


class JitStrategy:
    """Global arrays on a 1-D ``data`` mesh: batch sharded, state replicated and donated."""

    bn_axis_name = None

    def __init__(self, devices=None):
        self.mesh = Mesh(np.asarray(devices if devices is not None else jax.devices()), ("data",))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.data_sharding = NamedSharding(self.mesh, PartitionSpec("data"))
        self.train_step = CompiledOnFirstCall(jax.jit(
            _owned_by_the_caller(steps.train_step),
            in_shardings=(self.replicated, self.data_sharding),
            out_shardings=(self.replicated, self.replicated),
            donate_argnums=0,
        ), "train step")
        self.eval_step = CompiledOnFirstCall(jax.jit(
            _owned_by_the_caller(_eval_with_positions),
            in_shardings=(self.replicated, self.data_sharding),
            out_shardings=self.replicated,
        ), "eval step")

    def init_state(self, init_fn: Callable[[], steps.TrainState]) -> steps.TrainState:
        return jax.jit(init_fn, out_shardings=self.replicated)()

    def place_state(self, state):
        return jax.device_put(state, self.replicated)

    def one_copy(self, tree):
        """Global arrays are already one logical copy (still on the devices, not fetched)."""
        return tree

    def shard_batch(self, local_batch: dict) -> dict:
        return {
            key: jax.make_array_from_process_local_data(self.data_sharding, np.asarray(value))
            for key, value in local_batch.items()
        }

    def gather(self, x) -> np.ndarray:
        """A replicated per-example step output as one host array."""
        return np.asarray(jax.device_get(x))


class PmapStrategy:
    """One replica per local device; collectives over the ``batch`` axis.

    Unlike ``JitStrategy``'s, its compiled steps outlive it: jax 0.10 runs ``pmap`` through a
    cache (``jax._src.pmap._cached_shard_map``) whose entries hold the pmapped function
    itself, so nothing compiled from it is freed before ``jax.clear_caches()``. A sweep of
    pmap runs in one process should call that between runs (docs/reliability.md, Limits).
    """

    bn_axis_name = PMAP_AXIS

    def __init__(self):
        self.devices = jax.local_devices()
        self._replicate = jax.pmap(lambda _, state: state, in_axes=(0, None), devices=self.devices)
        self.train_step = CompiledOnFirstCall(jax.pmap(
            functools.partial(steps.train_step, axis_name=PMAP_AXIS),
            axis_name=PMAP_AXIS,
            donate_argnums=0,
        ), "train step")
        self.eval_step = CompiledOnFirstCall(jax.pmap(
            functools.partial(_eval_with_positions, axis_name=PMAP_AXIS), axis_name=PMAP_AXIS
        ), "eval step")

    def init_state(self, init_fn):
        return self.place_state(jax.jit(init_fn)())

    def place_state(self, state):
        """One replica per local device, from a state in any layout: fresh from ``jit``,
        restored from a checkpoint, or ``one_copy`` of a pmapped state (which JAX keeps
        replicated over the pmap's devices, a layout that ``pmap`` refuses as a mapped input).
        An unmapped (``in_axes=None``) argument is broadcast by ``pmap`` itself from any
        layout, so the replicas come from the one function that will consume them."""
        return self._replicate(np.zeros(len(self.devices), np.int8), state)

    def one_copy(self, tree):
        """Device 0's replica of every leaf (still on the devices, not fetched)."""
        return jax.tree.map(lambda x: x[0], tree)

    def shard_batch(self, local_batch: dict) -> dict:
        n = len(self.devices)
        return {
            key: np.asarray(value).reshape((n, -1) + np.shape(value)[1:])
            for key, value in local_batch.items()
        }

    def gather(self, x) -> np.ndarray:
        """Per-example outputs of every device (of every process) as one host array."""
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            x = multihost_utils.process_allgather(x)
        x = np.asarray(jax.device_get(x))
        return x.reshape(-1)  # per-example scalars: [processes?, devices, local batch] -> flat


def create_strategy(name: str, global_batch_size: int, eval_batch_size: int):
    check_batch_size(global_batch_size)
    check_batch_size(eval_batch_size, "config.eval_batch_size")
    if name == "jit":
        return JitStrategy()
    if name == "pmap":
        return PmapStrategy()
    raise UserError(f"config.parallelism must be 'jit' or 'pmap', got {name!r}")
