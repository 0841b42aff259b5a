"""The training loop's own overhead: steps/s with the input pipeline replaced by one fixed batch.

    python benchmarks/loop_overhead.py [--image_size 32] [--batch_size 8] [--steps 300]
        [--repeats 3] [--modes bare,synced,loop] [--json out.json]

Three ways of running the same jitted ``train_step`` on the same batch, in turns:

* ``bare``: ``train_step`` in a Python loop, nothing read back until the end (the floor);
* ``synced``: the same, plus a host read of the previous step's loss at every step (what
  ``train.py`` did before it stopped syncing per step: at most one step queued ahead);
* ``loop``: ``train._Training.train_epoch``, the real loop (metrics window, logging every
  ``--log_every`` steps, stop checks), with ``pipeline.train_loader`` replaced by the batch;
* ``loop_baseline`` (with ``--baseline_train FILE``): the same with another version of
  ``murajax/train.py``, e.g. ``git show 16c1a69:murajax/train.py > /tmp/train_old.py`` (the
  per-step host read), measured in the same process, in turns.

Each figure is the median over ``--repeats`` of ``--steps`` steps after a warm-up (compile);
on a shared machine the ratio to ``bare`` of the same round (runs seconds apart) is the steadier
figure, also reported as a median.
The tiny DenseNet (``densenet_tiny``) on CPU; a small synthetic set gives the batch and the
loss weights.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import pathlib
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from murajax import (checkpoints, optim, parallel, synthetic, tasks, train,  # noqa: E402
                     train_state, writers)
from murajax.configs import smoke  # noqa: E402
from murajax.data import pipeline  # noqa: E402


class _FixedLoader:
    """``steps`` copies of one batch, with the iterator interface the loop uses."""

    def __init__(self, batch: dict, steps: int):
        self.batch, self.steps = batch, steps

    def __iter__(self):
        return (self.batch for _ in range(self.steps))

    def get_state(self) -> dict:
        return {}

    def set_state(self, state: dict) -> None:
        del state


def _config(root: str, args):
    config = smoke.get_config()
    config.data.root = root
    config.data.synthetic_studies = 0
    config.data.image_size = args.image_size
    config.batch_size = args.batch_size
    config.log_every_steps = args.log_every
    config.checkpoint_every_steps = 10**9  # no saves while timing
    return config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--log_every", type=int, default=100)
    parser.add_argument("--modes", default="bare,synced,loop")
    parser.add_argument("--baseline_train", default="", help="another murajax/train.py")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    baseline = None
    if args.baseline_train:
        spec = importlib.util.spec_from_file_location("baseline_train", args.baseline_train)
        baseline = sys.modules["baseline_train"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(baseline)
        modes.append("loop_baseline")

    with tempfile.TemporaryDirectory() as tmp:
        root = str(synthetic.generate(pathlib.Path(tmp) / "data", num_studies=20, seed=0))
        config = _config(root, args)
        task = tasks.from_config(config)
        index = task.read_split(config.data, "train")
        batch = next(iter(pipeline.train_loader(
            index, config.data, global_batch_size=config.batch_size, seed=0, epoch=0)))
        strategy = parallel.create_strategy(config.parallelism, config.batch_size,
                                            config.eval_batch_size)
        model = train_state.model_from_config(config, bn_axis_name=strategy.bn_axis_name)
        tx = optim.create_optimizer(config.optim)
        init = functools.partial(train_state.create_train_state, jax.random.key(0), model, tx,
                                 config.data.image_size, task.loss_weights(index))
        workdir = pathlib.Path(tmp) / "run"
        workdir.mkdir()
        checkpointer = checkpoints.Checkpointer(workdir, keep_best=1)
        writer = writers.MetricWriter(workdir)
        pipeline.train_loader = lambda *a, **k: _FixedLoader(batch, args.steps)

        def bare(state, synced: bool):
            previous = None
            for _ in range(args.steps):
                state, metrics = strategy.train_step(state, strategy.shard_batch(batch))
                if synced and previous is not None:
                    float(previous.loss.compute())
                previous = metrics
            return state

        def loop(state, module=train):
            run = module._Training(config, task, strategy, checkpointer, writer, state,
                                   steps_per_epoch=args.steps)
            with module._StopRequest() as stop:
                run.train_epoch(0, index, {}, module.RunProgress(), stop)
            return run.state

        runners = {"bare": lambda s: bare(s, False), "synced": lambda s: bare(s, True),
                   "loop": loop, "loop_baseline": lambda s: loop(s, baseline)}
        results = {mode: [] for mode in modes}
        for repeat in range(args.repeats + 1):  # the first round warms up (compiles)
            for mode in modes:
                state = strategy.init_state(init)
                jax.block_until_ready(state)
                start = time.perf_counter()
                state = runners[mode](state)
                jax.block_until_ready(state)
                elapsed = time.perf_counter() - start
                if repeat:
                    results[mode].append(args.steps / elapsed)
        checkpointer.close()
        writer.close()

    summary = {mode: {"steps_per_s_median": statistics.median(v), "steps_per_s": v}
               for mode, v in results.items()}
    if "bare" in results:
        for mode, item in summary.items():
            item["vs_bare_median"] = statistics.median(
                x / b for x, b in zip(results[mode], results["bare"]))
    for mode, item in summary.items():
        runs = ", ".join(f"{x:.1f}" for x in item["steps_per_s"])
        ratio = f"  {item['vs_bare_median']:.2f}x bare" if "vs_bare_median" in item else ""
        print(f"{mode:13s} {item['steps_per_s_median']:8.1f} steps/s{ratio}  (runs: {runs})")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(
            {"args": vars(args), "devices": str(jax.devices()), "results": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
