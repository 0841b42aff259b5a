"""Two JAX processes (CPU, gloo collectives, 127.0.0.1) train exactly like one process.

Each process has 2 CPU devices; the single-process reference has 4. Both see the same global
batches (the loader gives process p the p-th slice of every global batch), so the runs differ
only in how float32 sums are split across devices.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import pytest

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
           "MURAJAX_COMPILATION_CACHE": jax.config.jax_compilation_cache_dir,
           **(env_extra or {})}
    args = [sys.executable, str(REPO / "launch.py"), "--config", "smoke",
            f"--workdir={workdir}", f"--config.data.root={root}", "--config.data.image_size=32",
            "--config.batch_size=8", "--config.eval_batch_size=8", "--config.num_epochs=1",
            "--config.checkpoint_every_steps=1000", "--config.log_every_steps=1",
            # Whole runs drift apart faster at higher rates: see test_parallel_runs.py.
            "--config.optim.learning_rate=3e-4", *extra]
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
    # The first step starts from the same params on the same global batch: its loss agrees
    # to rounding only if each process read its own slice of that batch.
    first_single, first_multi = _train_losses(single)[1], _train_losses(multi)[1]
    assert first_multi == pytest.approx(first_single, rel=helpers.ROUNDING)
    val_single = checkpoints.Checkpointer(single, read_only=True).restore_progress(step_single)
    val_multi = checkpoints.Checkpointer(multi, read_only=True).restore_progress(step_multi)
    # Whole runs: Adam amplifies the rounding differences of later steps (test_parallel.py).
    assert val_multi["val_loss"] == pytest.approx(val_single["val_loss"], rel=0.01)


def _train_losses(workdir) -> dict[int, float]:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}
