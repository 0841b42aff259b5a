"""The pure steps: the paper's weighted loss, masking, BatchNorm statistics, evaluation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from murajax import recipes, steps
from murajax.recipes import weighted_bce
from tests import helpers


def test_weighted_bce_matches_hand_computation():
    logits = jnp.array([0.0, 2.0, -1.0])
    labels = jnp.array([1, 0, 0])
    weights = jnp.array([0.4, 0.7, 0.2])
    # -w*log(sigmoid(z)) for y=1, -w*log(1-sigmoid(z)) for y=0
    expected = [
        0.4 * np.log(2.0),
        0.7 * np.log(1.0 + np.exp(2.0)),
        0.2 * np.log(1.0 + np.exp(-1.0)),
    ]
    np.testing.assert_allclose(weighted_bce.weighted_bce(logits, labels, weights), expected, rtol=1e-6)


def test_example_weights_pick_w_T1_for_abnormal_and_w_T0_for_normal():
    table = jnp.asarray(helpers.loss_weights())
    weights = weighted_bce.example_weights(table, jnp.array([3, 3, -1]), jnp.array([1, 0, 1]))
    np.testing.assert_allclose(weights, [table[3, 1], table[3, 0], 1.0])


def test_train_step_loss_is_the_masked_mean_of_weighted_bce():
    state = helpers.tiny_state()
    batch = helpers.random_batch(6, masked=(2, 5))
    logits, _ = state.apply_fn(state.variables, batch["image"], train=True,
                               mutable=["batch_stats"])
    p = 1.0 / (1.0 + np.exp(-np.asarray(logits[:, 0], np.float64)))
    y = batch["label"]
    w = helpers.loss_weights()[batch["study_type"], y]
    per_example = -w * (y * np.log(p) + (1 - y) * np.log(1 - p))
    expected = (per_example * batch["mask"]).sum() / batch["mask"].sum()

    _, metrics = jax.jit(steps.train_step)(state, batch)
    assert float(metrics.loss.compute()) == pytest.approx(expected, rel=1e-5)
    assert int(metrics.loss.count) == 4


def test_masked_examples_do_not_change_the_gradient():
    state = helpers.tiny_state()
    batch = helpers.random_batch(4, masked=(3,))
    other = dict(batch)
    other["label"] = batch["label"].copy()
    other["label"][3] = 1 - other["label"][3]
    other["study_type"] = batch["study_type"].copy()
    other["study_type"][3] = (other["study_type"][3] + 1) % 7
    step = jax.jit(steps.train_step)
    a, _ = step(state, batch)
    b, _ = step(state, other)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(x, y)


def test_train_step_updates_params_step_and_batch_stats_eval_step_does_not():
    state = helpers.tiny_state()
    batch = helpers.random_batch(4)
    new_state, _ = jax.jit(steps.train_step)(state, batch)
    assert int(new_state.step) == 1
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state.batch_stats,
                           new_state.batch_stats)
    assert all(jax.tree.leaves(changed))
    metrics, probabilities = jax.jit(steps.eval_step)(new_state, batch)
    assert probabilities.shape == (4,) and probabilities.dtype == jnp.float32
    assert np.all((probabilities >= 0) & (probabilities <= 1))
    assert int(metrics.loss.count) == 4


def test_bfloat16_compute_keeps_loss_and_params_in_float32():
    config = helpers.tiny_config(**{"model.dtype": "bfloat16"})
    state = helpers.tiny_state(config)
    new_state, metrics = jax.jit(steps.train_step)(state, helpers.random_batch(4))
    assert metrics.loss.total.dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new_state.params))
    assert np.isfinite(float(metrics.loss.compute()))


def test_apply_plateau_sets_the_next_learning_rate():
    config = helpers.tiny_config()
    state = helpers.tiny_state(config)
    state = steps.apply_plateau(state, 1.0, config.optim)
    state = steps.apply_plateau(state, 2.0, config.optim)  # smoke config: patience 1
    state = steps.apply_plateau(state, 2.0, config.optim)
    from murajax import optim
    assert float(optim.learning_rate(state.opt_state)) == pytest.approx(
        config.optim.learning_rate * config.optim.plateau_factor)


def test_the_state_recipe_is_the_loss_train_step_minimises():
    """A recipe is the seam for new losses: one that doubles the paper's loss doubles the
    training loss and the gradients, while validation keeps reporting the plain loss."""
    doubled = recipes.Recipe(
        "doubled", train_loss=lambda logits, batch, state: 2.0 * weighted_bce.per_example_loss(
            logits, batch, state))
    plain = helpers.tiny_state()
    twice = plain.replace(recipe=doubled)
    batch = helpers.random_batch(6, masked=(1,))
    grads = jax.jit(lambda s: steps.compute_gradients(s, batch)[0])
    _, plain_metrics = jax.jit(steps.train_step)(plain, batch)
    _, twice_metrics = jax.jit(steps.train_step)(twice, batch)
    assert float(twice_metrics.loss.compute()) == pytest.approx(
        2 * float(plain_metrics.loss.compute()), rel=1e-6)
    for a, b in zip(jax.tree.leaves(grads(twice)), jax.tree.leaves(grads(plain)), strict=True):
        np.testing.assert_allclose(a, 2 * b, rtol=1e-5, atol=1e-12)
    plain_eval, _ = jax.jit(steps.eval_step)(plain, batch)
    twice_eval, _ = jax.jit(steps.eval_step)(twice, batch)
    assert float(twice_eval.loss.compute()) == float(plain_eval.loss.compute())
