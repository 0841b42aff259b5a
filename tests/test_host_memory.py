"""murajax.host_memory: when launch.py re-executes itself with glibc's huge-page tunable."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from murajax import host_memory

ROOT = Path(__file__).resolve().parents[1]
GLIBC_OK = sys.platform.startswith("linux") and (host_memory._glibc_version() or (0, 0)) >= (2, 35)


def _thp(tmp_path, setting="always [madvise] never"):
    path = tmp_path / "enabled"
    path.write_text(setting + "\n")
    return str(path)


@pytest.mark.skipif(not GLIBC_OK, reason="needs Linux with glibc >= 2.35")
def test_environment_adds_the_tunable_to_existing_ones(tmp_path):
    env = host_memory.huge_pages_environment(
        {"GLIBC_TUNABLES": "glibc.malloc.check=0", "PATH": "/bin"}, _thp(tmp_path))
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.check=0:glibc.malloc.hugetlb=1"
    assert env["PATH"] == "/bin" and env["MURAJAX_HUGE_PAGES"] == "0"
    env = host_memory.huge_pages_environment({}, _thp(tmp_path))
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


@pytest.mark.parametrize("environ,setting", [
    ({"MURAJAX_HUGE_PAGES": "0"}, "always [madvise] never"),          # opted out
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "[always] madvise never"),  # user's choice
    ({"JAX_PLATFORMS": "cuda"}, "always [madvise] never"),            # not a CPU run
    ({}, "always madvise [never]"),                                   # THP off in the kernel
])
def test_environment_is_left_alone(tmp_path, environ, setting):
    assert host_memory.huge_pages_environment(environ, _thp(tmp_path, setting)) is None


def test_reexec_keeps_the_process_and_its_arguments():
    if host_memory.huge_pages_environment() is None:
        pytest.skip("huge pages do not apply on this machine (see huge_pages_environment)")
    script = textwrap.dedent("""
        import os, sys
        print("start", os.getpid(), sys.argv[1:], flush=True)
        from murajax import host_memory
        host_memory.reexec_with_huge_pages()
        print("after", os.getpid(), os.environ["GLIBC_TUNABLES"], flush=True)
    """)
    out = subprocess.run([sys.executable, "-c", script, "--flag", "x"], cwd=ROOT, check=True,
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout.splitlines()
    pid = out[0].split()[1]
    assert out[0] == out[1] == f"start {pid} ['--flag', 'x']"  # run again, same PID and argv
    assert out[2].startswith(f"after {pid} ") and len(out) == 3
    assert out[2].endswith("glibc.malloc.hugetlb=1")
