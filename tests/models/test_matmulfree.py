"""The MatMul-free LM: config, recurrent decoding, training, packed export/import."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from memx.errors import CheckpointCorruptError, CheckpointMismatchError, ConfigError
from memx.kernels import _testing
from memx.models._testing import jit_for_test
from memx.models.config import ModelConfig, SSMConfig, matmulfree_config
from memx.models.decode import cache_bytes, generate
from memx.models.factory import build_model
from memx.models.packed import export_packed, load_packed, pack_model
from memx.nn.bitlinear import BitLinear, PackedBitLinear

# impl="reference": the scan runs the same f·h + b as the step form, so per-token int8 codes
# (a discontinuous function of h) cannot differ between the two forms by a rounding flip.
CFG = matmulfree_config(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64,
                        ssm=SSMConfig(impl="reference"))


def _tokens(b=2, t=12, seed=0):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, 64)


def test_config_choices_are_validated():
  assert CFG.mixers == ("mlgru", "mlgru") and CFG.mlp_kind == "bitglu" and CFG.uses_bitlinear
  assert not ModelConfig().uses_bitlinear
  with pytest.raises(ConfigError, match="model.mlp_kind = 'glu'"):
    dataclasses.replace(CFG, mlp_kind="glu")
  with pytest.raises(ConfigError, match="model.mlp_kind"):
    dataclasses.replace(CFG, mlp=False)
  with pytest.raises(ConfigError, match="model.ternary"):
    dataclasses.replace(CFG, ternary=1)
  with pytest.raises(ConfigError, match="mlgru"):
    dataclasses.replace(CFG, mixers=("mlgru", "gru"))


def test_decode_equals_parallel_forward_and_state_is_constant():
  model = build_model(CFG, rngs=nnx.Rngs(0))
  assert isinstance(model.blocks[0].mixer.w_f, BitLinear)
  tokens = _tokens()
  full = jit_for_test(lambda m, t: m(t))(model, tokens)
  logits, cache = jit_for_test(lambda m, t: m.prefill(t, 16))(model, tokens[:, :7])
  _testing.assert_allclose(logits, full[:, :7], name="prefill")
  step = jit_for_test(lambda m, t, c: m.decode_step(t, c))
  tail = []
  for t in range(7, 12):
    lg, cache = step(model, tokens[:, t], cache)
    tail.append(lg)
  _testing.assert_allclose(jnp.stack(tail, 1), full[:, 7:], name="decode")
  # One fp32 [B, D] state per layer plus the position: no growth with max_len.
  assert cache_bytes(model.init_cache(2, 16)) == cache_bytes(model.init_cache(2, 65536))
  assert cache_bytes(model.init_cache(2, 16)) == 2 * 2 * 32 * 4 + 4
  out = generate(model, tokens[:, :5], 4)
  assert out.shape == (2, 9)
  # Teacher-forced: every generated token is the argmax of the forward pass before it.
  logits = jit_for_test(lambda m, t: m(t))(model, out)
  np.testing.assert_array_equal(jnp.argmax(logits[:, 4:-1], -1), out[:, 5:])


def test_loss_falls():
  cfg = dataclasses.replace(CFG, ssm=SSMConfig())
  model = build_model(cfg, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.adam(1e-2)
  opt = tx.init(params)
  tokens = _tokens(b=4, t=16, seed=3) % 8  # a small alphabet: learnable in a few steps

  def loss_fn(params, tokens):
    logits = nnx.merge(graphdef, params, rest)(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  @jax.jit
  def train_step(params, opt, tokens):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  losses = []
  for _ in range(30):
    params, opt, loss = train_step(params, opt, tokens)
    losses.append(float(loss))
  assert np.isfinite(losses).all()
  assert losses[-1] < losses[0] - 1.0, losses


def test_bf16_params_survive_export_and_import(tmp_path):
  """numpy has no bfloat16: the file holds those arrays as raw 2-byte records, read back as
  bfloat16 bit for bit."""
  cfg = dataclasses.replace(CFG, param_dtype="bfloat16")
  model = build_model(cfg, rngs=nnx.Rngs(0))
  path = tmp_path / "packed_bf16.npz"
  export_packed(model, path)
  tokens = _tokens()
  want = pack_model(nnx.clone(model))(tokens)
  np.testing.assert_array_equal(load_packed(path, cfg)(tokens), want)


def test_a_corrupt_code_is_refused(tmp_path):
  path = tmp_path / "packed.npz"
  export_packed(build_model(CFG, rngs=nnx.Rngs(0)), path)
  with np.load(path) as z:
    data = {k: z[k] for k in z.files}
  key = next(k for k in data if k.endswith("['packed']"))
  data[key] = data[key].copy()
  data[key][0, 0] |= 0b11 << 4  # code 3 in the third row of the first byte
  np.savez(path, **data)
  with pytest.raises(CheckpointCorruptError, match="2-bit code 3"):
    load_packed(path, CFG)


def test_export_import_gives_identical_logits(tmp_path):
  model = build_model(CFG, rngs=nnx.Rngs(0))
  tokens = _tokens()
  want_train = model(tokens)
  path = tmp_path / "packed.npz"
  nbytes = export_packed(model, path)
  packed = pack_model(nnx.clone(model))
  assert isinstance(packed.blocks[1].mlp.w_down, PackedBitLinear)
  want = packed(tokens)
  _testing.assert_allclose(want, want_train, name="packed vs training forward")
  loaded = load_packed(path, CFG)
  np.testing.assert_array_equal(loaded(tokens), want)
  np.testing.assert_array_equal(load_packed(path)(tokens), want)  # config from the file
  np.testing.assert_array_equal(generate(loaded, tokens[:, :4], 3),
                                generate(packed, tokens[:, :4], 3))
  # Weight bytes: 4 MLGRU d×d + (d×2f + f×d) BitGLU per layer at 2 bits, scales fp32.
  d, f = 32, 64
  ternary = 2 * (4 * d * d + 3 * d * f)
  assert sum(x.nbytes for x in jax.tree.leaves(nnx.state(packed, nnx.Variable))) == nbytes
  packed_bytes = sum(x.packed.nbytes for _, x in packed.iter_modules()
                     if isinstance(x, PackedBitLinear))
  assert packed_bytes == ternary // 4
  # The file keeps the byte layout (4 weights per byte along K); the model serves int32 words.
  with np.load(path) as z:
    codes = {k: z[k] for k in z.files if k.endswith("['packed']")}
  assert codes and all(a.dtype == np.uint8 for a in codes.values())
  assert sum(a.nbytes for a in codes.values()) == ternary // 4
  assert loaded.blocks[1].mlp.w_down.packed.dtype == jnp.int32


def test_load_into_mismatched_config_is_a_clear_error(tmp_path):
  path = tmp_path / "packed.npz"
  export_packed(build_model(CFG, rngs=nnx.Rngs(0)), path)
  with pytest.raises(CheckpointMismatchError, match="d_ff: file 64 vs requested 128"):
    load_packed(path, dataclasses.replace(CFG, d_ff=128))
  with pytest.raises(ConfigError, match="packed checkpoint"):
    export_packed(build_model(dataclasses.replace(CFG, ternary=False), rngs=nnx.Rngs(0)), path)
  bad = tmp_path / "bad.npz"
  bad.write_bytes(b"not a zip")
  with pytest.raises(CheckpointCorruptError, match="cannot read"):
    load_packed(bad)


def test_training_keeps_fewer_activations_than_the_transformer():
  """The memory claim at the level that does not depend on a compiler: the activation bytes
  autodiff keeps for the backward pass are fewer than those of a Transformer of equal width,
  depth and parameter count given the same care (SwiGLU also recomputes silu(gate)·up). The
  MLGRU keeps 3 [B, T, D] projections where attention keeps q, k, v, rotated q/k and output."""
  from memx.models.transformer import TransformerLM
  from memx.train.memory import saved_activation_bytes

  mf = matmulfree_config(vocab_size=128, d_model=64, n_layers=2, n_heads=4)
  tf = ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4)
  tokens = _tokens(2, 65)

  def saved(cfg):
    graphdef, params, rest = nnx.split(TransformerLM(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)

    def loss(p):
      logits = nnx.merge(graphdef, p, rest)(tokens[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    n_params = sum(x.size for x in jax.tree.leaves(params))
    return saved_activation_bytes(loss, params), n_params

  (mf_bytes, mf_params), (tf_bytes, tf_params) = saved(mf), saved(tf)
  assert abs(mf_params - tf_params) / tf_params < 0.02  # equal size (MF: +norms, +bounds)
  assert mf_bytes < 0.9 * tf_bytes, (mf_bytes, tf_bytes)
