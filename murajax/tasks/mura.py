"""The MURA task: one binary label (abnormal) per musculoskeletal radiograph study.

Reading the MURA-v1.1 CSVs and folders is ``murajax.data.mura``'s; this module says what the
data means for training and validation: the paper's per-study-type loss weights, one model
output, a study's probability as the mean of its views', and study-level AUROC and Cohen's
kappa as the validation metrics (the full report with bootstrap CIs is ``murajax.evaluation``).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from murajax import evaluation
from murajax.data import mura


@dataclasses.dataclass(frozen=True)
class MuraTask:
    name: str = "mura"
    num_outputs: int = 1  # one logit: abnormal

    def read_split(self, data_config, split: str) -> mura.MuraIndex:
        """The images and studies of ``split`` as ``config.data`` selects them."""
        return mura.index_from_config(data_config, split)

    def loss_weights(self, train_index: mura.MuraIndex) -> np.ndarray:
        """float32 [study types, 2]: w_T0 and w_T1 of the paper, from the training split."""
        return mura.class_weights(train_index)

    def score_studies(self, index: mura.MuraIndex,
                      probabilities: np.ndarray) -> evaluation.StudyPredictions:
        """Per-image probabilities (NaN: not scored) -> per-study: the mean of its views."""
        return evaluation.score_studies(index.images, probabilities)

    def validation_metrics(self, index: mura.MuraIndex, probabilities: np.ndarray,
                           threshold: float) -> dict[str, float]:
        """The study-level numbers logged at every epoch end."""
        studies = self.score_studies(index, probabilities)
        studies = studies.subset(studies.label >= 0)  # unlabelled studies are not scored
        metrics = evaluation.binary_metrics(studies.label, studies.probability, threshold)
        return {"auroc": metrics["auroc"], "kappa": metrics["kappa"]}


MURA = MuraTask()
