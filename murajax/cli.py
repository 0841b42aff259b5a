"""murajax: train, evaluate and predict on MURA (musculoskeletal radiographs) with JAX/Flax.

    murajax                                              # the demo: synthetic MURA, tiny DenseNet
    murajax --config=default --config.data.root=/data/MURA-v1.1 --workdir runs/mura
    murajax --mode=evaluate --workdir runs/mura [--config.eval.ensemble_top_k=1]
    murajax --mode=predict --workdir runs/mura --input study_dir --output out [--cam]
    murajax --mode=predict --workdir runs/mura --config.data.cache=/data/mura-cache-320 \
        --output out [--config.eval.split=valid|train|all]   # the cached images of a split
    murajax --mode=audit --workdir runs/mura [--config.eval.split=train]    # label worklist
    murajax --mode=relabel --workdir runs/mura [--config.relabel.confidence=0.95]

--config is a config name (accelerator, default, paper_224, smoke; the default is smoke) or
the path of a .py file with get_config(). Any field can be overridden as
--config.<field>=<value>; unknown fields are refused. --mode=evaluate, predict, audit and
relabel need no config: the run's <workdir>/config.json is the config, and only the --config.<field>
overrides given on the command line apply on top of it.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from murajax import configs, host_memory, xla_cache
from murajax.errors import UserError

FLAGS = flags.FLAGS

_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Where checkpoints, logs and reports go.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "evaluate", "predict", "audit", "relabel"],
                          "What to do.")
_INPUT = flags.DEFINE_multi_string("input", [], "predict: image files, study folders or trees "
                                   "(or none, with --config.data.cache: a cached split).")
_OUTPUT = flags.DEFINE_string("output", "", "predict: folder for predictions.csv and CAMs.")
_CAM = flags.DEFINE_bool("cam", False, "predict: also write class activation map overlays.")
_READERS = flags.DEFINE_string("readers", "", "evaluate: CSV of per-study reader labels.")

_HELP = ("--help", "-help", "--helpshort", "-helpshort", "-?", "-h")
_HELPFULL = ("--helpfull", "-helpfull")
# --mode=predict's overrides and the Predictor.from_workdir arguments they set.
_PREDICT_FIELDS = {"eval.ensemble_top_k": "top_k", "eval.threshold": "threshold",
                   "eval_batch_size": "batch_size", "data.num_workers": "num_workers",
                   "eval.use_ema": "use_ema", "data.cache": "cache", "eval.split": "split"}


def _error(message: str) -> None:
    print(f"murajax: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def select_config(argv: Sequence[str]) -> list[str]:
    """``argv`` with every ``--config`` value (a name or a path) replaced by the file it names
    (``configs.resolve``), so that ml_collections' ``DEFINE_config_file`` gets a path. Raises
    ``UserError`` for an unknown name or a missing file."""
    argv = list(argv)
    for i in range(1, len(argv)):
        arg = argv[i]
        if arg == "--":
            break
        named = re.match(r"^(--?config=)(.*)$", arg, re.DOTALL)
        if named:
            argv[i] = named.group(1) + configs.resolve(named.group(2))
        elif arg in ("--config", "-config") and i + 1 < len(argv):
            argv[i + 1] = configs.resolve(argv[i + 1])
    return argv


def _take_help_flags(argv: list[str]) -> tuple[list[str], str | None]:
    """absl's --help exits 1; this command's help exits 0: the help flags are taken out here
    and answered after the flags (and the config) have been parsed."""
    end = argv.index("--") if "--" in argv else len(argv)
    wanted = None
    kept = []
    for i, arg in enumerate(argv):
        if 0 < i < end and arg in _HELP + _HELPFULL:
            wanted = "full" if arg in _HELPFULL or wanted == "full" else "short"
        else:
            kept.append(arg)
    return kept, wanted


def _unknown_config_field(error: Exception, argv: Sequence[str]):
    """ml_collections raises a bare AttributeError/KeyError for --config.<unknown>=...: say which
    flag, without a traceback, and exit 2."""
    text = str(error)
    if "get_config" in text:
        _error(f"the --config file has no get_config() function ({text})")
    named = re.search(r'instead of "(\w+)"', text) or re.search(r"'(\w+)'", text)
    leaf = named.group(1) if named else text
    given = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    flag = next((a for a in given if leaf in a[len("--config."):].split(".")), None)
    hint = re.search(r'Did you mean "([^"]+)"', text)
    _error(f"{flag or repr(leaf)}: no such config field"
           + (f"; did you mean {hint.group(1)!r}?" if hint else "")
           + " (the fields are those of the --config file; see murajax/configs/default.py)")


def _define_config_flag(argv: list[str]):
    """The --config flag, defined against ``argv`` (ml_collections looks there for the
    --config.<field> overrides). With no --config in ``argv`` the default, the installed smoke
    config, is loaded and its overrides are applied here, at definition."""
    if "config" in FLAGS:  # main() called again in this process: start afresh
        for name in [n for n in FLAGS if n == "config" or n.startswith("config.")]:
            delattr(FLAGS, name)
        FLAGS.unparse_flags()
    try:
        return config_flags.DEFINE_config_file(
            "config", configs.path(configs.DEFAULT),
            f"Config: a name ({', '.join(configs.NAMES)}) or the path of a get_config() file; "
            f"the default is the installed {configs.DEFAULT} config.",
            lock_config=True, sys_argv=argv)
    except (AttributeError, KeyError) as e:
        _unknown_config_field(e, argv)


def _parse_flags(argv):
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as e:
        _unknown_config_field(e, argv)


def _print_help(which: str) -> None:
    text = FLAGS.get_help() if which == "full" else FLAGS.module_help(__name__)
    if which != "full":
        text += "\n\nTry --helpfull to get a list of all flags."
    try:
        print(__doc__.strip() + "\n\nflags:\n" + text, flush=True)
    except BrokenPipeError:  # murajax --help | head
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _start_jax(config) -> None:
    import jax

    cache = os.environ.get("MURAJAX_COMPILATION_CACHE", os.path.expanduser("~/.cache/murajax/xla"))
    if cache:  # capped, so locked: concurrent runs (a sweep) share it safely
        xla_cache.enable(cache, min_compile_seconds=1.0)
    dist = config.distributed
    if dist.enabled:
        if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=dist.coordinator_address or None,
            num_processes=dist.num_processes or None,
            process_id=dist.process_id if dist.process_id >= 0 else None,
        )
    logging.info("JAX %s: process %d/%d, %d local / %d global devices (%s)", jax.__version__,
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count(), jax.devices()[0].platform)
    if host_memory.huge_pages_requested():
        logging.info("host malloc uses transparent huge pages (GLIBC_TUNABLES=%s; "
                     "MURAJAX_HUGE_PAGES=0 turns this off)", os.environ["GLIBC_TUNABLES"])


def _print_summary(summary: dict) -> None:
    lines = ["", "murajax run summary"]
    if summary.get("preempted"):
        lines.append(f"  stopped early at step {summary.get('step')}: rerun the same command to resume")
    if "val_loss" in summary:
        lines += [
            f"  epoch {summary['epoch']}, step {summary['step']}",
            f"  validation loss     {summary['val_loss']:.4f}",
            f"  study-level AUROC   {summary['auroc']:.4f}",
            f"  study-level kappa   {summary['kappa']:.4f}",
        ]
        if "ema_val_loss" in summary:  # config.ema.decay > 0
            lines += [f"  EMA weights: validation loss {summary['ema_val_loss']:.4f}, "
                      f"AUROC {summary['ema_auroc']:.4f}, kappa {summary['ema_kappa']:.4f}"]
    lines += [f"  checkpoints         {summary['checkpoints']}",
              f"  metrics             {summary['metrics']}"]
    print("\n".join(lines), flush=True)


def _check_run_dir(workdir: str) -> None:
    """--mode=evaluate/predict/audit/relabel: fail before JAX starts when ``workdir`` holds
    no trained run."""
    path = Path(workdir) / "config.json"  # checkpoints.CONFIG_FILE (that module loads JAX)
    if not path.is_file():
        raise UserError(f"{path} not found: {workdir} is not a murajax run directory "
                        f"(train into it first: murajax --workdir {workdir})")


def predict_options(overrides: dict) -> dict:
    """--mode=predict: the explicit --config.<field> overrides as ``run_predict`` arguments.
    Predict uses the run's saved config; only the fields in ``_PREDICT_FIELDS`` apply."""
    options = {}
    for field, value in overrides.items():
        if field in _PREDICT_FIELDS:
            options[_PREDICT_FIELDS[field]] = value
        elif not field.startswith("distributed."):
            accepted = ", ".join(f"--config.{f}" for f in _PREDICT_FIELDS)
            raise UserError(f"--config.{field} does not apply to --mode=predict, which uses the "
                            f"run's saved config (<workdir>/config.json); these do: {accepted}")
    return options


def _run(argv, help_wanted: str | None = None) -> int:
    if help_wanted:
        _print_help(help_wanted)
        return 0
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from murajax import writers

    writers.quiet_library_logs()

    config = FLAGS.config
    overrides = dict(config_flags.get_override_values(FLAGS["config"]))
    options = {}
    try:
        if _MODE.value != "train":
            _check_run_dir(_WORKDIR.value)
            if _MODE.value == "predict":
                if not _OUTPUT.value:
                    raise UserError("--mode=predict needs --output DIR")
                options = predict_options(overrides)
        _start_jax(config)
        if _MODE.value == "train":
            from murajax import train

            _print_summary(train.train_and_evaluate(config, _WORKDIR.value))
        elif _MODE.value == "evaluate":
            from murajax.modes import evaluate

            report_dir = evaluate.evaluate_workdir(overrides, _WORKDIR.value,
                                                   readers=_READERS.value)
            print(f"evaluation report: {report_dir}", flush=True)
        elif _MODE.value == "audit":
            from murajax.modes import audit

            print(f"label audit: {audit.audit_workdir(overrides, _WORKDIR.value)}", flush=True)
        elif _MODE.value == "relabel":
            from murajax.modes import relabel

            out_dir = relabel.relabel_workdir(overrides, _WORKDIR.value)
            print(f"relabelled train labels: {out_dir} (train_labeled_studies.csv, flips.csv)",
                  flush=True)
        else:
            from murajax.modes import predict

            predict.run_predict(_WORKDIR.value, _INPUT.value, _OUTPUT.value, cam=_CAM.value,
                                **options)
    except UserError as e:
        print(f"murajax: error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


def main(argv: Sequence[str] | None = None):
    """The ``murajax`` command (also ``python -m murajax`` and ``python launch.py``).

    ``argv`` defaults to ``sys.argv``; only then does the process re-execute itself with huge
    pages for XLA:CPU (``host_memory.reexec_with_huge_pages``, before JAX loads). Exits with
    0 on success, 2 for a user error (one line on stderr), 1 for a usage error.
    """
    command_line = argv is None
    argv = list(sys.argv if argv is None else argv)
    try:
        argv = select_config(argv)
    except UserError as e:
        _error(str(e))
    argv, help_wanted = _take_help_flags(argv)
    if command_line and not help_wanted:
        host_memory.reexec_with_huge_pages()  # MURAJAX_HUGE_PAGES=0 turns it off
    _define_config_flag(argv)
    app.run(lambda args: _run(args, help_wanted), argv=argv, flags_parser=_parse_flags)
