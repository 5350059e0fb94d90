"""Mesh construction and the dp rule table."""

import jax
import pytest
from jax.sharding import PartitionSpec

from memx.config import Config, ModelConfig, ParallelConfig
from memx.errors import ConfigError
from memx.parallel.mesh import batch_sharding, make_mesh
from memx.parallel.rules import RULES
from memx.train.step import init_state, state_shardings


def test_minus_one_takes_all_devices():
  mesh = make_mesh(ParallelConfig())
  assert dict(mesh.shape) == {"data": jax.device_count()}


@pytest.mark.multidevice
def test_two_axes_and_explicit_sizes():
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices")
  mesh = make_mesh(ParallelConfig(mesh_shape=(-1, 2), mesh_axes=("data", "model")))
  assert dict(mesh.shape) == {"data": 4, "model": 2}
  with pytest.raises(ConfigError, match="multiply to the 8 devices"):
    make_mesh(ParallelConfig(mesh_shape=(3,)))
  with pytest.raises(ConfigError, match="must divide"):
    make_mesh(ParallelConfig(mesh_shape=(-1, 3), mesh_axes=("data", "model")))


@pytest.mark.parametrize("kwargs, match", [
    ({"strategy": "tp"}, "parallel.strategy"),
    ({"mesh_shape": (-1, -1), "mesh_axes": ("data", "x")}, "at most one axis may be -1"),
    ({"mesh_shape": (2,), "mesh_axes": ("data", "x")}, "one size per axis"),
    ({"mesh_axes": ("batch",)}, "'data' axis"),
    ({"mesh_shape": (0,)}, "positive or -1"),
])
def test_bad_parallel_configs(kwargs, match):
  with pytest.raises(ConfigError, match=match):
    ParallelConfig(**kwargs)


def test_dp_rules_replicate_params_and_split_batch():
  assert dict(RULES["dp"]) == {"batch": "data"}
  mesh = make_mesh(ParallelConfig())
  cfg = Config(model=ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2))
  shardings = state_shardings(init_state(cfg, jax.random.key(0)).state, mesh, "dp")
  specs = {s.spec for s in jax.tree.leaves(shardings)}
  assert specs == {PartitionSpec(None, None), PartitionSpec(None), PartitionSpec(),
                   PartitionSpec(None, None, None)}
  assert batch_sharding(mesh).spec == PartitionSpec("data")
