"""The optimizer: which parameters decay, the learning-rate schedule's ends."""

import jax
import numpy as np
import pytest
from flax import nnx

from memx.models.config import ModelConfig, SSMConfig
from memx.models.transformer import TransformerLM
from memx.train.config import OptimConfig
from memx.train.optim import decay_mask, lr_schedule, make_optimizer


def test_decay_mask_spares_norms_biases_and_ssm_dynamics():
  cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4,
                    mixers=("mamba2", "attention"),
                    ssm=SSMConfig(d_state=16, head_dim=16, n_groups=2, chunk_size=16))
  params = nnx.state(TransformerLM(cfg, rngs=nnx.Rngs(0)), nnx.Param)
  mask = {jax.tree_util.keystr(p): m
          for p, m in jax.tree_util.tree_flatten_with_path(decay_mask(params))[0]}
  spared = {k for k, m in mask.items() if not m}
  mixer = "['blocks'][0]['mixer']"
  # Mamba-2's gated norm and conv biases are 2-D, [heads, head_dim], and are still spared.
  for name in ("norm", "conv_x_bias", "conv_b_bias", "conv_c_bias", "a_log", "d", "dt_bias"):
    assert f"{mixer}['{name}'].value" in spared
  for name in ("w_x", "w_z", "w_b", "w_c", "w_dt", "w_out", "conv_x"):
    assert mask[f"{mixer}['{name}'].value"]
  assert mask["['blocks'][1]['attn']['wq'].value"] and mask["['embed'].value"]
  assert not mask["['final_norm']['scale'].value"]
  # Applied: with zero gradients only the decayed weights move.
  opt = make_optimizer(OptimConfig(lr=1.0, warmup_steps=0, weight_decay=0.5), 10)
  zeros = jax.tree.map(np.zeros_like, params)
  updates, _ = opt.update(zeros, opt.init(params), params)
  moved = {jax.tree_util.keystr(p): bool(np.any(np.asarray(u) != 0))
           for p, u in jax.tree_util.tree_flatten_with_path(updates)[0]}
  assert moved == mask


@pytest.mark.parametrize("steps, warmup", [(100, 10), (10, 0), (2, 5)])
def test_schedule_reaches_its_final_lr_at_the_last_update(steps, warmup):
  """Warmup from 0 to the peak at step w, then cosine down to min_lr_ratio·lr exactly at the
  last update, step steps - 1 (a run too short to decay ends at the peak)."""
  cfg = OptimConfig(lr=1.0, warmup_steps=warmup, min_lr_ratio=0.1)
  sched = lr_schedule(cfg, steps)
  w = min(warmup, steps - 1)
  if w:
    assert float(sched(0)) == 0.0 and float(sched(w)) == pytest.approx(1.0)
  final = 0.1 if steps - 1 > w else 1.0
  assert float(sched(steps - 1)) == pytest.approx(final, rel=1e-6)
  assert all(final - 1e-6 <= float(sched(t)) <= 1.0 + 1e-6 for t in range(w, steps))


def test_clipping_keeps_the_optimizer_state_layout():
  params = {"w": np.ones((3, 3), np.float32)}
  states = [make_optimizer(OptimConfig(clip_norm=c), 10).init(params) for c in (None, 1.0)]
  assert jax.tree.structure(states[0]) == jax.tree.structure(states[1])


def test_decay_mask_spares_every_norm_of_the_matmulfree_model():
  # There the rank rule alone spares MLGRU's h_norm (no NO_DECAY name covers it).
  from memx.models.config import matmulfree_config
  model = TransformerLM(matmulfree_config(vocab_size=32, d_model=16, n_layers=2, n_heads=2),
                        rngs=nnx.Rngs(0))
  mask = decay_mask(nnx.state(model, nnx.Param))
  flat = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
  norms = [k for k in flat if "norm" in k]
  assert any("h_norm" in k for k in norms)
  assert not any(flat[k] for k in norms), [k for k in norms if flat[k]]


def _bytes(tree) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def test_optimizer_state_bytes():
  """Exact optimizer-state bytes from the parameter shapes: AdamW keeps two float32 moments,
  one in bf16 with mu_dtype, Lion one; Adafactor a row and a column per factored matrix."""
  params = {"w": np.ones((512, 256), np.float32), "b": np.ones((256,), np.float32),
            "small": np.ones((64, 32), np.float32)}
  n = 512 * 256 + 256 + 64 * 32

  def state(**kw):
    opt = make_optimizer(OptimConfig(**kw), 10)
    st = opt.init(params)
    # Scalars (step counts) aside: the per-parameter state.
    return _bytes([x for x in jax.tree.leaves(st) if np.ndim(x) > 0])

  assert state(name="adamw") == 2 * 4 * n
  assert state(name="adamw", mu_dtype="bfloat16") == (2 + 4) * n
  assert state(name="lion") == 4 * n
  assert state(name="lion", mu_dtype="bfloat16") == 2 * n
  # Factored where the two largest dims reach 32: w keeps 512 + 256 statistics, small 64 + 32;
  # b keeps a full second moment; each unused slot is a 1-element placeholder.
  assert state(name="adafactor") == 4 * ((512 + 256 + 1) + (256 + 1 + 1) + (64 + 32 + 1))


@pytest.mark.parametrize("name", ["adamw", "lion", "adafactor", "galore", "frugal", "apollo",
                                  "apollo_mini"])
def test_each_optimizer_trains(name):
  """A few updates on one fixed batch lower its loss with every optimizer."""
  from memx.config import Config, DataConfig, TrainConfig
  from memx.train._testing import fixed_batch_losses

  cfg = Config(model=ModelConfig(vocab_size=264, d_model=128, n_layers=1, n_heads=2),
               data=DataConfig(source="corpus", seq_len=32),
               optim=OptimConfig(name=name, lr={"lion": 1e-3, "adafactor": 3e-2}.get(name, 1e-2),
                                 warmup_steps=0, galore_rank=16, galore_every=5,
                                 apollo_rank=16, apollo_every=5),
               train=TrainConfig(steps=12, batch_size=4))
  losses = fixed_batch_losses(cfg)
  assert losses[-1] < 0.8 * losses[0], losses


def test_bad_optimizer_settings():
  from memx.errors import ConfigError

  with pytest.raises(ConfigError, match="optim.name = 'adagrad'"):
    OptimConfig(name="adagrad")
  with pytest.raises(ConfigError, match="optim.mu_dtype = 'float16'"):
    OptimConfig(mu_dtype="float16")
  with pytest.raises(ConfigError, match="adafactor keeps no first moment"):
    OptimConfig(name="adafactor", mu_dtype="bfloat16")


@pytest.mark.parametrize("name", ["adamw", "lion", "adafactor"])
def test_weight_decay_is_decoupled_and_scaled_by_the_lr(name):
  """With zero gradients every optimizer's first update is exactly -lr·weight_decay·p on the
  decayed weights and 0 elsewhere (optax's Adafactor alone would take weight_decay·p)."""
  params = {"w": np.full((256, 128), 0.5, np.float32), "scale": np.ones((128,), np.float32)}
  opt = make_optimizer(OptimConfig(name=name, lr=0.1, warmup_steps=0, weight_decay=0.2), 10)
  zeros = jax.tree.map(np.zeros_like, params)
  updates, _ = opt.update(zeros, opt.init(params), params)
  np.testing.assert_allclose(updates["w"], -0.1 * 0.2 * 0.5, rtol=1e-6)
  np.testing.assert_array_equal(updates["scale"], 0.0)


@pytest.mark.multidevice
@pytest.mark.parametrize("name", ["adafactor", "galore", "apollo", "fp8"])
def test_factored_state_under_fsdp_equals_one_device(name):
  """Adafactor's factored statistics, GaLore's projections and APOLLO's low-rank moments carry
  their parameter's axes but not its shape. Under FSDP every optimizer array with a dim that 8
  divides is split over "fsdp" (same-shaped moments as their parameter, the others along their
  largest such dim), the rest replicated; FSDP steps equal one device's (GaLore's SVD runs at
  the first step, on the sharded gradient)."""
  from memx.config import Config, DataConfig, TrainConfig
  from memx.data import make_loader
  from memx.parallel.config import ParallelConfig
  from memx.parallel.constrain import sharding_context
  from memx.parallel.mesh import batch_sharding, make_mesh
  from memx.train.step import init_state, make_train_step, state_shardings

  if jax.device_count() < 8:
    pytest.skip("needs 8 devices")
  cfg = Config(model=ModelConfig(vocab_size=264, d_model=128, n_layers=1, n_heads=2),
               data=DataConfig(source="corpus", seq_len=32),
               optim=OptimConfig(**({"moment_quant": name} if name == "fp8" else {"name": name}),
                                 lr=3e-2 if name == "adafactor" else 1e-2,
                                 warmup_steps=0, galore_rank=16, apollo_rank=16),
               train=TrainConfig(steps=3, batch_size=8))
  ts = init_state(cfg, jax.random.key(0))
  loader = make_loader(cfg.data, batch_size=8, seed=0, split="train")
  par = ParallelConfig(strategy="fsdp", mesh_axes=("data", "fsdp"), mesh_shape=(1, 8))
  mesh = make_mesh(par)
  shardings = state_shardings(ts.state, mesh, "fsdp")
  low_rank = 0
  for array, sharding in zip(jax.tree.leaves(ts.state[1]), jax.tree.leaves(shardings[1]),
                             strict=True):
    spec = list(sharding.spec) + [None] * (array.ndim - len(sharding.spec))
    splits = [i for i, e in enumerate(spec) if e is not None]
    if any(n % 8 == 0 for n in array.shape):
      assert len(splits) == 1 and spec[splits[0]] == "fsdp", (array.shape, spec)
      low_rank += 16 in array.shape
    else:
      assert not splits, (array.shape, spec)
  if name in ("galore", "apollo"):
    assert low_rank >= 14, low_rank  # the 7 block matrices' projected arrays

  def run(mesh, strategy):
    sh = state_shardings(ts.state, mesh, strategy)
    state = jax.device_put(ts.state, sh)
    with sharding_context(mesh, strategy):
      step = jax.jit(make_train_step(cfg, ts.graphdef), out_shardings=(sh, None))
      for i in range(3):
        state, m = step(state, loader.global_batch(i, batch_sharding(mesh, strategy)))
    return state, float(m["loss"])

  one_mesh = make_mesh(ParallelConfig(mesh_shape=(1,)), devices=jax.devices()[:1])
  one_state, one_loss = run(one_mesh, "dp")
  fsdp_state, fsdp_loss = run(mesh, "fsdp")
  np.testing.assert_allclose(fsdp_loss, one_loss, rtol=1e-5)
  if name == "galore":
    # GaLore's projection is the top-16 singular subspace of a gradient that FSDP sums in
    # another order. Where singular values 16 and 17 nearly tie (0.00107 and 0.00099 in wk),
    # a 1e-6 relative change of the gradient moves that subspace and the update by up to 1e-3
    # (measured on one device), so weights are not comparable element by element; the loss
    # after three updates is (checked above, to 1e-5).
    return
  if name == "fp8":
    # The sharded gradient's other summation order (1e-6 relative) flips a few FP8 codes of
    # the moments by one step (~6%), which moves those weights' updates by a few percent of lr.
    pairs = list(zip(jax.tree.leaves(fsdp_state[0]), jax.tree.leaves(one_state[0]), strict=True))
    for a, b in pairs:
      np.testing.assert_allclose(a, b, atol=1e-3)
    off = sum(int((~np.isclose(a, b, rtol=2e-4, atol=2e-6)).sum()) for a, b in pairs)
    assert off < 0.05 * sum(a.size for a, _ in pairs), off
    return
  for a, b in zip(jax.tree.leaves(fsdp_state), jax.tree.leaves(one_state), strict=True):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)
