"""Mesh construction, strategies and their validation, batch specs, activation constraints."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from memx.config import Config, ModelConfig, ParallelConfig
from memx.errors import ConfigError
from memx.parallel.constrain import (
  constrain,
  sequence_options,
  sharding_context,
  spec_for,
  use_rules,
)
from memx.parallel.mesh import batch_sharding, batch_spec, make_mesh
from memx.parallel.rules import RULES, STRATEGIES
from memx.parallel.validate import validate_arrays, validate_for_model
from memx.train.step import init_state, state_shardings


def test_minus_one_takes_all_devices():
  mesh = make_mesh(ParallelConfig())
  assert dict(mesh.shape) == {"data": jax.device_count()}


@pytest.mark.multidevice
def test_two_axes_and_explicit_sizes():
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices")
  mesh = make_mesh(ParallelConfig(strategy="tp", mesh_shape=(-1, 2),
                                  mesh_axes=("data", "tensor")))
  assert dict(mesh.shape) == {"data": 4, "tensor": 2}
  with pytest.raises(ConfigError, match="multiply to the 8 devices"):
    make_mesh(ParallelConfig(mesh_shape=(3,)))
  with pytest.raises(ConfigError, match="must divide"):
    make_mesh(ParallelConfig(strategy="tp", mesh_shape=(-1, 3), mesh_axes=("data", "tensor")))
  # An axis the strategy does not split over would make its devices repeat each other's work:
  # refused when its size is given, and when -1 resolves it to more than 1 device.
  with pytest.raises(ConfigError, match=r"splits nothing over mesh axes \('tensor',\)"):
    make_mesh(ParallelConfig(mesh_shape=(2, -1), mesh_axes=("data", "tensor")))
  assert dict(make_mesh(ParallelConfig(mesh_shape=(-1, 1), mesh_axes=("data", "tensor"))).shape
              ) == {"data": 8, "tensor": 1}


@pytest.mark.parametrize("kwargs, match", [
    ({"strategy": "zero9"}, "parallel.strategy"),
    ({"strategy": "tp"}, "is missing"),
    ({"mesh_shape": (-1, -1), "mesh_axes": ("data", "x")}, "at most one axis may be -1"),
    ({"mesh_shape": (2,), "mesh_axes": ("data", "x")}, "one size per axis"),
    ({"mesh_axes": ("batch",)}, "'data' axis"),
    ({"mesh_shape": (0,)}, "positive or -1"),
    ({"mesh_shape": (2, 4), "mesh_axes": ("data", "tensor")}, "splits nothing over"),
    ({"strategy": "fsdp", "mesh_shape": (1, 2, 4), "mesh_axes": ("data", "fsdp", "seq")},
     r"splits nothing over mesh axes \('seq',\)"),
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


# --- strategies, validation, activation constraints ---------------------------------------------

def test_every_strategy_needs_its_axes():
  for strategy in STRATEGIES:
    axes = ("data",) + tuple(a for a in ("fsdp", "seq", "tensor") if a in strategy.replace(
        "sp", "seq").replace("tp", "tensor"))
    ParallelConfig(strategy=strategy, mesh_shape=(1,) * (len(axes) - 1) + (-1,), mesh_axes=axes)
  with pytest.raises(ConfigError, match=r"strategy 'fsdp_tp' .* \('tensor',\) is missing"):
    ParallelConfig(strategy="fsdp_tp", mesh_shape=(1, -1), mesh_axes=("data", "fsdp"))
  with pytest.raises(ConfigError, match="parallel.sequence_method"):
    ParallelConfig(sequence_method="ulysses")
  with pytest.raises(ConfigError, match="parallel.sequence_layout"):
    ParallelConfig(sequence_layout="snake")
  sp = ParallelConfig(strategy="sp", mesh_shape=(1, -1), mesh_axes=("data", "seq"))
  assert sp.layout == "zigzag"
  assert dataclasses.replace(sp, sequence_method="all_to_all").layout == "contiguous"
  assert ParallelConfig().layout == "contiguous"


@pytest.mark.parametrize("strategy, shape, model, extra, match", [
    ("tp", (2, 4), dict(n_heads=6, d_model=48), {}, r"model.n_heads = 6 .* tensor=4"),
    ("tp", (2, 4), dict(n_heads=8, n_kv_heads=2, d_model=64), {}, "model.n_kv_heads"),
    ("fsdp", (1, 8), dict(d_model=36, n_heads=2), {}, r"model.d_model = 36 .* fsdp=8"),
    ("tp", (1, 8), dict(n_heads=8, d_model=64, vocab_size=260), {}, "model.vocab_size = 260"),
    ("fsdp", (2, 4), dict(), {"batch_size": 12}, r"train.batch_size = 12 .* data=2 x fsdp=4"),
    ("sp", (2, 4), dict(), {"seq_len": 36}, r"data.seq_len = 36 .*x2: the zigzag"),
])
def test_validate_for_model_names_the_uneven_dimension(strategy, shape, model, extra, match):
  axes = ("data",) + {"tp": ("tensor",), "fsdp": ("fsdp",), "sp": ("seq",)}[strategy]
  pcfg = ParallelConfig(strategy=strategy, mesh_shape=shape, mesh_axes=axes)
  with pytest.raises(ConfigError, match=match):
    validate_for_model(pcfg, ModelConfig(**model), dict(zip(axes, shape, strict=True)), **extra)


def test_validate_for_model_checks_sequence_attention_and_mlgru():
  sizes = {"data": 2, "seq": 4}
  a2a = ParallelConfig(strategy="sp", mesh_shape=(2, 4), mesh_axes=("data", "seq"),
                       sequence_method="all_to_all")
  six = ModelConfig(vocab_size=64, d_model=48, n_heads=6, n_kv_heads=3, d_ff=64)
  with pytest.raises(ConfigError, match="6 query heads must split over the 4 devices"):
    validate_for_model(a2a, six, sizes, seq_len=64)
  validate_for_model(dataclasses.replace(a2a, sequence_method="ring"), six, sizes, seq_len=64)
  validate_for_model(a2a, ModelConfig(vocab_size=64, d_model=32, n_heads=8, n_kv_heads=2),
                     sizes, seq_len=64)  # kv heads 2 divide the 4 devices: repeated
  planned = dataclasses.replace(ModelConfig(vocab_size=64, d_model=32, n_heads=4, n_layers=1),
                                attn_plan=(((4, 0.0, 0),) * 4,))
  with pytest.raises(ConfigError, match="model.attn_plan"):
    validate_for_model(dataclasses.replace(a2a, sequence_method="ring"), planned, sizes)
  # A seq axis of size 1 splits nothing: the zigzag layout's x2 does not apply.
  one = ParallelConfig(strategy="sp", mesh_shape=(8, 1), mesh_axes=("data", "seq"))
  validate_for_model(one, six, {"data": 8, "seq": 1}, batch_size=8, seq_len=63)
  # MLGRU projections put d_model on the MLP axis.
  from memx.models.config import matmulfree_config
  tp = ParallelConfig(strategy="tp", mesh_shape=(1, 8), mesh_axes=("data", "tensor"))
  with pytest.raises(ConfigError, match="MLGRU width"):
    validate_for_model(tp, matmulfree_config(vocab_size=64, d_model=36, n_layers=1, n_heads=2,
                                             d_ff=64), {"data": 1, "tensor": 8})


def test_validate_for_model_accepts_even_splits():
  pcfg = ParallelConfig(strategy="fsdp_sp_tp", mesh_shape=(1, 2, 2, 2),
                        mesh_axes=("data", "fsdp", "seq", "tensor"))
  validate_for_model(pcfg, ModelConfig(vocab_size=64, d_model=32, n_heads=4, n_kv_heads=2),
                     {"data": 1, "fsdp": 2, "seq": 2, "tensor": 2}, batch_size=4, seq_len=64)


def test_validate_arrays_reads_axes_metadata():
  cfg = Config(model=ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2))
  state = init_state(cfg, jax.random.key(0)).state
  validate_arrays(state, {"data": 1, "tensor": 2}, "tp")
  with pytest.raises(ConfigError, match=r"heads', size 2\) is not a multiple of the 4"):
    validate_arrays(state, {"data": 1, "tensor": 4}, "tp")


@pytest.mark.multidevice
def test_batch_spec_follows_the_strategy():
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices")
  mesh = make_mesh(ParallelConfig(strategy="fsdp_sp", mesh_shape=(2, 2, 2),
                                  mesh_axes=("data", "fsdp", "seq")))
  assert batch_spec(mesh) == PartitionSpec("data")
  assert batch_spec(mesh, "fsdp_sp") == PartitionSpec(("data", "fsdp"), "seq")
  assert batch_spec(mesh, "dp") == PartitionSpec("data", None)


@pytest.mark.multidevice
def test_constrain_is_a_no_op_without_mesh_and_shards_with_one():
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices")
  x = jnp.ones((8, 16, 4))
  assert constrain(x, ("batch", "seq", "embed")) is x
  with use_rules("fsdp"):
    assert constrain(x, ("batch", "seq", "embed")) is x  # rules but no mesh
    assert spec_for(("batch", "embed")) == PartitionSpec(("data", "fsdp"), None)
  mesh = Mesh(np.asarray(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "seq"))
  with sharding_context(mesh, "fsdp_sp", sequence_method="all_to_all"):
    assert sequence_options().method == "all_to_all"
    y = jax.jit(lambda x: constrain(x * 2, ("batch", "seq", "embed")))(x)
  assert sequence_options().method == "ring"
  assert y.sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec(("data", "fsdp"), "seq")), 3)
  with pytest.raises(ValueError, match="2 logical axes"):
    constrain(x, ("batch", "seq"))
