"""The training loop: exact resume, checkpoints kept, logging, and the demo actually learning."""

import json
import pathlib

import jax
import numpy as np
import pytest

from murajax import checkpoints, synthetic, tasks, train
from murajax.errors import UserError
from tests import helpers


@pytest.fixture(scope="module")
def mura_root(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("data"), num_studies=40, seed=3)


def _config(root, **overrides):
    return helpers.run_config(root, **{"checkpoint_every_steps": 4, "log_every_steps": 2,
                                       **overrides})


@pytest.fixture(scope="module")
def uninterrupted(mura_root, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    return workdir, train.train_and_evaluate(_config(mura_root), workdir)


def test_resumed_run_ends_with_bit_identical_params(mura_root, uninterrupted, tmp_path):
    _, full = uninterrupted
    steps_per_epoch = full["history"][0]["step"]
    # Stop mid-epoch 0, at a step that is no checkpoint_every_steps multiple, then again in
    # epoch 1, then finish.
    final = helpers.train_with_two_interruptions(
        lambda **extra: _config(mura_root, **extra), tmp_path, steps_per_epoch)
    helpers.assert_same_tree(helpers.final_variables(tmp_path), helpers.final_variables(uninterrupted[0]))
    assert final["val_loss"] == full["val_loss"]
    # metrics.jsonl reads as one run: same train losses at the same steps.
    def losses(workdir):
        records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["split"], r["loss"]) for r in records]
    assert losses(tmp_path) == losses(uninterrupted[0])


def test_run_that_already_finished_does_nothing_more(mura_root, uninterrupted):
    workdir, full = uninterrupted
    steps_before = checkpoints.Checkpointer(workdir, read_only=True).all_steps()
    variables_before = helpers.final_variables(workdir)
    again = train.train_and_evaluate(_config(mura_root), workdir)
    assert again["history"] == full["history"] and again["step"] == full["step"]
    assert checkpoints.Checkpointer(workdir, read_only=True).all_steps() == steps_before
    helpers.assert_same_tree(helpers.final_variables(workdir), variables_before)


def test_keeps_latest_and_best_checkpoints_with_their_validation_loss(uninterrupted):
    workdir, full = uninterrupted
    steps = checkpoints.Checkpointer(workdir, read_only=True).all_steps()
    history = full["history"]
    best = min(history, key=lambda r: r["val_loss"])["step"]
    # keep_best=1: the best epoch-end checkpoint and the newest; mid-epoch ones are gone.
    assert set(steps) == {best, history[-1]["step"]}
    assert checkpoints.best_steps(workdir, 5) == [best]


def test_metrics_jsonl_has_train_and_validation_records(uninterrupted):
    workdir, _ = uninterrupted
    records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["split"] == "train"]
    valid_records = [r for r in records if r["split"] == "valid"]
    assert len(valid_records) == 2
    for key in ("step", "epoch", "loss", "learning_rate", "images_per_second"):
        assert all(key in r for r in train_records)
    for key in ("loss", "auroc", "kappa", "learning_rate"):
        assert all(np.isfinite(r[key]) for r in valid_records)
    assert (workdir / "tensorboard").is_dir()
    assert json.loads((workdir / "config.json").read_text())["model"]["name"] == "densenet_tiny"


def test_workdir_of_another_model_is_refused(mura_root, uninterrupted):
    workdir, _ = uninterrupted
    config = _config(mura_root)
    config.model.name = "densenet121"
    with pytest.raises(UserError, match="model.name='densenet_tiny'"):
        train.train_and_evaluate(config, workdir)


def test_non_finite_loss_stops_with_a_clear_error_and_saves_nothing(mura_root, tmp_path):
    config = _config(mura_root, **{"optim.learning_rate": 1e30, "checkpoint_every_steps": 1})
    with pytest.raises(train.NonFiniteLossError, match="was not saved"):
        train.train_and_evaluate(config, tmp_path)
    # Whatever was saved before the divergence holds finite numbers only.
    checkpointer = checkpoints.Checkpointer(tmp_path, read_only=True)
    for step in checkpointer.all_steps():
        params = checkpointer.restore_variables(step)["params"]
        assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


def test_evaluate_mode_report_agrees_with_sklearn_on_its_predictions(mura_root, uninterrupted):
    import csv

    from sklearn.metrics import cohen_kappa_score, roc_auc_score

    from murajax.modes import evaluate

    workdir, _ = uninterrupted
    flags_config = _config(mura_root, **{"eval.bootstrap_samples": 200,
                                         "eval.ensemble_top_k": 2})
    out = evaluate.evaluate_workdir(flags_config, workdir)
    for name in ("report.json", "report.md", "predictions.csv", "roc.png", "calibration.png"):
        assert (workdir / "eval" / "valid" / name).is_file(), name
    report = json.loads((workdir / "eval" / "valid" / "report.json").read_text())
    with open(f"{out}/predictions.csv") as f:
        rows = list(csv.DictReader(f))
    labels = np.array([int(r["label"]) for r in rows])
    probs = np.array([float(r["probability"]) for r in rows])
    assert report["aggregate"]["auroc"]["value"] == pytest.approx(roc_auc_score(labels, probs),
                                                                  abs=1e-6)
    assert report["aggregate"]["kappa"]["value"] == pytest.approx(
        cohen_kappa_score(labels, (probs > 0.5).astype(int)), abs=1e-6)
    # keep_best=1: the best epoch-end checkpoint, plus the newest if that is another one.
    assert len(report["checkpoints"]) == len(checkpoints.best_steps(workdir, 2)) >= 1


def test_predictor_probabilities_equal_eval_step(mura_root, uninterrupted):
    from murajax import inference, steps
    from murajax.data import mura, pipeline

    workdir, _ = uninterrupted
    config = _config(mura_root)
    step = checkpoints.best_steps(workdir, 1)[0]
    variables = checkpoints.restore_variables(workdir, step)
    state = helpers.tiny_state(config).replace(**variables)
    index = mura.index_from_config(config.data, "valid")
    batch = next(iter(pipeline.eval_loader(index, config.data, global_batch_size=16)))
    _, expected = jax.jit(steps.eval_step)(state, batch)

    predictor = inference.Predictor.from_workdir(workdir, top_k=1, batch_size=16)
    logits = predictor.predict_batch(batch)
    np.testing.assert_allclose(jax.nn.sigmoid(logits[0]), expected, rtol=1e-5, atol=1e-6)


def test_accelerator_config_trains_in_bfloat16_with_remat(mura_root, tmp_path):
    """murajax/configs/accelerator.py (bfloat16 compute, remat, float32 params and loss) runs end to
    end; only its size is scaled down (tiny model, batch 8, no worker processes)."""
    from murajax.configs import accelerator

    config = accelerator.get_config()
    assert config.model.dtype == "bfloat16" and config.model.remat
    for dotted, value in {
        "model.name": "densenet_tiny", "data.image_size": helpers.IMAGE_SIZE,
        "data.root": str(mura_root), "data.synthetic_studies": 0, "data.num_workers": 0,
        "data.prefetch": 0, "batch_size": 8, "eval_batch_size": 16, "num_epochs": 1,
        "checkpoint_every_steps": 2, "log_every_steps": 1, "keep_best": 1,
        "optim.learning_rate": 1e-3,
    }.items():
        section, *path = dotted.split(".")
        if path:
            config[section][path[0]] = value
        else:
            config[section] = value
    summary = train.train_and_evaluate(config, tmp_path)
    params = helpers.final_variables(tmp_path)["params"]
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(params))
    assert np.isfinite(summary["history"][-1]["val_loss"])
    assert summary["history"][-1]["step"] > 0


def test_warm_up_resumes_bit_identical_and_cannot_be_switched_on_mid_run(mura_root, uninterrupted,
                                                                         tmp_path):
    """config.optim.warmup_steps: the warm-up position is checkpointed (stopped at step 3 of a
    6-step warm-up, the resumed run ends bit-identical); the train records log the warmed-up
    rate; a run saved without a warm-up is refused one."""
    def config(**extra):
        return _config(mura_root, **{"optim.warmup_steps": 6, "num_epochs": 1, **extra})

    straight = train.train_and_evaluate(config(), tmp_path / "straight")
    first = train.train_and_evaluate(config(stop_after_steps=3), tmp_path / "resumed")
    assert first["preempted"] and first["step"] == 3
    resumed = train.train_and_evaluate(config(), tmp_path / "resumed")
    helpers.assert_same_tree(helpers.final_variables(tmp_path / "resumed"),
                             helpers.final_variables(tmp_path / "straight"))
    assert resumed["val_loss"] == straight["val_loss"]
    records = [json.loads(l) for l in (tmp_path / "straight" / "metrics.jsonl").read_text()
               .splitlines()]
    rate = config().optim.learning_rate
    for r in (r for r in records if r["split"] == "train"):  # the next update's rate
        assert r["learning_rate"] == pytest.approx(rate * min(1, (r["step"] + 1) / 6),
                                                   rel=2 * float(np.finfo(np.float32).eps))
    with pytest.raises(UserError, match="a warm-up cannot be added to or dropped from a run"):
        train.train_and_evaluate(config(), uninterrupted[0])


def test_synthetic_data_is_recorded_by_absolute_path(tmp_path, monkeypatch):
    """A run in a relative workdir records its generated data's folder absolute, so evaluate
    and predict find it from any working folder."""
    monkeypatch.chdir(tmp_path)
    config = helpers.tiny_config(**{"data.synthetic_studies": 14})
    data = train.prepare_data(config, pathlib.Path("runs/demo"), tasks.from_config(config))
    assert config.data.root == str(tmp_path / "runs/demo/data/MURA-v1.1")
    assert len(data.valid.images) > 0
    assert all(pathlib.Path(r.path).is_absolute() for r in data.valid.images)
