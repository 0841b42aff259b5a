"""The evaluation report: numbers, markdown, ROC and calibration plots, and the files.

Owns ``build_report`` (overall and per study type metrics with bootstrap CIs, plus an optional
reader comparison), its markdown rendering, the ROC and reliability-diagram plots, and
``write_outputs``: report.json (undefined values as ``null``), report.md, predictions.csv (one
row per study), roc.png, calibration.png. numpy and matplotlib (object-oriented API) only.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from murajax.errors import UserError
from murajax.evaluation.metrics import COUNT_KEYS, binary_metrics, bootstrap_metrics, safe_div
from murajax.evaluation.studies import (STUDY_TYPES, UNKNOWN_STUDY_TYPE, StudyPredictions,
                                        study_type_name)


def _group_report(labels, probabilities, threshold, num_samples, seed, n_views) -> dict[str, Any]:
    point = binary_metrics(labels, probabilities, threshold)
    group: dict[str, Any] = bootstrap_metrics(labels, probabilities, threshold,
                                              num_samples=num_samples, seed=seed)
    for k in COUNT_KEYS:
        group[k] = int(point[k])
    group["n_images"] = int(np.sum(n_views))
    return group


def build_report(
    studies: StudyPredictions,
    threshold: float = 0.5,
    *,
    num_samples: int = 10000,
    seed: int = 0,
    checkpoints: Sequence[Any] = (),
    reader_comparison: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The evaluation report: overall and per study type metrics with bootstrap CIs.

    ``reader_comparison`` (from ``compare_with_readers``) is included as is when given.
    """
    unlabelled = int(np.sum(studies.label < 0))
    if unlabelled:
        raise UserError(f"{unlabelled} of {len(studies)} studies have no label (-1, e.g. "
                        f"folders named 'studyN' without _positive/_negative); metrics need a "
                        f"labelled split (config.eval.split).")
    report: dict[str, Any] = {
        "threshold": float(threshold),
        "num_bootstrap": int(num_samples),
        "seed": int(seed),
        "checkpoints": [str(c) for c in checkpoints],
        "aggregate": _group_report(studies.label, studies.probability, threshold, num_samples,
                                   seed, studies.n_views),
        "by_study_type": {},
    }
    present = sorted(set(int(t) for t in studies.study_type), key=lambda t: (t < 0, t))
    for t in present:
        mask = studies.study_type == t
        report["by_study_type"][study_type_name(t)] = _group_report(
            studies.label[mask], studies.probability[mask], threshold, num_samples, seed,
            studies.n_views[mask])
    if reader_comparison is not None:
        report["reader_comparison"] = dict(reader_comparison)
    return report


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(float(x)) else None
    return x


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def _fmt_ci(est: Mapping[str, Any]) -> str:
    value = _fmt(est.get("value"))
    if value == "n/a":
        return value
    return f"{value} [{_fmt(est.get('ci_low'))}, {_fmt(est.get('ci_high'))}]"


def _markdown(report: Mapping[str, Any]) -> str:
    agg = report["aggregate"]
    lines = [
        "# MURA evaluation",
        "",
        f"{agg['n']} studies ({agg['n_positive']} abnormal, {agg['n_negative']} normal; "
        f"{agg.get('n_images', 'n/a')} images). A study's probability is the mean of its views' "
        f"probabilities; it is called abnormal when the probability is > {report['threshold']:g}.",
        f"Values are point estimates on all studies; square brackets hold 95% bootstrap confidence "
        f"intervals (2.5th-97.5th percentiles over {report['num_bootstrap']} resamples of "
        f"studies, seed {report.get('seed', 'n/a')}). n/a: undefined (e.g. one class only).",
        "",
    ]
    ckpts = report.get("checkpoints") or []
    if ckpts:
        lines.append(f"Model: ensemble (mean probability) of {len(ckpts)} checkpoint(s):")
        lines += [f"- `{c}`" for c in ckpts]
        lines.append("")
    rows = list(report["by_study_type"].items()) + [("**Overall**", agg)]
    lines += [
        "| Study type | Studies (abnormal/normal) | AUROC | Kappa | F1 | Sensitivity | Specificity |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, g in rows:
        lines.append(
            f"| {name} | {g['n']} ({g['n_positive']}/{g['n_negative']}) | {_fmt_ci(g['auroc'])} | "
            f"{_fmt_ci(g['kappa'])} | {_fmt_ci(g['f1'])} | {_fmt_ci(g['sensitivity'])} | "
            f"{_fmt_ci(g['specificity'])} |")
    lines += [
        "",
        f"Confusion counts at threshold {report['threshold']:g} (positive = abnormal):",
        "",
        "| Study type | TP | FP | TN | FN | Precision | Accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, g in rows:
        lines.append(f"| {name} | {g['tp']} | {g['fp']} | {g['tn']} | {g['fn']} | "
                     f"{_fmt_ci(g['precision'])} | {_fmt_ci(g['accuracy'])} |")
    lines.append("")
    if report.get("reader_comparison"):
        lines += _reader_markdown(report["reader_comparison"])
    lines += [
        "Files: `predictions.csv` (one row per study), `report.json` (these numbers), "
        "`roc.png` (ROC curves, operating point marked), `calibration.png` (reliability diagram).",
        "",
    ]
    return "\n".join(lines)


def _reader_markdown(comparison: Mapping[str, Any]) -> list[str]:
    lines = ["## Comparison with radiologists", ""]
    for key in ("protocol_a", "protocol_b"):
        proto = comparison.get(key)
        if not proto:
            continue
        lines += [f"### {proto['name']}", "", proto["gold_standard"], "",
                  f"{proto['n_studies']} studies, {proto['num_bootstrap']} bootstrap resamples.", ""]
        lines += ["| Rater | " + " | ".join(m.upper() if m == "f1" else m.capitalize()
                                           for m in proto["metrics"]) + " |",
                  "|---|" + "---|" * len(proto["metrics"])]
        metrics = proto["metrics"]
        first = next(iter(metrics.values()))
        for reader in first["readers"]:
            lines.append(f"| {reader} | " + " | ".join(_fmt_ci(metrics[m]["readers"][reader])
                                                       for m in metrics) + " |")
        lines.append("| Readers' mean | " + " | ".join(_fmt_ci(metrics[m]["readers_mean"])
                                                       for m in metrics) + " |")
        lines.append("| **Model** | " + " | ".join(_fmt_ci(metrics[m]["model"]) for m in metrics) + " |")
        lines.append("| Model - readers' mean | " + " | ".join(
            _fmt_ci(metrics[m]["model_minus_readers_mean"])
            + (" *" if metrics[m]["model_minus_readers_mean"]["significant"] else "")
            for m in metrics) + " |")
        lines += ["", "\\* significant: the 95% CI of the difference excludes 0.", ""]
    return lines


def _roc_curve(labels: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-probabilities, kind="stable")
    p = probabilities[order]
    y = labels[order]
    last = np.r_[np.flatnonzero(p[1:] != p[:-1]), len(p) - 1]
    tps = np.cumsum(y)[last]
    fps = (last + 1) - tps
    n_pos, n_neg = max(int(y.sum()), 1), max(int(len(y) - y.sum()), 1)
    return np.r_[0.0, fps / n_neg], np.r_[0.0, tps / n_pos]


def _plot_roc(path: str, report: Mapping[str, Any], studies: StudyPredictions) -> None:
    from matplotlib.figure import Figure  # object-oriented API: Agg canvas, no pyplot state

    fig = Figure(figsize=(7, 6.5))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="0.7", lw=1, ls="--")
    t = report["threshold"]
    groups = [(name, studies.study_type == STUDY_TYPES.index(name) if name != UNKNOWN_STUDY_TYPE
               else studies.study_type < 0, g) for name, g in report["by_study_type"].items()]
    groups.append(("Overall", np.ones(len(studies), dtype=bool), report["aggregate"]))
    for name, mask, g in groups:
        y, p = studies.label[mask], studies.probability[mask]
        if y.min(initial=0) == y.max(initial=0):
            continue  # ROC undefined with one class
        fpr, tpr = _roc_curve(y, p)
        overall = name == "Overall"
        line, = ax.plot(fpr, tpr, lw=2.5 if overall else 1.1, color="k" if overall else None,
                        label=f"{name} (AUROC {_fmt(g['auroc']['value'])})", zorder=3 if overall else 2)
        sens, spec = g["sensitivity"]["value"], g["specificity"]["value"]
        if sens is not None and spec is not None and not (math.isnan(sens) or math.isnan(spec)):
            ax.plot([1 - spec], [sens], marker="o", ms=8 if overall else 5, color=line.get_color(),
                    markeredgecolor="k", zorder=4)
    ax.plot([], [], "o", color="w", markeredgecolor="k", label=f"operating point (threshold {t:g})")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="False positive rate (1 - specificity)",
           ylabel="True positive rate (sensitivity)", title="ROC by study type")
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _plot_calibration(path: str, studies: StudyPredictions, num_bins: int = 10) -> None:
    from matplotlib.figure import Figure

    p, y = studies.probability, studies.label
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, num_bins - 1)
    count = np.bincount(which, minlength=num_bins)
    mean_p = safe_div(np.bincount(which, weights=p, minlength=num_bins), count)
    frac_pos = safe_div(np.bincount(which, weights=y, minlength=num_bins), count)
    ece = float(np.nansum(count * np.abs(mean_p - frac_pos)) / max(len(p), 1))

    fig = Figure(figsize=(6, 7))
    ax, hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], color="0.6", ls="--", lw=1, label="perfectly calibrated")
    keep = count > 0
    ax.plot(mean_p[keep], frac_pos[keep], "o-", color="C0", label=f"model (ECE {ece:.3f})")
    ax.set(ylim=(0, 1), ylabel="Fraction of studies abnormal",
           title=f"Reliability diagram ({len(p)} studies, {num_bins} bins)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    hist.bar((edges[:-1] + edges[1:]) / 2, count, width=1.0 / num_bins, color="C0", alpha=0.6,
             edgecolor="k")
    hist.set(xlim=(0, 1), xlabel="Mean predicted probability of abnormality", ylabel="Studies")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_outputs(out_dir: str | os.PathLike, report: Mapping[str, Any], studies: StudyPredictions) -> None:
    """Write report.json, report.md, predictions.csv, roc.png and calibration.png to out_dir."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(_jsonable(report), f, indent=2, allow_nan=False)
        f.write("\n")
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(_markdown(_jsonable(report)))
    with open(os.path.join(out_dir, "predictions.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["study", "study_type", "label", "probability", "n_views"])
        for s, t, y, p, v in zip(studies.study, studies.study_type, studies.label,
                                 studies.probability, studies.n_views):
            writer.writerow([s, study_type_name(int(t)), int(y), repr(float(p)), int(v)])
    _plot_roc(os.path.join(out_dir, "roc.png"), _jsonable(report), studies)
    _plot_calibration(os.path.join(out_dir, "calibration.png"), studies)
