"""murajax vs PyTorch eager on the same DenseNet training step, measured side by side.

    python benchmarks/compare_torch.py [--model densenet169] [--batch-size 8]
        [--image-size 224] [--remat auto|none|bottleneck|layer] [--rounds 4] [--steps-per-round 3]
        [--json FILE]

Two worker processes, one per framework, each holding its model, optimizer state and a fixed
random batch: murajax's jitted ``train_step``/``eval_step`` (``murajax.bench.StepBench``, the
same code as ``python -m murajax.bench``) and ``benchmarks/torch_densenet.TorchBench`` (forward,
weighted BCE, backward, ``torch.optim.Adam`` step; eval in no-grad eval mode). The parent lets
them run alternately, ``--steps-per-round`` steps at a time for ``--rounds`` rounds, so that both
see the same machine load; only one works at any moment. Reported per framework: median train
and eval images/s over all timed steps, time to the first runnable step (murajax: trace + XLA
compile of the train step; PyTorch: its first, un-timed step), peak RSS of its process and the
peak RSS while the steps run (Linux: the high-water mark is reset after setup). The load average
is printed at the start and end of every round: on a shared 2-core machine it decides whether
the figures mean anything.

PyTorch is needed only here (``pip install torch``); murajax never imports it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _worker(kind: str, conn, args: dict) -> None:
    """Serves 'train k' / 'eval k' / 'report' requests for one framework."""
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from murajax import host_memory  # standard library only: the torch worker stays JAX-free
    info: dict = {}
    if kind == "murajax":
        if args.get("compilation_cache"):
            from murajax import xla_cache

            xla_cache.enable(args["compilation_cache"])
        from murajax import bench

        session = bench.StepBench(args["model"], args["batch_size"], args["image_size"],
                                  remat=args["remat"], log=lambda m: None)
        session.compile_train()
        session.compile_eval()
        session.time_train(1)  # first executions (allocations) are not steady state
        session.time_eval(1)
        info.update(setup_s=session.figures["compile_s"],
                    eval_setup_s=session.figures["eval_compile_s"],
                    flops_per_image=session.figures["train_flops"] / args["batch_size"],
                    version=__import__("jax").__version__)
        train, evaluate = session.time_train, session.time_eval
    else:
        import torch
        from torch_densenet import TorchBench

        torch_bench = TorchBench(args["model"], args["batch_size"], args["image_size"])
        start = time.perf_counter()
        torch_bench.train_step()
        info["setup_s"] = time.perf_counter() - start
        start = time.perf_counter()
        torch_bench.eval_step()
        info["eval_setup_s"] = time.perf_counter() - start
        info.update(version=torch.__version__, threads=torch.get_num_threads())

        def train(k):
            from torch_densenet import time_steps

            return time_steps(torch_bench.train_step, k, 0)

        def evaluate(k):
            from torch_densenet import time_steps

            return time_steps(torch_bench.eval_step, k, 0)

    info["setup_peak_rss_mb"] = host_memory.peak_rss_mb()
    reset = host_memory.reset_peak_rss()
    conn.send(("ready", info))
    while True:
        request, k = conn.recv()
        if request == "train":
            conn.send(train(k))
        elif request == "eval":
            conn.send(evaluate(k))
        else:
            info.update(peak_rss_mb=host_memory.peak_rss_mb(),
                        step_peak_rss_mb=host_memory.vm_hwm_mb() if reset else None)
            conn.send(info)
            return


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="densenet169")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--remat", default="auto",
                        choices=["auto", "none", "bottleneck", "layer"],
                        help="murajax's config.model.remat (PyTorch's step never recomputes)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps-per-round", type=int, default=3)
    parser.add_argument("--compilation-cache", default="")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    if argv is None:  # both workers inherit it: the same allocator setting as launch.py's
        sys.path.insert(0, str(ROOT))
        from murajax import host_memory

        host_memory.reexec_with_huge_pages()
    worker_args = {"model": args.model, "batch_size": args.batch_size,
                   "image_size": args.image_size, "remat": args.remat,
                   "compilation_cache": args.compilation_cache}

    ctx = mp.get_context("spawn")
    workers = {}
    infos = {}
    print(f"load average {os.getloadavg()[0]:.2f} at start; setting up (murajax compiles)",
          flush=True)
    for kind in ("murajax", "torch"):  # one at a time: setup is not measured side by side
        parent, child = ctx.Pipe()
        process = ctx.Process(target=_worker, args=(kind, child, worker_args), daemon=True)
        process.start()
        status, infos[kind] = parent.recv()
        assert status == "ready"
        workers[kind] = (process, parent)
        print(f"  {kind}: ready after {infos[kind]['setup_s']:.1f} s", flush=True)

    times = {kind: {"train": [], "eval": []} for kind in workers}
    loads = []
    for r in range(args.rounds):
        load_start = os.getloadavg()[0]
        order = list(workers) if r % 2 == 0 else list(workers)[::-1]
        for what in ("train", "eval"):
            for kind in order:
                _, conn = workers[kind]
                time.sleep(0.5)  # let the other framework's threads go idle
                conn.send((what, args.steps_per_round))
                times[kind][what] += conn.recv()
        loads.append((load_start, os.getloadavg()[0]))
        print(f"round {r + 1}: load {load_start:.2f} -> {loads[-1][1]:.2f}; " + ", ".join(
            f"{kind} train {args.batch_size / statistics.median(times[kind]['train']):.2f} img/s"
            for kind in workers), flush=True)

    result = {"model": args.model, "batch_size": args.batch_size,
              "image_size": args.image_size, "remat": args.remat, "rounds": args.rounds,
              "steps_per_round": args.steps_per_round, "cpu_count": os.cpu_count(),
              "load_averages": loads, "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}
    for kind, (process, conn) in workers.items():
        conn.send(("report", 0))
        info = conn.recv()
        process.join(timeout=60)
        train_s = statistics.median(times[kind]["train"])
        eval_s = statistics.median(times[kind]["eval"])
        result[kind] = {
            **info,
            "train_images_per_s": args.batch_size / train_s,
            "eval_images_per_s": args.batch_size / eval_s,
            "train_step_s": train_s, "train_step_s_all": times[kind]["train"],
            "eval_step_s": eval_s,
        }
    m, t = result["murajax"], result["torch"]
    result["train_speedup"] = m["train_images_per_s"] / t["train_images_per_s"]
    result["eval_speedup"] = m["eval_images_per_s"] / t["eval_images_per_s"]

    rows = [
        ("train images/s", "train_images_per_s", "{:.2f}"),
        ("eval images/s", "eval_images_per_s", "{:.2f}"),
        ("setup s (compile / 1st step)", "setup_s", "{:.1f}"),
        ("peak RSS MB", "peak_rss_mb", "{:.0f}"),
        ("peak RSS MB during steps", "step_peak_rss_mb", "{:.0f}"),
    ]
    print(f"\n{args.model} batch {args.batch_size} {args.image_size}px, {os.cpu_count()} CPUs, "
          f"jax {m['version']} vs torch {t['version']} ({t['threads']} threads)")
    print(f"{'':32}{'murajax':>10}{'pytorch':>10}{'ratio':>8}")
    for label, key, fmt in rows:
        a, b = m.get(key), t.get(key)
        if a is None or b is None:
            continue
        print(f"{label:32}{fmt.format(a):>10}{fmt.format(b):>10}{a / b:>8.2f}")
    print("load average per round: " + ", ".join(f"{a:.2f}->{b:.2f}" for a, b in loads))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
