"""The noisy-labels benchmark: synthetic MURA with known label noise, the tiny model, every recipe.

    python benchmarks/noisy_labels.py [--out /tmp/noisy_bench] [--json /tmp/noisy_bench.json]
        [--methods paper,focal,...] [--noise 0,0.2,0.4] [--seeds 0,1,2] [--rerun] [--table_only]

For each noise level P it writes (once) a synthetic set whose *train* labels are flipped
symmetrically at rate P (``murajax.synthetic``; valid stays clean; the flipped studies are
listed in ``flipped_train_studies.csv``), then trains the tiny model of
``murajax/configs/smoke.py`` (densenet_tiny, 64 px, batch 32, Adam 3e-3; fewer studies and
epochs, see ``base_config``) once per method and seed, in this process
(``murajax.train.train_and_evaluate``). A method is a dict of config overrides (``METHODS``);
``best`` is the combination chosen from the single methods' results (``choose_best``).
Reported per run: the clean-valid study AUROC and Cohen's kappa of the last epoch (the EMA's
when the method evaluates with it). After each noisy ``paper`` and ``small_loss`` run,
``--mode=audit`` (``murajax.modes.audit``) ranks the train studies and the script scores its
precision at k (k = the number of flipped train studies). A method whose config field this
murajax lacks, or that murajax refuses (a UserError), is recorded as skipped with the reason.

Results are merged into ``--json`` after every run (keyed by method, noise and seed), so a
subset can be rerun (``--methods focal --seeds 2``) and a killed benchmark restarted: runs
already in the JSON are skipped unless ``--rerun`` (which also chooses ``best`` again). The
markdown table and the issue's two targets are printed at the end (``--table_only``: from the
JSON, without training). Results: docs/research.md.

This module owns the benchmark: its settings, the method list, the best-combination rule,
precision at k, and the table.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import pathlib
import shutil
import sys
import time

import numpy as np

# The methods, each alone: config overrides on top of ``base_config``. Values are chosen for
# runs of under a hundred steps (e.g. an EMA over ~20 steps, not the usual ~1000).
METHODS: dict[str, dict] = {
    "paper": {},
    "label_smoothing": {"loss.label_smoothing": 0.2},
    "focal": {"loss.name": "focal"},
    "gce": {"loss.name": "gce"},  # q = 0.7
    "bootstrap": {"loss.name": "bootstrap"},  # soft, beta = 0.95
    "mixup": {"mixup.alpha": 0.4},
    "ema": {"ema.decay": 0.95, "eval.use_ema": True},
    "small_loss": {"reweight.mode": "small_loss"},  # above the 0.7 quantile: weight 0.1
    # The EMA is the teacher; 'missing_only' (the default merge) changes nothing here, where
    # every study has a (possibly wrong) label.
    "teacher": {"teacher.enabled": True, "teacher.merge": "replace_disagreeing",
                "ema.decay": 0.95},
}
BEST = "best"
AUDITED = ("paper", "small_loss")  # audited when noisy (small_loss: with its running loss)
SINGLE = [name for name in METHODS if name != "paper"]
NOISE = (0.0, 0.2, 0.4)
SEEDS = (0, 1, 2)
NUM_STUDIES = 300
NUM_EPOCHS = 4
DATA_SEED = 0  # one synthetic set per noise level; the training seed varies


def base_config(root: str, seed: int, num_epochs: int = NUM_EPOCHS):
    """The tiny model of the smoke config on the set at ``root``, sized for the benchmark."""
    from murajax.configs import smoke

    config = smoke.get_config()
    config.data.root = root
    config.data.synthetic_studies = 0
    config.num_epochs = num_epochs
    config.seed = seed
    config.checkpoint_every_steps = 10_000  # epoch ends only
    config.log_every_steps = 1000
    return config


def apply_overrides(config, overrides: dict):
    """``config`` with dotted ``overrides`` set; a KeyError names a field the config lacks."""
    for field, value in overrides.items():
        *parents, leaf = field.split(".")
        section = config
        for name in parents:
            if name not in section:
                raise KeyError(field)
            section = section[name]
        if leaf not in section:
            raise KeyError(field)
        section[leaf] = value
    return config


def study_key(path: str) -> str:
    """A study as both files can spell it: ``train/XR_WRIST/patient00001/study1_negative``
    (suspects.csv writes the id, flipped_train_studies.csv the MURA CSV path
    ``MURA-v1.1/train/.../study1_negative/``)."""
    path = path.strip().replace("\\", "/").strip("/")
    parts = path.split("/")
    if "train" in parts or "valid" in parts:
        start = max(i for i, p in enumerate(parts) if p in ("train", "valid"))
        parts = parts[start:]
    return "/".join(parts)


def precision_at_k(suspects_csv, flipped_csv) -> dict:
    """``{"k", "hits", "precision"}``: of the top-k rows of ``suspects_csv`` (most suspicious
    first), how many are listed in ``flipped_csv``; k = the number of flipped studies."""
    with open(flipped_csv, newline="") as f:
        flipped = {study_key(row["study"]) for row in csv.DictReader(f)}
    with open(suspects_csv, newline="") as f:
        ranked = [study_key(row["study"]) for row in csv.DictReader(f)]
    k = len(flipped)
    if k == 0:
        return {"k": 0, "hits": 0, "precision": float("nan")}
    hits = sum(study in flipped for study in ranked[:k])
    return {"k": k, "hits": hits, "precision": hits / k}


def run_key(method: str, noise: float, seed: int) -> str:
    return f"{method}|{noise:g}|{seed}"


def _values(results: dict, method: str, noise: float, field: str, seeds=None) -> list[float]:
    out = []
    for key, run in results.items():
        m, n, s = key.split("|")
        if m == method and math.isclose(float(n), noise) and field in run and (
                seeds is None or int(s) in seeds) and not run.get("skipped"):
            out.append(float(run[field]))
    return out


def choose_best(results: dict, noise_levels, max_methods: int = 3) -> tuple[list[str], str]:
    """The combination: the single methods whose mean AUROC over the noisy levels beats the
    paper recipe's, best first, at most one per ``loss.name`` (one loss at a time) and at most
    ``max_methods``; returns (names, why). Empty when none beats the paper recipe."""
    noisy = [n for n in noise_levels if n > 0] or list(noise_levels)

    def mean_auroc(method):
        means = [np.mean(v) for n in noisy if (v := _values(results, method, n, "auroc"))]
        return float(np.mean(means)) if len(means) == len(noisy) else None

    paper = mean_auroc("paper")
    if paper is None:
        return [], "no paper-recipe results yet"
    gains = {m: a - paper for m in SINGLE if (a := mean_auroc(m)) is not None}
    chosen, has_loss = [], False
    for method in sorted(gains, key=gains.get, reverse=True):
        if gains[method] <= 0 or len(chosen) >= max_methods:
            break
        loss = "loss.name" in METHODS[method]
        if loss and has_loss:
            continue
        chosen.append(method)
        has_loss = has_loss or loss
    levels = ", ".join(f"{n:g}" for n in noisy)
    why = (f"single methods whose mean AUROC over noise {levels} beats the paper recipe's "
           f"({paper:.4f}), best first, one loss function at most, at most {max_methods}: "
           + ", ".join(f"{m} ({gains[m]:+.4f})" for m in chosen) if chosen else
           f"no single method beats the paper recipe's mean AUROC ({paper:.4f}) over noise "
           f"{levels}")
    return chosen, why


def best_overrides(names: list[str]) -> dict:
    overrides = {}
    for name in names:
        overrides.update(METHODS[name])
    return overrides


def _stat(values: list[float], digits: int = 3) -> str:
    if not values:
        return "-"
    return (f"{np.mean(values):.{digits}f} [{min(values):.{digits}f}, "
            f"{max(values):.{digits}f}]")


def make_table(data: dict, noise_levels=None, methods=None) -> str:
    """The markdown tables of ``data`` (the benchmark JSON): AUROC and kappa per method and
    noise level (mean [min, max] over seeds, n = seeds), then the audit's precision at k."""
    results = data.get("runs", {})
    if noise_levels is None:
        noise_levels = sorted({float(k.split("|")[1]) for k in results})
    if methods is None:
        seen = {k.split("|")[0] for k in results}
        methods = [m for m in list(METHODS) + [BEST] if m in seen]
    lines = ["| method | " + " | ".join(f"AUROC, noise {n:g}" for n in noise_levels) + " | "
             + " | ".join(f"kappa, noise {n:g}" for n in noise_levels) + " |",
             "|---|" + "---|" * (2 * len(noise_levels))]
    for method in methods:
        skipped = [r for k, r in results.items() if k.split("|")[0] == method and
                   r.get("skipped")]
        if skipped and not any(_values(results, method, n, "auroc") for n in noise_levels):
            lines.append(f"| {method} | " + " | ".join(
                ["(skipped: " + skipped[0]["skipped"] + ")"] + ["-"] * (
                    2 * len(noise_levels) - 1)) + " |")
            continue
        cells = []
        for field in ("auroc", "kappa"):
            for n in noise_levels:
                v = _values(results, method, n, field)
                cells.append(_stat(v) + (f" (n={len(v)})" if v and len(v) != 3 else ""))
        name = method
        if method == BEST and data.get("best"):
            name = f"best = {' + '.join(data['best'])}"
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    precision = []
    for method in AUDITED:
        for n in noise_levels:
            v = _values(results, method, n, "precision_at_k")
            k = _values(results, method, n, "k")
            if v:
                n_note = f" (n={len(v)})" if len(v) != 3 else ""
                precision.append(f"| {method} | {n:g} | {int(k[0])} | {_stat(v)}{n_note} |")
    if precision:
        lines += ["", "Audit (train split, best-k ensemble; small_loss: with its running loss): "
                  "precision at k, k = flipped train studies", "",
                  "| run | noise | k | precision@k |", "|---|---|---:|---|"]
        lines += precision
    return "\n".join(lines)


def targets(data: dict) -> list[str]:
    """The issue's two targets, measured (precision@k >= 0.8 at 0.2; ``best`` recovers >= half
    of the AUROC lost between clean and 0.4 noise)."""
    results = data.get("runs", {})
    out = []
    p = _values(results, "paper", 0.2, "precision_at_k")
    if p:
        out.append(f"precision@k at noise 0.2: {np.mean(p):.3f} (target >= 0.8: "
                   f"{'met' if np.mean(p) >= 0.8 else 'NOT met'})")
    clean = _values(results, "paper", 0.0, "auroc")
    noisy = _values(results, "paper", 0.4, "auroc")
    best = _values(results, BEST, 0.4, "auroc")
    if clean and noisy and best:
        lost = np.mean(clean) - np.mean(noisy)
        recovered = np.mean(best) - np.mean(noisy)
        share = recovered / lost if lost > 0 else float("nan")
        out.append(f"noise 0.4: AUROC lost by the paper recipe {lost:.4f}, recovered by best "
                   f"{recovered:.4f} ({share:.0%} of it; target >= 50%: "
                   f"{'met' if share >= 0.5 else 'NOT met'})")
    return out


def _load(path: pathlib.Path) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    return {"runs": {}}


def _save(path: pathlib.Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _dataset(out: pathlib.Path, noise: float, num_studies: int = NUM_STUDIES) -> pathlib.Path:
    """The synthetic set at symmetric noise ``noise`` (written once, then reused)."""
    from murajax import synthetic

    return synthetic.generate(out / "data" / f"noise{noise:g}", num_studies=num_studies,
                              seed=DATA_SEED, label_noise=noise, noise_mode="symmetric")


def _train(method: str, overrides: dict, noise: float, seed: int, root: pathlib.Path,
           out: pathlib.Path, num_epochs: int = NUM_EPOCHS) -> dict:
    from murajax import train
    from murajax.errors import UserError

    config = base_config(str(root), seed, num_epochs)
    try:
        apply_overrides(config, overrides)
    except KeyError as e:
        return {"skipped": f"this murajax's config has no field {e.args[0]}"}
    workdir = out / "runs" / f"{method}_noise{noise:g}_seed{seed}"
    if workdir.exists():
        shutil.rmtree(workdir)  # a fresh run: a stale one may hold another method's config
    start = time.time()
    try:
        summary = train.train_and_evaluate(config, workdir)
    except UserError as e:  # e.g. a method this murajax cannot combine: the others go on
        return {"skipped": f"refused: {e}"}
    use_ema = bool(config.eval.get("use_ema", False))
    result = {
        "auroc": float(summary["ema_auroc" if use_ema else "auroc"]),
        "kappa": float(summary["ema_kappa" if use_ema else "kappa"]),
        "val_loss": float(summary["ema_val_loss" if use_ema else "val_loss"]),
        "epochs": int(summary["epoch"]), "train_seconds": round(time.time() - start, 1),
        "overrides": overrides, "workdir": str(workdir),
    }
    if noise > 0 and method in AUDITED:
        from murajax.modes import audit

        start = time.time()
        audit_dir = audit.audit_workdir({"eval.split": "train"}, workdir)
        result.update(precision_at_k(audit_dir / "suspects.csv",
                                     root / "flipped_train_studies.csv"))
        result["precision_at_k"] = result.pop("precision")
        result["audit_seconds"] = round(time.time() - start, 1)
    return result


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="/tmp/noisy_bench", help="data and run folders")
    parser.add_argument("--json", default="/tmp/noisy_bench.json", help="results (merged)")
    parser.add_argument("--methods", default=",".join(list(METHODS) + [BEST]),
                        help=f"comma-separated, of {', '.join(list(METHODS) + [BEST])}")
    parser.add_argument("--noise", default=",".join(f"{n:g}" for n in NOISE))
    parser.add_argument("--seeds", default=",".join(str(s) for s in SEEDS))
    parser.add_argument("--rerun", action="store_true", help="rerun runs already in --json")
    parser.add_argument("--table_only", action="store_true", help="print the table and stop")
    parser.add_argument("--num_studies", type=int, default=NUM_STUDIES,
                        help="synthetic studies per noise level (a larger benchmark: 600)")
    parser.add_argument("--num_epochs", type=int, default=NUM_EPOCHS)
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS and m != BEST]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {list(METHODS) + [BEST]}")
    noise_levels = _floats(args.noise)
    seeds = [int(s) for s in _floats(args.seeds)]
    json_path = pathlib.Path(args.json)
    data = _load(json_path)
    settings = {"num_studies": args.num_studies, "num_epochs": args.num_epochs,
                "data_seed": DATA_SEED,
                "noise_mode": "symmetric"}
    saved = data.get("settings", settings)
    if any(saved.get(k) != v for k, v in settings.items()) and not args.table_only:
        print(f"error: {json_path} holds results of other settings {data['settings']} (these: "
              f"{settings}); use another --json", file=sys.stderr)
        return 2
    data["settings"] = settings
    if not args.table_only:
        from murajax import xla_cache

        cache = os.path.join(args.out, "xla_cache")  # the seeds of a method share compiles
        xla_cache.enable(cache, min_compile_seconds=0.5)
        out = pathlib.Path(args.out)
        skipped: set[str] = set()
        # Seed-major: a benchmark cut short holds every method at the seeds it finished.
        for seed in seeds:
            for method in methods:
                if method in skipped:
                    continue
                if method == BEST:
                    if not data.get("best") or args.rerun:  # chosen once, kept for all seeds
                        names, why = choose_best(data["runs"], noise_levels)
                        print(f"best combination: {why}", flush=True)
                        if not names:
                            continue
                        data["best"], data["best_why"] = names, why
                    overrides = best_overrides(data["best"])
                else:
                    overrides = METHODS[method]
                for noise in noise_levels:
                    key = run_key(method, noise, seed)
                    done = data["runs"].get(key)
                    if done and not args.rerun and done.get("overrides", overrides) == overrides:
                        if done.get("skipped"):
                            skipped.add(method)
                            break
                        continue
                    root = _dataset(out, noise, args.num_studies)
                    print(f"[{time.strftime('%H:%M:%S')}] {key} ...", flush=True)
                    same = run_key(data["best"][0], noise, seed) if method == BEST and len(
                        data["best"]) == 1 else None
                    if same in data["runs"]:  # the same config and seed: the same numbers
                        result = dict(data["runs"][same], same_as=same)
                    else:
                        result = _train(method, overrides, noise, seed, root, out,
                                        args.num_epochs)
                    data["runs"][key] = result
                    _save(json_path, data)
                    if "skipped" in result:
                        print(f"  skipped: {result['skipped']} (the {method} method needs it)",
                              flush=True)
                        skipped.add(method)
                        break
                    print("  " + ", ".join(f"{k}={v}" for k, v in result.items()
                                           if k not in ("overrides", "workdir")), flush=True)
    print(make_table(data))
    for line in targets(data):
        print(line)
    return 0


if __name__ == "__main__":
    if "--table_only" not in sys.argv:
        from murajax import host_memory

        host_memory.reexec_with_huge_pages()  # as murajax runs (docs/performance.md)
    sys.exit(main())
