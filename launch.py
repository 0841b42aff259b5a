"""murajax's command line: parse flags and config, start JAX, dispatch on --mode.

    python launch.py                                   # the demo: synthetic MURA, tiny DenseNet
    python launch.py --config configs/default.py --config.data.root=/data/MURA-v1.1 \
        --workdir runs/mura                            # the paper's recipe on real MURA
    python launch.py --mode=evaluate --workdir runs/mura
    python launch.py --mode=predict --workdir runs/mura --input study_dir --output out --cam

Any config field can be overridden as --config.<field>=<value>; unknown fields are refused.
"""

from __future__ import annotations

import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags


def _unknown_config_field(error: Exception):
    """ml_collections raises a bare AttributeError/KeyError for --config.<unknown>=...: say which
    flag, without a traceback, and exit 2."""
    text = str(error)
    named = re.search(r'instead of "(\w+)"', text) or re.search(r"'(\w+)'", text)
    leaf = named.group(1) if named else text
    given = [a.split("=")[0] for a in sys.argv[1:] if a.startswith("--config.")]
    flag = next((a for a in given if leaf in a[len("--config."):].split(".")), None)
    hint = re.search(r'Did you mean "([^"]+)"', text)
    print(f"murajax: error: {flag or repr(leaf)}: no such config field"
          + (f"; did you mean {hint.group(1)!r}?" if hint else "")
          + " (the fields are those of the --config file; see configs/default.py)",
          file=sys.stderr, flush=True)
    sys.exit(2)


def _parse_flags(argv):
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as e:
        _unknown_config_field(e)


try:  # with the default --config, overrides are applied here, at definition
    _CONFIG = config_flags.DEFINE_config_file(
        "config", "configs/smoke.py", "Config file (a get_config() module).", lock_config=True
    )
except (AttributeError, KeyError) as e:
    _unknown_config_field(e)

_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Where checkpoints, logs and reports go.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "evaluate", "predict"], "What to do.")
_INPUT = flags.DEFINE_multi_string("input", [], "predict: image files, study folders or trees.")
_OUTPUT = flags.DEFINE_string("output", "", "predict: folder for predictions.csv and CAMs.")
_CAM = flags.DEFINE_bool("cam", False, "predict: also write class activation map overlays.")
_READERS = flags.DEFINE_string("readers", "", "evaluate: CSV of per-study reader labels.")


def _start_jax(config) -> None:
    import jax

    cache = os.environ.get("MURAJAX_COMPILATION_CACHE", os.path.expanduser("~/.cache/murajax/xla"))
    if cache:
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
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
    from murajax import host_memory

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
    lines += [f"  checkpoints         {summary['checkpoints']}",
              f"  metrics             {summary['metrics']}"]
    print("\n".join(lines), flush=True)


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from murajax import writers
    from murajax.errors import UserError

    writers.quiet_library_logs()

    config = _CONFIG.value
    try:
        _start_jax(config)
        if _MODE.value == "train":
            from murajax import train

            _print_summary(train.train_and_evaluate(config, _WORKDIR.value))
        elif _MODE.value == "evaluate":
            from murajax import evaluate

            report_dir = evaluate.evaluate_workdir(config, _WORKDIR.value, readers=_READERS.value)
            print(f"evaluation report: {report_dir}", flush=True)
        else:
            from murajax import inference

            if not _OUTPUT.value:
                raise UserError("--mode=predict needs --output DIR")
            inference.run_predict(_WORKDIR.value, _INPUT.value, _OUTPUT.value, cam=_CAM.value)
    except UserError as e:
        print(f"murajax: error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    from murajax import host_memory

    host_memory.reexec_with_huge_pages()  # before JAX starts; MURAJAX_HUGE_PAGES=0 turns it off
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=_parse_flags)
