"""``murajax --mode=evaluate``: score a trained run's best checkpoint(s) on a split.

Owns the workdir side of evaluation: the run's config with the command line's overrides
(``evaluation_config``), per-member probabilities for every image of a split
(``predict_split``), and ``evaluate_workdir``, which restores the top-k checkpoints, averages
the members, scores the studies and writes ``<workdir>/eval/<split>/`` with
``murajax.evaluation`` (where every number is computed).
"""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np
from absl import logging

from murajax import checkpoints, evaluation, inference, tasks
from murajax.data import pipeline
from murajax.errors import UserError


def evaluation_config(overrides, workdir: str | os.PathLike):
    """The run's saved config (``<workdir>/config.json``) with ``overrides`` on top.

    ``overrides`` maps dotted field names to values, e.g. ``{"eval.ensemble_top_k": 3}``: the
    command line passes the ``--config.<field>`` flags given explicitly, so a run trained with
    ``eval.ensemble_top_k=3`` evaluates with 3 unless that flag is given. Model fields cannot
    be overridden (the checkpoints hold the run's model). A ``ConfigDict`` (the Python API's
    older form) contributes its whole ``eval`` section and a non-empty ``data.root``.
    """
    config = checkpoints.load_run_config(workdir)
    if isinstance(overrides, ml_collections.ConfigDict):
        config.eval = overrides.eval
        if overrides.data.root:
            config.data.root = overrides.data.root
        return config
    saved = os.path.join(str(workdir), checkpoints.CONFIG_FILE)
    for field, value in (overrides or {}).items():
        *parents, leaf = field.split(".")
        if parents and parents[0] == "model":
            raise UserError(f"--config.{field}: evaluation uses the model the run was trained "
                            f"with ({saved}); model fields cannot be overridden")
        section = config
        for name in parents:
            section = section.get(name) if isinstance(section, ml_collections.ConfigDict) else None
        if not isinstance(section, ml_collections.ConfigDict) or leaf not in section:
            raise UserError(f"--config.{field}: no such field in the run's config ({saved})")
        if field in ("data.num_workers", "data.prefetch"):
            del section[leaf]  # 'auto' or an integer: the saved type need not match
        try:
            section[leaf] = value
        except TypeError as e:
            raise UserError(f"--config.{field}={value!r}: {e}") from None
    return config


def predict_split(predictor, index, data_config, batch_size: int) -> np.ndarray:
    """Per-member probabilities ``[members, images]`` for every image of ``index``; NaN for an
    image skipped as unreadable."""
    probabilities = np.full((len(predictor.variables), len(index.images)), np.nan, np.float32)
    for batch in pipeline.eval_loader(index, data_config, global_batch_size=batch_size):
        logits = predictor.predict_batch(batch)
        real = batch["mask"] > 0  # not padding, not an image skipped as unreadable
        probabilities[:, batch["index"][real]] = np.asarray(jax.nn.sigmoid(logits))[:, real]
    return probabilities


def evaluate_workdir(overrides, workdir: str | os.PathLike, readers: str = "") -> str:
    """Scores a run's best checkpoint (or top-k ensemble) on ``config.eval.split`` and writes
    ``<workdir>/eval/<split>/``: report.json, report.md, predictions.csv, roc.png,
    calibration.png. Returns that folder. The config is the run's own with ``overrides``
    (dotted field -> value, or None) applied: see ``evaluation_config``."""
    config = evaluation_config(overrides, workdir)
    top_k = int(config.eval.ensemble_top_k)
    if top_k < 1:
        raise UserError(f"config.eval.ensemble_top_k must be >= 1, got {top_k}")
    # config.eval.use_ema (the run's, or --config.eval.use_ema): score the EMA weights.
    predictor = inference.Predictor.from_workdir(
        workdir, top_k=top_k, batch_size=int(config.eval_batch_size),
        use_ema=bool(config.eval.get("use_ema", False)))
    steps = predictor.steps  # the ensemble's checkpoints, found once by from_workdir
    task = tasks.from_config(config)
    index = task.read_split(config.data, config.eval.split)
    logging.info("evaluating checkpoints %s%s on %s: %d images in %d studies", steps,
                 " (EMA weights)" if predictor.use_ema else "", config.eval.split,
                 len(index.images), len(index.studies))
    members = predict_split(predictor, index, config.data, int(config.eval_batch_size))
    studies = task.score_studies(index, evaluation.ensemble_probabilities(list(members)))
    unlabelled = int(np.sum(studies.label < 0))
    if unlabelled:
        logging.info("%d studies without a label are left out of the report", unlabelled)
        studies = studies.subset(studies.label >= 0)
    comparison = None
    readers = readers or config.eval.readers
    if readers:
        reader_studies, names, labels = evaluation.read_reader_labels(readers)
        rows = evaluation.align_to_readers(studies, reader_studies)
        gold = [g.strip() for g in str(config.eval.reader_gold).split(",") if g.strip()]
        comparison = evaluation.compare_with_readers(
            studies.probability[rows], labels, reader_names=names,
            threshold=float(config.eval.threshold), num_samples=int(config.eval.bootstrap_samples),
            seed=int(config.seed), gold_subset=gold or None, study_types=studies.study_type[rows],
        )
    report = evaluation.build_report(
        studies, float(config.eval.threshold), num_samples=int(config.eval.bootstrap_samples),
        seed=int(config.seed),
        checkpoints=[f"step {s}" + (" (EMA)" if predictor.use_ema else "") for s in steps],
        reader_comparison=comparison,
    )
    out_dir = os.path.join(str(workdir), "eval", str(config.eval.split))
    evaluation.write_outputs(out_dir, report, studies)
    aggregate = report["aggregate"]
    logging.info("%s: study AUROC %.4f, kappa %.4f over %d studies -> %s", config.eval.split,
                 aggregate["auroc"]["value"], aggregate["kappa"]["value"], len(studies), out_dir)
    return out_dir
