"""The plateau rule: when the learning rate drops, and by how much."""

import jax
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


def _adam_steps(tx, state, params, n):
    """``n`` updates with a constant gradient; the first coordinate of each update (of the
    head's, where there is a head)."""
    moves = []
    for _ in range(n):
        updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
        moves.append(float(jax.tree.leaves(updates.get("head", updates))[0].ravel()[0]))
    return np.array(moves), state


def test_no_warm_up_is_the_papers_optimizer_state():
    import optax

    config = default.get_config().optim
    assert config.warmup_steps == 0 and config.warmup_epochs == 0
    params = {"w": jnp.ones(3)}
    paper = optax.inject_hyperparams(optax.adam)(learning_rate=1e-4)
    assert jax.tree.structure(optim.create_optimizer(config).init(params)) == \
        jax.tree.structure(paper.init(params))
    assert not optim.has_warmup(config)


@pytest.mark.parametrize("trainable", ["all", "head"])
def test_warm_up_scales_the_plateau_rate_linearly_then_stops(trainable):
    config = default.get_config().optim
    config.warmup_steps, config.trainable = 4, trainable
    params = {"head": {"w": jnp.ones(2)}, "body": {"w": jnp.ones(2)}}
    tx = optim.create_optimizer(config)
    state = optim.with_learning_rate(tx.init(params), 1e-2)
    assert float(optim.learning_rate(state)) == pytest.approx(1e-2)
    assert float(optim.applied_learning_rate(state, config)) == pytest.approx(1e-2 / 4)
    moves, state = _adam_steps(tx, state, params, 6)
    config.warmup_steps = 0
    plain_tx = optim.create_optimizer(config)
    plain, plain_state = _adam_steps(
        plain_tx, optim.with_learning_rate(plain_tx.init(params), 1e-2), params, 6)
    # The same Adam updates, each times the warm-up factor (one float32 product's rounding).
    rtol = np.finfo(np.float32).eps
    np.testing.assert_allclose(moves, plain * np.array([1, 2, 3, 4, 4, 4]) / 4, rtol=rtol)
    assert np.all(plain < 0)
    assert float(optim.learning_rate(state)) == pytest.approx(1e-2)  # the plateau's, unscaled
    # The plateau rule still reads and writes the rate, and the warm-up position is kept.
    lowered = optim.with_learning_rate(state, 1e-3)
    assert int(lowered[1].count) == 6
    more, _ = _adam_steps(tx, lowered, params, 1)
    plain_more, _ = _adam_steps(plain_tx, optim.with_learning_rate(plain_state, 1e-3), params,
                                1)
    np.testing.assert_allclose(more, plain_more, rtol=rtol)


def test_warm_up_position_is_in_the_state_so_a_restored_copy_continues_exactly():
    config = default.get_config().optim
    config.warmup_steps = 5
    params = {"w": jnp.linspace(-1.0, 1.0, 4)}
    tx = optim.create_optimizer(config)
    straight, _ = _adam_steps(tx, tx.init(params), params, 6)
    first, state = _adam_steps(tx, tx.init(params), params, 2)
    restored = jax.tree.map(np.asarray, jax.device_get(state))  # what a checkpoint holds
    rest, _ = _adam_steps(tx, restored, params, 4)
    np.testing.assert_array_equal(np.concatenate([first, rest]), straight)


def test_warm_up_in_epochs_resolves_from_the_steps_per_epoch_and_bad_values_are_refused():
    from murajax.errors import UserError

    config = default.get_config().optim
    config.warmup_epochs = 1.5
    assert optim.warmup_steps_from_config(config, steps_per_epoch=10) == 15
    assert optim.warmup_steps_from_config(config, steps_per_epoch=0) == 1
    config.warmup_steps = 3
    with pytest.raises(UserError, match="warmup_steps=3 and warmup_epochs=1.5 are both set"):
        optim.create_optimizer(config, steps_per_epoch=10)
    config.warmup_steps, config.warmup_epochs = -1, 0.0
    with pytest.raises(UserError, match="config.optim.warmup_steps and warmup_epochs must be"):
        optim.create_optimizer(config)
