"""Fine-tuning runs: a base run's weights start the model, LoRA / QLoRA runs train only the
adapters (the base stays bit-identical, the optimizer state is the adapters'), resume exactly,
restore for evaluation, and reject bases and settings that do not fit."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx

from memx.config import (
  CheckpointConfig,
  Config,
  DataConfig,
  FinetuneConfig,
  ModelConfig,
  OptimConfig,
  TrainConfig,
)
from memx.errors import ConfigError
from memx.experiment.rundir import write_config
from memx.nn.lora import LoRAWeight
from memx.nn.quantized import NF4Weight
from memx.train.loop import train
from memx.train.restore import load_trained
from memx.train.step import init_state, tree_bytes

BASE = Config(
    model=ModelConfig(vocab_size=264, d_model=64, n_layers=2, n_heads=2),
    data=DataConfig(source="corpus", seq_len=16),
    optim=OptimConfig(lr=3e-3, warmup_steps=2),
    train=TrainConfig(steps=4, batch_size=8, log_every=1, eval_batches=1),
    checkpoint=CheckpointConfig(every=2, keep=2),
)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
  return _train(BASE, tmp_path_factory.mktemp("base"))


def _train(cfg, run_dir, **kwargs):
  """train() as `memx run` does it: the run directory holds its config."""
  run_dir.mkdir(exist_ok=True)
  write_config(run_dir, cfg)
  train(cfg, run_dir, progress=False, **kwargs)
  return run_dir


def _ft(base_run, **finetune):
  return dataclasses.replace(BASE, finetune=FinetuneConfig(base=str(base_run), **finetune),
                             train=dataclasses.replace(BASE.train, steps=3))


def _params(model, kind=nnx.Param):
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in
          jax.tree_util.tree_flatten_with_path(nnx.state(model, kind))[0]}


def test_full_finetune_starts_from_the_base_weights(base_run):
  base = load_trained(base_run).model
  ts = init_state(_ft(base_run), jax.random.key(123))
  model, _ = nnx.merge(ts.graphdef, ts.state)
  got, want = _params(model), _params(base)
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])


@pytest.mark.parametrize("quantize_base", ["none", "nf4"])
def test_lora_run_trains_only_the_adapters(base_run, tmp_path, quantize_base):
  cfg = _ft(base_run, lora_rank=4, lora_alpha=8.0, quantize_base=quantize_base)
  ts = init_state(cfg, jax.random.key(0))
  model, opt = nnx.merge(ts.graphdef, ts.state)
  adapters = nnx.state(model, nnx.LoRAParam)
  # the optimizer holds AdamW moments for the adapters only (+ counters)
  assert abs(tree_bytes(opt.opt_state) - 2 * tree_bytes(adapters)) <= 64
  _train(cfg, tmp_path / "ft")
  summary = json.loads((tmp_path / "ft" / "summary.json").read_text())
  assert np.isfinite(summary["final_eval_loss"])
  # parameters count the weights an NF4 base stores, not its code bytes
  n_base = sum(x.size for x in jax.tree.leaves(nnx.state(load_trained(base_run).model,
                                                         nnx.Param)))
  n_adapters = sum(x.size for x in jax.tree.leaves(adapters))
  assert (summary["params"], summary["trainable_params"]) == (n_base + n_adapters, n_adapters)
  tuned = load_trained(tmp_path / "ft").model
  wq = tuned.blocks[0].attn.wq
  assert isinstance(wq, LoRAWeight)
  assert isinstance(wq.base, NF4Weight) == (quantize_base == "nf4")
  assert np.abs(np.asarray(wq.b[...])).max() > 0  # trained
  # frozen: every non-adapter array equals the base run's (or its NF4 codes at init)
  frozen = lambda m: {k: v for k, v in _params(m, nnx.Variable).items()  # noqa: E731
                      if "['a']" not in k and "['b']" not in k}
  start, end = frozen(model), frozen(tuned)
  assert start.keys() == end.keys()
  for k in start:
    np.testing.assert_array_equal(end[k], start[k], err_msg=k)


def test_lora_run_resumes_bit_identically(base_run, tmp_path):
  cfg = dataclasses.replace(_ft(base_run, lora_rank=2), checkpoint=CheckpointConfig(every=1))
  _train(cfg, tmp_path / "once")
  _train(cfg, tmp_path / "twice", stop_at_step=1)
  _train(cfg, tmp_path / "twice", resume=True)
  a, b = load_trained(tmp_path / "once").model, load_trained(tmp_path / "twice").model
  pa, pb = _params(a, nnx.LoRAParam), _params(b, nnx.LoRAParam)
  for k in pa:
    np.testing.assert_array_equal(pa[k], pb[k])


def test_a_lora_run_can_be_the_base_of_another(base_run, tmp_path):
  first = _ft(base_run, lora_rank=2)
  _train(first, tmp_path / "first")
  merged = load_trained(tmp_path / "first").model
  from memx.nn.lora import merge_lora
  want = _params(merge_lora(merged))
  ts = init_state(dataclasses.replace(first, finetune=FinetuneConfig(base=str(
      tmp_path / "first"))), jax.random.key(0))
  got = _params(nnx.merge(ts.graphdef, ts.state)[0])
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])


def test_bad_finetune_settings_fail_clearly(base_run):
  with pytest.raises(ConfigError, match="finetune.quantize_base = 'nf4' is not allowed"):
    FinetuneConfig(quantize_base="nf4")
  with pytest.raises(ConfigError, match="finetune.lora_targets"):
    FinetuneConfig(lora_rank=2, lora_targets=("wq", "w_qk"))
  with pytest.raises(ConfigError, match="finetune.base_step = 3 is not allowed"):
    FinetuneConfig(base_step=3)
  wider = dataclasses.replace(_ft(base_run), model=dataclasses.replace(BASE.model, d_model=128))
  with pytest.raises(ConfigError, match="does not fit model"):
    init_state(wider, jax.random.key(0))
  mamba = dataclasses.replace(BASE, model=dataclasses.replace(
      BASE.model, mixers=("mamba2", "mamba2"), mlp=False), finetune=FinetuneConfig(lora_rank=2))
  with pytest.raises(ConfigError, match="none of the target weights"):
    init_state(mamba, jax.random.key(0))


@pytest.mark.parametrize("strategy, axes, shape", [("fsdp", ("data", "fsdp"), (1, 8)),
                                                    ("tp", ("data", "tensor"), (4, 2))])
def test_lora_and_qlora_steps_under_a_mesh_equal_one_device(strategy, axes, shape):
  """Adapters are sharded by their logical axes (A on the input dims, B on the output dims),
  NF4 codes replicated: three updates equal the single-device ones."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices")
  from memx.data import make_loader
  from memx.parallel.constrain import sharding_context
  from memx.parallel.mesh import batch_sharding, make_mesh
  from memx.train.step import make_train_step, state_shardings

  cfg = dataclasses.replace(BASE, finetune=FinetuneConfig(lora_rank=4, quantize_base="nf4"),
                            train=dataclasses.replace(BASE.train, batch_size=8))
  ts = init_state(cfg, jax.random.key(0))
  loader = make_loader(cfg.data, batch_size=8, seed=0, split="train")

  def run(par, devices):
    mesh = make_mesh(par, devices=devices)
    shardings = state_shardings(ts.state, mesh, par.strategy)
    # NF4 codes are split as their weight: wq's rows (d) under FSDP, its columns (heads) under
    # TP; every weight has its d side split under FSDP (wo and w_down along their columns)
    codes = {jax.tree_util.keystr(k): v.spec for k, v in
             jax.tree_util.tree_flatten_with_path(shardings)[0] if "codes" in str(k)}
    wq = next(v for k, v in codes.items() if "['attn']['wq']" in k)
    if par.strategy == "fsdp":
      assert wq[0] == "fsdp" and all("fsdp" in tuple(v) for v in codes.values()), codes
    elif par.strategy == "tp":
      assert wq[1] == "tensor", codes
    state = jax.device_put(ts.state, shardings)
    with sharding_context(mesh, par.strategy):
      step = jax.jit(make_train_step(cfg, ts.graphdef), out_shardings=(shardings, None))
      losses = []
      for i in range(3):
        state, m = step(state, loader.global_batch(i, batch_sharding(mesh, par.strategy)))
        losses.append(float(m["loss"]))
    return state, losses

  from memx.config import ParallelConfig
  one_state, one = run(ParallelConfig(mesh_shape=(1,)), jax.devices()[:1])
  par = ParallelConfig(strategy=strategy, mesh_axes=axes, mesh_shape=shape)
  mesh_state, many = run(par, jax.devices())
  np.testing.assert_allclose(many, one, rtol=1e-5)
  for x, y in zip(jax.tree.leaves(one_state), jax.tree.leaves(mesh_state), strict=True):
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32),
                               rtol=2e-4, atol=2e-6)


def test_lora_steps_with_microbatches_equal_the_whole_batch():
  """Gradient accumulation over the adapters alone (the accumulator is laid out as the trainable
  variables) gives the whole batch's update."""
  from memx.data import make_loader
  from memx.train.step import make_train_step

  cfg = dataclasses.replace(BASE, finetune=FinetuneConfig(lora_rank=4))
  ts = init_state(cfg, jax.random.key(0))
  # B = 0 at creation: one plain step first, so both runs start from adapters that act
  loader = make_loader(cfg.data, batch_size=8, seed=0, split="train")
  batch_at = lambda i: {k: jax.numpy.asarray(v) for k, v in loader.local_batch(i).items()}  # noqa: E731
  state, _ = jax.jit(make_train_step(cfg, ts.graphdef))(ts.state, batch_at(0))
  batch = batch_at(1)
  out = {}
  for n in (1, 4):
    c = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, microbatches=n))
    out[n] = jax.jit(make_train_step(c, ts.graphdef))(state, batch)
  np.testing.assert_allclose(out[4][1]["loss"], out[1][1]["loss"], rtol=1e-6)
  for x, y in zip(jax.tree.leaves(out[1][0]), jax.tree.leaves(out[4][0]), strict=True):
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32),
                               rtol=1e-4, atol=1e-6)


def test_a_lora_run_evaluates_with_quantized_weights(base_run, tmp_path):
  """`memx eval --weight-quant` on a LoRA run merges the adapters, then quantizes."""
  from memx.cli import main

  run = _train(_ft(base_run, lora_rank=2), tmp_path / "ft")
  assert main(["eval", str(run), "--lengths", "128", "--depths", "0.5", "--batches", "1",
               "--batch-size", "2", "--weight-quant", "rtn:4:64"]) == 0
  result = json.loads((run / "evaluations" / "rtn-w4g64.json").read_text())
  assert result["weight_quant"]["bits_per_weight"] == 5.0
  assert np.isfinite(result["eval_loss"]["128"])


def test_a_qlora_run_can_teach_a_distilled_student(base_run, tmp_path):
  """Distillation merges a fine-tuned teacher's adapters (and dequantizes its NF4 bases) before
  seeding: the hybrid student's kept attention layer and MLPs are the merged teacher's."""
  from memx.distill.config import DistillConfig, StudentConfig
  from memx.distill.runner import initial_student, plan
  from memx.nn.lora import merge_lora

  run = _train(_ft(base_run, lora_rank=2, quantize_base="nf4"), tmp_path / "ft")
  merged = merge_lora(load_trained(run).model)
  p = plan(run, DistillConfig(student=StudentConfig(kind="hybrid", every=2)), tmp_path / "d")
  student, _ = initial_student(p, log=lambda *_: None)
  np.testing.assert_array_equal(student.blocks[0].attn.wq[...], merged.blocks[0].attn.wq[...])
  for i in (0, 1):
    np.testing.assert_array_equal(student.blocks[i].mlp.w_down[...],
                                  merged.blocks[i].mlp.w_down[...])


def test_resume_needs_no_base_and_refuses_other_adapter_settings(base_run, tmp_path):
  """A fine-tune resumes from its own checkpoint with its base run gone, bit for bit; resuming
  with other adapter settings is refused (they are part of what a checkpoint must share)."""
  import shutil

  from memx.errors import CheckpointMismatchError

  moved = tmp_path / "base"
  shutil.copytree(base_run, moved)
  cfg = dataclasses.replace(_ft(moved, lora_rank=2), checkpoint=CheckpointConfig(every=1))
  _train(cfg, tmp_path / "once")
  _train(cfg, tmp_path / "twice", stop_at_step=1)
  shutil.rmtree(moved)
  _train(cfg, tmp_path / "twice", resume=True)
  a, b = load_trained(tmp_path / "once").model, load_trained(tmp_path / "twice").model
  for k, v in _params(a, nnx.LoRAParam).items():
    np.testing.assert_array_equal(_params(b, nnx.LoRAParam)[k], v)
  other = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, lora_alpha=64.0),
                              train=dataclasses.replace(cfg.train, steps=5))
  with pytest.raises(CheckpointMismatchError):
    train(other, tmp_path / "twice", resume=True, progress=False)


def test_a_base_must_have_finished_or_name_its_step(base_run, tmp_path):
  half = tmp_path / "half"
  half.mkdir()
  write_config(half, BASE)
  train(BASE, half, progress=False, stop_at_step=2)
  with pytest.raises(ConfigError, match="has not finished training"):
    init_state(_ft(half), jax.random.key(0))
  from memx.train.loop import prepare
  with pytest.raises(ConfigError, match="has not finished training"):
    prepare(_ft(half))
  init_state(_ft(half, base_step=2), jax.random.key(0))  # an explicit step is fine
  with pytest.raises(ConfigError, match=r"base_step = 3 is not allowed.*steps \[2\]"):
    prepare(dataclasses.replace(_ft(half), finetune=FinetuneConfig(base=str(half), base_step=3)))
