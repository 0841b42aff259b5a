"""The demo learns: the smoke config reaches study-level AUROC >= 0.90 on synthetic MURA."""

import pytest

from murajax.configs import smoke
from murajax import train


@pytest.mark.slow
def test_smoke_config_reaches_auroc_090(tmp_path):
    config = smoke.get_config()
    summary = train.train_and_evaluate(config, tmp_path)
    assert summary["epoch"] == config.num_epochs
    assert summary["auroc"] >= 0.90, summary["history"]
