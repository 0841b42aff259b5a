"""Each training recipe against a hand computation (float64 numpy), and their config fields."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from murajax import recipes, steps
from murajax.errors import UserError
from murajax.recipes import soft_targets
from tests import helpers

LOGITS = np.array([2.0, -1.0, 0.3, -3.0, 0.0], np.float32)
LABELS = np.array([1, 0, 0, 1, 1], np.int32)
TYPES = np.array([0, 3, 6, 2, -1], np.int32)  # -1: unknown type, weight 1
# float32 losses of O(1) computed in a different order than the float64 reference.
RTOL = 1e-5


class _State:
    loss_weights = jnp.asarray(helpers.loss_weights())


def _apply(loss):
    batch = {"label": jnp.asarray(LABELS), "study_type": jnp.asarray(TYPES)}
    return np.asarray(loss(jnp.asarray(LOGITS)[:, None], batch, _State()))


def _reference():
    z = LOGITS.astype(np.float64)
    p = 1 / (1 + np.exp(-z))
    table = helpers.loss_weights().astype(np.float64)
    w = np.where(TYPES >= 0, table[np.maximum(TYPES, 0), LABELS], 1.0)
    return z, p, w, LABELS.astype(np.float64)


def _bce(t, p):
    return -(t * np.log(p) + (1 - t) * np.log(1 - p))


def test_label_smoothing_moves_the_target_towards_one_half():
    _, p, w, y = _reference()
    t = y * 0.8 + 0.1
    np.testing.assert_allclose(_apply(soft_targets.SmoothedBCE(smoothing=0.2)), w * _bce(t, p),
                               rtol=RTOL)


@pytest.mark.parametrize("alpha", [None, 0.25])
def test_focal_scales_cross_entropy_by_one_minus_p_t_to_the_gamma(alpha):
    _, p, w, y = _reference()
    p_t = np.where(y == 1, p, 1 - p)
    expected = _bce(y, p) * (1 - p_t) ** 1.5
    if alpha is not None:
        expected *= np.where(y == 1, alpha, 1 - alpha)
    np.testing.assert_allclose(_apply(soft_targets.Focal(gamma=1.5, alpha=alpha)), w * expected,
                               rtol=RTOL)


def test_gce_is_one_minus_p_y_to_the_q_over_q_and_tends_to_cross_entropy():
    _, p, w, y = _reference()
    p_y = np.where(y == 1, p, 1 - p)
    np.testing.assert_allclose(_apply(soft_targets.GeneralisedCrossEntropy(q=0.7)),
                               w * (1 - p_y ** 0.7) / 0.7, rtol=RTOL)
    near_zero = _apply(soft_targets.GeneralisedCrossEntropy(q=1e-4))
    np.testing.assert_allclose(near_zero, w * _bce(y, p), rtol=1e-3)  # (1 - p^q)/q -> -log p


@pytest.mark.parametrize("hard", [False, True])
def test_bootstrap_mixes_the_label_with_the_models_belief_held_fixed(hard):
    _, p, w, y = _reference()
    belief = (p > 0.5).astype(np.float64) if hard else p
    target = 0.8 * y + 0.2 * belief
    loss = soft_targets.Bootstrap(beta=0.8, hard=hard)
    np.testing.assert_allclose(_apply(loss), w * _bce(target, p), rtol=RTOL)
    # The belief is a constant: d loss / d logit = w (p - target), as for a fixed target.
    batch = {"label": jnp.asarray(LABELS), "study_type": jnp.asarray(TYPES)}
    grad = jax.grad(lambda z: jnp.sum(loss(z[:, None], batch, _State())))(jnp.asarray(LOGITS))
    np.testing.assert_allclose(grad, w * (p - target), rtol=RTOL, atol=1e-7)


@pytest.mark.parametrize("name", ["focal", "gce", "bootstrap"])
def test_the_configured_recipe_is_what_train_step_minimises_and_validation_stays_plain(name):
    config = helpers.tiny_config(**{"loss.name": name, "loss.label_smoothing": 0.1})
    recipe = recipes.from_config(config)
    assert recipe == recipes.from_config(config)  # a static field: equal recipes, one compile
    plain = helpers.tiny_state()
    state = plain.replace(recipe=recipe)
    batch = helpers.random_batch(6, masked=(4,))
    logits, _ = state.apply_fn(state.variables, batch["image"], train=True,
                               mutable=["batch_stats"])
    per_example = np.asarray(recipe.train_loss(logits, batch, state))
    _, metrics = jax.jit(steps.train_step)(state, batch)
    real = batch["mask"] > 0
    assert float(metrics.loss.compute()) == pytest.approx(per_example[real].mean(), rel=1e-5)
    eval_recipe, _ = jax.jit(steps.eval_step)(state, batch)
    eval_plain, _ = jax.jit(steps.eval_step)(plain, batch)
    assert float(eval_recipe.loss.compute()) == float(eval_plain.loss.compute())


def test_the_default_config_is_exactly_the_papers_loss():
    assert recipes.from_config(helpers.tiny_config()) is recipes.DEFAULT_RECIPE


@pytest.mark.parametrize("field, value, message", [
    ("name", "mixup_typo", r"config.loss.name='mixup_typo' is not a known recipe; known: "
                           r"weighted_bce, focal, gce, bootstrap"),
    ("label_smoothing", 1.0, r"config.loss.label_smoothing=1.0 must be in \[0, 1\)"),
    ("gce_q", 0.0, r"config.loss.gce_q=0.0 must be in \(0, 1\]"),
    ("focal_gamma", -1.0, r"config.loss.focal_gamma=-1.0 must be >= 0"),
    ("bootstrap_beta", 1.5, r"config.loss.bootstrap_beta=1.5 must be in \[0, 1\]"),
    ("bootstrap_mode", "medium", r"config.loss.bootstrap_mode must be 'soft' or 'hard'"),
])
def test_bad_loss_fields_are_refused_naming_the_field(field, value, message):
    config = helpers.tiny_config(**{"loss.name": "bootstrap", f"loss.{field}": value})
    with pytest.raises(UserError, match=message):
        recipes.from_config(config)


# ---- mixup and CutMix -------------------------------------------------------------------------

from murajax.recipes import mixup  # noqa: E402


@pytest.mark.parametrize("seed", range(5))
def test_partners_are_a_cycle_of_the_real_examples_and_padding_keeps_itself(seed):
    mask = (np.random.default_rng(seed).uniform(size=10) > 0.3).astype(np.float32)
    partner = np.asarray(mixup.real_partners(jax.random.key(seed), jnp.asarray(mask)))
    real = np.flatnonzero(mask > 0)
    np.testing.assert_array_equal(partner[mask == 0], np.flatnonzero(mask == 0))
    assert sorted(partner[real]) == sorted(real)  # a permutation of the real ones
    if len(real) > 1:
        assert np.all(partner[real] != real)
        seen, i = {real[0]}, partner[real[0]]  # one cycle through all of them
        while i != real[0]:
            seen.add(i)
            i = partner[i]
        assert seen == set(real)


def test_mix_blends_images_targets_and_weights_with_one_lambda():
    batch = helpers.random_batch(4, masked=(3,))
    partner = jnp.array([2, 0, 1, 3])
    mixed = mixup.mix(batch, partner, jnp.float32(0.3), None, _State.loss_weights)
    x, y = batch["image"], batch["label"].astype(np.float64)
    table = helpers.loss_weights()
    w = table[batch["study_type"], batch["label"]]
    for i, j in enumerate([2, 0, 1]):
        np.testing.assert_allclose(mixed["image"][i], 0.3 * x[i] + 0.7 * x[j], rtol=1e-6,
                                   atol=1e-6)
        assert float(mixed["target"][i]) == pytest.approx(0.3 * y[i] + 0.7 * y[j], rel=1e-6)
        assert float(mixed["loss_weight"][i]) == pytest.approx(0.3 * w[i] + 0.7 * w[j], rel=1e-6)
    np.testing.assert_array_equal(mixed["image"][3], x[3])  # padding is left alone


@pytest.mark.parametrize("alpha, cutmix_alpha", [(0.4, 0.0), (0.0, 1.0), (0.4, 1.0)])
def test_padding_never_mixes_into_real_examples(alpha, cutmix_alpha):
    batch = helpers.random_batch(8, masked=(1, 6))
    batch["image"] = np.abs(batch["image"]) / 10
    batch["image"][[1, 6]] = 1e6  # would show up in any real example it touched
    batch["label"][[1, 6]] = 7  # an impossible label: would show up in the targets
    prepare = mixup.Mixup(alpha=alpha, cutmix_alpha=cutmix_alpha)
    for seed in range(10):
        mixed = prepare(batch, jax.random.key(seed), _State())
        real = batch["mask"] > 0
        assert float(jnp.max(mixed["image"][real])) < 10
        assert float(jnp.max(mixed["target"][real])) <= 1.0


def test_cutmix_pastes_the_partners_box_and_lambda_is_what_remains():
    batch = helpers.random_batch(3)
    paste, lam = mixup.box_mask(jax.random.key(3), 32, 32, jnp.float32(0.6))
    assert float(lam) == pytest.approx(1 - float(jnp.mean(paste)))
    # A box of round(32 sqrt(0.4))^2 = 400 pixels (39%), less where it is clipped at an edge.
    assert 0 < 1 - float(lam) <= 400 / 1024
    partner = jnp.array([1, 2, 0])
    mixed = mixup.mix(batch, partner, lam, paste, _State.loss_weights)
    inside = np.asarray(paste[..., 0]) > 0
    np.testing.assert_array_equal(np.asarray(mixed["image"][0])[inside], batch["image"][1][inside])
    np.testing.assert_array_equal(np.asarray(mixed["image"][0])[~inside],
                                  batch["image"][0][~inside])


def test_mixup_in_train_step_is_keyed_by_the_step_and_changes_the_update():
    config = helpers.tiny_config(**{"mixup.alpha": 0.4})
    recipe = recipes.from_config(config)
    assert recipe.prepare == mixup.Mixup(alpha=0.4)
    plain = helpers.tiny_state()
    mixed = plain.replace(recipe=recipe)
    batch = helpers.random_batch(8, masked=(2,))
    step = jax.jit(steps.train_step)
    a, metrics_a = step(mixed, batch)
    b, metrics_b = step(mixed, batch)
    np.testing.assert_array_equal(float(metrics_a.loss.compute()), float(metrics_b.loss.compute()))
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(x, y)  # same state and batch: the same mix
    c, metrics_c = step(plain, batch)
    assert float(metrics_c.loss.compute()) != float(metrics_a.loss.compute())


def test_bad_mixup_fields_are_refused():
    with pytest.raises(UserError, match=r"config.mixup.prob=0.0 must be in \(0, 1\]"):
        recipes.from_config(helpers.tiny_config(**{"mixup.alpha": 0.2, "mixup.prob": 0.0}))
