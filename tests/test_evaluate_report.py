"""murajax.evaluation.report: the report's numbers against scikit-learn, and the files written."""

import csv
import json

import numpy as np
import pytest

from murajax import evaluation as ev
from murajax.errors import UserError
from tests.evaluation_reference import sklearn_metrics


def _studies(seed=0, n=300):
    rng = np.random.default_rng(seed)
    types = rng.integers(0, 7, n)
    y = rng.integers(0, 2, n)
    p = np.clip(0.3 * y + 0.7 * rng.random(n), 0, 1)
    p[:5] = 0.5  # exactly at the threshold: normal
    return ev.StudyPredictions(
        study=[f"MURA-v1.1/valid/{ev.STUDY_TYPES[t]}/patient{i:05d}/study1/" for i, t in enumerate(types)],
        study_type=types, label=y, probability=p, n_views=rng.integers(1, 5, n))


def test_build_report_and_write_outputs(tmp_path):
    studies = _studies()
    report = ev.build_report(studies, 0.5, num_samples=300, seed=0, checkpoints=["ckpt_10", "ckpt_12"])
    assert set(report["by_study_type"]) == set(ev.STUDY_TYPES)
    for k in ("n", "tp", "fp", "tn", "fn", "n_images"):
        assert sum(g[k] for g in report["by_study_type"].values()) == report["aggregate"][k]
    ev.write_outputs(tmp_path / "out", report, studies)
    out = tmp_path / "out"
    for name in ("report.json", "report.md", "predictions.csv", "roc.png", "calibration.png"):
        assert (out / name).stat().st_size > 0, name
    for name in ("roc.png", "calibration.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["study", "study_type", "label", "probability", "n_views"]
    y = np.array([int(r["label"]) for r in rows])
    p = np.array([float(r["probability"]) for r in rows])
    t = np.array([r["study_type"] for r in rows])
    assert [r["study"] for r in rows] == studies.study
    np.testing.assert_array_equal(p, studies.probability)
    saved = json.loads((out / "report.json").read_text())
    assert saved["threshold"] == 0.5 and saved["checkpoints"] == ["ckpt_10", "ckpt_12"]
    assert saved["num_bootstrap"] == 300
    groups = [("aggregate", saved["aggregate"], np.ones(len(y), bool))] + [
        (name, g, t == name) for name, g in saved["by_study_type"].items()]
    for name, g, mask in groups:
        want = sklearn_metrics(y[mask], p[mask])
        for k in ev.RATE_METRICS:
            assert g[k]["value"] == pytest.approx(want[k], abs=1e-12), (name, k)
            assert g[k]["ci_low"] <= g[k]["value"] <= g[k]["ci_high"], (name, k)
        assert g["n"] == mask.sum() and g["n_positive"] == y[mask].sum()
    md = (out / "report.md").read_text()
    for name in ev.STUDY_TYPES + ("Overall", "AUROC", "Kappa", "Sensitivity", "Specificity", "ckpt_12"):
        assert name in md
    assert f"{saved['aggregate']['auroc']['value']:.3f}" in md


def test_build_report_refuses_unlabelled_studies():
    s = ev.aggregate_studies(["x/XR_HAND/p/s", "y", "y"], [0.1, 0.2, 0.4], [-1, 1, 1])
    with pytest.raises(UserError, match="1 of 2 studies have no label"):
        ev.build_report(s, 0.5, num_samples=10, seed=0, checkpoints=[])
