"""murajax.evaluation.studies: views -> studies (mean of views), the ensemble, score_studies."""

import dataclasses
import subprocess
import sys

import numpy as np
import pytest

from murajax import evaluation as ev
from murajax.data import mura


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


def test_study_types_inferred_from_ids_follow_the_one_path_rule():
    ids = ["valid/XR_HAND/p1/s1", "MURA/XR_WRIST/copied/XR_ELBOW/p2/s1", "other/xr_shoulder/p3/s1",
           "nowhere/p4/s1"]
    s = ev.aggregate_studies(ids, [0.1, 0.2, 0.3, 0.4], [0, 1, 0, 1])
    assert s.study_type.tolist() == [mura.study_type_from_path(i) for i in ids]
    assert [ev.study_type_name(t) for t in s.study_type] == ["XR_HAND", "XR_ELBOW", "XR_SHOULDER",
                                                             "unknown"]


def _records(rows):
    return [mura.ImageRecord(path=f"/mura/{study}/image{i}.png", study=study,
                             study_type=ev.STUDY_TYPES.index(study.split("/")[1]), patient="p",
                             label=label) for i, (study, label) in enumerate(rows)]


def test_score_studies_skips_unscored_images_and_means_the_rest():
    records = _records([("valid/XR_HAND/p1/s1", 1), ("valid/XR_HAND/p1/s1", 1),
                        ("valid/XR_WRIST/p2/s1", 0), ("valid/XR_HAND/p1/s1", 1),
                        ("valid/XR_ELBOW/p3/s1", 0), ("valid/XR_WRIST/p2/s1", 0)])
    probabilities = np.array([0.2, np.nan, 0.9, 0.6, np.nan, 0.4], np.float32)
    s = ev.score_studies(records, probabilities)
    assert s.study == ["valid/XR_HAND/p1/s1", "valid/XR_WRIST/p2/s1"]  # XR_ELBOW: nothing scored
    p = probabilities.astype(np.float64)  # the float32 model outputs, averaged in float64
    np.testing.assert_array_equal(s.probability, [(p[0] + p[3]) / 2, (p[2] + p[5]) / 2])
    assert s.n_views.tolist() == [2, 2] and s.label.tolist() == [1, 0]
    assert s.study_type.tolist() == [ev.STUDY_TYPES.index("XR_HAND"), ev.STUDY_TYPES.index("XR_WRIST")]
    scored = np.isfinite(probabilities)
    kept = [r for r, keep in zip(records, scored) if keep]
    same = ev.aggregate_studies([r.study for r in kept], probabilities[scored],
                                [r.label for r in kept], [r.study_type for r in kept])
    assert dataclasses.asdict(s).keys() == dataclasses.asdict(same).keys()
    for field in ("study_type", "label", "probability", "n_views"):
        np.testing.assert_array_equal(getattr(s, field), getattr(same, field))
    with pytest.raises(ValueError, match="shape"):
        ev.score_studies(records, probabilities[:3])


@dataclasses.dataclass
class _View:  # what prediction has: a study, maybe a study type name, no label
    study: str
    study_type: str | None = None


def test_score_studies_takes_only_what_records_have():
    views = [_View("in/XR_HAND/s1", "XR_HAND"), _View("in/XR_HAND/s1", "XR_HAND"),
             _View("in/xr_wrist/s2"), _View("in/s3", "unknown")]
    s = ev.score_studies(views, [0.25, 0.75, 0.5, 0.1])
    assert s.study == ["in/XR_HAND/s1", "in/xr_wrist/s2", "in/s3"]
    assert s.probability.tolist() == [0.5, 0.5, 0.1]
    assert s.label.tolist() == [-1, -1, -1]  # unlabelled
    assert s.study_type.tolist() == [ev.STUDY_TYPES.index("XR_HAND"),
                                     ev.STUDY_TYPES.index("XR_WRIST"), -1]
    empty = ev.score_studies(views[:1], [np.nan])
    assert len(empty) == 0 and empty.probability.shape == (0,)


def test_evaluation_imports_neither_jax_nor_matplotlib():
    code = ("import sys; from murajax import evaluation; "
            "print(sorted(m for m in ('jax', 'flax', 'orbax', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
