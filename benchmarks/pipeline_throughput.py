"""Throughput of the training input pipeline (decode, resize+flip+rotate, normalise, batch).

    python benchmarks/pipeline_throughput.py [--root /path/to/MURA-v1.1] [--image_size 320]
        [--batch_size 16] [--batches 40] [--num_workers 0] [--resize stretch]

Without --root it generates synthetic MURA (120 studies) in a temporary folder. It reports
images/s of wall time and, for the in-process pipeline (--num_workers 0, no prefetch thread),
images per CPU-second of this process: on a shared machine the CPU figure is what one worker
sustains, the wall figure depends on what else runs. With --num_workers N it reports the wall
rate divided by N (per worker).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import ml_collections  # noqa: E402

from murajax import synthetic  # noqa: E402
from murajax.data import mura, pipeline  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="", help="MURA-v1.1 folder (default: synthetic)")
    parser.add_argument("--studies", type=int, default=120)
    parser.add_argument("--image_size", type=int, default=320)
    parser.add_argument("--resize", default="stretch")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--prefetch", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or synthetic.generate(tmp, num_studies=args.studies, seed=0)
        index = mura.read_split(root, "train")
        config = ml_collections.ConfigDict({
            "image_size": args.image_size, "resize": args.resize, "hflip": True,
            "rotation_degrees": 30.0, "on_bad_image": "error", "num_workers": args.num_workers,
            "prefetch": args.prefetch,
        })
        steps = pipeline.steps_per_epoch(len(index.images), args.batch_size)
        batches = min(args.batches, steps)
        print(f"{len(index.images)} images from {root}; {args.image_size}x{args.image_size} "
              f"{args.resize}, batch {args.batch_size}, {batches} batches, "
              f"num_workers={args.num_workers}, prefetch={args.prefetch}, "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
        best_wall = best_cpu = 0.0
        for repeat in range(args.repeats):
            loader = pipeline.train_loader(index, config, global_batch_size=args.batch_size,
                                           seed=0, epoch=repeat)
            next(loader)  # start-up (worker processes) is not throughput
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(batches - 1):
                next(loader)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            loader.close()
            n = (batches - 1) * args.batch_size
            rate = n / wall
            per_worker = rate / max(1, args.num_workers)
            line = f"  run {repeat}: {rate:7.1f} images/s wall, {per_worker:7.1f} per worker"
            if args.num_workers == 0:
                cpu_rate = n / cpu
                best_cpu = max(best_cpu, cpu_rate)
                line += f", {cpu_rate:7.1f} images per CPU-second"
            best_wall = max(best_wall, per_worker)
            print(line, flush=True)
        print(f"best: {best_wall:.1f} images/s per worker (wall)"
              + (f", {best_cpu:.1f} images per CPU-second" if args.num_workers == 0 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
