"""Does batch 256 with configs/accelerator.py's rule learn as well as the paper's batch 8?

    python benchmarks/large_batch.py [--studies 1000] [--epochs 8] [--seeds 0,1,2]
        [--image_size 64] [--out /tmp/large_batch] [--json out.json]

Trains the tiny DenseNet (``densenet_tiny``) on one synthetic MURA set, 3 seeds each, with
* ``paper``: configs/default.py's optimizer (batch 8, Adam 1e-4, plateau x0.1, patience 0);
* ``accelerator``: configs/accelerator.py's batch and optimizer (batch 256, Adam
  1e-4 * sqrt(256 / 8), linear warm-up over the first epoch, the same plateau rule), in float32
  and with CPU settings (its bfloat16 compute and 16 loader workers are for accelerators);
* ``linear`` (not run unless named in ``--configs``): the rule accelerator.py had before, Adam's
  rate scaled linearly (1e-4 * 256 / 8 = 3.2e-3) with no warm-up;
and reports each run's final validation study-level AUROC (and the best epoch's) per config,
with the seed-to-seed range. The same epochs for both: batch 256 takes 32x fewer steps.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from murajax import synthetic, train  # noqa: E402
from murajax.configs import accelerator, default  # noqa: E402


def make_config(name: str, root: str, seed: int, args):
    config = (default if name == "paper" else accelerator).get_config()
    if name == "linear":
        config.optim.learning_rate = 1e-4 * config.batch_size / 8
        config.optim.warmup_epochs = 0.0
    config.model.name = "densenet_tiny"
    config.model.dtype = "float32"
    config.model.remat = "auto"
    config.data.root = root
    config.data.synthetic_studies = 0
    config.data.image_size = args.image_size
    config.data.num_workers = 0
    config.data.prefetch = 2
    config.eval_batch_size = 64
    config.num_epochs = args.epochs
    config.seed = seed
    config.keep_best = 1
    config.checkpoint_every_steps = 10**6  # epoch-end checkpoints only
    config.log_every_steps = 50 if name == "paper" else 4
    return config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--configs", default="paper,accelerator")
    parser.add_argument("--out", default="/tmp/large_batch")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    root = out / "data" / "MURA-v1.1"
    if not (root / "valid_labeled_studies.csv").is_file():
        synthetic.generate(out / "data", num_studies=args.studies, seed=1234)

    results = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        for name in args.configs.split(","):  # in turns: contention hits both alike
            config = make_config(name, str(root), seed, args)
            workdir = out / "runs" / f"{name}_seed{seed}"
            start = time.perf_counter()
            summary = train.train_and_evaluate(config, workdir)
            history = summary["history"]
            run = {"seed": seed, "final_auroc": history[-1]["auroc"],
                   "best_auroc": max(r["auroc"] for r in history),
                   "final_val_loss": history[-1]["val_loss"], "steps": history[-1]["step"],
                   "final_lr": history[-1]["learning_rate"],
                   "aurocs": [r["auroc"] for r in history],
                   "wall_s": time.perf_counter() - start}
            results.setdefault(name, []).append(run)
            print(f"{name:12s} seed {seed}: final AUROC {run['final_auroc']:.4f}  best "
                  f"{run['best_auroc']:.4f}  val loss {run['final_val_loss']:.4f}  "
                  f"{run['steps']} steps  {run['wall_s']:.0f} s", flush=True)

    print("\nconfig        batch  lr        warm-up   steps  final AUROC (min..max)   mean")
    for name, runs in results.items():
        config = make_config(name, str(root), 0, args)
        finals = [r["final_auroc"] for r in runs]
        print(f"{name:12s} {config.batch_size:5d}  {config.optim.learning_rate:.2e}  "
              f"{config.optim.warmup_epochs:4.1f} ep  {runs[0]['steps']:5d}  "
              f"{min(finals):.4f}..{max(finals):.4f}  {sum(finals) / len(finals):.4f}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"args": vars(args), "results": results},
                                                      indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
