"""Small builders shared by the tests: a tiny state and random MURA-shaped batches."""

import jax
import numpy as np

from murajax.configs import smoke
from murajax import checkpoints, optim, train_state

IMAGE_SIZE = 32


def assert_same_batch(a, b):
    """Two pipeline batches: the same fields, equal; the images as the steps read them (a grey
    row's planes 1 and 2 are not written: ``pipeline.whole_planes``)."""
    from murajax.data import pipeline

    assert a.keys() == b.keys()
    for key in a:
        if key == "image":
            np.testing.assert_array_equal(pipeline.whole_planes(a), pipeline.whole_planes(b))
        else:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def tiny_config(**overrides):
    config = smoke.get_config()
    config.data.image_size = IMAGE_SIZE
    config.data.num_workers = 0  # 'auto' would start Grain workers on a many-core machine
    for dotted, value in overrides.items():
        section = config
        *parents, leaf = dotted.split(".")
        for parent in parents:
            section = section[parent]
        section[leaf] = value
    return config


def run_config(root, **overrides):
    """``tiny_config`` for a short training run on the MURA-v1.1 folder ``root`` (no synthetic
    data): batch 8, eval batch 16, 2 epochs, the best checkpoint kept; ``overrides`` as in
    ``tiny_config`` (dotted names) on top."""
    return tiny_config(**{"data.root": str(root), "data.synthetic_studies": 0, "batch_size": 8,
                          "eval_batch_size": 16, "num_epochs": 2, "keep_best": 1, **overrides})


def loss_weights():
    rng = np.random.default_rng(1)
    w1 = rng.uniform(0.3, 0.7, size=7)
    return np.stack([1.0 - w1, w1], axis=1).astype(np.float32)  # [type, label]


def tiny_state(config=None, bn_axis_name=None, seed=0):
    config = config or tiny_config()
    model = train_state.model_from_config(config, bn_axis_name=bn_axis_name)
    tx = optim.create_optimizer(config.optim)
    return train_state.create_train_state(
        jax.random.key(seed), model, tx, config.data.image_size, loss_weights()
    )


def random_batch(batch_size, seed=0, image_size=IMAGE_SIZE, masked=()):
    rng = np.random.default_rng(seed)
    mask = np.ones(batch_size, np.float32)
    mask[list(masked)] = 0.0
    return {
        "image": rng.normal(size=(batch_size, image_size, image_size, 3)).astype(np.float32),
        "label": rng.integers(0, 2, batch_size).astype(np.int32),
        "study_type": rng.integers(0, 7, batch_size).astype(np.int32),
        "mask": mask,
        "index": np.arange(batch_size, dtype=np.int32),
    }


# A float32 sum of n terms in another order differs by about sqrt(n) * eps relative to the
# terms' magnitude (n * eps in the worst case). Device layouts (one device, a 4-device mesh,
# pmap, two processes) differ only in how such sums are split. The largest reductions in the
# tiny model are BatchNorm's per-channel sums over batch x height x width (8 x 16 x 16 = 2048
# terms at 32 px: sqrt(n) * eps = 45 eps), and a gradient passes through a forward and a
# backward chain of them. 256 eps (3.1e-5) bounds that with margin. Measured on an AVX-512
# machine with --xla_cpu_max_isa unset, AVX2 and SSE4_2: losses 6-16 eps, gradients 22-27 eps
# (relative global norm), BatchNorm statistics under 7 eps per layer.
ROUNDING = 256 * float(np.finfo(np.float32).eps)


def final_variables(workdir) -> dict:
    """Params and BatchNorm statistics of a run's newest checkpoint (a finished run's last)."""
    step = checkpoints.Checkpointer(workdir, read_only=True).latest_step()
    return checkpoints.restore_variables(workdir, step)


def assert_same_tree(a, b):
    """Two pytrees with the same (non-empty) leaves, bit for bit."""
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def train_with_two_interruptions(make_config, workdir, steps_per_epoch: int) -> dict:
    """Trains ``make_config(**overrides)`` in ``workdir`` stopped twice: at step 3 (mid-epoch,
    between checkpoints), then ``steps_per_epoch`` steps later (in the next epoch); then to the
    end. Returns the last run's summary."""
    from murajax import train

    first = train.train_and_evaluate(make_config(stop_after_steps=3), workdir)
    assert first["preempted"] and first["step"] == 3
    second = train.train_and_evaluate(make_config(stop_after_steps=steps_per_epoch), workdir)
    assert second["preempted"] and second["step"] == 3 + steps_per_epoch
    final = train.train_and_evaluate(make_config(), workdir)
    assert not final["preempted"]
    return final


def memory_mappings() -> int:
    """The memory mappings this process holds (Linux: lines of /proc/self/maps). Every loaded
    XLA:CPU executable holds some for its code, and the kernel caps them (vm.max_map_count)."""
    with open("/proc/self/maps") as maps:
        return sum(1 for _ in maps)
