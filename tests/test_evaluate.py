"""Tests for murajax.evaluate: metrics against scikit-learn, the vectorised bootstrap, study
aggregation, reports, and the paper's reader-comparison protocols on a hand-worked example."""

import csv
import json
import math
import os
import warnings

import numpy as np
import pytest
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    accuracy_score,
    cohen_kappa_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from murajax import evaluate as ev
from murajax.errors import UserError


def _sklearn_metrics(y, p, threshold=0.5):
    pred = (np.asarray(p) > threshold).astype(int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        warnings.simplefilter("ignore", UserWarning)
        return {
            "auroc": roc_auc_score(y, p) if len(set(y)) == 2 else math.nan,
            "kappa": cohen_kappa_score(y, pred),
            "f1": f1_score(y, pred, zero_division=np.nan),
            "precision": precision_score(y, pred, zero_division=np.nan),
            "sensitivity": recall_score(y, pred, zero_division=np.nan),
            "specificity": recall_score(y, pred, pos_label=0, zero_division=np.nan),
            "accuracy": accuracy_score(y, pred),
        }


def _random_data(seed, n, ties=False):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = np.clip(0.35 * y + 0.65 * rng.random(n), 0, 1)
    if ties:
        p = np.round(p, 1)  # many exact ties, some exactly at the threshold 0.5
    return y, p


def _assert_close(a, b, what=""):
    if math.isnan(b):
        assert math.isnan(a), what
    else:
        assert a == pytest.approx(b, abs=1e-12), what


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_binary_metrics_match_sklearn(seed, ties, threshold):
    y, p = _random_data(seed, 37 + 29 * seed, ties)
    got = ev.binary_metrics(y, p, threshold)
    want = _sklearn_metrics(y, p, threshold)
    for k in ev.RATE_METRICS:
        _assert_close(got[k], want[k], k)
    pred = p > threshold
    assert got["tp"] == int(np.sum(pred & (y == 1)))
    assert got["fp"] == int(np.sum(pred & (y == 0)))
    assert got["tn"] == int(np.sum(~pred & (y == 0)))
    assert got["fn"] == int(np.sum(~pred & (y == 1)))
    assert (got["n"], got["n_positive"], got["n_negative"]) == (len(y), y.sum(), len(y) - y.sum())


def test_binary_metrics_undefined_is_nan():
    got = ev.binary_metrics([1, 1, 1], [0.9, 0.2, 0.7])
    assert math.isnan(got["auroc"]) and math.isnan(got["specificity"])
    assert got["sensitivity"] == pytest.approx(2 / 3)
    got = ev.binary_metrics([0, 0], [0.1, 0.2])  # all true negatives: kappa, F1, precision undefined
    for k in ("auroc", "kappa", "f1", "precision", "sensitivity"):
        assert math.isnan(got[k]), k
    assert got["specificity"] == 1.0 and got["accuracy"] == 1.0
    empty = ev.binary_metrics([], [])
    assert empty["n"] == 0 and math.isnan(empty["accuracy"])
    with pytest.raises(ValueError):
        ev.binary_metrics([0, 2], [0.1, 0.2])


@pytest.mark.parametrize("seed", [0, 7])
def test_bootstrap_per_resample_values_match_sklearn(seed):
    y, p = _random_data(seed, 40, ties=bool(seed))
    num, chunk = 30, 7  # several chunks, the last one partial
    dist = ev.bootstrap_distribution(y, p, num_samples=num, seed=seed, chunk_size=chunk)
    idx = np.concatenate(list(ev.bootstrap_indices(len(y), num, seed, chunk)))
    assert idx.shape == (num, len(y))
    for r in (0, 6, 7, 13, 29):
        want = _sklearn_metrics(y[idx[r]], p[idx[r]])
        for k in ev.RATE_METRICS:
            _assert_close(dist[k][r], want[k], f"resample {r} {k}")


def test_bootstrap_ci_contains_estimate_and_narrows():
    widths = []
    for n in (100, 1600):
        y, p = _random_data(3, n)
        res = ev.bootstrap_metrics(y, p, num_samples=2000, seed=1)
        point = ev.binary_metrics(y, p)
        for k in ev.RATE_METRICS:
            assert res[k]["value"] == point[k]
            assert res[k]["ci_low"] <= res[k]["value"] <= res[k]["ci_high"], k
        widths.append({k: res[k]["ci_high"] - res[k]["ci_low"] for k in ev.RATE_METRICS})
    for k in ev.RATE_METRICS:
        assert widths[1][k] < 0.6 * widths[0][k], k  # ~1/sqrt(16) = 0.25 in theory
    again = ev.bootstrap_metrics(*_random_data(3, 100), num_samples=2000, seed=1)
    y, p = _random_data(3, 100)
    assert again == ev.bootstrap_metrics(y, p, num_samples=2000, seed=1)
    assert again != ev.bootstrap_metrics(y, p, num_samples=2000, seed=2)


def test_bootstrap_drops_undefined_resamples():
    # 1 positive in 30: many resamples hold no positive, their AUROC is NaN and left out.
    y = np.zeros(30, dtype=int)
    y[0] = 1
    p = np.linspace(0, 1, 30)
    dist = ev.bootstrap_distribution(y, p, num_samples=500, seed=0)
    assert np.isnan(dist["auroc"]).any() and not np.isnan(dist["auroc"]).all()
    res = ev.bootstrap_metrics(y, p, num_samples=500, seed=0)
    assert res["auroc"]["ci_low"] == res["auroc"]["ci_high"] == 0.0  # the positive scores lowest


def test_ensemble_is_mean_of_members():
    rng = np.random.default_rng(0)
    members = [rng.random(50) for _ in range(5)]
    ens = ev.ensemble_probabilities(members)
    np.testing.assert_allclose(ens, sum(members) / 5, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(ev.ensemble_probabilities(members[:1]), members[0])
    with pytest.raises(ValueError):
        ev.ensemble_probabilities([np.zeros(3), np.zeros(4)])


def test_aggregate_studies_one_to_thirteen_views():
    rng = np.random.default_rng(0)
    ids, probs, labels, types, expected = [], [], [], [], {}
    for k in range(1, 14):
        study = f"MURA-v1.1/valid/{ev.STUDY_TYPES[k % 7]}/patient{k:05d}/study1_{'positive' if k % 2 else 'negative'}/"
        p = rng.random(k)
        expected[study] = (p.mean(), k % 2, k % 7, k)
        ids += [study] * k
        probs += list(p)
        labels += [k % 2] * k
        types += [k % 7] * k
    perm = rng.permutation(len(ids))  # views of a study need not be contiguous
    ids = [ids[i] for i in perm]
    probs, labels, types = np.array(probs)[perm], np.array(labels)[perm], np.array(types)[perm]
    for study_types in (types, None, np.array([ev.STUDY_TYPES[t] for t in types])):
        s = ev.aggregate_studies(ids, probs, labels, study_types)
        first_seen = list(dict.fromkeys(ids))
        assert s.study == first_seen
        for i, study in enumerate(s.study):
            mean, label, stype, n_views = expected[study]
            assert s.probability[i] == pytest.approx(mean, abs=1e-15)
            assert (s.label[i], s.study_type[i], s.n_views[i]) == (label, stype, n_views)
    assert sorted(s.n_views.tolist()) == list(range(1, 14))


def test_aggregate_studies_rejects_disagreeing_views():
    with pytest.raises(ValueError, match="disagree on the label"):
        ev.aggregate_studies(["a", "a", "b"], [0.1, 0.2, 0.3], [0, 1, 1], [0, 0, 0])
    with pytest.raises(ValueError, match="study type"):
        ev.aggregate_studies(["a", "a"], [0.1, 0.2], [0, 0], [0, 1])
    s = ev.aggregate_studies(["x/XR_HAND/p/s", "y", "y"], [0.1, 0.2, 0.4], [-1, 1, 1])
    assert s.study_type.tolist() == [ev.STUDY_TYPES.index("XR_HAND"), -1]
    assert s.label.tolist() == [-1, 1] and s.probability[1] == pytest.approx(0.3)
    with pytest.raises(UserError, match="1 of 2 studies have no label"):
        ev.build_report(s, 0.5, num_samples=10, seed=0, checkpoints=[])


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
        want = _sklearn_metrics(y[mask], p[mask])
        for k in ev.RATE_METRICS:
            assert g[k]["value"] == pytest.approx(want[k], abs=1e-12), (name, k)
            assert g[k]["ci_low"] <= g[k]["value"] <= g[k]["ci_high"], (name, k)
        assert g["n"] == mask.sum() and g["n_positive"] == y[mask].sum()
    md = (out / "report.md").read_text()
    for name in ev.STUDY_TYPES + ("Overall", "AUROC", "Kappa", "Sensitivity", "Specificity", "ckpt_12"):
        assert name in md
    assert f"{saved['aggregate']['auroc']['value']:.3f}" in md


# ---------------------------------------------------------------------------------------------
# Reader comparison: a hand-worked example with 6 readers and 8 studies.
#
#   study     s1 s2 s3 s4 s5 s6 s7 s8
#   R1         0  1  1  0  0  0  0  1     (differs from the consensus on s1)
#   R2         1  1  1  1  0  0  0  1     (s4)
#   R3         1  1  1  0  0  0  0  1
#   R4         1  0  1  0  0  0  0  0     (s2)
#   R5         1  1  1  0  0  0  0  0
#   R6         1  1  1  0  1  0  0  0     (s5)
#   model p   .9 .8 .3 .5 .1 .2 .4 .7  -> > 0.5: 1 1 0 0 0 0 0 1 (0.5 itself is normal)
#
# s1-s7: each study has at most one reader off the consensus 1 1 1 0 0 0 0, so the majority of
# any 5 readers is the consensus. s8 is split 3-3: readers R1-R3 (who said 1) see the other five
# vote 2:3, gold 0; R4-R6 see 3:2, gold 1. So
#   gold A (for R1, R2, R3) = 1 1 1 0 0 0 0 0,   gold B (for R4, R5, R6) = 1 1 1 0 0 0 0 1.
# (Wrongly including reader i in its own gold would make s8 a 3-3 tie for everyone.)
# kappa = 2(tp*tn - fn*fp) / ((tp+fp)(fp+tn) + (tp+fn)(fn+tn)),  F1 = 2tp / (2tp + fp + fn):
#   R1 vs A: tp2 fp1(s8) fn1(s1) tn4  kappa 14/30 = 7/15   F1 4/6 = 2/3
#   R2 vs A: tp3 fp2(s4,s8) fn0 tn3   kappa 18/34 = 9/17   F1 6/8 = 3/4
#   R3 vs A: tp3 fp1(s8) fn0 tn4      kappa 24/32 = 3/4    F1 6/7
#   R4 vs B: tp2 fp0 fn2(s2,s8) tn4   kappa 16/32 = 1/2    F1 4/6 = 2/3
#   R5 vs B: tp3 fp0 fn1(s8) tn4      kappa 24/32 = 3/4    F1 6/7
#   R6 vs B: tp3 fp1(s5) fn1(s8) tn3  kappa 16/32 = 1/2    F1 6/8 = 3/4
#   model vs A: tp2 fp1(s8) fn1(s3) tn4: kappa 7/15, F1 2/3;  vs B: tp3 fp0 fn1(s3) tn4: 3/4, 6/7
# Readers' mean kappa = (7/15 + 9/17 + 3/4 + 1/2 + 3/4 + 1/2) / 6 = 1783/3060; F1 = 191/252.
# Model kappa = (3 * 7/15 + 3 * 3/4) / 6 = 73/120; F1 = (2/3 + 6/7) / 2 = 16/21.
# Differences: kappa 73/120 - 1783/3060 = 157/6120; F1 16/21 - 191/252 = 1/252.
#
# Protocol B, gold = majority of (R3, R4, R5) = 1 1 1 0 0 0 0 0 (= gold A; s8 votes 1,0,0).
# Remaining readers: R1 (7/15, 2/3), R2 (9/17, 3/4), R6 vs A: tp3 fp1(s5) fn0 tn4: 3/4, 6/7.
# Readers' mean kappa = (7/15 + 9/17 + 3/4) / 3 = 1781/3060, F1 = 191/252; model 7/15, 2/3;
# differences: kappa 7/15 - 1781/3060 = -353/3060, F1 2/3 - 191/252 = -23/252.

READERS = np.array([
    [0, 1, 1, 0, 0, 0, 0, 1],
    [1, 1, 1, 1, 0, 0, 0, 1],
    [1, 1, 1, 0, 0, 0, 0, 1],
    [1, 0, 1, 0, 0, 0, 0, 0],
    [1, 1, 1, 0, 0, 0, 0, 0],
    [1, 1, 1, 0, 1, 0, 0, 0],
]).T  # (8 studies, 6 readers)
MODEL_P = np.array([0.9, 0.8, 0.3, 0.5, 0.1, 0.2, 0.4, 0.7])
NAMES = ["R1", "R2", "R3", "R4", "R5", "R6"]


def test_reader_protocols_hand_computed():
    res = ev.compare_with_readers(MODEL_P, READERS, reader_names=NAMES, threshold=0.5,
                                  num_samples=200, seed=0, gold_subset=["R3", "R4", "R5"])
    a = res["protocol_a"]["metrics"]
    kappas = [7 / 15, 9 / 17, 3 / 4, 1 / 2, 3 / 4, 1 / 2]
    f1s = [2 / 3, 3 / 4, 6 / 7, 2 / 3, 6 / 7, 3 / 4]
    model_k = [7 / 15] * 3 + [3 / 4] * 3
    model_f = [2 / 3] * 3 + [6 / 7] * 3
    for j, r in enumerate(NAMES):
        assert a["kappa"]["readers"][r]["value"] == pytest.approx(kappas[j])
        assert a["f1"]["readers"][r]["value"] == pytest.approx(f1s[j])
        assert a["kappa"]["model_minus_reader"][r]["value"] == pytest.approx(model_k[j] - kappas[j])
        assert a["f1"]["model_minus_reader"][r]["value"] == pytest.approx(model_f[j] - f1s[j])
    assert a["kappa"]["readers_mean"]["value"] == pytest.approx(1783 / 3060)
    assert a["f1"]["readers_mean"]["value"] == pytest.approx(191 / 252)
    assert a["kappa"]["model"]["value"] == pytest.approx(73 / 120)
    assert a["f1"]["model"]["value"] == pytest.approx(16 / 21)
    assert a["kappa"]["model_minus_readers_mean"]["value"] == pytest.approx(157 / 6120)
    assert a["f1"]["model_minus_readers_mean"]["value"] == pytest.approx(1 / 252)
    for m in ("kappa", "f1"):
        d = a[m]["model_minus_readers_mean"]
        assert d["ci_low"] <= d["value"] <= d["ci_high"]
        assert d["significant"] is False  # 8 studies: nothing is significant

    b = res["protocol_b"]
    assert b["gold_readers"] == ["R3", "R4", "R5"]
    bm = b["metrics"]
    assert list(bm["kappa"]["readers"]) == ["R1", "R2", "R6"]
    for r, k, f in (("R1", 7 / 15, 2 / 3), ("R2", 9 / 17, 3 / 4), ("R6", 3 / 4, 6 / 7)):
        assert bm["kappa"]["readers"][r]["value"] == pytest.approx(k)
        assert bm["f1"]["readers"][r]["value"] == pytest.approx(f)
    assert bm["kappa"]["model"]["value"] == pytest.approx(7 / 15)
    assert bm["f1"]["model"]["value"] == pytest.approx(2 / 3)
    assert bm["kappa"]["model_minus_readers_mean"]["value"] == pytest.approx(-353 / 3060)
    assert bm["f1"]["model_minus_readers_mean"]["value"] == pytest.approx(-23 / 252)


def test_majority_vote_ties_are_abnormal():
    assert ev.majority_vote(np.array([[1, 0], [0, 0], [1, 1], [0, 1]])).tolist() == [1, 0, 1, 1]
    assert ev.majority_vote(np.array([[1, 0, 0], [1, 1, 0]])).tolist() == [0, 1]


def test_reader_bootstrap_recomputes_everything():
    """The CI of model - readers' mean equals percentiles of a brute-force per-resample loop."""
    rng = np.random.default_rng(5)
    n, num = 60, 12
    truth = rng.integers(0, 2, n)
    readers = np.where(rng.random((n, 6)) < 0.85, truth[:, None], 1 - truth[:, None])
    probs = np.clip(0.6 * truth + 0.5 * rng.random(n) - 0.05, 0, 1)
    res = ev.compare_with_readers(probs, readers, num_samples=num, seed=3)
    idx = np.concatenate(list(ev.bootstrap_indices(n, num, 3)))
    diffs = {"kappa": [], "f1": []}
    for row in idx:
        lab, pred = readers[row], (probs[row] > 0.5).astype(int)
        score = {"kappa": cohen_kappa_score, "f1": lambda t, q: f1_score(t, q, zero_division=np.nan)}
        for m, fn in score.items():
            r_scores, m_scores = [], []
            for i in range(6):
                others = np.delete(lab, i, axis=1)
                gold = (2 * others.sum(1) >= 5).astype(int)
                r_scores.append(fn(gold, lab[:, i]))
                m_scores.append(fn(gold, pred))
            diffs[m].append(np.mean(m_scores) - np.mean(r_scores))
    for m in ("kappa", "f1"):
        lo, hi = np.percentile(diffs[m], [2.5, 97.5])
        est = res["protocol_a"]["metrics"][m]["model_minus_readers_mean"]
        assert est["ci_low"] == pytest.approx(lo) and est["ci_high"] == pytest.approx(hi)


def test_reader_comparison_by_study_type_in_report_and_undefined_as_null(tmp_path):
    types = np.array([0, 0, 0, 6, 6, 6, 6, 6])
    res = ev.compare_with_readers(MODEL_P, READERS, reader_names=NAMES, num_samples=50, seed=0,
                                  study_types=types)
    assert set(res["by_study_type"]) == {"XR_ELBOW", "XR_WRIST"}
    assert res["by_study_type"]["XR_ELBOW"]["protocol_a"]["n_studies"] == 3
    # Study labels = R3's: the XR_ELBOW studies (s1-s3) are all abnormal, so AUROC is undefined.
    studies = ev.StudyPredictions([f"s{i}" for i in range(8)], types, READERS[:, 2], MODEL_P,
                                  np.ones(8, dtype=int))
    report = ev.build_report(studies, 0.5, num_samples=50, seed=0, checkpoints=[],
                             reader_comparison=res)
    ev.write_outputs(tmp_path, report, studies)
    md = (tmp_path / "report.md").read_text()
    assert "Comparison with radiologists" in md and "R6" in md and "n/a" in md
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["by_study_type"]["XR_ELBOW"]["auroc"]["value"] is None
    assert saved["reader_comparison"]["protocol_a"]["metrics"]["kappa"]["model"]["value"] == \
        pytest.approx(73 / 120)


def _write(tmp_path, text, name="readers.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_read_reader_labels(tmp_path):
    path = _write(tmp_path, "study,A,B,C\nMURA-v1.1/valid/s1/,1,0,1\n\nvalid/s2,0,0,0\n")
    studies, names, labels = ev.read_reader_labels(path)
    assert studies == ["MURA-v1.1/valid/s1/", "valid/s2"] and names == ["A", "B", "C"]
    assert labels.tolist() == [[1, 0, 1], [0, 0, 0]]
    s = ev.StudyPredictions(["valid/s2", "valid/s1"], np.array([0, 0]), np.array([0, 1]),
                            np.array([0.2, 0.8]), np.array([1, 1]))
    assert ev.align_to_readers(s, studies).tolist() == [1, 0]
    with pytest.raises(UserError, match="no model prediction"):
        ev.align_to_readers(s, ["s3"])


@pytest.mark.parametrize("text, match", [
    ("name,A,B\ns1,1,0\n", "row 1.*'study'"),
    ("study,A\ns1,1\n", "at least 2"),
    ("study,A,A\ns1,1,0\n", "duplicate"),
    ("study,A,B\ns1,1,0\ns2,1\n", "row 3: 2 fields"),
    ("study,A,B\ns1,1,0\ns2,1,yes\n", "row 3: reader 'B'.*'yes'"),
    ("study,A,B\ns1,1,0\ns1,1,1\n", "row 3: study 's1' already listed in row 2"),
    ("study,A,B\n", "no study rows"),
    ("", "empty"),
])
def test_read_reader_labels_errors(tmp_path, text, match):
    path = _write(tmp_path, text)
    with pytest.raises(UserError, match=match) as err:
        ev.read_reader_labels(path)
    assert str(path) in str(err.value) or "empty" in match
    assert os.path.basename(path) in str(err.value)


def test_read_reader_labels_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        ev.read_reader_labels(tmp_path / "nope.csv")
