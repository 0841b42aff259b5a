"""One device, jit over a 4-device mesh and pmap over 4 devices compute the same step.

The layouts differ only in how float32 sums are split: a batch's BatchNorm statistics and its
gradients are reduced per device and then across devices. So the comparisons here are of
quantities a layout can only perturb by rounding (one step's loss, gradients, BatchNorm
statistics and probabilities, from the same params), with tolerances derived from float32's
machine epsilon rather than measured on one CPU; and of one Adam update, whose differences must
be fully explained by those of its gradients. Whole runs are compared in test_parallel_runs.py.
"""

import functools
import gc
import os

import jax
import numpy as np
import pytest

from murajax import parallel, steps
from murajax.errors import UserError
from tests import helpers

GLOBAL_BATCH = 8
EPS32 = float(np.finfo(np.float32).eps)
ROUNDING = helpers.ROUNDING  # why 256 eps: see there


def _one_step(state, batch, axis_name=None):
    """What train_step does, with the gradients it applies returned alongside."""
    grads, outputs, batch_stats = steps.compute_gradients(state, batch, axis_name)
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    _, probabilities = steps.eval_step(state, batch, axis_name)
    return grads, outputs["loss"], probabilities, new_state


def _run_jit(config, batch, devices):
    strategy = parallel.JitStrategy(devices)
    state = strategy.init_state(lambda: helpers.tiny_state(config))
    step = jax.jit(_one_step, in_shardings=(strategy.replicated, strategy.data_sharding),
                   out_shardings=strategy.replicated)
    grads, loss, probabilities, new = step(state, strategy.shard_batch(batch))
    return jax.device_get({"params": state.params, "grads": grads, "loss": loss,
                           "probabilities": probabilities, "new_params": new.params,
                           "batch_stats": new.batch_stats})


def _run_pmap(config, batch):
    strategy = parallel.PmapStrategy()
    state = strategy.init_state(
        lambda: helpers.tiny_state(config, bn_axis_name=parallel.PMAP_AXIS))
    step = jax.pmap(functools.partial(_one_step, axis_name=parallel.PMAP_AXIS),
                    axis_name=parallel.PMAP_AXIS)
    grads, loss, probabilities, new = step(state, strategy.shard_batch(batch))
    first = strategy.one_copy
    return jax.device_get({"params": first(state.params), "grads": first(grads),
                           "loss": strategy.gather(loss),
                           "probabilities": strategy.gather(probabilities),
                           "new_params": first(new.params),
                           "batch_stats": first(new.batch_stats)})


def _flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)]).astype(np.float64)


def _relative(a, b):
    return np.linalg.norm(_flat(a) - _flat(b)) / np.linalg.norm(_flat(b))


@pytest.fixture(scope="module", params=["unrolled", "scan"])
def layouts(request):
    """Both block layouts: 'scan''s BatchNorm statistics are reduced across devices inside
    its loops."""
    assert jax.device_count() == 4, "conftest should give 4 CPU devices"
    config = helpers.tiny_config(**{"model.block_impl": request.param})
    batch = helpers.random_batch(GLOBAL_BATCH, seed=0, masked=(5,))
    return config, {
        "one device": _run_jit(config, batch, jax.devices()[:1]),
        "jit, 4 devices": _run_jit(config, batch, jax.devices()),
        "pmap, 4 devices": _run_pmap(config, batch),
    }


@pytest.mark.parametrize("layout", ["jit, 4 devices", "pmap, 4 devices"])
def test_one_step_agrees_with_one_device_to_rounding(layouts, layout):
    _, runs = layouts
    one, other = runs["one device"], runs[layout]
    np.testing.assert_array_equal(_flat(other["params"]), _flat(one["params"]))  # same init
    loss_scale = np.max(np.abs(one["loss"]))
    np.testing.assert_allclose(other["loss"], one["loss"], rtol=0, atol=ROUNDING * loss_scale)
    np.testing.assert_allclose(other["probabilities"], one["probabilities"], rtol=ROUNDING,
                               atol=ROUNDING)
    # The global norm: single leaves whose true gradient is ~0 (the stem's BatchNorm scale,
    # 1e-6 of the norm) are all rounding noise, relative to themselves.
    assert _relative(other["grads"], one["grads"]) <= ROUNDING
    for a, b in zip(jax.tree.leaves(other["batch_stats"]), jax.tree.leaves(one["batch_stats"]),
                    strict=True):
        assert np.linalg.norm(a - b) <= ROUNDING * np.linalg.norm(b)


@pytest.mark.parametrize("layout", ["jit, 4 devices", "pmap, 4 devices"])
def test_one_adam_update_differs_only_as_its_gradients_do(layouts, layout):
    """Adam's first update is lr * g / (|g| + eps): Lipschitz in g with constant lr / eps, and
    never larger than lr. So for each weight the layouts' params may differ by at most
    lr * min(2, |g_a - g_b| / eps), plus the rounding of the update and of p - update. A
    gradient of ~1e-12, computed in another order, may flip sign and move its weight by up to
    2 lr: that is Adam's amplification of rounding, not a layout error."""
    config, runs = layouts
    one, other = runs["one device"], runs[layout]
    lr, eps = config.optim.learning_rate, config.optim.eps
    p0 = _flat(one["params"])
    gradient_gap = np.abs(_flat(other["grads"]) - _flat(one["grads"]))
    bound = (lr * np.minimum(2.0, gradient_gap / eps)
             + np.spacing(np.abs(p0).astype(np.float32) + lr) + 16 * EPS32 * lr)
    gap = np.abs(_flat(other["new_params"]) - _flat(one["new_params"]))
    worst = int(np.argmax(gap - bound))
    assert np.all(gap <= bound), (
        f"weight {worst} differs by {gap[worst]:.3g} after one update, more than its gradient "
        f"gap ({gradient_gap[worst]:.3g}) allows ({bound[worst]:.3g})")
    # And the update happened: the weights did move by about lr.
    assert np.median(np.abs(_flat(one["new_params"]) - p0)) > 0.5 * lr


def test_strategies_place_examples_and_states_consistently():
    """Every example's probability comes back at its index, padding marked -1, and a state
    taken out of pmap's layout (as the epoch end does) can be put back (the pmap crash)."""
    config = helpers.tiny_config()
    batch = helpers.random_batch(GLOBAL_BATCH, seed=3, masked=(2,))
    for strategy, axis in ((parallel.JitStrategy(), None),
                           (parallel.PmapStrategy(), parallel.PMAP_AXIS)):
        state = strategy.init_state(lambda: helpers.tiny_state(config, bn_axis_name=axis))
        state, _ = strategy.train_step(state, strategy.shard_batch(batch))
        host = steps.apply_plateau(strategy.one_copy(state), 1.0, config.optim)
        state = strategy.place_state(host)
        state, _ = strategy.train_step(state, strategy.shard_batch(batch))
        _, _, positions = strategy.eval_step(state, strategy.shard_batch(batch))
        expected = np.arange(GLOBAL_BATCH)
        expected[2] = -1
        np.testing.assert_array_equal(strategy.gather(positions), expected)
        assert int(strategy.one_copy(state).step) == 2


def test_batch_size_must_divide_across_devices():
    with pytest.raises(UserError, match=r"config.batch_size=6 .* multiple of the number of devices \(4"):
        parallel.create_strategy("jit", 6, 8)


def test_unknown_parallelism_is_refused():
    with pytest.raises(UserError, match="config.parallelism"):
        parallel.create_strategy("dp", 8, 8)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="counts Linux memory mappings")
def test_a_jit_strategys_compiled_steps_are_freed_with_it():
    """A sweep in one process builds a strategy per run. Its compiled programs (each holding
    memory mappings for its code) must go with it, or a long sweep reaches the kernel's
    vm.max_map_count and segfaults while loading the next program. (PmapStrategy cannot
    promise this: jax keeps every pmapped function; see its docstring.)"""

    def compile_eval_step_and_drop(batch_size):
        strategy = parallel.JitStrategy()
        state = strategy.init_state(helpers.tiny_state)
        jax.block_until_ready(strategy.eval_step(
            state, strategy.shard_batch(helpers.random_batch(batch_size))))
        held = helpers.memory_mappings()
        del strategy, state
        gc.collect()
        return held, helpers.memory_mappings()

    compile_eval_step_and_drop(4)  # warms up what every run shares (the init, small ops)
    held, before = compile_eval_step_and_drop(8)
    per_program = held - before
    assert per_program > 20, "the compiled step should hold code mappings while alive"
    for batch_size in (12, 16, 20):  # a new program each time
        compile_eval_step_and_drop(batch_size)
    assert helpers.memory_mappings() - before < per_program
