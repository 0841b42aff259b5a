"""The command line (murajax/cli.py): config names and paths, overrides in evaluate/predict."""

import subprocess
import sys
from pathlib import Path

import pytest

from murajax import cli, configs
from murajax.modes import evaluate
from murajax.errors import UserError
from tests import helpers

REPO = Path(__file__).resolve().parents[1]
NAMES = ("accelerator", "default", "paper_224", "smoke")


def test_the_installed_configs_are_listed_and_load_by_name():
    assert configs.NAMES == NAMES
    for name in NAMES:
        path = Path(configs.resolve(name))
        assert path == REPO / "murajax" / "configs" / f"{name}.py"
        assert path.is_file()
    from murajax.configs import accelerator, default, paper_224, smoke

    assert default.get_config().model.name == "densenet169"
    assert paper_224.get_config().data.image_size == 224
    assert accelerator.get_config().model.dtype == "bfloat16"
    assert smoke.get_config().model.name == "densenet_tiny"


def test_a_path_is_kept_and_a_bad_name_or_path_is_refused(tmp_path, monkeypatch):
    own = tmp_path / "own.py"
    own.write_text("from murajax.configs import default\n\n"
                   "def get_config():\n    return default.get_config()\n")
    assert configs.resolve(str(own)) == str(own)
    assert configs.resolve(f"{own}:arg") == f"{own}:arg"
    assert configs.resolve("smoke:arg") == configs.path("smoke") + ":arg"
    monkeypatch.chdir(tmp_path)
    assert configs.resolve("own.py") == "own.py"
    with pytest.raises(UserError, match=r"no config named 'nope'; known configs: accelerator, "
                                        r"default, paper_224, smoke"):
        configs.resolve("nope")
    with pytest.raises(UserError, match=r"configs/smoke.py: no such file \(did you mean "
                                        r"--config=smoke\?\); known configs"):
        configs.resolve("configs/smoke.py")
    with pytest.raises(UserError, match="is a folder"):
        configs.resolve(str(tmp_path) + "/")


def test_select_config_rewrites_every_form_of_the_flag():
    smoke, default = configs.path("smoke"), configs.path("default")
    assert cli.select_config(["murajax", "--config=smoke", "--config.batch_size=2"]) == [
        "murajax", f"--config={smoke}", "--config.batch_size=2"]
    assert cli.select_config(["murajax", "--config", "default", "-config=smoke"]) == [
        "murajax", "--config", default, f"-config={smoke}"]
    assert cli.select_config(["murajax", "--mode=evaluate"]) == ["murajax", "--mode=evaluate"]
    assert cli.select_config(["murajax", "--", "--config=nope"]) == [
        "murajax", "--", "--config=nope"]
    with pytest.raises(UserError, match="no config named 'nope'"):
        cli.select_config(["murajax", "--config", "nope"])


def _saved_run(tmp_path, **overrides):
    from murajax import checkpoints

    config = helpers.tiny_config(**overrides)
    checkpoints.save_run_config(tmp_path, config)
    return tmp_path


def test_evaluation_uses_the_run_config_and_only_the_given_overrides(tmp_path):
    workdir = _saved_run(tmp_path, **{"eval.ensemble_top_k": 3, "eval.bootstrap_samples": 77})
    assert evaluate.evaluation_config({}, workdir).eval.ensemble_top_k == 3
    config = evaluate.evaluation_config({"eval.ensemble_top_k": 1, "data.root": "/data/m"},
                                        workdir)
    assert config.eval.ensemble_top_k == 1 and config.eval.bootstrap_samples == 77
    assert config.data.root == "/data/m"
    with pytest.raises(UserError, match=r"--config.eval.nope: no such field in the run's config"):
        evaluate.evaluation_config({"eval.nope": 1}, workdir)
    with pytest.raises(UserError, match=r"--config.model.name: evaluation uses the model"):
        evaluate.evaluation_config({"model.name": "densenet121"}, workdir)
    with pytest.raises(UserError, match=r"--config.eval.ensemble_top_k=2.5"):
        evaluate.evaluation_config({"eval.ensemble_top_k": 2.5}, workdir)
    with pytest.raises(UserError, match=r"config.json not found"):
        evaluate.evaluation_config({}, tmp_path / "elsewhere")
    # The Python API's older form: a whole config whose eval section replaces the run's.
    flags_config = helpers.tiny_config(**{"eval.ensemble_top_k": 2})
    assert evaluate.evaluation_config(flags_config, workdir).eval.ensemble_top_k == 2


def test_predict_takes_the_overrides_it_can_use_and_refuses_the_others():
    assert cli.predict_options({"eval.ensemble_top_k": 2, "eval.threshold": 0.3,
                                "eval_batch_size": 4, "data.num_workers": 0,
                                "distributed.enabled": False}) == {
        "top_k": 2, "threshold": 0.3, "batch_size": 4, "num_workers": 0}
    with pytest.raises(UserError, match=r"--config.data.image_size does not apply to "
                                        r"--mode=predict"):
        cli.predict_options({"data.image_size": 64})


def _command(tmp_path, *flags):
    """launch.py from another folder: the checkout's command without installing."""
    return subprocess.run([sys.executable, str(REPO / "launch.py"), *flags], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)


def test_launch_py_works_from_another_folder(tmp_path):
    result = _command(tmp_path, "--help")
    assert result.returncode == 0, result.stderr
    assert "--config" in result.stdout and "--workdir" in result.stdout
    result = _command(tmp_path, "--config=nope")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "murajax: error: --config=nope: no config named 'nope'; known configs: accelerator, "
        "default, paper_224, smoke; or give the path of a .py file with get_config()"]
    own = tmp_path / "own.py"
    own.write_text("from murajax.configs import smoke\n\n"
                   "def get_config():\n    return smoke.get_config()\n")
    result = _command(tmp_path, f"--config={own}", "--config.batch_sise=8")
    assert result.returncode == 2
    assert "--config.batch_sise: no such config field; did you mean 'batch_size'?" in result.stderr
    for mode in ("evaluate", "predict"):
        result = _command(tmp_path, f"--mode={mode}", "--workdir=run", "--output=out")
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [
            "murajax: error: run/config.json not found: run is not a murajax run directory "
            "(train into it first: murajax --workdir run)"]
