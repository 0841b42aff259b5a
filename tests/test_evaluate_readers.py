"""murajax.evaluation.readers: reader labels and the paper's reader-comparison protocols on a
hand-worked example."""

import json
import os

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score, f1_score

from murajax import evaluation as ev
from murajax.errors import UserError


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
