"""Loss-based re-weighting (config.reweight): the weighting rule and the running-loss update on
hand-made arrays, the scatter inside the step (jit and pmap alike), its absence when off, exact
resume (in process and after kill -9), bad fields refused, and the audit reading it."""

import csv

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from murajax import checkpoints, optim, parallel, steps, synthetic, train, train_state
from murajax.data import mura
from murajax.errors import UserError
from murajax.modes import audit
from murajax.recipes import reweight
from tests import harness, helpers

NAN = np.nan


def _settings(mode="small_loss", quantile=0.5, weight=0.1, momentum=0.5, start_step=0):
    return reweight.Reweight(mode=mode, quantile=quantile, weight=weight, momentum=momentum,
                             start_step=start_step)


# ---- the rule, by hand ---------------------------------------------------------------------------

# Seen: 0.1, 0.5, 0.9, 0.3, 2.0 (sorted 0.1 0.3 0.5 0.9 2.0); entries 2 and 5 not seen yet.
RUNNING = np.array([0.1, 0.5, NAN, 0.9, 0.3, NAN, 2.0], np.float32)
INDEX = np.array([0, 1, 2, 3, 6, -1, 4], np.int32)  # -1: padding


def _weights(settings, step=5, running=RUNNING):
    return np.asarray(reweight.example_weights(jnp.asarray(running), jnp.asarray(INDEX),
                                               settings, jnp.asarray(step, jnp.int32)))


def test_small_loss_down_weights_the_examples_above_the_quantile():
    # quantile 0.5 of the seen losses: 0.5 (linear interpolation, as numpy): 0.9 and 2.0 above.
    np.testing.assert_allclose(_weights(_settings()), [1, 1, 1, 0.1, 0.1, 1, 1], rtol=1e-6)
    # quantile 0.25: 0.3; 0.5, 0.9 and 2.0 above (0.3 itself is not: strictly above).
    np.testing.assert_allclose(_weights(_settings(quantile=0.25)), [1, 0.1, 1, 0.1, 0.1, 1, 1],
                               rtol=1e-6)
    # quantile 0.7: 0.5 + 0.8 * (0.9 - 0.5) = 0.82.
    assert float(reweight.threshold(jnp.asarray(RUNNING), 0.7)) == pytest.approx(0.82, abs=1e-6)
    np.testing.assert_allclose(_weights(_settings(quantile=0.7, weight=0.0)),
                               [1, 1, 1, 0, 0, 1, 1])


def test_large_loss_up_weights_the_examples_above_the_quantile():
    np.testing.assert_allclose(_weights(_settings("large_loss", weight=3.0)),
                               [1, 1, 1, 3, 3, 1, 1], rtol=1e-6)
    np.testing.assert_allclose(_weights(_settings("large_loss", quantile=0.25, weight=2.0)),
                               [1, 2, 1, 2, 2, 1, 1], rtol=1e-6)


def test_unseen_examples_and_steps_before_the_start_weigh_one():
    # Before start_step: all 1; from it on, the rule.
    assert np.all(_weights(_settings(start_step=6), step=5) == 1.0)
    np.testing.assert_allclose(_weights(_settings(start_step=6), step=6),
                               [1, 1, 1, 0.1, 0.1, 1, 1], rtol=1e-6)
    # Nothing seen yet: all 1.
    assert np.all(_weights(_settings(), running=np.full(7, NAN, np.float32)) == 1.0)


def test_running_loss_update_by_hand():
    running = jnp.asarray([NAN, 1.0, NAN, 2.0], jnp.float32)
    index = jnp.asarray([1, 3, 0, -1, 2], jnp.int32)
    loss = jnp.asarray([3.0, 4.0, 5.0, 6.0, 7.0], jnp.float32)
    mask = jnp.asarray([1, 1, 1, 1, 0], jnp.float32)  # 2: masked (skipped or unlabelled)
    out = reweight.update_running_loss(running, index, loss, mask, momentum=0.5)
    # 1: 0.5 * 1 + 0.5 * 3 = 2; 3: 0.5 * 2 + 0.5 * 4 = 3; 0: first sight, 5; 2: untouched.
    np.testing.assert_array_equal(np.asarray(out), [5.0, 2.0, NAN, 3.0])


# ---- inside the step -----------------------------------------------------------------------------

NUM_IMAGES = 20


def _state(settings, bn_axis_name=None, config=None):
    config = config or helpers.tiny_config()
    model = train_state.model_from_config(config, bn_axis_name=bn_axis_name)
    return train_state.create_train_state(
        jax.random.key(0), model, optim.create_optimizer(config.optim), config.data.image_size,
        helpers.loss_weights(), reweight=settings, num_images=NUM_IMAGES)


def _batch(k, size=8):
    batch = helpers.random_batch(size, seed=k, masked=(k,))
    batch["index"] = np.random.default_rng(10 + k).permutation(NUM_IMAGES)[:size].astype(np.int32)
    batch["label"][size - 1] = -1  # unlabelled: no running loss
    return batch


def test_running_loss_after_two_steps_matches_numpy():
    """NaN at first; after each step the step's labelled real examples move as
    r <- m r + (1 - m) loss (their loss on the state before the step), the others not."""
    settings = _settings(momentum=0.5, start_step=0)
    state = _state(settings)
    assert state.running_loss.shape == (NUM_IMAGES,) and np.all(np.isnan(state.running_loss))
    expected = np.full(NUM_IMAGES, NAN, np.float64)
    step = jax.jit(steps.train_step)
    for k in range(2):
        batch = _batch(k)
        _, outputs, _ = jax.jit(steps.compute_gradients)(state, batch)
        loss = np.asarray(outputs["loss"], np.float64)
        for i, position in enumerate(batch["index"]):
            if batch["mask"][i] > 0 and batch["label"][i] >= 0:
                old = expected[position]
                expected[position] = loss[i] if np.isnan(old) else 0.5 * old + 0.5 * loss[i]
        state, _ = step(state, batch)
    got = np.asarray(state.running_loss, np.float64)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    seen = ~np.isnan(expected)
    assert 8 < seen.sum() < NUM_IMAGES  # some seen twice, some never
    np.testing.assert_allclose(got[seen], expected[seen], rtol=helpers.ROUNDING)


def test_the_weights_multiply_the_loss_in_the_gradient():
    """small_loss with weight 0 drops the examples above the threshold: the gradient is that of
    the batch with those masked, times (their share kept): the denominator stays."""
    batch = _batch(0)
    running = np.full(NUM_IMAGES, NAN, np.float32)
    running[batch["index"]] = np.arange(8, dtype=np.float32)  # position i has loss i
    state = _state(_settings(quantile=0.5, weight=0.0)).replace(running_loss=jnp.asarray(running))
    weights = np.asarray(reweight.example_weights(state.running_loss, batch["index"],
                                                  state.reweight, state.step))
    np.testing.assert_array_equal(weights, [1, 1, 1, 1, 0, 0, 0, 0])  # median 3.5
    count = float(np.sum(np.asarray(steps.supervised_mask(batch))))  # 0 masked, 7 unlabelled
    dropped = dict(batch, mask=batch["mask"] * weights)
    kept = float(np.sum(np.asarray(steps.supervised_mask(dropped))))
    grads, _, _ = jax.jit(steps.compute_gradients)(state, batch)
    plain = state.replace(running_loss=None, reweight=None)
    reference, _, _ = jax.jit(steps.compute_gradients)(plain, dropped)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(reference)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r) * kept / count,
                                   rtol=1e-4, atol=1e-7)


def test_jit_and_pmap_hold_the_same_running_loss():
    settings = _settings(momentum=0.5, start_step=1)  # the second step is re-weighted
    results = {}
    for layout in ("jit", "pmap"):
        strategy = parallel.JitStrategy() if layout == "jit" else parallel.PmapStrategy()
        state = strategy.init_state(lambda: _state(settings, strategy.bn_axis_name))
        for k in range(3):
            state, _ = strategy.train_step(state, strategy.shard_batch(_batch(k)))
        if layout == "pmap":  # every replica the same array
            replicas = np.asarray(state.running_loss)
            assert replicas.shape == (jax.local_device_count(), NUM_IMAGES)
            assert all(np.array_equal(replicas[0], r, equal_nan=True) for r in replicas[1:])
        results[layout] = np.asarray(strategy.one_copy(state).running_loss, np.float64)
    jit_loss, pmap_loss = results["jit"], results["pmap"]
    np.testing.assert_array_equal(np.isnan(jit_loss), np.isnan(pmap_loss))
    seen = ~np.isnan(jit_loss)
    assert seen.sum() > 8
    np.testing.assert_allclose(pmap_loss[seen], jit_loss[seen], rtol=8 * helpers.ROUNDING)


def _paths(tree):
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def test_mode_none_leaves_the_state_exactly_as_before():
    config = helpers.tiny_config()
    assert config.reweight.mode == "none"
    assert reweight.from_config(config) is None
    plain = helpers.tiny_state(config)
    off = _state(None, config=config)
    assert off.running_loss is None and off.reweight is None
    assert _paths(off) == _paths(plain)
    assert not [p for p in _paths(off) if "running_loss" in p]
    assert checkpoints.state_digest(off) == checkpoints.state_digest(plain)
    assert set(checkpoints._on_disk(off)) == set(checkpoints._on_disk(plain))
    after, _ = jax.jit(steps.train_step)(off, helpers.random_batch(8))
    assert after.running_loss is None and _paths(after) == _paths(plain)
    on = _state(_settings())
    assert "running_loss" in checkpoints._on_disk(on)


@pytest.mark.parametrize("field,value,message", [
    ("mode", "big_loss", r"config\.reweight\.mode must be one of none, small_loss, large_loss"),
    ("quantile", 1.0, r"config\.reweight\.quantile=1\.0 must be in \(0, 1\)"),
    ("momentum", 1.0, r"config\.reweight\.momentum=1\.0 must be in \[0, 1\)"),
    ("momentum", float("nan"), r"config\.reweight\.momentum must be a number"),
    ("start_epoch", -1, r"config\.reweight\.start_epoch=-1 must be an integer >= 0"),
    ("weight", 1.5, r"config\.reweight\.weight=1\.5 must be in \[0, 1\) with mode='small_loss'"),
])
def test_bad_fields_are_refused_naming_them(field, value, message, tmp_path):
    config = helpers.tiny_config(**{"reweight.mode": "small_loss", f"reweight.{field}": value})
    with pytest.raises(UserError, match=message):
        reweight.from_config(config)
    with pytest.raises(UserError, match=message):  # before any work
        train.train_and_evaluate(config, tmp_path)


def test_large_loss_needs_a_weight_above_one():
    config = helpers.tiny_config(**{"reweight.mode": "large_loss"})
    with pytest.raises(UserError, match=r"config\.reweight\.weight=0\.1 must be > 1"):
        reweight.from_config(config)
    config.reweight.weight = 2.0
    config.reweight.start_epoch = 2
    assert reweight.from_config(config, steps_per_epoch=5) == reweight.Reweight(
        "large_loss", quantile=0.7, weight=2.0, momentum=0.9, start_step=10)


# ---- whole runs ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mura_root(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("data"), num_studies=40, seed=3)


def _config(root, **overrides):
    return helpers.run_config(root, **{"checkpoint_every_steps": 4, "log_every_steps": 2,
                                       "reweight.mode": "small_loss", **overrides})


def _final(workdir):
    reader = checkpoints.Checkpointer(workdir, read_only=True)
    step = reader.latest_step()
    return checkpoints.restore_variables(workdir, step), reader.restore_running_loss(step)


@pytest.fixture(scope="module")
def uninterrupted(mura_root, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reweight_uninterrupted")
    return workdir, train.train_and_evaluate(_config(mura_root), workdir)


def test_resumed_run_ends_with_bit_identical_running_loss_and_params(mura_root, uninterrupted,
                                                                     tmp_path):
    full_dir, full = uninterrupted
    steps_per_epoch = full["history"][0]["step"]
    # The second stop is past start_epoch.
    final = helpers.train_with_two_interruptions(lambda **extra: _config(mura_root, **extra),
                                                 tmp_path, steps_per_epoch)
    (variables, running), (full_variables, full_running) = _final(tmp_path), _final(full_dir)
    helpers.assert_same_tree(variables, full_variables)
    np.testing.assert_array_equal(running, full_running)
    assert final["history"] == full["history"]
    assert harness.metric_records(tmp_path) == harness.metric_records(full_dir)
    # Every labelled train image was seen: a finite running loss each.
    index = mura.read_split(mura_root, "train")
    assert running.shape == (len(index.images),)
    labelled = np.array([r.label >= 0 for r in index.images])
    assert np.all(np.isfinite(running[labelled])) and np.all(running[labelled] >= 0)


def test_re_weighting_changes_the_training(mura_root, uninterrupted, tmp_path):
    """Same run with mode none: the first epoch (before start_epoch) is the same, the second
    is not."""
    _, full = uninterrupted
    plain = train.train_and_evaluate(_config(mura_root, **{"reweight.mode": "none"}), tmp_path)
    assert plain["history"][0] == full["history"][0]
    assert plain["history"][1]["val_loss"] != full["history"][1]["val_loss"]
    assert checkpoints.Checkpointer(tmp_path, read_only=True).restore_running_loss(
        plain["history"][1]["step"]) is None


def test_toggling_re_weighting_on_a_workdir_is_refused(mura_root, uninterrupted):
    workdir, _ = uninterrupted
    with pytest.raises(UserError, match=r"config\.reweight\.mode='small_loss', but this run has "
                                        r"config\.reweight\.mode='none'"):
        train.train_and_evaluate(_config(mura_root, **{"reweight.mode": "none"}), workdir)


def test_audit_reads_the_running_loss_per_study(mura_root, uninterrupted):
    workdir, _ = uninterrupted
    index = mura.read_split(mura_root, "train")
    _, running = _final(workdir)
    losses = audit.training_losses(workdir, index)
    labelled = {r.study for r in index.images if r.label >= 0}
    assert set(losses) == labelled
    study = index.studies[0]
    views = running[index.views(study)]
    assert losses[study] == pytest.approx(float(np.mean(views[np.isfinite(views)])), rel=1e-6)


def test_audit_of_the_train_split_joins_the_running_loss_to_the_score(uninterrupted):
    workdir, _ = uninterrupted
    out = audit.audit_workdir({"eval.split": "train", "eval.ensemble_top_k": 1}, workdir)
    with open(out / "suspects.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    gaps = [abs(float(r["score"]) - abs(float(r["probability"]) - int(r["label"])))
            for r in rows]
    assert max(gaps) > 1e-3  # not the disagreement alone
    assert "running training loss" in (out / "suspects.md").read_text()


# ---- kill -9 ---------------------------------------------------------------------------------------


def test_reweight_run_killed_mid_epoch_resumes_bit_identically(mura_root, tmp_path):
    """One SIGKILL mid-epoch (one-device subprocesses, as tests/test_ema.py's), then a run to the
    end: params and running loss equal an uninterrupted subprocess run's, bit for bit."""
    env = harness.subprocess_env(jax.config.jax_compilation_cache_dir)
    overrides = {"data.root": str(mura_root), "data.synthetic_studies": 0,
                 "data.image_size": 32, "batch_size": 8, "eval_batch_size": 16,
                 "num_epochs": 1, "checkpoint_every_steps": 3, "log_every_steps": 1,
                 "keep_best": 1, "reweight.mode": "small_loss", "reweight.start_epoch": 0}
    killed, reference = harness.killed_and_uninterrupted(tmp_path, overrides, env)
    (variables, running), (ref_variables, ref_running) = _final(killed), _final(reference)
    helpers.assert_same_tree(variables, ref_variables)
    np.testing.assert_array_equal(running, ref_running)
    assert np.isfinite(running).sum() > 0
    assert harness.metric_records(killed) == harness.metric_records(reference)
