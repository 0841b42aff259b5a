"""Weight EMA (config.ema.decay, config.eval.use_ema): the average itself, its absence when off,
exact resume (in process and after kill -9), and evaluation with the EMA weights."""

import json

import jax
import numpy as np
import pytest

from murajax import checkpoints, optim, parallel, steps, synthetic, train, train_state
from murajax.errors import UserError
from tests import harness, helpers

DECAY = 0.75  # far from 1, so that a few steps move the EMA well away from both ends


def _ema_state(config=None, decay=DECAY, bn_axis_name=None):
    config = config or helpers.tiny_config()
    model = train_state.model_from_config(config, bn_axis_name=bn_axis_name)
    return train_state.create_train_state(
        jax.random.key(0), model, optim.create_optimizer(config.optim),
        config.data.image_size, helpers.loss_weights(), ema_decay=decay)


def _host(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), jax.device_get(tree))


def _assert_close_trees(actual, expected, rtol=1e-5, atol=1e-6):
    leaves_a, leaves_e = jax.tree.leaves(actual), jax.tree.leaves(expected)
    assert len(leaves_a) == len(leaves_e) > 0
    for a, e in zip(leaves_a, leaves_e):
        np.testing.assert_allclose(np.asarray(a, np.float64), e, rtol=rtol, atol=atol)


def _paths(tree):
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


# ---- the average, and nothing when off -----------------------------------------------------------


def test_ema_after_k_steps_equals_the_average_of_the_params_sequence():
    """ema_0 = the initial weights; ema_t = d ema_{t-1} + (1 - d) w_t, for params and BatchNorm
    statistics, from the weights each step produced (recomputed here in float64)."""
    state = _ema_state()
    step = jax.jit(steps.train_step)
    expected = _host(state.variables)  # the EMA starts at the initial weights
    helpers.assert_same_tree(state.ema, state.variables)
    for k in range(4):
        state, _ = step(state, helpers.random_batch(8, seed=k, masked=(k,)))
        weights = _host(state.variables)
        expected = jax.tree.map(lambda e, w: DECAY * e + (1 - DECAY) * w, expected, weights)
    _assert_close_trees(state.ema, expected)
    # It is an average, not a copy: after 4 steps it lags the weights.
    gap = max(float(np.max(np.abs(np.asarray(e) - w)))
              for e, w in zip(jax.tree.leaves(state.ema), jax.tree.leaves(weights)))
    assert gap > 1e-4


def test_decay_zero_leaves_the_state_exactly_as_before():
    """Off (the default): no EMA leaf, so the state, its digest and every checkpoint keep their
    old structure; the train step leaves it so."""
    config = helpers.tiny_config()
    assert config.ema.decay == 0.0 and config.eval.use_ema is False
    assert train_state.ema_decay_from_config(config) == 0.0
    plain, off = helpers.tiny_state(config), _ema_state(config, decay=0.0)
    assert off.ema is None
    paths = _paths(off)
    assert not [p for p in paths if "ema" in p]
    assert {p.split("[")[0].split(".")[1] for p in paths} == {
        "step", "params", "opt_state", "batch_stats", "rng", "plateau", "loss_weights"}
    assert paths == _paths(plain)
    assert checkpoints.state_digest(off) == checkpoints.state_digest(plain)
    after, _ = jax.jit(steps.train_step)(off, helpers.random_batch(8))
    assert after.ema is None and _paths(after) == paths


@pytest.mark.parametrize("decay", [1.0, 1.5, -0.1, float("nan")])
def test_decay_outside_0_1_is_refused_naming_the_field(decay):
    with pytest.raises(UserError, match=r"config\.ema\.decay must be in \[0, 1\)"):
        train_state.ema_decay_from_config(helpers.tiny_config(**{"ema.decay": decay}))


def test_use_ema_without_an_ema_is_refused(tmp_path):
    config = helpers.tiny_config(**{"eval.use_ema": True})
    with pytest.raises(UserError, match=r"config\.eval\.use_ema=True needs an EMA"):
        train_state.ema_decay_from_config(config)
    with pytest.raises(UserError, match=r"config\.ema\.decay must be in"):  # before any work
        train.train_and_evaluate(helpers.tiny_config(**{"ema.decay": 1.0}), tmp_path)


@pytest.mark.parametrize("layout", ["jit", "pmap"])
def test_ema_is_replicated_like_params_under_jit_and_pmap(layout):
    """The shared train_step keeps the EMA in both layouts: the state is donated (the EMA shares
    no buffer with params), and every pmap replica holds the same average."""
    config = helpers.tiny_config()
    strategy = parallel.JitStrategy() if layout == "jit" else parallel.PmapStrategy()
    state = strategy.init_state(lambda: _ema_state(config, bn_axis_name=strategy.bn_axis_name))
    expected = _host(strategy.one_copy(state).variables)
    for k in range(2):
        state, _ = strategy.train_step(state, strategy.shard_batch(helpers.random_batch(8, k)))
        weights = _host(strategy.one_copy(state).variables)
        expected = jax.tree.map(lambda e, w: DECAY * e + (1 - DECAY) * w, expected, weights)
    _assert_close_trees(strategy.one_copy(state).ema, expected)
    if layout == "pmap":
        for leaf in jax.tree.leaves(state.ema):
            leaf = np.asarray(leaf)
            assert leaf.shape[0] == jax.local_device_count()
            assert all(np.array_equal(leaf[0], leaf[i]) for i in range(1, leaf.shape[0]))


# ---- whole runs: exact resume, validation, evaluation -------------------------------------------


@pytest.fixture(scope="module")
def mura_root(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("data"), num_studies=40, seed=3)


def _config(root, **overrides):
    return helpers.run_config(root, **{"checkpoint_every_steps": 4, "log_every_steps": 2,
                                       "ema.decay": DECAY, "eval.use_ema": True, **overrides})


def _final(workdir):
    step = checkpoints.Checkpointer(workdir, read_only=True).latest_step()
    return (checkpoints.restore_variables(workdir, step),
            checkpoints.restore_variables(workdir, step, use_ema=True))


@pytest.fixture(scope="module")
def uninterrupted(mura_root, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ema_uninterrupted")
    return workdir, train.train_and_evaluate(_config(mura_root), workdir)


def test_resumed_run_ends_with_bit_identical_ema_and_params(mura_root, uninterrupted, tmp_path):
    full_dir, full = uninterrupted
    steps_per_epoch = full["history"][0]["step"]
    final = helpers.train_with_two_interruptions(lambda **extra: _config(mura_root, **extra),
                                                 tmp_path, steps_per_epoch)
    (variables, ema), (full_variables, full_ema) = _final(tmp_path), _final(full_dir)
    helpers.assert_same_tree(variables, full_variables)
    helpers.assert_same_tree(ema, full_ema)
    assert final["history"] == full["history"]
    assert harness.metric_records(tmp_path) == harness.metric_records(full_dir)


def test_validation_logs_both_and_use_ema_selects_the_ema(uninterrupted):
    workdir, full = uninterrupted
    valid = [r for r in harness.metric_records(workdir) if r["split"] == "valid"]
    assert len(valid) == 2
    for record in valid:
        for key in ("loss", "auroc", "kappa", "ema_loss", "ema_auroc", "ema_kappa",
                    "ema_accuracy"):
            assert np.isfinite(record[key]), key
        assert record["ema_loss"] != record["loss"]  # two different sets of weights
    assert full["ema_val_loss"] == full["history"][-1]["ema_val_loss"]
    # config.eval.use_ema: each epoch-end checkpoint is scored (best-k) by the EMA's loss.
    reader = checkpoints.Checkpointer(workdir, read_only=True)
    by_step = {r["step"]: r for r in full["history"]}
    scored = [s for s in reader.all_steps() if s in by_step]
    assert scored
    for step in scored:
        assert reader.restore_progress(step)["val_loss"] == by_step[step]["ema_val_loss"]


def test_predictor_and_evaluate_mode_use_the_ema_weights(mura_root, uninterrupted):
    from murajax import inference
    from murajax.data import mura, pipeline
    from murajax.modes import evaluate

    workdir, _ = uninterrupted
    config = _config(mura_root)
    step = checkpoints.best_steps(workdir, 1)[0]
    ema = checkpoints.restore_variables(workdir, step, use_ema=True)
    index = mura.index_from_config(config.data, "valid")
    batch = next(iter(pipeline.eval_loader(index, config.data, global_batch_size=16)))
    _, expected = jax.jit(steps.eval_step)(helpers.tiny_state(config).replace(**ema), batch)

    # The run's config.json says use_ema=True; use_ema=False asks for the raw weights.
    with_ema = inference.Predictor.from_workdir(workdir, top_k=1, batch_size=16)
    raw = inference.Predictor.from_workdir(workdir, top_k=1, batch_size=16, use_ema=False)
    assert with_ema.use_ema and not raw.use_ema
    ema_p = jax.nn.sigmoid(with_ema.predict_batch(batch)[0])
    raw_p = jax.nn.sigmoid(raw.predict_batch(batch)[0])
    np.testing.assert_allclose(ema_p, expected, rtol=1e-5, atol=1e-6)
    assert np.max(np.abs(ema_p - raw_p)) > 1e-4

    def report(use_ema):
        out = evaluate.evaluate_workdir({"eval.use_ema": use_ema, "eval.bootstrap_samples": 50,
                                         "eval.ensemble_top_k": 1}, workdir)
        with open(f"{out}/report.json") as f:
            return json.load(f)

    ema_report, raw_report = report(True), report(False)
    assert ema_report["checkpoints"] == [f"step {step} (EMA)"]
    assert raw_report["checkpoints"] == [f"step {step}"]
    assert ema_report["aggregate"] != raw_report["aggregate"]


def _dict_state(seed, with_ema):
    rng = np.random.default_rng(seed)

    def variables():
        return {"params": {"w": jax.numpy.asarray(rng.normal(size=256).astype(np.float32))},
                "batch_stats": {"mean": jax.numpy.asarray(rng.normal(size=8).astype(np.float32))}}

    state = variables()
    if with_ema:
        state["ema"] = variables()
    return state


def test_ema_restore_checks_its_digest_and_refuses_runs_without_one(tmp_path):
    checkpointer = checkpoints.Checkpointer(tmp_path, keep_best=3)
    checkpointer.save(1, _dict_state(1, with_ema=True), {}, {"epoch": 0}, val_loss=1.0)
    checkpointer.save(2, _dict_state(2, with_ema=True), {}, {"epoch": 0}, val_loss=1.0)
    checkpointer.save(3, _dict_state(3, with_ema=False), {}, {"epoch": 0}, val_loss=1.0)
    checkpointer.wait()
    checkpointer.close()
    root = tmp_path / "checkpoints"
    assert "ema_variables_sha256" not in json.loads((root / "3/progress/metadata").read_text())
    # 2: its EMA digest no longer matches (as if the EMA's arrays had been damaged).
    progress_file = root / "2" / "progress" / "metadata"
    progress = json.loads(progress_file.read_text())
    progress["ema_variables_sha256"] = "0" * 64
    progress_file.write_text(json.dumps(progress))

    reader = checkpoints.Checkpointer(tmp_path, read_only=True)
    restored = reader.restore_variables(1, use_ema=True)
    helpers.assert_same_tree(restored, _dict_state(1, with_ema=True)["ema"])
    with pytest.raises(checkpoints.CorruptCheckpointError, match=f"checkpoint {root / '2'}:"):
        reader.restore_variables(2, use_ema=True)
    helpers.assert_same_tree(reader.restore_variables(2), {k: v for k, v in _dict_state(
        2, with_ema=True).items() if k != "ema"})  # the raw weights' digest still holds
    with pytest.raises(UserError, match="holds no EMA weights"):
        reader.restore_variables(3, use_ema=True)


def test_workdir_of_a_run_without_an_ema_is_refused_with_one(mura_root, uninterrupted):
    workdir, _ = uninterrupted
    with pytest.raises(UserError, match=r"config\.ema\.decay=0\.75, but this run has "
                                        r"config\.ema\.decay=0\.0"):
        train.train_and_evaluate(_config(mura_root, **{"ema.decay": 0.0,
                                                       "eval.use_ema": False}), workdir)


# ---- kill -9 ------------------------------------------------------------------------------------


def test_ema_run_killed_mid_epoch_resumes_bit_identically(mura_root, tmp_path):
    """One SIGKILL mid-epoch (one-device subprocesses, as tests/test_reliability.py's), then a
    run to the end: params and EMA equal an uninterrupted subprocess run's, bit for bit."""
    env = harness.subprocess_env(jax.config.jax_compilation_cache_dir)
    overrides = {"data.root": str(mura_root), "data.synthetic_studies": 0,
                 "data.image_size": 32, "batch_size": 8, "eval_batch_size": 16,
                 "num_epochs": 1, "checkpoint_every_steps": 3, "log_every_steps": 1,
                 "keep_best": 1, "ema.decay": DECAY}
    # Killed at step 7: the save of 6 waited for 3 to commit, so it resumes from 3 or 6.
    killed, reference = harness.killed_and_uninterrupted(tmp_path, overrides, env)
    (variables, ema), (ref_variables, ref_ema) = _final(killed), _final(reference)
    helpers.assert_same_tree(variables, ref_variables)
    helpers.assert_same_tree(ema, ref_ema)
    assert harness.metric_records(killed) == harness.metric_records(reference)
