"""The input pipeline side by side: murajax's PNG path, its image cache, and torchvision.

    python benchmarks/torch_pipeline.py --torch-python /tmp/torchvenv/bin/python \
        [--data-root MURA-v1.1] [--cache DIR | --build-cache] [--image-size 320] \
        [--batch-size 16] [--num-workers 0] [--batches 25] [--cache-batches N] [--warmup 3] \
        [--rounds 3] [--grey] [--json out.json]

The driver (run it with murajax's Python) runs, in alternating rounds in one session (ABC,
then CBA, ...), ``python -m murajax.bench --pipeline-only`` on the PNG files, on the cache
(``--cache``, or ``--build-cache`` into a temporary folder), each once with the flips and
rotations on the host and once with ``augment_on='device'`` (the host hands over uint8 pixels,
decoded and resized for PNGs, read for the cache; the train step flips, rotates and normalises),
with ``--grey`` also the PNG path (host augmentation) and the cache (device augmentation)
with ``config.data.colour='grey'`` (one-plane batches),
and this file's ``--torch-worker`` mode under ``--torch-python``: what a PyTorch user writes,
``PIL`` ``.convert('RGB')``, torchvision ``Resize((S, S))``, ``RandomHorizontalFlip()``,
``RandomRotation(30)``, ``ToTensor()``, ``Normalize(ImageNet)`` in a ``DataLoader`` with the same
batch size and number of workers, over the same train images in the same order (murajax's
epoch-0 permutation), with one torch thread (``--torch-threads``). Every figure is images per
CPU-second of the whole process tree, workers included (``murajax.cpu_time``), and images/s of
wall time, over ``--batches`` batches after ``--warmup``; the table gives each one's median
over the rounds and the per-round ratios' medians. Without ``--data-root`` it writes synthetic
MURA (``--studies``) first.

PyTorch is needed only in the ``--torch-python`` venv (``pip install torch torchvision``);
murajax never imports it, and the torch worker imports nothing of murajax but ``cpu_time``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------------------
# The PyTorch side (runs in the torch venv).


def train_images(root: pathlib.Path) -> list[tuple[str, int]]:
    """(path, label) of ``train_image_paths.csv``'s rows in file order, as murajax lists them
    (the study folder's ``_positive`` suffix is the label)."""
    out = []
    with open(root / "train_image_paths.csv", newline="") as f:
        for row in csv.reader(f):
            if not row or not row[0].strip():
                continue
            rel = pathlib.PurePosixPath(row[0].strip())
            parts = rel.parts[1:] if rel.parts[0] == root.name else rel.parts
            out.append((str(root.joinpath(*parts)), int("_positive" in rel.parent.name)))
    return out


def torch_worker(args) -> dict:
    import numpy as np
    import torch
    import torchvision
    from PIL import Image
    from torchvision import transforms

    sys.path.insert(0, str(REPO))
    from murajax import cpu_time

    if args.torch_threads > 0:  # DataLoader's workers run with 1; see --torch-threads
        torch.set_num_threads(args.torch_threads)
    root = pathlib.Path(args.data_root)
    items = train_images(root)
    size = args.image_size
    transform = transforms.Compose([
        transforms.Resize((size, size)),
        transforms.RandomHorizontalFlip(),
        transforms.RandomRotation(30),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])

    class Radiographs(torch.utils.data.Dataset):
        def __len__(self):
            return len(items)

        def __getitem__(self, i):
            path, label = items[i]
            with Image.open(path) as image:
                return transform(image.convert("RGB")), label

    # murajax's epoch 0 order for seed 0 (data.pipeline.epoch_plan): the same images.
    order = np.random.default_rng([0, 0, 0]).permutation(len(items)).tolist()
    needed = (args.warmup + args.batches) * args.batch_size
    if needed > len(order):
        raise SystemExit(f"error: {needed} images needed, the train split has {len(order)}")
    loader = torch.utils.data.DataLoader(Radiographs(), batch_size=args.batch_size,
                                         sampler=order, num_workers=args.num_workers,
                                         drop_last=True)
    it = iter(loader)
    for _ in range(args.warmup):
        next(it)
    watch = cpu_time.Stopwatch()
    for _ in range(args.batches):
        images, _ = next(it)
    wall, cpu = watch.read()
    del it
    n = args.batches * args.batch_size
    return {"pipeline_source": "torchvision", "pipeline_images_per_s": n / wall,
            "pipeline_images_per_cpu_s": n / cpu, "pipeline_wall_s": wall,
            "pipeline_cpu_s": cpu, "pipeline_batches": args.batches,
            "pipeline_image_dtype": str(images.dtype), "image_shape": list(images.shape),
            "torch": torch.__version__, "torchvision": torchvision.__version__,
            "torch_threads": torch.get_num_threads(), "cpu_accounting": cpu_time.METHOD,
            "num_workers": args.num_workers, "batch_size": args.batch_size,
            "image_size": size, "load_average_end": os.getloadavg()[0]}


# ------------------------------------------------------------------------------------------
# The driver.


def _run_json(command: list[str], out: pathlib.Path) -> dict:
    done = subprocess.run(command + ["--json", str(out)], capture_output=True, text=True,
                          cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(command)}\n{done.stderr}")
    return json.loads(out.read_text())


def _common(args, batches: int | None = None) -> list[str]:
    return ["--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
            "--num-workers", str(args.num_workers),
            "--batches", str(args.batches if batches is None else batches),
            "--warmup", str(args.warmup)]


def runs(args, root: pathlib.Path, cache: str) -> dict[str, list[str]]:
    bench = [args.murajax_python, "-m", "murajax.bench", "--pipeline-only",
             "--data-root", str(root)] + _common(args)
    kinds = {"murajax PNG": bench + ["--augment-on", "host"],
             "murajax PNG, augment on device": bench + ["--augment-on", "device"]}
    if cache:
        cached = [args.murajax_python, "-m", "murajax.bench", "--pipeline-only",
                  "--data-root", str(root), "--cache", cache] + _common(args, args.cache_batches)
        kinds["murajax cache, augment on host"] = bench + ["--cache", cache,
                                                           "--augment-on", "host"]
        kinds["murajax cache, augment on device"] = cached + ["--augment-on", "device"]
    if args.grey:
        kinds["murajax PNG, grey"] = bench + ["--augment-on", "host", "--colour", "grey"]
        if cache:
            kinds["murajax cache, grey, augment on device"] = cached + [
                "--augment-on", "device", "--colour", "grey"]
    kinds["torchvision"] = [args.torch_python, str(pathlib.Path(__file__).resolve()),
                            "--torch-worker", "--data-root", str(root),
                            "--torch-threads", str(args.torch_threads)] + _common(args)
    return kinds


def summarise(rounds: list[dict[str, dict]]) -> dict:
    kinds = list(rounds[0])
    out = {"kinds": {}, "ratios": {}}
    for kind in kinds:
        out["kinds"][kind] = {key: statistics.median(r[kind][key] for r in rounds)
                              for key in ("pipeline_images_per_cpu_s", "pipeline_images_per_s")}
    pairs = [("murajax PNG", "torchvision")]
    pairs += [(k, "torchvision") for k in kinds if k == "murajax PNG, augment on device"]
    pairs += [(k, "murajax PNG") for k in kinds if k.startswith("murajax cache")]
    pairs += [(k, "torchvision") for k in kinds if k.startswith("murajax cache")]
    pairs += [(k, "murajax PNG, grey") for k in kinds if k.startswith("murajax cache, grey")]
    for a, b in pairs:
        per_round = [r[a]["pipeline_images_per_cpu_s"] / r[b]["pipeline_images_per_cpu_s"]
                     for r in rounds]
        out["ratios"][f"{a} / {b}"] = {"median": statistics.median(per_round),
                                       "min": min(per_round), "max": max(per_round)}
    return out


def format_summary(summary: dict, rounds: int, args) -> str:
    lines = [f"{args.image_size}px, batch {args.batch_size}, {args.num_workers} worker(s), "
             f"{args.batches} batches after {args.warmup} (the cache on the device: "
             f"{args.cache_batches or args.batches}), median of {rounds} alternating rounds",
             f"{'':36}{'images/CPU-s':>14}{'images/s wall':>15}"]
    for kind, figures in summary["kinds"].items():
        lines.append(f"{kind:<36}{figures['pipeline_images_per_cpu_s']:>14.1f}"
                     f"{figures['pipeline_images_per_s']:>15.1f}")
    lines.append("ratios of images per CPU-second (median [min, max] over rounds)")
    for pair, r in summary["ratios"].items():
        lines.append(f"  {pair:<58}{r['median']:>7.2f} [{r['min']:.2f}, {r['max']:.2f}]")
    return "\n".join(lines)


def driver(args) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        if args.data_root:
            root = pathlib.Path(args.data_root).expanduser().absolute()
        else:
            print(f"writing {args.studies} synthetic studies", file=sys.stderr, flush=True)
            root = pathlib.Path(subprocess.run(
                [args.murajax_python, "-c", "import sys; from murajax import synthetic; "
                 f"print(synthetic.generate(sys.argv[1], num_studies={args.studies}))",
                 str(tmp / "data")], check=True, capture_output=True, text=True,
                cwd=REPO).stdout.strip().splitlines()[-1])
        cache = args.cache
        if args.build_cache and not cache:
            cache = str(tmp / "cache")
            print("building the image cache", file=sys.stderr, flush=True)
            subprocess.run([args.murajax_python, "-m", "murajax.data.cache", "build",
                            "--root", str(root), "--out", cache,
                            "--image_size", str(args.image_size)], check=True, cwd=REPO,
                           stdout=subprocess.DEVNULL)
        kinds = runs(args, root, cache)
        rounds = []
        for r in range(args.rounds):
            order = list(kinds) if r % 2 == 0 else list(reversed(kinds))
            results = {}
            for kind in order:
                results[kind] = _run_json(kinds[kind], tmp / "run.json")
                if not results[kind]["pipeline_images_per_cpu_s"]:
                    raise SystemExit(f"{kind}: no CPU time measured (clock ticks are 10 ms): "
                                     "raise --batches")
                print(f"round {r}: {kind:<34} "
                      f"{results[kind]['pipeline_images_per_cpu_s']:8.1f} images/CPU-s "
                      f"{results[kind]['pipeline_images_per_s']:8.1f} images/s",
                      file=sys.stderr, flush=True)
            rounds.append(results)
        summary = summarise(rounds)
        print(format_summary(summary, len(rounds), args), flush=True)
        if args.json:
            path = pathlib.Path(args.json)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({
                "settings": {k: v for k, v in vars(args).items() if k != "json"},
                "data_root": str(root) if args.data_root else "synthetic",
                "load_average": os.getloadavg()[0], "summary": summary, "rounds": rounds,
            }, indent=2, sort_keys=True) + "\n")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch-worker", action="store_true",
                        help="run only torchvision's pipeline (in the torch venv)")
    parser.add_argument("--torch-python", default=sys.executable,
                        help="the Python of a venv with torch and torchvision")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch.set_num_threads in the loading process (0: torch's "
                        "default, one per core: with num_workers=0 its idle OpenMP threads "
                        "spin, about 8x the CPU on this 2-core machine; workers use 1)")
    parser.add_argument("--murajax-python", default=sys.executable,
                        help="the Python of murajax's venv")
    parser.add_argument("--data-root", default="",
                        help="MURA-v1.1 folder (default: --studies synthetic studies)")
    parser.add_argument("--studies", type=int, default=200)
    parser.add_argument("--cache", default="", help="an image cache built from --data-root")
    parser.add_argument("--build-cache", action="store_true",
                        help="build one in a temporary folder first")
    parser.add_argument("--image-size", type=int, default=320)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--batches", type=int, default=25)
    parser.add_argument("--cache-batches", type=int, default=None,
                        help="batches for the cache with augmentation on the device (default "
                        "--batches; may exceed an epoch, read on into the next: it reads a "
                        "small split's epoch in a fraction of a second)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--grey", action="store_true",
                        help="also time the PNG path and the cache with "
                        "config.data.colour='grey' (one-plane batches)")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    if args.torch_worker:
        result = torch_worker(args)
        if args.json:
            pathlib.Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        else:
            print(json.dumps(result, indent=2))
        return 0
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())
