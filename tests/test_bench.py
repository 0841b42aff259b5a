"""murajax.bench on the tiny model: the measurements run and the JSON is complete and sane.

Not a timing test: nothing here asserts a speed, only that every figure is there, finite and
consistent with the others.
"""

import json
import math

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
