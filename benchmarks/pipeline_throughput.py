"""Throughput of the training input pipeline (decode, resize+flip+rotate, normalise, batch).

    python benchmarks/pipeline_throughput.py [--root /path/to/MURA-v1.1] [--image_size 320]
        [--batch_size 16] [--batches 40] [--num_workers 0] [--resize stretch] [--repeats 3]

Without --root it generates synthetic MURA (120 studies) in a temporary folder. Each repeat
(a new epoch's loader) reports images/s of wall time, that per worker, and images per
CPU-second of the whole process tree, worker processes included: on a shared machine the CPU
figure is what the pipeline costs, the wall figure depends on what else runs. The timing is
``murajax.bench.time_loader``'s, as ``python -m murajax.bench --pipeline-only`` (one loader,
the cache, JSON) and ``benchmarks/torch_pipeline.py`` (side by side with torchvision) use it.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from murajax import bench  # noqa: E402
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
        root = args.root or bench._synthetic_root(tmp, args.studies)
        index = mura.read_split(root, "train")
        config = bench.pipeline_config(args.image_size, num_workers=args.num_workers,
                                       prefetch=args.prefetch, resize=args.resize,
                                       augment_on="host")
        batches = min(args.batches, pipeline.steps_per_epoch(len(index.images),
                                                             args.batch_size))
        print(f"{len(index.images)} images from {root}; {args.image_size}x{args.image_size} "
              f"{args.resize}, batch {args.batch_size}, {batches} batches, "
              f"num_workers={args.num_workers}, prefetch={args.prefetch}, "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
        best_wall = best_cpu = 0.0
        for repeat in range(args.repeats):
            r = bench.time_loader(index, config, args.batch_size, batches=batches - 1, warmup=1)
            per_worker = r["pipeline_images_per_s"] / max(1, args.num_workers)
            cpu_rate = r["pipeline_images_per_cpu_s"] or 0.0
            best_wall, best_cpu = max(best_wall, per_worker), max(best_cpu, cpu_rate)
            print(f"  run {repeat}: {r['pipeline_images_per_s']:7.1f} images/s wall, "
                  f"{per_worker:7.1f} per worker, {cpu_rate:7.1f} images per CPU-second",
                  flush=True)
        print(f"best: {best_wall:.1f} images/s per worker (wall), {best_cpu:.1f} images per "
              "CPU-second")
    return 0


if __name__ == "__main__":
    sys.exit(main())
