"""murajax as an installed command: the wheel, a fresh virtual environment, a folder outside the
checkout; and the install instructions (README, .ci/run, pyproject.toml, constraints.txt)."""

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import jax
import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIG_NAMES = ["accelerator", "default", "paper_224", "smoke"]
TIMEOUT_S = 300


def _run(command, cwd, env=None, expect=0):
    result = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=TIMEOUT_S)
    if expect is not None:
        assert result.returncode == expect, (
            f"{command}: exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def _purelib(python) -> Path:
    return Path(subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True).stdout.strip())


def _build_wheel(tmp_path) -> Path:
    """The wheel of a copy of the package source (the build leaves build/ and *.egg-info next
    to its source: not in the checkout)."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "murajax", source / "murajax",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
          "-q", source, "-w", wheels], cwd=tmp_path)
    (wheel,) = wheels.glob("murajax-*.whl")
    return wheel


def _fresh_venv(tmp_path, wheel) -> Path:
    """A new venv holding the wheel, which sees this venv's third-party packages through a
    plain path in a .pth file: that path is not a site dir, so its .pth files (the editable
    murajax's finder among them) are not processed."""
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path)
    python = venv / "bin" / "python"
    site_packages = _purelib(python)
    (site_packages / "_murajax_test_deps.pth").write_text(
        sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
          "-q", wheel], cwd=tmp_path)
    return venv


@pytest.mark.slow
def test_the_wheel_installs_a_murajax_command_that_works_outside_the_checkout(tmp_path):
    wheel = _build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        entry_points = next(z.read(n).decode() for n in names
                            if n.endswith(".dist-info/entry_points.txt"))
    for name in CONFIG_NAMES + ["__init__"]:
        assert f"murajax/configs/{name}.py" in names
    assert {"murajax/cli.py", "murajax/__main__.py"} <= set(names)
    assert not [n for n in names if n.startswith(("configs/", "tests/"))]
    assert re.search(r"^murajax = murajax\.cli:main$", entry_points, re.M), entry_points

    venv = _fresh_venv(tmp_path, wheel)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    assert not scratch.is_relative_to(REPO)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update({
        "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        "VIRTUAL_ENV": str(venv),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
        "MURAJAX_COMPILATION_CACHE": jax.config.jax_compilation_cache_dir,
        "PYTHONUNBUFFERED": "1",
    })
    murajax = shutil.which("murajax", path=env["PATH"])
    assert murajax == str(venv / "bin" / "murajax")

    # The installed package, not the checkout's (editable) one.
    where = _run(["python", "-c", "import murajax.cli; print(murajax.cli.__file__)"], scratch,
                 env).stdout.strip()
    assert Path(where).is_relative_to(_purelib(venv / "bin" / "python")), where

    result = _run([murajax, "--help"], scratch, env)
    assert "--config" in result.stdout and "smoke" in result.stdout
    _run(["python", "-m", "murajax", "--help"], scratch, env)

    result = _run([murajax, "--config=nope"], scratch, env, expect=2)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("murajax: error: --config=nope")
    assert all(name in result.stderr for name in CONFIG_NAMES), result.stderr

    # The installed smoke config (the default), made small; eval settings saved with the run.
    # Two epochs: two epoch-end checkpoints, of which ensemble_top_k=1 picks one.
    result = _run([murajax, "--config.num_epochs=2", "--config.data.synthetic_studies=24",
                   "--config.data.image_size=32", "--config.batch_size=8",
                   "--config.eval_batch_size=8", "--config.eval.ensemble_top_k=1",
                   "--config.eval.bootstrap_samples=50"], scratch, env)
    assert "murajax run summary" in result.stdout and "epoch 2" in result.stdout
    saved = json.loads((scratch / "runs" / "demo" / "config.json").read_text())
    assert saved["model"]["name"] == "densenet_tiny" and saved["num_epochs"] == 2
    from murajax import host_memory

    if host_memory.huge_pages_environment(env) is not None:  # re-executed, arguments kept
        assert "host malloc uses transparent huge pages" in result.stderr, result.stderr[-3000:]

    # Evaluation: the run's config (ensemble_top_k=1, not the smoke file's 5), plus the flag.
    _run([murajax, "--mode=evaluate", "--workdir", "runs/demo",
          "--config.eval.bootstrap_samples=100"], scratch, env)
    report = json.loads((scratch / "runs/demo/eval/valid/report.json").read_text())
    assert report["num_bootstrap"] == 100
    assert len(report["checkpoints"]) == 1, report["checkpoints"]

    valid = scratch / "runs/demo/data/MURA-v1.1/valid"
    study = next(p.parent for p in sorted(valid.rglob("image1.png")))
    _run([murajax, "--mode=predict", "--workdir", "runs/demo", "--input", study,
          "--output", "out"], scratch, env)
    rows = (scratch / "out" / "predictions.csv").read_text().strip().splitlines()
    assert rows[0].startswith("study,image,") and len(rows) >= 2

    result = _run([murajax, "--mode=evaluate", "--workdir", "runs/none"], scratch, env, expect=2)
    assert result.stderr.strip() == (
        "murajax: error: runs/none/config.json not found: runs/none is not a murajax run "
        "directory (train into it first: murajax --workdir runs/none)")

    result = _run(["python", "-m", "murajax.bench", "--help"], scratch, env)
    assert "--model" in result.stdout


# ---- the install instructions ------------------------------------------------------------------


def _readme_commands():
    """The README's first two commands: the demo, then the tests."""
    return re.findall(r"^    (python3 -m venv .*)$", (REPO / "README.md").read_text(), re.M)[:2]


def test_ci_runs_exactly_the_readme_test_command():
    demo, tests = _readme_commands()
    assert demo.endswith("&& murajax") and "pip install -c constraints.txt -e ." in demo
    assert 'pip install -c constraints.txt -e ".[test]"' in tests
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    commands = [line for line in ci if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert commands == [tests]


def test_constraints_pin_every_dependency_and_the_build_tool():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    assert "murajax" not in pins and "pip" not in pins
    wanted = project["dependencies"] + project["optional-dependencies"]["test"]
    for requirement in wanted:
        name = re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", requirement).group()).lower()
        assert name in pins, f"{requirement} is not pinned in constraints.txt"
    assert int(pins["setuptools"].split(".")[0]) >= 77  # the test extra's setuptools>=77


def test_scikit_learn_is_a_test_dependency_only():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.startswith("scikit-learn")]
    assert [d for d in project["optional-dependencies"]["test"] if d.startswith("scikit-learn")]
    for path in list((REPO / "murajax").rglob("*.py")) + [REPO / "launch.py"]:
        assert not re.search(r"^\s*(import|from)\s+sklearn", path.read_text(), re.M), path
