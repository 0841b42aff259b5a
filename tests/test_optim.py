"""The plateau rule: when the learning rate drops, and by how much."""

import jax.numpy as jnp
import numpy as np
import pytest

from murajax.configs import default
from murajax import optim


def _run(losses, **overrides):
    config = default.get_config().optim
    for key, value in overrides.items():
        config[key] = value
    plateau, rate = optim.init_plateau(), jnp.asarray(1e-4, jnp.float32)
    rates = []
    for loss in losses:
        plateau, rate = optim.plateau_step(plateau, rate, loss, config)
        rates.append(float(rate))
    return np.array(rates), plateau


def test_paper_rule_divides_by_ten_after_every_epoch_without_improvement():
    rates, plateau = _run([1.0, 0.9, 0.95, 0.8, 0.85, 0.85])
    np.testing.assert_allclose(rates, [1e-4, 1e-4, 1e-5, 1e-5, 1e-6, 1e-7], rtol=1e-6)
    assert int(plateau.num_drops) == 3
    assert float(plateau.best_loss) == pytest.approx(0.8)


def test_patience_tolerates_that_many_bad_epochs():
    rates, _ = _run([1.0, 1.1, 1.1, 1.1, 0.5, 0.6, 0.6], plateau_patience=2)
    np.testing.assert_allclose(rates, [1e-4, 1e-4, 1e-4, 1e-5, 1e-5, 1e-5, 1e-5], rtol=1e-6)


def test_cooldown_blocks_drops_right_after_a_drop():
    rates, _ = _run([1.0, 1.1, 1.2, 1.3, 1.4], plateau_cooldown=2)
    # drop at epoch 2, then two cooldown epochs, then bad epochs count again
    np.testing.assert_allclose(rates, [1e-4, 1e-5, 1e-5, 1e-5, 1e-6], rtol=1e-6)


def test_improvement_below_relative_threshold_counts_as_a_plateau():
    rates, _ = _run([1.0, 0.99995, 0.9], plateau_threshold=1e-4)
    np.testing.assert_allclose(rates, [1e-4, 1e-5, 1e-5], rtol=1e-6)


def test_rate_never_goes_below_the_minimum():
    rates, plateau = _run([1.0] + [2.0] * 6, min_learning_rate=1e-6)
    assert rates.min() == pytest.approx(1e-6)
    assert int(plateau.num_drops) == 2


def test_rate_in_optimizer_state_is_what_adam_applies():
    import optax

    config = default.get_config().optim
    tx = optim.create_optimizer(config)
    params = {"w": jnp.ones(3)}
    state = optim.with_learning_rate(tx.init(params), 1e-2)
    updates, _ = tx.update({"w": jnp.ones(3)}, state, params)
    # Adam's first step moves each coordinate by exactly the rate (sign of the gradient).
    np.testing.assert_allclose(np.asarray(updates["w"]), -1e-2, rtol=1e-5)
    assert float(optim.learning_rate(state)) == pytest.approx(1e-2)
    assert isinstance(tx, optax.GradientTransformationExtraArgs)
