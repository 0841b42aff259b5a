"""murajax.bench on the tiny model: the measurements run and the JSON is complete and sane.

Not a timing test: nothing here asserts a speed, only that every figure is there, finite and
consistent with the others.
"""

import json
import math
import pathlib

import jax
import pytest

from murajax import bench

REQUIRED = (
    "train_images_per_s", "eval_images_per_s", "compile_s", "peak_rss_mb", "flops_per_image",
    "achieved_gflops", "matmul_peak_gflops", "mfu", "pipeline_images_per_s",
)


@pytest.fixture(scope="module")
def tiny_result():
    return bench.run(model="densenet_tiny", batch_size=8, image_size=32, steps=2, warmup=1,
                     pipeline=True, pipeline_studies=16, pipeline_batches=3, matmul_n=256,
                     log=lambda message: None)


def _positive(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_result_has_every_figure_and_they_are_positive(tiny_result):
    for key in REQUIRED:
        assert _positive(tiny_result.get(key)), (key, tiny_result.get(key))
    assert tiny_result["model"] == "densenet_tiny"
    assert tiny_result["batch_size"] == 8 and tiny_result["image_size"] == 32


def test_figures_are_consistent(tiny_result):
    r = tiny_result
    assert r["train_images_per_s"] == pytest.approx(8 / r["train_step_s"])
    assert r["train_step_s_min"] <= r["train_step_s"] <= r["train_step_s_max"]
    assert r["compile_s"] == pytest.approx(r["train_lower_s"] + r["train_xla_compile_s"])
    assert r["achieved_gflops"] == pytest.approx(
        r["flops_per_image"] * r["train_images_per_s"] / 1e9)
    assert r["mfu"] == pytest.approx(r["achieved_gflops"] / r["matmul_peak_gflops"])
    # A training step costs more than a forward pass (about 3x: forward, two backward products).
    assert r["flops_per_image"] > 1.5 * r["eval_flops_per_image"]
    assert r["peak_rss_mb"] >= (r["step_peak_rss_mb"] or 0)
    assert r["xla_temp_mb"] > 0


def test_main_writes_the_json_and_prints_a_table(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "matmul_peak_gflops", lambda n=None, repeats=8: 100.0)
    out = tmp_path / "bench.json"
    assert bench.main(["--model", "densenet_tiny", "--image-size", "32", "--steps", "1",
                       "--warmup", "0", "--no-pipeline", "--no-eval", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert _positive(result["train_images_per_s"]) and "eval_images_per_s" not in result
    assert "pipeline_images_per_s" not in result
    table = capsys.readouterr().out
    assert "train images/s" in table and "densenet_tiny" in table


def test_conv_impl_flag_reaches_the_model(tmp_path):
    out = tmp_path / "xla.json"
    assert bench.main(["--model", "densenet_tiny", "--image-size", "32", "--steps", "1",
                       "--warmup", "0", "--no-pipeline", "--no-eval", "--conv-impl", "xla",
                       "--json", str(out)]) == 0
    assert json.loads(out.read_text())["conv_impl"] == "xla"
    # The matmul formulation has no convolution in its 1x1 layers; XLA's has one per layer.
    convolutions = {}
    for impl in ("xla", "matmul"):
        session = bench.StepBench("densenet_tiny", 8, 32, conv_impl=impl, log=lambda m: None)
        lowered = session.strategy.train_step.lower(session.state, session.batch)
        convolutions[impl] = lowered.as_text().count("convolution")
    assert convolutions["matmul"] < convolutions["xla"], convolutions


def test_the_strategys_compile_keeps_remat_barriers():
    """The real strategy compiles with ``parallel.xla_compiler_options()``: jax.checkpoint's
    barriers survive into the compiled step (XLA:CPU otherwise strips them, and remat then saves
    nothing; tests/test_models.py measures the memory)."""
    barriers = {}
    for policy in ("none", "bottleneck"):
        session = bench.StepBench("densenet_tiny", 8, 32, remat=policy, log=lambda m: None)
        session.compile_train()
        barriers[policy] = session.train.as_text().count("opt-barrier")
    assert barriers["none"] == 0 and barriers["bottleneck"] > 0, barriers


def test_bad_arguments_are_user_errors(capsys):
    assert bench.main(["--model", "densenet_tiny", "--image-size", "32", "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err
    # The batch must split evenly over the devices (the tests run with 4 CPU devices).
    if jax.device_count() > 1:
        assert bench.main(["--model", "densenet_tiny", "--image-size", "32",
                           "--batch-size", str(jax.device_count() + 1)]) == 2


def test_compiler_options_keep_passes_the_user_disabled(monkeypatch):
    from murajax import parallel

    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4 "
                                    "--xla_disable_hlo_passes=algsimp,cse_barrier_expander")
    assert parallel.xla_compiler_options() == {
        "xla_disable_hlo_passes": "algsimp,cse_barrier_expander"}
    monkeypatch.setenv("XLA_FLAGS", "")
    assert parallel.xla_compiler_options() == {"xla_disable_hlo_passes": "cse_barrier_expander"}


# ------------------------------------------------------------------------------------------
# --pipeline-only: the input pipeline alone, the process-tree CPU accounting, the input stall.


@pytest.fixture(scope="module")
def mura_root(tmp_path_factory):
    from murajax import synthetic

    return synthetic.generate(tmp_path_factory.mktemp("pipeline"), num_studies=16, seed=0)


def _pipeline_args(root, out, *extra):
    return ["--pipeline-only", "--data-root", str(root), "--image-size", "32", "--batch-size",
            "8", "--batches", "2", "--warmup", "1", "--json", str(out), *extra]


def test_pipeline_only_reports_throughput_per_wall_and_cpu_second(mura_root, tmp_path,
                                                                    capsys):
    out = tmp_path / "pipeline.json"
    assert bench.main(_pipeline_args(mura_root, out)) == 0
    r = json.loads(out.read_text())
    for key in ("pipeline_images_per_s", "pipeline_images_per_cpu_s", "pipeline_wall_s",
                "pipeline_cpu_s"):
        assert _positive(r[key]), (key, r[key])
    assert r["pipeline_source"] == "png" and r["num_workers"] == 0 and r["batch_size"] == 8
    assert r["pipeline_batches"] == 2 and r["pipeline_image_dtype"] == "uint8"
    assert r["pipeline_images_per_s"] == pytest.approx(16 / r["pipeline_wall_s"])
    assert r["pipeline_images_per_cpu_s"] == pytest.approx(16 / r["pipeline_cpu_s"])
    assert "train_images_per_s" not in r  # no step compiled
    assert "images per CPU-second" in capsys.readouterr().out


def test_pipeline_only_times_batches_beyond_one_epoch_in_the_next_epochs(mura_root, tmp_path):
    from murajax.data import mura, pipeline

    per_epoch = pipeline.steps_per_epoch(len(mura.read_split(mura_root, "train").images), 8)
    out = tmp_path / "pipeline.json"
    batches = 2 * per_epoch + 1  # after one warm-up batch: into a third epoch
    assert bench.main(_pipeline_args(mura_root, out, "--batches", str(batches))) == 0
    r = json.loads(out.read_text())
    assert r["pipeline_batches"] == batches and r["pipeline_epochs"] == 3
    assert r["pipeline_images_per_cpu_s"] == pytest.approx(8 * batches / r["pipeline_cpu_s"])


def test_pipeline_only_input_stall(mura_root, tmp_path):
    out = tmp_path / "stall.json"
    assert bench.main(_pipeline_args(mura_root, out, "--stall", "--stall-steps", "2")) == 0
    r = json.loads(out.read_text())
    assert r["stall_model"] == "densenet_tiny" and r["stall_steps"] == 2
    for key in ("stall_fixed_batch_step_s", "stall_step_s", "stall_input_wait_s"):
        assert _positive(r[key]), (key, r[key])
    assert r["input_wait_fraction"] == pytest.approx(r["stall_input_wait_s"] / r["stall_step_s"])
    assert 0 < r["input_wait_fraction"] < 1
    assert r["input_stall_fraction"] == pytest.approx(
        1 - r["stall_fixed_batch_step_s"] / r["stall_step_s"])


def test_pipeline_only_refuses_impossible_requests(mura_root, tmp_path, capsys):
    out = tmp_path / "x.json"
    assert bench.main(["--pipeline-only", "--cache", str(tmp_path)]) == 2
    assert "--data-root" in capsys.readouterr().err
    assert bench.main(_pipeline_args(mura_root, out, "--warmup", "1000")) == 2
    assert "--warmup" in capsys.readouterr().err and not out.exists()
    if jax.device_count() > 1:  # the step shards the batch: refused before any timing
        assert bench.main(_pipeline_args(mura_root, out, "--stall", "--batch-size",
                                         str(jax.device_count() + 1))) == 2
        assert "--batch-size" in capsys.readouterr().err and not out.exists()


def test_tree_cpu_time_counts_a_child_process_once_alive_and_once_reaped():
    import subprocess
    import sys

    from murajax import cpu_time

    burn = 0.4  # CPU seconds the child spends; the clock ticks are 10 ms
    child_code = ("import sys, time\nwhile time.process_time() < %r: pass\n"
                  "print('done', flush=True)\nsys.stdin.read()\n" % burn)
    before = cpu_time.tree_seconds()
    child = subprocess.Popen([sys.executable, "-c", child_code], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "done"
    alive = cpu_time.tree_seconds() - before  # the child still runs
    child.stdin.close()
    child.wait()
    reaped = cpu_time.tree_seconds() - before  # now in this process's children entry
    child.stdout.close()
    assert alive >= burn - 0.02, alive
    assert reaped >= burn - 0.02 and abs(reaped - alive) < 0.2, (alive, reaped)


def _torch_pipeline():
    import importlib.util

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "torch_pipeline.py"
    spec = importlib.util.spec_from_file_location("torch_pipeline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_torch_side_reads_the_images_murajax_trains_on(mura_root):
    from murajax.data import mura

    index = mura.read_split(mura_root, "train")
    listed = _torch_pipeline().train_images(mura_root)
    assert [path for path, _ in listed] == [str(r.path) for r in index.images]
    assert [label for _, label in listed] == [r.label for r in index.images]


def test_side_by_side_ratios_are_per_round_medians():
    tp = _torch_pipeline()

    def figures(cpu):
        return {"pipeline_images_per_cpu_s": cpu, "pipeline_images_per_s": cpu / 2}

    rounds = [{"murajax PNG": figures(300.0), "murajax cache, augment on device": figures(6e3),
               "torchvision": figures(200.0)},
              {"murajax PNG": figures(200.0), "murajax cache, augment on device": figures(5e3),
               "torchvision": figures(100.0)},
              {"murajax PNG": figures(240.0), "murajax cache, augment on device": figures(7e3),
               "torchvision": figures(160.0)}]
    summary = tp.summarise(rounds)
    assert summary["kinds"]["murajax PNG"]["pipeline_images_per_cpu_s"] == 240.0
    png_torch = summary["ratios"]["murajax PNG / torchvision"]
    assert png_torch == {"median": 1.5, "min": 1.5, "max": 2.0}
    cache_png = summary["ratios"]["murajax cache, augment on device / murajax PNG"]
    assert cache_png["median"] == pytest.approx(25.0) and cache_png["max"] == pytest.approx(
        7e3 / 240)


def test_the_cache_on_the_device_can_be_timed_over_more_batches_than_the_rest():
    import argparse

    tp = _torch_pipeline()
    args = argparse.Namespace(murajax_python="py", torch_python="tpy", image_size=32,
                              batch_size=8, num_workers=0, batches=5, cache_batches=50,
                              warmup=1, torch_threads=1, grey=True)
    kinds = tp.runs(args, pathlib.Path("/data/MURA-v1.1"), "/data/cache")

    def batches(command):
        return int(command[command.index("--batches") + 1])

    on_device = ("murajax cache, augment on device", "murajax cache, grey, augment on device")
    assert [batches(kinds[k]) for k in on_device] == [50, 50]
    assert {batches(c) for k, c in kinds.items() if k not in on_device} == {5}
    assert all("--cache" in kinds[k] for k in on_device)
    # --grey: the PNG path and the cache once more with config.data.colour='grey'.
    greys = [k for k, c in kinds.items() if c[-2:] == ["--colour", "grey"]]
    assert greys == ["murajax PNG, grey", "murajax cache, grey, augment on device"]
    args.grey = False
    assert not any("grey" in k for k in tp.runs(args, pathlib.Path("/r"), "/c"))
    args.cache_batches = None
    assert batches(tp.runs(args, pathlib.Path("/r"), "/c")["murajax cache, augment on device"]) \
        == 5
