"""jit over a 4-device mesh, pmap over 4 devices and a single device train identically."""

import jax
import numpy as np
import pytest

from murajax import parallel
from murajax.errors import UserError
from tests import helpers

NUM_STEPS = 3
GLOBAL_BATCH = 8
# Float32 sums over a batch split four ways differ from one device's in the last bits. Losses
# and probabilities agree to RTOL; params as helpers.assert_params_close explains.
RTOL = 1e-4


def _train(strategy, config, bn_axis_name=None):
    state = strategy.init_state(lambda: helpers.tiny_state(config, bn_axis_name=bn_axis_name))
    losses = []
    for i in range(NUM_STEPS):
        state, metrics = strategy.train_step(
            state, strategy.shard_batch(helpers.random_batch(GLOBAL_BATCH, seed=i, masked=(5,))))
        losses.append(float(strategy.host_state(metrics).loss.compute()))
    _, probs, positions = strategy.eval_step(
        state, strategy.shard_batch(helpers.random_batch(GLOBAL_BATCH, seed=99)))
    host = jax.device_get(strategy.host_state(state))
    return host, np.array(losses), strategy.gather(probs), strategy.gather(positions)


def test_jit_pmap_and_one_device_reach_the_same_params():
    assert jax.device_count() == 4, "conftest should give 4 CPU devices"
    config = helpers.tiny_config(**{"optim.eps": helpers.LAYOUT_TEST_EPS})
    one, one_losses, one_probs, _ = _train(parallel.JitStrategy(jax.devices()[:1]), config)
    jit, jit_losses, jit_probs, positions = _train(parallel.JitStrategy(), config)
    pmap, pmap_losses, pmap_probs, pmap_positions = _train(
        parallel.PmapStrategy(), config, bn_axis_name=parallel.PMAP_AXIS)

    for other, losses, probs in ((jit, jit_losses, jit_probs), (pmap, pmap_losses, pmap_probs)):
        np.testing.assert_allclose(losses, one_losses, rtol=RTOL)
        # Probabilities come from the trained params, so they inherit the params' tolerance:
        # a weight off by 1% of a step moves an output in its fourth digit.
        np.testing.assert_allclose(probs, one_probs, rtol=1e-3, atol=1e-6)
        helpers.assert_params_close(other.params, one.params, config.optim.learning_rate,
                                    NUM_STEPS)
        helpers.assert_batch_stats_close(other.batch_stats, one.batch_stats)
        assert int(other.step) == NUM_STEPS
    np.testing.assert_array_equal(positions, np.arange(GLOBAL_BATCH))
    np.testing.assert_array_equal(pmap_positions, np.arange(GLOBAL_BATCH))


def test_batch_size_must_divide_across_devices():
    with pytest.raises(UserError, match=r"config.batch_size=6 .* multiple of the number of devices \(4"):
        parallel.create_strategy("jit", 6, 8)


def test_unknown_parallelism_is_refused():
    with pytest.raises(UserError, match="config.parallelism"):
        parallel.create_strategy("dp", 8, 8)
