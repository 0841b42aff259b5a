"""Compile time and step time of the train step, ``block_impl='unrolled'`` against ``'scan'``.

    python benchmarks/compile_time.py --rounds 2            # both, in turns, fresh caches
    python benchmarks/compile_time.py --block-impl scan     # one process, one measurement

With ``--rounds`` each round runs, for each block_impl in turn, two processes sharing a new
persistent compilation cache: a first launch (trace + lower, XLA compile, then ``--steps``
timed steps) and a second launch (trace + lower, load from the cache), so both see the same
machine load. One process prints one JSON line: ``lower_s``, ``compile_s`` (XLA, or the cache
load), ``launch_s`` (their sum), ``step_s`` (median of the timed steps), ``fusions`` (XLA's
fusion count in the compiled program's text).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def one(args) -> dict:
    import jax

    from murajax import xla_cache

    if args.cache_dir:
        xla_cache.enable(args.cache_dir, min_compile_seconds=0.0)  # as murajax's own runs
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    from murajax import bench, train_state

    if args.scan_bucket:  # an experiment knob, not a config field
        build = train_state.model_from_config
        train_state.model_from_config = lambda *a, **k: build(*a, **k).clone(
            scan_bucket=args.scan_bucket)

    config = bench.make_config(args.model, args.image_size, args.batch_size, "float32",
                               args.remat, "jit", args.conv_impl)
    config.model.block_impl = args.block_impl
    strategy = bench.create_strategy("jit")
    state = bench.init_state(config, strategy)
    batch = strategy.shard_batch(bench.random_batch(args.batch_size, args.image_size))
    start, cpu_start = time.perf_counter(), _cpu_s()
    lowered = strategy.train_step.lower(state, batch)
    lowered_at, cpu_lowered = time.perf_counter(), _cpu_s()
    compiled = strategy.train_step.compile(lowered)  # as murajax compiles it
    compile_s, cpu_compiled = time.perf_counter() - lowered_at, _cpu_s()
    lower_s = lowered_at - start
    text = compiled.as_text() if args.fusions else ""
    times, cpu_times = [], []
    for i in range(args.warmup + args.steps):
        start, cpu = time.perf_counter(), _cpu_s()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(_cpu_s() - cpu)
    return {"block_impl": args.block_impl, "scan_bucket": args.scan_bucket or None,
            "lower_s": lower_s, "compile_s": compile_s,
            "launch_s": lower_s + compile_s,
            # CPU seconds of this process (all threads): less sensitive to other jobs than
            # wall time.
            "lower_cpu_s": cpu_lowered - cpu_start, "compile_cpu_s": cpu_compiled - cpu_lowered,
            "step_s": statistics.median(times) if times else None,
            "step_cpu_s": statistics.median(cpu_times) if cpu_times else None,
            "fusions": text.count(" fusion(") if text else None,
            "load_average": os.getloadavg()[0]}


def turns(args) -> None:
    impls = ("unrolled", "scan")
    rows = []
    for round_ in range(args.rounds):
        for impl in impls:
            with tempfile.TemporaryDirectory() as cache:
                for launch in ("first", "second"):
                    cmd = [sys.executable, __file__, "--block-impl", impl, "--cache-dir", cache,
                           "--model", args.model, "--image-size", str(args.image_size),
                           "--batch-size", str(args.batch_size), "--remat", args.remat,
                           "--conv-impl", args.conv_impl,
                           "--steps", str(args.steps if launch == "first" else 0),
                           "--warmup", str(args.warmup if launch == "first" else 0)]
                    if launch == "first":
                        cmd.append("--fusions")
                    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                    row = {"round": round_, "launch": launch, **json.loads(out.splitlines()[-1])}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block-impl", default="scan", choices=("unrolled", "scan"))
    parser.add_argument("--rounds", type=int, default=0, help="both impls in turns, N rounds")
    parser.add_argument("--model", default="densenet169")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--remat", default="auto")
    parser.add_argument("--conv-impl", default="auto")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--cache-dir", default="")
    parser.add_argument("--scan-bucket", type=int, default=0,
                        help="DenseNet.scan_bucket (channels; default the model's 128)")
    parser.add_argument("--fusions", action="store_true", help="count the compiled fusions")
    parser.add_argument("--json", default="", help="--rounds: write the rows here")
    args = parser.parse_args()
    if args.rounds:
        turns(args)
    else:
        print(json.dumps(one(args)), flush=True)


if __name__ == "__main__":
    from murajax import host_memory

    host_memory.reexec_with_huge_pages()  # what murajax runs with (docs/performance.md, exp. 10)
    main()
