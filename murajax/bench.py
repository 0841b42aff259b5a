"""Performance benchmark of the real training and evaluation steps, and of the input pipeline.

    python -m murajax.bench [--model densenet169] [--batch-size 8] [--image-size 224]
        [--dtype float32|bfloat16] [--remat [auto|none|bottleneck|layer]] [--parallelism jit|pmap]
        [--steps 10] [--warmup 2] [--no-eval] [--pipeline/--no-pipeline]
        [--compilation-cache DIR] [--json FILE]
    python -m murajax.bench --pipeline-only [--data-root MURA-v1.1] [--cache DIR]
        [--image-size 320] [--batch-size 8] [--num-workers 0|N|auto] [--batches 20]
        [--warmup 2] [--augment-on host|device] [--colour keep|grey] [--stall] [--json FILE]

(absl flags, murajax/command_flags.py: ``--help`` lists them; ``--batch_size`` works too.)
This module owns the benchmark: building a bench state, timing the compiled steps, the table
and the JSON.

What it measures, in one process:

* the train step (``murajax.parallel`` strategy's ``train_step``, i.e. ``steps.train_step``
  jitted with the state donated) and the eval step: the time to trace+lower and, separately,
  to XLA-compile them (``.lower(...).compile()``), then the median wall time per step over
  ``--steps`` steps after ``--warmup`` steps, as images/s;
* XLA's own FLOP count of each compiled step (``compiled.cost_analysis()['flops']``), the
  FLOP/s it achieves, and that against the FLOP/s of a large float32 matmul measured in the same
  run (``mfu``: a machine-utilisation figure relative to what this process can get from a
  matmul here, not a vendor's peak);
* memory: the process's peak RSS (``ru_maxrss``, includes compilation), the peak RSS while
  the steps run (Linux: the high-water mark is reset after compilation), XLA's buffer
  assignment for the train step (``compiled.memory_analysis()``) and, on GPU/TPU, the device's
  ``memory_stats()['peak_bytes_in_use']``;
* the training input pipeline (``murajax.data.pipeline.train_loader``, in-process decoding)
  over a small synthetic MURA set written to a temporary folder.

``--pipeline-only`` measures the input pipeline alone, from PNG files or an image cache
(``config.data.cache``) with any number of workers: ``pipeline_images_per_s`` (wall) and
``pipeline_images_per_cpu_s``, images per CPU-second of the whole process tree, worker processes
included (``murajax.cpu_time``), over ``--batches`` batches after ``--warmup`` (read on into the
next epochs when one has fewer). ``--stall`` then
trains the tiny model on those batches with ``train.py``'s loop and reports its input stall
(``input_stall``). ``benchmarks/torch_pipeline.py`` runs it side by side with torchvision.

The state has the structure of ``train_state.create_train_state``'s (checked), with He-normal
kernels drawn by NumPy: running the initialiser would compile a second DenseNet program, which
costs a minute on a small CPU and tells nothing about training speed (``--real-init`` runs it).
Images are random normal; the step's cost does not depend on the values.
"""

from __future__ import annotations

import functools
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from murajax import command_flags, host_memory, models, optim, parallel, train_state, xla_cache
from murajax.configs import default as default_config
from murajax.errors import UserError

NUM_STUDY_TYPES = 7


# ------------------------------------------------------------------------------------------
# Building the state and the batch.


def make_config(model: str, image_size: int, batch_size: int, dtype: str, remat: bool | str,
                parallelism: str, conv_impl: str = "auto"):
    config = default_config.get_config()
    config.model.name = model
    config.model.conv_impl = conv_impl
    config.model.dtype = dtype
    config.model.remat = remat
    config.data.image_size = image_size
    config.batch_size = batch_size
    config.eval_batch_size = batch_size
    config.parallelism = parallelism
    return config


def create_strategy(parallelism: str):
    if parallelism == "jit":
        return parallel.JitStrategy()
    if parallelism == "pmap":
        return parallel.PmapStrategy()
    raise UserError(f"--parallelism must be 'jit' or 'pmap', got {parallelism!r}")


def _loss_weights() -> np.ndarray:
    w1 = np.linspace(0.3, 0.7, NUM_STUDY_TYPES)
    return np.stack([1.0 - w1, w1], axis=1).astype(np.float32)


def init_state(config, strategy, *, real_init: bool = False, seed: int = 0):
    """A TrainState with ``create_train_state``'s structure, placed for ``strategy``."""
    model = train_state.model_from_config(config, bn_axis_name=strategy.bn_axis_name)
    tx = optim.create_optimizer(config.optim)
    init_fn = functools.partial(
        train_state.create_train_state, jax.random.key(seed), model, tx,
        config.data.image_size, _loss_weights(),
    )
    if real_init:
        return strategy.init_state(init_fn)
    abstract = jax.eval_shape(init_fn)
    rng = np.random.default_rng(seed)

    def param(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_in = math.prod(leaf.shape[:-1])
            value = rng.normal(0.0, math.sqrt(2.0 / fan_in), leaf.shape)
        elif name == "scale":
            value = np.ones(leaf.shape)
        else:
            value = np.zeros(leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    def stat(path, leaf):
        return jnp.asarray(np.ones(leaf.shape) if path[-1].key == "var" else np.zeros(leaf.shape),
                           leaf.dtype)

    params = jax.tree_util.tree_map_with_path(param, abstract.params)
    state = train_state.TrainState(
        step=jnp.asarray(0, jnp.int32),
        apply_fn=model.apply,
        params=params,
        tx=tx,
        opt_state=jax.jit(tx.init)(params),
        batch_stats=jax.tree_util.tree_map_with_path(stat, abstract.batch_stats),
        rng=jax.random.key(seed + 1),
        plateau=optim.init_plateau(),
        loss_weights=jnp.asarray(_loss_weights()),
    )
    got, want = jax.eval_shape(lambda: state), abstract
    if jax.tree.structure(got) != jax.tree.structure(want) or any(
        (a.shape, a.dtype) != (b.shape, b.dtype)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))
    ):
        raise AssertionError("bench state differs from create_train_state's")
    return strategy.place_state(state)


def random_batch(batch_size: int, image_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "image": rng.normal(size=(batch_size, image_size, image_size, 3)).astype(np.float32),
        "label": rng.integers(0, 2, batch_size).astype(np.int32),
        "study_type": rng.integers(0, NUM_STUDY_TYPES, batch_size).astype(np.int32),
        "mask": np.ones(batch_size, np.float32),
        "index": np.arange(batch_size, dtype=np.int32),
    }


# ------------------------------------------------------------------------------------------
# Measuring.


def compile_timed(jitted, *args):
    """(compiled, trace+lower seconds, XLA compile seconds)."""
    start = time.perf_counter()
    lowered = jitted.lower(*args)
    lowered_at = time.perf_counter()
    compiled = jitted.compile(lowered)
    done = time.perf_counter()
    return compiled, lowered_at - start, done - lowered_at


def step_flops(compiled) -> float | None:
    """XLA's FLOP count of one execution of ``compiled`` (all devices), or None."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # pylint: disable=broad-except  (not every backend implements it)
        return None
    if isinstance(analysis, (list, tuple)):  # older JAX: one dict per device program
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return None
    return float(analysis["flops"])


def memory_analysis_mb(compiled) -> dict[str, float]:
    try:
        m = compiled.memory_analysis()
    except Exception:  # pylint: disable=broad-except
        return {}
    if m is None:
        return {}
    mb = 1024.0 ** 2
    return {
        "xla_temp_mb": m.temp_size_in_bytes / mb,
        "xla_argument_mb": m.argument_size_in_bytes / mb,
        "xla_output_mb": m.output_size_in_bytes / mb,
    }


def median_step_seconds(step_fn, steps: int, warmup: int) -> list[float]:
    """Wall seconds of each of ``steps`` calls of ``step_fn`` (blocking), after ``warmup``."""
    for _ in range(warmup):
        jax.block_until_ready(step_fn())
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(step_fn())
        times.append(time.perf_counter() - start)
    return times


def matmul_peak_gflops(n: int | None = None, repeats: int = 8) -> float:
    """Best FLOP/s of an n x n float32 matmul (n=2048 on CPU, 8192 elsewhere), in GFLOP/s."""
    if n is None:
        n = 2048 if jax.default_backend() == "cpu" else 8192
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((n, n), dtype=np.float32))
    b = jnp.asarray(rng.standard_normal((n, n), dtype=np.float32))
    matmul = jax.jit(lambda x, y: jnp.dot(x, y, precision=jax.lax.Precision.HIGHEST))
    jax.block_until_ready(matmul(a, b))
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(matmul(a, b))
        best = min(best, time.perf_counter() - start)
    return 2.0 * n ** 3 / best / 1e9


def device_peak_mb() -> float | None:
    if jax.default_backend() == "cpu":
        return None
    peaks = []
    for device in jax.local_devices():
        stats = device.memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            peaks.append(stats["peak_bytes_in_use"])
    return max(peaks) / 1024.0 ** 2 if peaks else None


def pipeline_images_per_s(image_size: int, batch_size: int, *, studies: int = 40,
                          batches: int = 6, workdir: str | None = None) -> dict[str, float]:
    """Training input pipeline throughput (in-process decoding) over synthetic MURA."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        root = _synthetic_root(tmp, studies)
        config = pipeline_config(image_size, num_workers=0, prefetch=0)
        index = _train_index(root, config)
        available = _available_batches(index, batch_size)
        if available < 2:
            raise UserError(f"pipeline benchmark: {len(index.images)} synthetic images give "
                            f"fewer than 2 batches of {batch_size}; raise --pipeline-studies")
        timed = time_loader(index, config, batch_size, batches=min(batches, available) - 1,
                            warmup=1)
    return {"pipeline_images_per_s": timed["pipeline_images_per_s"],
            "pipeline_images_per_cpu_s": timed["pipeline_images_per_cpu_s"],
            "pipeline_batches": timed["pipeline_batches"]}


# ------------------------------------------------------------------------------------------
# The input pipeline alone (--pipeline-only), and the training loop's input stall (--stall).


def pipeline_config(image_size: int, *, cache: str = "", num_workers: int | str = 0,
                    prefetch: int | str = "auto", augment_on: str = "", resize: str = "stretch",
                    model: str = "densenet_tiny", batch_size: int = 8, colour: str = ""):
    """The paper's config (flips, 30-degree rotations) with these input settings."""
    config = default_config.get_config()
    config.model.name = model
    config.batch_size = config.eval_batch_size = batch_size
    data = config.data
    data.image_size, data.resize, data.prefetch = image_size, resize, prefetch
    data.num_workers = num_workers
    if cache:
        data.cache = os.path.expanduser(cache)
    if augment_on:
        data.augment_on = augment_on
    if colour:
        data.colour = colour
    return config


def _synthetic_root(tmp, studies: int) -> pathlib.Path:
    from murajax import synthetic

    return synthetic.generate(tmp, num_studies=studies, seed=0)


def _train_index(root, config):
    from murajax.data import mura

    return mura.read_split(root, "train", on_missing=config.data.on_missing)


def _available_batches(index, batch_size: int) -> int:
    from murajax.data import pipeline

    return pipeline.steps_per_epoch(len(index.images), batch_size)


def _check_counts(batches: int, warmup: int, available: int, batch_size: int, images: int):
    if batches < 1 or warmup < 1:
        raise UserError(f"--batches must be >= 1 and --warmup >= 1 (the first batch includes "
                        f"starting the workers), got {batches} and {warmup}")
    if warmup >= available:
        raise UserError(f"--warmup {warmup} batches of {batch_size} leave none of the first "
                        f"epoch to time: the train split has {images} images ({available} "
                        "batches); lower --warmup or --batch-size, or give more data "
                        "(--studies for synthetic data)")


def _epochs_of_batches(index, config, batch_size: int):
    """The training batches of epoch 0, 1, 2, ... in turn, each epoch's loader opened as
    training opens it (inside the timed span) and closed when it ends; with the epoch."""
    from murajax.data import pipeline

    epoch = 0
    while True:
        loader = pipeline.train_loader(index, config.data, global_batch_size=batch_size,
                                       seed=0, epoch=epoch)
        try:
            for batch in loader:
                yield epoch, batch
        finally:
            loader.close()
        epoch += 1


def time_loader(index, config, batch_size: int, *, batches: int, warmup: int) -> dict:
    """Wall and process-tree CPU time of ``batches`` training batches after ``warmup``, on
    from epoch to epoch when one epoch has fewer (a cache reads an epoch of a small split in
    a fraction of a second, too short to time against 10 ms clock ticks)."""
    from murajax import cpu_time

    stream = _epochs_of_batches(index, config, batch_size)
    try:
        for _ in range(warmup):  # the first one starts the workers: not throughput
            next(stream)
        watch = cpu_time.Stopwatch()
        for _ in range(batches):
            epoch, batch = next(stream)
        wall, cpu = watch.read()
    finally:
        stream.close()
    images = batches * batch_size
    return {"pipeline_images_per_s": images / wall,
            "pipeline_images_per_cpu_s": images / cpu if cpu > 0 else None,
            "pipeline_wall_s": wall, "pipeline_cpu_s": cpu, "pipeline_batches": batches,
            "pipeline_epochs": epoch + 1, "pipeline_image_dtype": str(batch["image"].dtype),
            "pipeline_image_shape": list(batch["image"].shape),
            "cpu_accounting": cpu_time.METHOD}


def pipeline_only(data_root: str = "", cache: str = "", image_size: int = 320,
                  batch_size: int = 16, num_workers: int | str = 0, prefetch: int | str = "auto",
                  batches: int = 20, warmup: int = 2, augment_on: str = "",
                  colour: str = "", studies: int = 150, stall: bool = False, stall_steps: int = 10,
                  model: str = "densenet_tiny", log=print) -> dict[str, Any]:
    """``--pipeline-only``: the training input pipeline (PNG files, or the cache) on its own,
    and with ``stall`` the training loop's input stall; the flat dict ``--json`` writes."""
    from murajax.data import pipeline

    if cache and not data_root:
        raise UserError("--cache needs --data-root: the index and labels come from the "
                        "MURA-v1.1 folder the cache was built from")
    if stall:  # before the pipeline's timing: the step shards the batch over the devices
        parallel.check_batch_size(batch_size, "--batch-size")
    config = pipeline_config(image_size, cache=cache, num_workers=num_workers,
                             prefetch=prefetch, augment_on=augment_on, model=model,
                             batch_size=batch_size, colour=colour)
    with tempfile.TemporaryDirectory() as tmp:
        if data_root:
            root = pathlib.Path(os.path.expanduser(data_root))
        else:
            log(f"writing {studies} synthetic studies")
            root = _synthetic_root(tmp, studies)
        index = _train_index(root, config)
        available = _available_batches(index, batch_size)
        _check_counts(batches, warmup, available, batch_size, len(index.images))
        workers = pipeline.resolve_num_workers(config.data.num_workers)
        result: dict[str, Any] = {
            "mode": "pipeline", "data_root": str(root) if data_root else "synthetic",
            "pipeline_source": "cache" if cache else "png", "cache": cache,
            "image_size": image_size, "batch_size": batch_size,
            "num_workers": workers,
            "prefetch": pipeline.resolve_prefetch(config.data.prefetch, cache=cache,
                                                  num_workers=workers),
            "augment_on": config.data.get("augment_on", "host"),
            "colour": config.data.colour,
            "warmup": warmup, "train_images": len(index.images),
            **_host_environment(),
        }
        log(f"timing {batches} batches of {batch_size} after {warmup} warm-up "
            f"({result['pipeline_source']}, {result['num_workers']} worker(s))")
        result.update(time_loader(index, config, batch_size, batches=batches, warmup=warmup))
        if stall:
            if stall_steps + 1 > available:
                raise UserError(f"--stall-steps {stall_steps} needs {stall_steps + 1} batches; "
                                f"the train split has {available}")
            result.update(input_stall(index, config, steps=stall_steps, log=log))
    result["load_average_end"] = _load()
    return result


def input_stall(index, config, *, steps: int, log=print) -> dict[str, Any]:
    """The training loop's input stall: ``config.model`` trained on the pipeline's batches.

    The loop is ``train.py``'s: take a batch, put it on the devices, dispatch the step, then
    wait for the previous step's loss (its finiteness check), so the next batch is built while
    the step runs. ``input_wait_fraction`` is the share of the loop's wall time spent getting
    and placing batches; ``input_stall_fraction`` = 1 - (step time with one fixed batch) /
    (step time with the pipeline), the share of step time the input costs the loop.
    """
    from murajax.data import device_augment, pipeline

    strategy = create_strategy(config.parallelism)
    batch_size = config.batch_size
    model = train_state.model_from_config(config, bn_axis_name=strategy.bn_axis_name)
    tx = optim.create_optimizer(config.optim)
    state = strategy.init_state(functools.partial(
        train_state.create_train_state, jax.random.key(0), model, tx,
        config.data.image_size, _loss_weights(), augment=device_augment.from_config(config)))
    loader = pipeline.train_loader(index, config.data, global_batch_size=batch_size, seed=0,
                                   epoch=0)
    fixed = strategy.shard_batch(next(loader))  # the compile, and the fixed batch
    log(f"compiling the {config.model.name} train step")
    state, metrics = strategy.train_step(state, fixed)
    jax.block_until_ready(metrics)

    def loop(get_batch, n):
        nonlocal state
        previous, waited = None, 0.0
        start = time.perf_counter()
        for _ in range(n):
            got = time.perf_counter()
            batch = get_batch()
            waited += time.perf_counter() - got
            state, metrics = strategy.train_step(state, batch)
            if previous is not None:
                float(strategy.one_copy(previous).loss.compute())
            previous = metrics
        float(strategy.one_copy(previous).loss.compute())
        return (time.perf_counter() - start) / n, waited / n

    try:
        log(f"timing {steps} steps with a fixed batch, {steps} fed by the pipeline")
        fixed_before_s, _ = loop(lambda: fixed, steps)
        fed_s, wait_s = loop(lambda: strategy.shard_batch(next(loader)), steps)
        fixed_after_s, _ = loop(lambda: fixed, steps)
    finally:
        loader.close()
    fixed_s = (fixed_before_s + fixed_after_s) / 2  # before and after: the machine's drift
    return {"stall_model": config.model.name, "stall_steps": steps,
            "stall_fixed_batch_step_s": fixed_s, "stall_step_s": fed_s,
            "stall_fixed_batch_step_s_before": fixed_before_s,
            "stall_fixed_batch_step_s_after": fixed_after_s,
            "stall_input_wait_s": wait_s, "input_wait_fraction": wait_s / fed_s,
            "input_stall_fraction": 1.0 - fixed_s / fed_s}


def _host_environment() -> dict[str, Any]:
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    return {"cpu_count": os.cpu_count(), "cpus_available": len(affinity) if affinity else None,
            "python": platform.python_version(), "load_average_start": _load()}


_PIPELINE_ROWS = [
    ("pipeline images/s (wall)", "pipeline_images_per_s", "{:.1f}"),
    ("pipeline images per CPU-second", "pipeline_images_per_cpu_s", "{:.1f}"),
    ("  CPU s / wall s (process tree)", None, None),
    ("train step, fixed batch (s)", "stall_fixed_batch_step_s", "{:.4f}"),
    ("train step, fed by pipeline (s)", "stall_step_s", "{:.4f}"),
    ("input wait per step (s)", "stall_input_wait_s", "{:.4f}"),
    ("input wait / step time", "input_wait_fraction", "{:.1%}"),
    ("input stall (1 - fixed / fed)", "input_stall_fraction", "{:.1%}"),
]


def format_pipeline_table(result: dict[str, Any]) -> str:
    head = (f"input pipeline: {result['pipeline_source']} ({result['data_root']}), "
            f"{result['image_size']}px, batch {result['batch_size']}, "
            f"{result['num_workers']} worker(s), augment on {result['augment_on']}, "
            f"colour {result.get('colour', 'keep')}")
    lines = [head, "-" * len(head)]
    for label, key, fmt in _PIPELINE_ROWS:
        if key is None:
            value = f"{result['pipeline_cpu_s'] / result['pipeline_wall_s']:.2f}"
        elif result.get(key) is None:
            continue
        else:
            value = fmt.format(result[key])
        lines.append(f"{label:<34}{value:>12}")
    lines.append(f"{'load average (start/end)':<34}{result.get('load_average_start') or 0:>6.1f}"
                 f" / {result.get('load_average_end') or 0:.1f}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# The benchmark.


class StepBench:
    """The compiled train and eval steps of one configuration, ready to be timed.

    ``murajax.bench.run`` and ``benchmarks/compare_torch.py`` (which alternates these steps
    with PyTorch's in another process) share it.
    """

    def __init__(self, model: str = "densenet169", batch_size: int = 8, image_size: int = 224,
                 dtype: str = "float32", remat: bool | str = "auto", parallelism: str = "jit",
                 real_init: bool = False, log=print, conv_impl: str = "auto"):
        parallel.check_batch_size(batch_size, "--batch-size")
        self.batch_size = batch_size
        self.log = log
        config = make_config(model, image_size, batch_size, dtype, remat, parallelism,
                             conv_impl)
        self.strategy = create_strategy(parallelism)
        log(f"building {model} state ({'real' if real_init else 'fast'} init)")
        self.state = init_state(config, self.strategy, real_init=real_init)
        self.batch = self.strategy.shard_batch(random_batch(batch_size, image_size))
        self.train = self.evaluate = None
        self.figures: dict[str, Any] = {}

    def compile_train(self) -> None:
        self.log("compiling the train step")
        self.train, lower_s, xla_s = compile_timed(self.strategy.train_step, self.state,
                                                   self.batch)
        self.log(f"  {lower_s:.1f} s trace+lower, {xla_s:.1f} s XLA compile")
        self.figures.update(train_lower_s=lower_s, train_xla_compile_s=xla_s,
                            compile_s=lower_s + xla_s, train_flops=step_flops(self.train))
        self.figures.update(memory_analysis_mb(self.train))

    def compile_eval(self) -> None:
        self.log("compiling the eval step")
        self.evaluate, lower_s, xla_s = compile_timed(self.strategy.eval_step, self.state,
                                                      self.batch)
        self.figures.update(eval_compile_s=lower_s + xla_s, eval_flops=step_flops(self.evaluate))

    def train_once(self):
        self.state, metrics = self.train(self.state, self.batch)
        return metrics

    def eval_once(self):
        return self.evaluate(self.state, self.batch)

    def time_train(self, steps: int, warmup: int = 0) -> list[float]:
        return median_step_seconds(self.train_once, steps, warmup)

    def time_eval(self, steps: int, warmup: int = 0) -> list[float]:
        return median_step_seconds(self.eval_once, steps, warmup)


def summarize_steps(times: list[float], batch_size: int, flops: float | None,
                    prefix: str) -> dict[str, float]:
    """Median step time, images/s and achieved GFLOP/s of a list of step times."""
    step_s = statistics.median(times)
    out = {f"{prefix}step_s": step_s, f"{prefix}step_s_min": min(times),
           f"{prefix}step_s_max": max(times), f"{prefix}images_per_s": batch_size / step_s}
    if flops is not None:
        out[f"{'' if prefix == 'train_' else prefix}flops_per_image"] = flops / batch_size
        out[f"{'' if prefix == 'train_' else prefix}achieved_gflops"] = flops / step_s / 1e9
    return out


def run(model: str = "densenet169", batch_size: int = 8, image_size: int = 224,
        dtype: str = "float32", remat: bool | str = "auto", parallelism: str = "jit",
        steps: int = 10, warmup: int = 2, eval_steps: bool = True, pipeline: bool = True,
        pipeline_studies: int = 40, pipeline_batches: int = 6, real_init: bool = False,
        matmul_n: int | None = None, log=print, conv_impl: str = "auto") -> dict[str, Any]:
    """Runs the benchmark; returns the flat dict ``--json`` writes."""
    if steps < 1 or warmup < 0:
        raise UserError("--steps must be >= 1 and --warmup >= 0")
    result: dict[str, Any] = {
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "model": model, "batch_size": batch_size, "image_size": image_size, "dtype": dtype,
        "remat": models.resolve_remat(remat), "parallelism": parallelism, "conv_impl": conv_impl,
        "steps": steps, "warmup": warmup,
        **environment(),
    }
    session = StepBench(model, batch_size, image_size, dtype, remat, parallelism, real_init,
                        log, conv_impl)
    session.compile_train()
    rss_reset = host_memory.reset_peak_rss()
    log(f"timing {steps} train steps after {warmup} warm-up")
    times = session.time_train(steps, warmup)
    result["step_peak_rss_mb"] = host_memory.vm_hwm_mb() if rss_reset else None
    result.update(summarize_steps(times, batch_size, session.figures["train_flops"], "train_"))
    if eval_steps:
        session.compile_eval()
        times = session.time_eval(steps, warmup)
        result.update(summarize_steps(times, batch_size, session.figures["eval_flops"], "eval_"))
    result.update({k: v for k, v in session.figures.items() if not k.endswith("_flops")})

    result["device_peak_mb"] = device_peak_mb()
    result["peak_rss_mb"] = host_memory.peak_rss_mb()

    log("measuring float32 matmul peak")
    result["matmul_peak_gflops"] = matmul_peak_gflops(matmul_n)
    for prefix in ("", "eval_"):
        if result.get(f"{prefix}achieved_gflops") is not None:
            result[f"{prefix}mfu"] = (result[f"{prefix}achieved_gflops"]
                                      / result["matmul_peak_gflops"])
    if pipeline:
        log("measuring the input pipeline")
        result.update(pipeline_images_per_s(image_size, batch_size, studies=pipeline_studies,
                                            batches=pipeline_batches))
    result["load_average_end"] = _load()
    return result


def _load() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def environment() -> dict[str, Any]:
    return {
        "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
        "device_count": jax.device_count(), "cpu_count": os.cpu_count(),
        "jax_version": jax.__version__, "python": platform.python_version(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "compilation_cache": jax.config.jax_compilation_cache_dir or "",
        "load_average_start": _load(),
    }


_ROWS = [
    ("train images/s", "train_images_per_s", "{:.2f}"),
    ("train step (median s)", "train_step_s", "{:.3f}"),
    ("eval images/s", "eval_images_per_s", "{:.2f}"),
    ("train compile s (lower + XLA)", "compile_s", "{:.1f}"),
    ("eval compile s", "eval_compile_s", "{:.1f}"),
    ("train GFLOP / image (XLA)", "flops_per_image", "{:.1f}", 1e-9),
    ("train achieved GFLOP/s", "achieved_gflops", "{:.1f}"),
    ("f32 matmul peak GFLOP/s", "matmul_peak_gflops", "{:.1f}"),
    ("train MFU (vs matmul peak)", "mfu", "{:.1%}"),
    ("eval achieved GFLOP/s", "eval_achieved_gflops", "{:.1f}"),
    ("peak RSS MB (process)", "peak_rss_mb", "{:.0f}"),
    ("peak RSS MB (during steps)", "step_peak_rss_mb", "{:.0f}"),
    ("XLA temp buffers MB (train)", "xla_temp_mb", "{:.0f}"),
    ("device peak MB", "device_peak_mb", "{:.0f}"),
    ("pipeline images/s", "pipeline_images_per_s", "{:.1f}"),
    ("load average (start/end)", None, None),
]


def remat_label(policy: str) -> str:
    return "" if policy == "none" else f" remat={policy}"


def format_table(result: dict[str, Any]) -> str:
    head = (f"{result['model']} batch {result['batch_size']} {result['image_size']}px "
            f"{result['dtype']}{remat_label(result['remat'])} {result['parallelism']} on "
            f"{result['device_count']} x {result['device']} ({result['backend']})")
    lines = [head, "-" * len(head)]
    for row in _ROWS:
        label, key, fmt = row[:3]
        if key is None:
            value = f"{result.get('load_average_start') or 0:.1f} / " \
                    f"{result.get('load_average_end') or 0:.1f}"
        else:
            raw = result.get(key)
            if raw is None:
                continue
            value = fmt.format(raw * (row[3] if len(row) > 3 else 1))
        lines.append(f"{label:<32}{value:>12}")
    return "\n".join(lines)


def _define_flags(values) -> None:
    """The command's flags, as users spell them (``--batch-size``; underscores work too)."""
    f = values
    flags.DEFINE_enum("model", "densenet169", list(models.names()), "the model (config.model.name)",
                      flag_values=f)
    flags.DEFINE_integer("batch-size", 8, "global batch size", flag_values=f)
    flags.DEFINE_integer("image-size", 224, "input size in pixels", flag_values=f)
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype",
                      flag_values=f)
    flags.DEFINE_enum("remat", "auto", list(models.REMAT_POLICIES),
                      "what the backward pass recomputes (config.model.remat); bare --remat: "
                      "bottleneck", flag_values=f)
    flags.DEFINE_enum("parallelism", "jit", ["jit", "pmap"], "config.parallelism",
                      flag_values=f)
    flags.DEFINE_enum("conv-impl", "auto", list(models.CONV_IMPLS),
                      "how convolutions run (config.model.conv_impl)", flag_values=f)
    flags.DEFINE_integer("steps", 10, "timed steps (median reported)", flag_values=f)
    flags.DEFINE_integer("warmup", 2, "untimed steps before them", flag_values=f)
    flags.DEFINE_bool("eval", True, "also time the eval step (--no-eval saves its compile)",
                      flag_values=f)
    flags.DEFINE_bool("pipeline", True, "also measure the input pipeline", flag_values=f)
    flags.DEFINE_integer("pipeline-studies", 40, "synthetic studies for the pipeline benchmark",
                         flag_values=f)
    flags.DEFINE_bool("real-init", False,
                      "initialise with model.init (compiles it) instead of NumPy draws",
                      flag_values=f)
    flags.DEFINE_string("compilation-cache", "",
                        "JAX persistent compilation cache folder (as murajax sets)",
                        flag_values=f)
    flags.DEFINE_string("json", "", "also write the results to this file", flag_values=f)
    flags.DEFINE_bool("pipeline-only", False,
                      "measure only the training input pipeline: --data-root (default: "
                      "synthetic), --cache, --num-workers, --batches after --warmup",
                      flag_values=f)
    flags.DEFINE_string("data-root", "", "--pipeline-only: the MURA-v1.1 folder (empty: "
                        "--studies synthetic studies in a temporary folder)", flag_values=f)
    flags.DEFINE_string("cache", "", "--pipeline-only: an image cache built from --data-root "
                        "(config.data.cache)", flag_values=f)
    flags.DEFINE_string("num-workers", "0", "--pipeline-only: config.data.num_workers "
                        "(an integer or 'auto')", flag_values=f)
    flags.DEFINE_string("prefetch", "auto", "--pipeline-only: config.data.prefetch (an integer "
                        "or 'auto')", flag_values=f)
    flags.DEFINE_integer("batches", 20, "--pipeline-only: timed batches", flag_values=f)
    flags.DEFINE_enum("augment-on", "", ["", "host", "device"],
                      "--pipeline-only: config.data.augment_on (empty: the config's default)",
                      flag_values=f)
    flags.DEFINE_enum("colour", "", ["", "keep", "grey"],
                      "--pipeline-only: config.data.colour (empty: the config's default)",
                      flag_values=f)
    flags.DEFINE_integer("studies", 150, "--pipeline-only without --data-root: synthetic "
                         "studies (about 2.4 train images each)", flag_values=f)
    flags.DEFINE_bool("stall", False, "--pipeline-only: also train --stall-model on the "
                      "pipeline's batches and report the loop's input stall", flag_values=f)
    flags.DEFINE_integer("stall-steps", 10, "--stall: timed steps of each kind", flag_values=f)
    flags.DEFINE_enum("stall-model", "densenet_tiny", list(models.names()),
                      "--stall: the model trained", flag_values=f)


def parse_args(argv=None) -> types.SimpleNamespace:
    """The arguments (default ``sys.argv[1:]``) as attributes: ``batch_size``, ...,
    ``eval_steps`` (``--[no-]eval``). ``--help`` exits 0, a bad argument 2."""
    values = command_flags.parse("python -m murajax.bench", __doc__.splitlines()[0],
                                 _define_flags, argv, optional_values={"remat": "bottleneck"})
    args = {name.replace("-", "_"): values[name].value for name in values}
    args["eval_steps"] = args.pop("eval")
    return types.SimpleNamespace(**args)


def main(argv=None) -> int:
    args = parse_args(argv)
    if argv is None:  # as a command: measure what murajax runs (host_memory's huge pages)
        host_memory.reexec_with_huge_pages()
    if args.compilation_cache:
        xla_cache.enable(args.compilation_cache, min_compile_seconds=0.0)
    if args.pipeline_only:
        return _report(_measure_pipeline, format_pipeline_table, args)
    return _report(_measure_steps, format_table, args)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _measure_steps(args) -> dict:
    return run(model=args.model, batch_size=args.batch_size, image_size=args.image_size,
               dtype=args.dtype, remat=args.remat, parallelism=args.parallelism,
               conv_impl=args.conv_impl, steps=args.steps, warmup=args.warmup,
               eval_steps=args.eval_steps, pipeline=args.pipeline,
               pipeline_studies=args.pipeline_studies, real_init=args.real_init, log=_log)


def _measure_pipeline(args) -> dict:
    workers = args.num_workers.strip()
    return pipeline_only(
        data_root=args.data_root, cache=args.cache, image_size=args.image_size,
        batch_size=args.batch_size, num_workers=int(workers) if workers.isdigit() else workers,
        prefetch=args.prefetch, batches=args.batches, warmup=args.warmup,
        augment_on=args.augment_on, colour=args.colour, studies=args.studies, stall=args.stall,
        stall_steps=args.stall_steps, model=args.stall_model, log=_log)


def _report(measure, format_result, args) -> int:
    """``measure(args)``, printed as ``format_result`` says (and to ``--json``); 2 for a
    user error."""
    try:
        result = measure(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_result(result), flush=True)
    if args.json:
        path = pathlib.Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
