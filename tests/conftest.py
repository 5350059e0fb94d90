"""Test setup: 8 fake CPU devices and strict rank promotion, before JAX starts its backend."""

import os
import pathlib
import re

os.environ.setdefault("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu" if not os.environ.get("MEMX_TEST_GPU") else "")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_threefry_partitionable", True)
# Tests build the same small programs many times (fresh closures defeat jit's in-memory cache):
# a persistent cache shared by the xdist workers compiles each one once per session.
_CACHE = pathlib.Path(os.environ.get("MEMX_TEST_CACHE", "/tmp/memx-test-xla-cache"))
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def load_script():
  """Imports a repository file that is not a package module (scripts/bench_*.py, experiment
  pipelines) by its path from the repository root: load_script("scripts/bench_ssm.py")."""
  import importlib.util  # noqa: PLC0415

  def load(relpath: str):
    path = REPO / relpath
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

  return load


@pytest.fixture(scope="session")
def _compilation_cache(tmp_path_factory) -> pathlib.Path:
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    base = base.parent  # shared by the workers of this session
  path = base / "memx-xla-cache"
  path.mkdir(exist_ok=True)
  return path


@pytest.fixture
def run_env(monkeypatch, _compilation_cache):
  """Environment of the run processes: one CPU device (the 8 fake devices of conftest.py
  only slow their compiles down), a shared compilation cache, the fixture's defaults."""
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                 os.environ.get("XLA_FLAGS", ""))
  monkeypatch.setenv("XLA_FLAGS", flags.strip())
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(_compilation_cache))
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
  monkeypatch.delenv("MEMX_TEST_SWEEP_SEED", raising=False)
  monkeypatch.delenv("MEMX_TEST_SWEEP_DIVERGE_LR", raising=False)
  return monkeypatch
