"""``murajax --mode=audit``: a reviewer's worklist of the labels a trained run doubts.

``audit_workdir(overrides, workdir)`` scores ``config.eval.split`` with the run's best-k
ensemble (the config is the run's own with ``overrides``, as ``--mode=evaluate`` takes it:
``modes.evaluate.evaluation_config``) and writes ``<workdir>/audit/<split>/``:

* ``suspects.csv``: ``study,study_type,label,probability,score``, one row per labelled study,
  most suspicious first (``score`` descending; ties keep the split's order). ``study`` is the
  study id (``train/XR_WRIST/patient00001/study1_positive``), ``probability`` the ensemble's
  study probability (mean of its views'), ``score`` the suspicion (``suspicion_scores``);
* ``suspects.md``: the top 20 as a table, each with links to its views' CAM overlays;
* ``cam/<rank>_<study type>_<patient>_<study>_<image>.png``: those overlays, at the images'
  own size (``modes.predict.write_overlays``).

``score_split`` (the ensemble's study probabilities over a split) is shared with
``--mode=relabel`` (``murajax.modes.relabel``).
"""

from __future__ import annotations

import csv
import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from absl import logging

from murajax import evaluation, tasks
from murajax.data.files import ImageInput
from murajax.errors import UserError
from murajax.inference.cam import load_original
from murajax.inference.predictor import Predictor
from murajax.modes.evaluate import evaluation_config, predict_split
from murajax.modes.predict import cached_sources, write_overlays

SUSPECT_COLUMNS = ("study", "study_type", "label", "probability", "score")
TOP = 20  # studies in suspects.md, with CAM overlays


@dataclasses.dataclass
class SplitScores:
    """What ``score_split`` returns: the config used, the ensemble, the split's index and the
    ensemble's study predictions (``task.score_studies``; studies in first-appearance order)."""

    config: object
    split: str
    predictor: Predictor
    index: object  # the task's index of the split (mura.MuraIndex)
    studies: evaluation.StudyPredictions


def score_split(overrides, workdir: str | os.PathLike, split: str | None = None) -> SplitScores:
    """The best-k ensemble of ``workdir`` on ``split`` (default ``config.eval.split``): the
    run's config with ``overrides`` (``evaluation_config``), ``Predictor.from_workdir`` with
    ``config.eval.ensemble_top_k`` / ``eval_batch_size`` / ``eval.use_ema``, per-image
    probabilities (``predict_split``), averaged over members, then per study."""
    config = evaluation_config(overrides, workdir)
    split = str(config.eval.split if split is None else split)
    top_k = int(config.eval.ensemble_top_k)
    if top_k < 1:
        raise UserError(f"config.eval.ensemble_top_k must be >= 1, got {top_k}")
    predictor = Predictor.from_workdir(workdir, top_k=top_k, batch_size=int(config.eval_batch_size),
                                       use_ema=bool(config.eval.get("use_ema", False)))
    task = tasks.from_config(config)
    index = task.read_split(config.data, split)
    logging.info("scoring %s with checkpoints %s%s: %d images in %d studies", split,
                 predictor.steps, " (EMA weights)" if predictor.use_ema else "",
                 len(index.images), len(index.studies))
    members = predict_split(predictor, index, config.data, int(config.eval_batch_size))
    studies = task.score_studies(index, evaluation.ensemble_probabilities(list(members)))
    return SplitScores(config, split, predictor, index, studies)


def suspicion_scores(labels, probabilities, running_loss=None) -> np.ndarray:
    """How much the model doubts each given label, in [0, 1]: ``|probability - label|``.

    ``running_loss``: the training loss each study had while the run trained (one value per
    study, NaN where unknown; ``training_losses`` reads a ``config.reweight`` run's); when
    given, a study's score is the mean of its disagreement and its loss's rank
    among the studies with one (0 the lowest, 1 the highest; ties share their mean rank), and
    the disagreement alone where the loss is NaN.
    """
    labels = np.asarray(labels, np.float64)
    probabilities = np.asarray(probabilities, np.float64)
    if labels.shape != probabilities.shape:
        raise ValueError(f"labels {labels.shape} and probabilities {probabilities.shape} differ")
    disagreement = np.abs(probabilities - labels)
    if running_loss is None:
        return disagreement
    loss = np.asarray(running_loss, np.float64)
    if loss.shape != labels.shape:
        raise ValueError(f"running_loss must have shape {labels.shape}, got {loss.shape}")
    known = np.isfinite(loss)
    if known.sum() < 2:
        return disagreement
    values = loss[known]
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    for value in np.unique(values):  # ties: their mean rank
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    scores = disagreement.copy()
    scores[known] = 0.5 * disagreement[known] + 0.5 * ranks / (len(values) - 1)
    return scores


def rank_suspects(studies: evaluation.StudyPredictions, running_loss=None):
    """``(studies, scores)``: the labelled studies (label 0 or 1) sorted most suspicious first
    (score descending, ties in the split's order). ``running_loss``: study id -> loss
    (see ``suspicion_scores``), or None."""
    labelled = studies.subset(studies.label >= 0)
    loss = None
    if running_loss is not None:
        loss = np.array([float(running_loss.get(s, np.nan)) for s in labelled.study])
    scores = suspicion_scores(labelled.label, labelled.probability, loss)
    order = np.argsort(-scores, kind="stable")
    ranked = evaluation.StudyPredictions(
        study=[labelled.study[i] for i in order], study_type=labelled.study_type[order],
        label=labelled.label[order], probability=labelled.probability[order],
        n_views=labelled.n_views[order])
    return ranked, scores[order]


def training_losses(workdir, index) -> dict[str, float] | None:
    """Study id -> the mean running loss of its views (NaN-free views only) in ``workdir``'s
    latest checkpoint, for the train split's ``index``; None if the run kept no running loss
    (``config.reweight.mode='none'``) or kept it for another number of images."""
    from murajax import checkpoints

    reader = checkpoints.Checkpointer(workdir, read_only=True)
    step = reader.latest_step()
    loss = None if step is None else reader.restore_running_loss(step)
    if loss is None:
        return None
    if loss.shape != (len(index.images),):
        logging.warning("the running loss of %s has %d images, the train split %d: not used",
                        workdir, loss.shape[0], len(index.images))
        return None
    result = {}
    for study in index.studies:
        values = loss[index.views(study)]
        values = values[np.isfinite(values)]
        if len(values):
            result[study] = float(values.mean())
    logging.info("audit: the running loss of %d studies (checkpoint %d) joins the score",
                 len(result), step)
    return result


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def _overlay_name(rank: int, study: str, image_path: str) -> str:
    """``01_XR_WRIST_patient00001_study1_positive_image1``: unique per study and view."""
    parts = [p for p in study.replace("\\", "/").split("/") if p]
    return _safe("_".join([f"{rank:02d}"] + parts[-3:] + [Path(image_path).stem]))


def _write_csv(path: Path, ranked, scores) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(SUSPECT_COLUMNS)
        for i, study in enumerate(ranked.study):
            writer.writerow([study, evaluation.study_type_name(int(ranked.study_type[i])),
                             int(ranked.label[i]), f"{ranked.probability[i]:.6f}",
                             f"{scores[i]:.6f}"])


def _write_markdown(path: Path, split: str, steps, ranked, scores, overlays, total: int,
                    errors, with_loss: bool = False) -> None:
    top = min(TOP, len(ranked))
    score = ("the mean of |study probability - label| and the rank of the study's running "
             "training loss (0 lowest, 1 highest)" if with_loss else
             "|study probability - label|")
    lines = [f"# Label audit: {split}", "",
             f"The {top} of {total} labelled studies whose given label the ensemble (checkpoints "
             f"{steps}) doubts most; score = {score} (1: certain the label "
             "is wrong). All studies, ranked: `suspects.csv`. Each CAM shows where the model "
             "sees an abnormality.", "",
             "| rank | study | type | label | probability | score | CAM overlays |",
             "|---:|---|---|---:|---:|---:|---|"]
    for i in range(top):
        links = " ".join(f"[view {j + 1}](cam/{name}.png)" for j, name in enumerate(overlays[i]))
        lines.append(f"| {i + 1} | `{ranked.study[i]}` | "
                     f"{evaluation.study_type_name(int(ranked.study_type[i]))} | "
                     f"{int(ranked.label[i])} | {ranked.probability[i]:.3f} | {scores[i]:.3f} | "
                     f"{links or '-'} |")
    if errors:
        lines += ["", "Overlays that could not be drawn:", ""]
        lines += [f"* `{image}`: {message}" for image, message in errors]
    path.write_text("\n".join(lines) + "\n")


def _cached_sources(index, data_config) -> dict:
    """``predict.cached_sources`` (the overlays drawn on the cached images, as
    ``--mode=predict`` on a cache does) for a run read from the image cache alone (empty
    ``config.data.root``: the original images may be absent); ``{}`` otherwise."""
    if data_config.root or not data_config.get("cache", ""):
        return {}
    from murajax.data import cache

    return cached_sources(cache.pixels_for_index(index, data_config))


def audit_workdir(overrides, workdir: str | os.PathLike, *,
                  running_loss: Mapping[str, float] | None = None) -> Path:
    """Writes ``<workdir>/audit/<split>/`` (suspects.csv, suspects.md, cam/; see the module
    docstring) for ``config.eval.split`` and returns that folder. ``overrides``: dotted field
    -> value, as ``--mode=evaluate`` takes them. ``running_loss``: per-study training losses
    (study id -> loss); None: on the train split of a run that kept one (``config.reweight``),
    its latest checkpoint's (``training_losses``), else the ensemble's disagreement alone."""
    scored = score_split(overrides, workdir)
    studies, index, predictor = scored.studies, scored.index, scored.predictor
    if running_loss is None and scored.split == "train":
        running_loss = training_losses(workdir, index)
    unlabelled = int(np.sum(studies.label < 0))
    if unlabelled:
        logging.info("%d studies without a label have nothing to audit: left out", unlabelled)
    ranked, scores = rank_suspects(studies, running_loss)
    if not len(ranked):
        raise UserError(f"the {scored.split} split has no labelled study to audit")
    out_dir = Path(workdir) / "audit" / scored.split
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_csv(out_dir / "suspects.csv", ranked, scores)

    top = min(TOP, len(ranked))
    items, overlays = [], []
    for rank, study in enumerate(ranked.study[:top], start=1):
        names = []
        for position in index.views(study):
            record = index.images[position]
            name = _overlay_name(rank, study, record.path)
            names.append(name)
            items.append(ImageInput(record.path, study,
                                    evaluation.study_type_name(int(record.study_type)), name))
        overlays.append(names)
    sources = _cached_sources(index, scored.config.data)
    predictions = predictor.predict_images(items, cam=True, load=sources.get("load"))
    errors = list(predictions.errors)
    errors += write_overlays(predictor, predictions.rows, out_dir / "cam",
                             original=sources.get("original", load_original))
    failed = {image for image, _ in errors}  # unreadable, or the overlay failed
    drawn = {row.name for row in predictions.rows if row.image not in failed}
    overlays = [[name for name in names if name in drawn] for names in overlays]
    _write_markdown(out_dir / "suspects.md", scored.split, predictor.steps, ranked, scores,
                    overlays, len(ranked), errors, with_loss=running_loss is not None)
    logging.info("audit of %s: %d labelled studies ranked, the top %d with %d CAM overlays -> %s",
                 scored.split, len(ranked), top, sum(len(n) for n in overlays), out_dir)
    return out_dir
