"""Evaluation as in the MURA paper: study-level metrics, bootstrap CIs, reports, reader comparison.

numpy only and pure (no JAX, no checkpoints): ``murajax --mode=evaluate``
(``murajax.modes.evaluate``) restores the checkpoints, runs the model to get one probability
per image, and hands the result to these functions. One module per concern:

* ``studies``: ``StudyPredictions``, ``score_studies`` / ``aggregate_studies`` (a study's
  probability is the mean of its views'), ``ensemble_probabilities`` (mean over members).
* ``metrics``: ``binary_metrics`` and the vectorised bootstrap (``bootstrap_metrics``, ...).
* ``readers``: reader labels and the paper's reader-comparison protocols.
* ``report``: ``build_report``, report.md, ROC and calibration plots, ``write_outputs``.

Pipeline::

    probs = ensemble_probabilities([model_a_probs, model_b_probs])  # per image
    studies = score_studies(index.images, probs)                    # per study: mean of views
    report = build_report(studies, 0.5, num_samples=10000, seed=0, checkpoints=[...])
    write_outputs(out_dir, report, studies)

Conventions (the paper's): a study is abnormal when its probability is strictly greater than
the threshold (0.5); 95% CIs are the 2.5th and 97.5th percentiles over bootstrap resamples of
studies; a difference is significant when its CI excludes 0; undefined metrics are NaN in
Python results and ``null`` in report.json.
"""

from murajax.evaluation.metrics import (COUNT_KEYS, RATE_METRICS, binary_metrics,
                                        bootstrap_distribution, bootstrap_indices,
                                        bootstrap_metrics)
from murajax.evaluation.readers import (align_to_readers, compare_with_readers, majority_vote,
                                        read_reader_labels)
from murajax.evaluation.report import build_report, write_outputs
from murajax.evaluation.studies import (STUDY_TYPES, UNKNOWN_STUDY_TYPE, StudyPredictions,
                                        aggregate_studies, ensemble_probabilities, score_studies,
                                        study_type_name)

__all__ = [
    "COUNT_KEYS",
    "RATE_METRICS",
    "STUDY_TYPES",
    "UNKNOWN_STUDY_TYPE",
    "StudyPredictions",
    "aggregate_studies",
    "align_to_readers",
    "binary_metrics",
    "bootstrap_distribution",
    "bootstrap_indices",
    "bootstrap_metrics",
    "build_report",
    "compare_with_readers",
    "ensemble_probabilities",
    "majority_vote",
    "read_reader_labels",
    "score_studies",
    "study_type_name",
    "write_outputs",
]
