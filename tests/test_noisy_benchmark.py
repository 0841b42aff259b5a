"""The noisy-labels benchmark's plumbing (benchmarks/noisy_labels.py), without training: study
paths matched across the two CSVs, precision at k, the best-combination rule, the table."""

import math

import pytest

from benchmarks import noisy_labels as nl
from murajax.configs import smoke

FLIPPED = ["MURA-v1.1/train/XR_WRIST/patient00001/study1_negative/",
           "MURA-v1.1/train/XR_HAND/patient00007/study2_positive/",
           "MURA-v1.1/train/XR_ELBOW/patient00012/study1_negative/"]


def _write(path, header, rows):
    path.write_text("\n".join([header] + rows) + "\n")
    return path


def test_study_key_matches_suspects_ids_to_mura_csv_paths():
    assert nl.study_key(FLIPPED[0]) == "train/XR_WRIST/patient00001/study1_negative"
    assert nl.study_key("train/XR_WRIST/patient00001/study1_negative") == nl.study_key(FLIPPED[0])
    assert nl.study_key("/data/MURA-v1.1/train/XR_HAND/patient00007/study2_positive/") == \
        nl.study_key(FLIPPED[1])
    assert nl.study_key(FLIPPED[0]) != nl.study_key(FLIPPED[0].replace("negative", "positive"))


def test_precision_at_k_counts_flipped_studies_in_the_top_k(tmp_path):
    flipped = _write(tmp_path / "flipped.csv", "study,true_label,given_label",
                     [f"{s},1,0" for s in FLIPPED])
    # suspects.csv spells ids without MURA-v1.1/ and the trailing slash; k = 3: the top 3 hold
    # two flipped studies; the third flipped one is ranked 4th and must not count.
    ranked = [nl.study_key(FLIPPED[1]), "train/XR_HAND/patient00002/study1_positive",
              nl.study_key(FLIPPED[0]), nl.study_key(FLIPPED[2])]
    suspects = _write(tmp_path / "suspects.csv", "study,study_type,label,probability,score",
                      [f"{s},XR_HAND,0,0.9,{1 - i / 10}" for i, s in enumerate(ranked)])
    assert nl.precision_at_k(suspects, flipped) == {"k": 3, "hits": 2, "precision": 2 / 3}
    empty = _write(tmp_path / "none.csv", "study,true_label,given_label", [])
    assert math.isnan(nl.precision_at_k(suspects, empty)["precision"])


def _results(aurocs: dict) -> dict:
    """method -> {noise: [auroc per seed]} as benchmark runs."""
    return {nl.run_key(m, n, s): {"auroc": a, "kappa": a - 0.2}
            for m, by_noise in aurocs.items() for n, values in by_noise.items()
            for s, a in enumerate(values)}


def test_choose_best_keeps_methods_that_beat_the_paper_one_loss_at_most():
    results = _results({
        "paper": {0.2: [0.80, 0.82], 0.4: [0.70, 0.72]},
        "gce": {0.2: [0.86, 0.86], 0.4: [0.80, 0.80]},  # +0.07
        "focal": {0.2: [0.84, 0.84], 0.4: [0.75, 0.75]},  # +0.035, a second loss: left out
        "ema": {0.2: [0.83, 0.83], 0.4: [0.73, 0.73]},  # +0.01
        "mixup": {0.2: [0.70, 0.70], 0.4: [0.60, 0.60]},  # worse
        "small_loss": {0.2: [0.90]},  # missing a noise level: not ranked
    })
    names, why = nl.choose_best(results, [0.0, 0.2, 0.4])
    assert names == ["gce", "ema"]
    assert "gce" in why and "focal" not in why
    assert nl.best_overrides(names) == {**nl.METHODS["gce"], **nl.METHODS["ema"]}
    assert nl.choose_best(_results({"paper": {0.4: [0.9]}, "mixup": {0.4: [0.8]}}),
                          [0.4])[0] == []


def test_table_has_mean_and_range_per_method_and_noise_and_precision():
    runs = _results({"paper": {0.0: [0.9, 0.95, 1.0], 0.4: [0.6, 0.7, 0.8]}})
    runs[nl.run_key("paper", 0.4, 0)].update(precision_at_k=0.5, k=10)
    runs[nl.run_key("teacher", 0.0, 0)] = {"skipped": "no field teacher.enabled"}
    table = nl.make_table({"runs": runs})
    lines = table.splitlines()
    assert lines[0].startswith("| method | AUROC, noise 0 | AUROC, noise 0.4 | kappa, noise 0")
    paper = next(line for line in lines if line.startswith("| paper |"))
    assert "0.950 [0.900, 1.000]" in paper and "0.700 [0.600, 0.800]" in paper
    assert "0.500 [0.400, 0.600]" in paper  # kappa = auroc - 0.2 in _results
    assert any(line.startswith("| teacher | (skipped: no field teacher.enabled)")
               for line in lines)
    assert "| paper | 0.4 | 10 | 0.500 [0.500, 0.500] (n=1) |" in lines


def test_overrides_apply_and_unknown_fields_are_reported():
    config = nl.apply_overrides(smoke.get_config(), nl.METHODS["ema"])
    assert config.ema.decay == nl.METHODS["ema"]["ema.decay"] and config.eval.use_ema
    with pytest.raises(KeyError, match="nonexistent.enabled"):
        nl.apply_overrides(smoke.get_config(), {"nonexistent.enabled": True})
    with pytest.raises(KeyError, match="ema.nonexistent"):
        nl.apply_overrides(smoke.get_config(), {"ema.nonexistent": 1})


def test_targets_measure_precision_and_the_recovered_share_of_lost_auroc():
    runs = _results({"paper": {0.0: [0.90, 0.90], 0.4: [0.70, 0.70]},
                     nl.BEST: {0.4: [0.79, 0.79]}})  # recovers 0.09 of 0.2: 45%
    runs[nl.run_key("paper", 0.2, 0)] = {"auroc": 0.8, "precision_at_k": 0.75, "k": 8}
    lines = nl.targets({"runs": runs})
    assert lines[0] == "precision@k at noise 0.2: 0.750 (target >= 0.8: NOT met)"
    assert "(45% of it; target >= 50%: NOT met)" in lines[1]
    runs[nl.run_key(nl.BEST, 0.4, 0)]["auroc"] = runs[nl.run_key(nl.BEST, 0.4, 1)]["auroc"] = 0.8
    assert "(50% of it; target >= 50%: met)" in nl.targets({"runs": runs})[1]
