"""The mean teacher (config.teacher): its merge rules and consistency term on hand-made arrays,
the warm-up, its targets inside the train step (equal to a batch relabelled by hand), bad
fields refused, and a training run on partially labelled data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from murajax import recipes, steps, synthetic, train, train_state
from murajax.data import mura
from murajax.errors import UserError
from murajax.recipes import teacher as teaching
from murajax.recipes import weighted_bce
from tests import helpers


def _settings(merge="missing_only", hard=True, weight=0.5, confidence=0.9, start_step=0,
              consistency_weight=0.0):
    return teaching.Teacher(confidence=confidence, merge=merge, weight=weight, hard=hard,
                            start_step=start_step, consistency_weight=consistency_weight,
                            flip_view=False)


# Examples: labelled-and-agreeing, labelled-and-disagreeing (twice), unlabelled-and-confident
# (twice), unlabelled-and-unsure, labelled-and-unsure, padding (unlabelled, confident).
LABEL = np.array([1, 0, 1, -1, -1, -1, 1, -1], np.int32)
PROB = np.array([0.95, 0.97, 0.05, 0.02, 0.99, 0.6, 0.3, 0.99], np.float32)
REAL = np.array([1, 1, 1, 1, 1, 1, 1, 0], bool)


def _merge(settings):
    target, supervised = teaching.merge_targets(jnp.asarray(LABEL), jnp.asarray(PROB), settings,
                                                jnp.asarray(REAL))
    return np.asarray(target), np.asarray(supervised)


def test_missing_only_labels_only_the_confident_unlabelled_examples():
    target, supervised = _merge(_settings())
    np.testing.assert_array_equal(supervised, [1, 1, 1, 1, 1, 0, 1, 0])
    np.testing.assert_array_equal(target, [1, 0, 1, 0, 1, 0, 1, 0])
    # Soft targets: the teacher's probability where it labels, the given labels elsewhere.
    target, _ = _merge(_settings(hard=False))
    np.testing.assert_allclose(target, [1, 0, 1, 0.02, 0.99, 0, 1, 0], rtol=1e-7)


def test_replace_disagreeing_also_overrides_the_labels_the_confident_teacher_contradicts():
    target, supervised = _merge(_settings("replace_disagreeing"))
    np.testing.assert_array_equal(supervised, [1, 1, 1, 1, 1, 0, 1, 0])
    # Example 1 (0, teacher 0.97) -> 1, example 2 (1, teacher 0.05) -> 0; example 6 (1, teacher
    # 0.3) is unsure and keeps its label.
    np.testing.assert_array_equal(target, [1, 1, 0, 0, 1, 0, 1, 0])
    target, _ = _merge(_settings("replace_disagreeing", hard=False))
    np.testing.assert_allclose(target, [1, 0.97, 0.05, 0.02, 0.99, 0, 1, 0], rtol=1e-7)
    # A higher confidence (0.98) leaves example 1 (0.97) alone.
    target, _ = _merge(_settings("replace_disagreeing", confidence=0.98))
    np.testing.assert_array_equal(target, [1, 0, 1, 0, 1, 0, 1, 0])


def test_soft_blends_the_confident_teacher_into_every_labelled_target():
    target, supervised = _merge(_settings("soft", weight=0.25))
    np.testing.assert_array_equal(supervised, [1, 1, 1, 1, 1, 0, 1, 0])
    # (1 - w) y + w * decision for the confident labelled ones; unsure example 6 keeps 1.
    np.testing.assert_allclose(target, [1, 0.25, 0.75, 0, 1, 0, 1, 0], rtol=1e-7)
    target, _ = _merge(_settings("soft", weight=0.25, hard=False))
    np.testing.assert_allclose(
        target, [0.75 + 0.25 * 0.95, 0.25 * 0.97, 0.75 + 0.25 * 0.05, 0.02, 0.99, 0, 1, 0],
        rtol=1e-6)


def test_consistency_is_the_squared_probability_gap():
    logits = jnp.asarray([0.0, 2.0, -1.0])
    teacher_prob = jnp.asarray([0.5, 0.1, 0.9])
    student = 1 / (1 + np.exp(-np.array([0.0, 2.0, -1.0])))
    np.testing.assert_allclose(np.asarray(teaching.consistency(logits, teacher_prob)),
                               (student - [0.5, 0.1, 0.9]) ** 2, rtol=1e-6)


# ---- inside the step ----------------------------------------------------------------------------

def _teacher_state(settings, sharpen=200.0):
    """A tiny state with an EMA whose head is scaled up and re-centred on the test batch, so
    that its predictions spread from confident (either way) to unsure."""
    config = helpers.tiny_config(**{"ema.decay": 0.99, "teacher.enabled": True})
    model = train_state.model_from_config(config)
    from murajax import optim
    state = train_state.create_train_state(
        jax.random.key(0), model, optim.create_optimizer(config.optim), config.data.image_size,
        helpers.loss_weights(), recipes.from_config(config), ema_decay=0.99, teacher=settings)
    ema = jax.tree.map(jnp.copy, state.ema)
    head = ema["params"]["head"]
    head["kernel"] = head["kernel"] * sharpen
    logits = state.apply_fn(ema, jnp.asarray(_batch_with_unlabelled()["image"]), train=False)
    head["bias"] = head["bias"] - jnp.median(logits[:, 0])
    return state.replace(ema=ema)


def _batch_with_unlabelled(size=16):
    batch = helpers.random_batch(size, seed=3, masked=(15,))
    batch["label"][[1, 4, 6, 9, 12, 13]] = -1
    return batch


def test_the_step_trains_on_the_batch_the_teacher_relabelled():
    """With the teacher on, the gradients equal those of the same state without a teacher on
    the batch relabelled by hand from the teacher's predictions (the merge rule applied in
    numpy); and the unsure unlabelled examples stay out of the loss."""
    settings = _settings("replace_disagreeing")
    state = _teacher_state(settings)
    batch = _batch_with_unlabelled()
    prob = np.asarray(teaching.teacher_probabilities(state, jnp.asarray(batch["image"])))
    confident = (prob > 0.9) | (prob < 0.1)
    unlabelled = batch["label"] < 0
    assert (confident & unlabelled).any() and (~confident & unlabelled).any()  # both kinds
    relabelled = dict(batch)
    label = batch["label"].copy()
    label[confident & (batch["mask"] > 0)] = (prob > 0.5)[confident & (batch["mask"] > 0)]
    relabelled["label"] = label
    assert (label != batch["label"])[batch["label"] >= 0].any()  # some given label replaced

    grads, outputs, _ = jax.jit(steps.compute_gradients)(state, batch)
    plain = state.replace(teacher=None)
    expected, _, _ = jax.jit(steps.compute_gradients)(plain, relabelled)
    np.testing.assert_array_equal(np.asarray(outputs["label"])[batch["mask"] > 0],
                                  label[batch["mask"] > 0])
    norm = optim_norm(expected)
    gap = optim_norm(jax.tree.map(lambda a, b: a - b, grads, expected))
    assert gap <= helpers.ROUNDING * norm


def optim_norm(tree) -> float:
    return float(jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree))))


def test_before_the_warmup_ends_the_step_trains_on_the_given_labels():
    batch = _batch_with_unlabelled()
    state = _teacher_state(_settings("replace_disagreeing", start_step=5,
                                     consistency_weight=1.0))
    grads, outputs, _ = jax.jit(steps.compute_gradients)(state, batch)
    expected, _, _ = jax.jit(steps.compute_gradients)(state.replace(teacher=None), batch)
    real = batch["mask"] > 0
    np.testing.assert_array_equal(np.asarray(outputs["label"])[real], batch["label"][real])
    gap = optim_norm(jax.tree.map(lambda a, b: a - b, grads, expected))
    assert gap <= helpers.ROUNDING * optim_norm(expected)
    # From step 5 on the teacher applies, and its consistency term changes the gradients.
    later, _, _ = jax.jit(steps.compute_gradients)(state.replace(step=jnp.int32(5)), batch)
    assert optim_norm(jax.tree.map(lambda a, b: a - b, later, expected)) > (
        1e3 * helpers.ROUNDING * optim_norm(expected))


def test_the_consistency_term_adds_its_weighted_mean_over_real_examples():
    batch = _batch_with_unlabelled()
    with_term = _teacher_state(_settings(consistency_weight=2.0))
    state = jax.device_get(with_term)
    logits = state.apply_fn(state.variables, jnp.asarray(batch["image"]), train=True,
                            mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)})[0]
    prob = teaching.teacher_probabilities(state, jnp.asarray(batch["image"]))
    real = batch["mask"]
    expected = 2.0 * np.sum(np.asarray(teaching.consistency(logits[:, 0], prob)) * real) / real.sum()
    got = float(steps._consistency_loss(state, logits, prob, batch, None))
    assert got == pytest.approx(expected, rel=helpers.ROUNDING)


# ---- the config ---------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    ({"teacher.enabled": True}, "config.ema.decay"),
    ({"teacher.enabled": True, "ema.decay": 0.99, "teacher.merge": "always"},
     "config.teacher.merge"),
    ({"teacher.enabled": True, "ema.decay": 0.99, "teacher.confidence": 0.4},
     "config.teacher.confidence"),
    ({"teacher.enabled": True, "ema.decay": 0.99, "teacher.target": "fuzzy"},
     "config.teacher.target"),
    ({"teacher.enabled": True, "ema.decay": 0.99, "teacher.warmup_epochs": -1},
     "config.teacher.warmup_epochs"),
    ({"teacher.enabled": True, "ema.decay": 0.99, "teacher.consistency_weight": 1.0,
      "mixup.alpha": 0.4}, "config.mixup"),
])
def test_bad_teacher_fields_are_refused_naming_them(overrides, message):
    with pytest.raises(UserError, match=message.replace(".", r"\.")):
        teaching.from_config(helpers.tiny_config(**overrides))


def test_off_by_default_and_the_paper_recipe_untouched():
    config = helpers.tiny_config()
    assert teaching.from_config(config) is None
    assert recipes.from_config(config).train_loss is weighted_bce.per_example_loss
    settings = teaching.from_config(helpers.tiny_config(
        **{"teacher.enabled": True, "ema.decay": 0.99, "teacher.warmup_epochs": 2}), 7)
    assert settings.start_step == 14 and settings.flip_view and settings.hard


def test_a_run_with_the_teacher_on_partially_labelled_data(tmp_path):
    """Synthetic MURA with a third of the train studies unlabelled, augmented on the device
    (the teacher sees its own draw of flips and rotations): the run trains through the end of
    the teacher's warm-up."""
    root = synthetic.generate(tmp_path / "data", num_studies=40, seed=2,
                              unlabeled_fraction=0.3)
    labels = mura.read_split(root, "train").study_labels()
    assert np.sum(labels == -1) == round(0.3 * len(labels)) > 0
    config = helpers.run_config(root, **{"ema.decay": 0.9, "teacher.enabled": True,
                                         "teacher.warmup_epochs": 1,
                                         "teacher.consistency_weight": 1.0,
                                         # the teacher's view: its own draw on the device
                                         "data.augment_on": "device",
                                         "num_epochs": 2, "optim.learning_rate": 3e-3})
    summary = train.train_and_evaluate(config, tmp_path / "run")
    assert not summary["preempted"] and len(summary["history"]) == 2
    assert all(np.isfinite(r["val_loss"]) for r in summary["history"])
