"""The shared persistent compilation cache: capped (so locked by jax), legacy entries dated."""

import os
import subprocess
import sys

import pytest

from murajax import xla_cache
from murajax.errors import UserError


def _legacy_entry(folder, key="jit_f-0123", value=b"x" * 100):
    """An entry as jax writes it without a cap: no ``-atime`` file beside it."""
    path = folder / f"{key}-cache"
    path.write_bytes(value)
    os.utime(path, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    return path


def test_entries_without_atime_are_dated_and_the_capped_cache_accepts_writes(tmp_path):
    from jax._src.lru_cache import LRUCache

    _legacy_entry(tmp_path)
    assert xla_cache.date_entries_without_atime(tmp_path) == 1
    atime = (tmp_path / "jit_f-0123-atime").read_bytes()
    assert int.from_bytes(atime, "little") == 1_700_000_000_000_000_000
    assert xla_cache.date_entries_without_atime(tmp_path) == 0  # idempotent

    cache = LRUCache(str(tmp_path), max_size=150)  # room for one entry of 100 bytes
    cache.put("jit_g-4567", b"y" * 100)  # evicts the legacy entry, oldest by its atime
    assert cache.get("jit_g-4567") == b"y" * 100
    assert cache.get("jit_f-0123") is None


def test_only_local_folders_are_capped():
    assert xla_cache.is_local("/tmp/x") and xla_cache.is_local("file:///tmp/x")
    assert xla_cache.is_local("~/.cache/murajax/xla")
    assert not xla_cache.is_local("gs://bucket/xla")


def test_a_missing_folder_has_nothing_to_date(tmp_path):
    assert xla_cache.date_entries_without_atime(tmp_path / "absent") == 0


@pytest.mark.parametrize("text", ["0", "-2", "lots", "nan"])
def test_a_bad_cap_names_the_variable(monkeypatch, text):
    monkeypatch.setenv("MURAJAX_COMPILATION_CACHE_MAX_GB", text)
    with pytest.raises(UserError, match="MURAJAX_COMPILATION_CACHE_MAX_GB"):
        xla_cache.max_bytes_from_env()


def test_the_cap_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("MURAJAX_COMPILATION_CACHE_MAX_GB", raising=False)
    assert xla_cache.max_bytes_from_env() == int(xla_cache.DEFAULT_MAX_GB * 2**30)
    monkeypatch.setenv("MURAJAX_COMPILATION_CACHE_MAX_GB", "0.5")
    assert xla_cache.max_bytes_from_env() == 2**29


_CHILD = """
import sys
import jax, jax.numpy as jnp
from murajax import xla_cache
if sys.argv[2] == "enable":
    xla_cache.enable(sys.argv[1], min_compile_seconds=0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
print(jax.jit(lambda x: jnp.sin(x) * 3.0)(jnp.arange(7.0)).sum())
"""


@pytest.mark.parametrize("how", ["enable", "env"])
def test_a_process_set_up_either_way_writes_locked_dated_entries(tmp_path, how):
    folder = tmp_path / "xla"
    folder.mkdir()
    _legacy_entry(folder)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    if how == "env":
        xla_cache.date_entries_without_atime(folder)
        env.update(xla_cache.subprocess_env(folder, min_compile_seconds=0.0))
    subprocess.run([sys.executable, "-c", _CHILD, str(folder), how], env=env, check=True,
                   capture_output=True, timeout=120)
    entries = {p.name[: -len("-cache")] for p in folder.glob("*-cache")}
    assert "jit_f-0123" in entries and len(entries) >= 2  # the legacy one and the child's
    assert all((folder / f"{key}-atime").exists() for key in entries)
    assert (folder / ".lockfile").exists()  # jax took its lock: the cap is on
