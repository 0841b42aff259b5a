"""Two JAX processes (CPU, gloo collectives, 127.0.0.1) train exactly like one process.

Each process has 2 CPU devices; the single-process reference has 4. Both see the same global
batches (the loader gives process p the p-th slice of every global batch), so the runs differ
only in how float32 sums are split across devices.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from configs import smoke
from murajax import checkpoints, synthetic
from tests import helpers

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(workdir, root, devices, extra=(), env_extra=None):
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "MURAJAX_COMPILATION_CACHE": os.environ.get(
               "MURAJAX_TEST_CACHE", "/tmp/murajax-test-xla"), **(env_extra or {})}
    args = [sys.executable, str(REPO / "launch.py"), "--config", str(REPO / "configs/smoke.py"),
            f"--workdir={workdir}", f"--config.data.root={root}", "--config.data.image_size=32",
            "--config.batch_size=8", "--config.eval_batch_size=8", "--config.num_epochs=1",
            "--config.checkpoint_every_steps=1000",
            f"--config.optim.eps={helpers.LAYOUT_TEST_EPS}", *extra]
    return subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(proc, timeout=600):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    root = synthetic.generate(tmp_path / "data", num_studies=30, seed=5)
    single = tmp_path / "single"
    _finish(_launch(single, root, devices=4))

    multi = tmp_path / "multi"
    port = _free_port()
    procs = [
        _launch(multi, root, devices=2, extra=[
            "--config.distributed.enabled=True",
            f"--config.distributed.coordinator_address=127.0.0.1:{port}",
            "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"])
        for i in range(2)
    ]
    outputs = [_finish(p) for p in procs]
    assert "process 1/2" in outputs[1] and "4 global devices" in outputs[0]

    step_single = checkpoints.Checkpointer(single, read_only=True).latest_step()
    step_multi = checkpoints.Checkpointer(multi, read_only=True).latest_step()
    assert step_single == step_multi > 0
    a = checkpoints.restore_variables(single, step_single)
    b = checkpoints.restore_variables(multi, step_multi)
    helpers.assert_params_close(b["params"], a["params"],
                                learning_rate=smoke.get_config().optim.learning_rate,
                                num_steps=step_single)
    helpers.assert_batch_stats_close(b["batch_stats"], a["batch_stats"])
    val_single = checkpoints.Checkpointer(single, read_only=True).restore_progress(step_single)
    val_multi = checkpoints.Checkpointer(multi, read_only=True).restore_progress(step_multi)
    # The weights that drift (see assert_params_close) move the loss in its fourth digit.
    assert val_multi["val_loss"] == pytest.approx(val_single["val_loss"], rel=1e-3)
