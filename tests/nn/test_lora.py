"""LoRA and QLoRA adapters: a fresh adapter changes nothing, the low-rank path equals the merged
weight in values and gradients, only adapters are differentiated, NF4 bases equal their
dequantized weights, decoding agrees with the merged model, and bad requests fail clearly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memx.kernels import nf4
from memx.models.config import ModelConfig
from memx.models.transformer import TransformerLM
from memx.nn.lora import LoRAWeight, adapter_count, add_lora, linear, merge_lora
from memx.nn.quantized import NF4Weight

CFG = ModelConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=2, n_kv_heads=1)


def _model(seed=0, cfg=CFG):
  return TransformerLM(cfg, rngs=nnx.Rngs(params=jax.random.key(seed)))


def _randomize_b(model, seed=1):
  """B is zero at creation; give it values so the adapters do something."""
  keys = iter(jax.random.split(jax.random.key(seed), 64))
  for _path, var in nnx.iter_graph(model):
    if isinstance(var, LoRAWeight):
      var.b[...] = 0.05 * jax.random.normal(next(keys), var.b[...].shape)
  return model


def _is_adapter(key: str) -> bool:
  return "['a']" in key or "['b']" in key


def _tokens(b=2, t=12, seed=3):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, CFG.vocab_size)


def test_fresh_adapters_leave_the_model_unchanged():
  tokens = _tokens()
  before = _model()(tokens)
  adapted = add_lora(_model(), rank=4, alpha=8.0, rngs=nnx.Rngs(params=jax.random.key(9)))
  np.testing.assert_array_equal(adapted(tokens), before)
  # 2 layers x (wq [64,2,32], wk/wv [64,1,32], wo [2,32,64], gate/up [64,192], down [192,64])
  per_layer = 4 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 192) + (192 + 64))
  assert adapter_count(adapted) == 2 * per_layer


def test_low_rank_path_equals_the_merged_weight():
  tokens = _tokens()
  adapted = _randomize_b(add_lora(_model(), rank=4, alpha=8.0,
                                  rngs=nnx.Rngs(params=jax.random.key(9))))
  out = adapted(tokens)
  merged = merge_lora(adapted)
  assert not any(isinstance(v, LoRAWeight) for _, v in nnx.iter_graph(merged))
  np.testing.assert_allclose(merged(tokens), out, rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(out - _model()(tokens))).max() > 1e-3  # the adapters did something


def test_only_adapters_are_differentiated_and_their_gradients_match_the_merged_form():
  """Oracle: the same loss written with explicitly merged weights W + s·A·B, differentiated
  w.r.t. A and B by jax.grad."""
  tokens = _tokens()
  adapted = _randomize_b(add_lora(_model(), rank=3, alpha=6.0, targets=("wq", "wo", "w_down"),
                                  rngs=nnx.Rngs(params=jax.random.key(9))))

  def loss(model):
    return jnp.mean(jax.nn.log_softmax(model(tokens))[..., 0])

  grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(adapted)
  leaves = jax.tree_util.tree_flatten_with_path(grads)[0]
  assert leaves and all(_is_adapter(jax.tree_util.keystr(p)) for p, _ in leaves)

  graphdef, lora_state, rest = nnx.split(adapted, nnx.LoRAParam, ...)
  plain_def, plain_state = nnx.split(_model())  # same base weights (seed 0), no adapters

  def merged_loss(lora_state):
    m = nnx.merge(graphdef, lora_state, rest)
    plain = nnx.merge(plain_def, jax.tree.map(lambda x: x, plain_state))
    for mine, theirs in zip(m.blocks, plain.blocks, strict=True):
      theirs.attn.wq[...] = mine.attn.wq[...]
      theirs.attn.wo[...] = mine.attn.wo[...]
      theirs.mlp.w_down[...] = mine.mlp.w_down[...]
    return loss(plain)

  expected = jax.grad(merged_loss)(lora_state)
  for (p, g), (q, e) in zip(leaves, jax.tree_util.tree_flatten_with_path(expected)[0],
                            strict=True):
    assert jax.tree_util.keystr(p) == jax.tree_util.keystr(q)
    np.testing.assert_allclose(g, e, rtol=2e-4, atol=1e-7)


def test_linear_contracts_the_given_input_dims():
  x = jax.random.normal(jax.random.key(0), (3, 2, 32))
  w = nnx.Param(jax.random.normal(jax.random.key(1), (2, 32, 64)))
  lw = LoRAWeight(w, 2, 4, 4.0, rngs=nnx.Rngs(params=jax.random.key(2)))
  lw.b[...] = jax.random.normal(jax.random.key(3), lw.b[...].shape)
  expected = jnp.einsum("bhk,hkd->bd", x, w[...] + jnp.einsum("hkr,rd->hkd", lw.a[...],
                                                               lw.b[...]))
  np.testing.assert_allclose(linear(x, lw, 2, jnp.float32), expected, rtol=1e-5, atol=1e-4)
  with pytest.raises(ValueError, match="built for 2 input dims"):
    linear(x[..., 0, :], lw, 1, jnp.float32)


def test_nf4_base_equals_its_dequantized_weight():
  """QLoRA: the forward on NF4 codes equals the model whose bases are the dequantized weights
  (memx.kernels.nf4's reference), and stays close to the unquantized model."""
  tokens = _tokens()
  dense = _model()
  qlora = _randomize_b(add_lora(_model(), rank=4, alpha=8.0, quantize_base=True,
                                rngs=nnx.Rngs(params=jax.random.key(9))))
  w = qlora.blocks[0].attn.wq.base
  assert isinstance(w, NF4Weight)
  codes, absmax = nf4.quantize(dense.blocks[0].attn.wq[...].reshape(64, 64), block_size=64)
  np.testing.assert_array_equal(w.codes[...], codes)
  np.testing.assert_allclose(w.absmax(), absmax, rtol=0, atol=float(absmax.max()) / 100)
  out = qlora(tokens)
  np.testing.assert_allclose(merge_lora(qlora)(tokens), out, rtol=1e-4, atol=1e-4)
  # 4-bit codes + double-quantized scales: ~4.13 bits per weight
  assert w.nbytes() * 8 / (64 * 64) < 4.2


def test_nf4_model_is_close_to_the_unquantized_one():
  tokens = _tokens()
  dense = _model()(tokens)
  q = add_lora(_model(), rank=2, alpha=2.0, quantize_base=True,
               rngs=nnx.Rngs(params=jax.random.key(9)))(tokens)
  err = np.abs(np.asarray(q - dense)).max()
  assert 0 < err < 0.1 * np.abs(np.asarray(dense)).max()


def test_decoding_an_adapted_model_matches_the_merged_one():
  from memx.models.decode import generate

  adapted = _randomize_b(add_lora(_model(), rank=4, alpha=8.0,
                                  rngs=nnx.Rngs(params=jax.random.key(9))))
  prompt = _tokens(b=1, t=5)
  got = generate(adapted, prompt, 6)
  want = generate(merge_lora(adapted), prompt, 6)
  np.testing.assert_array_equal(got, want)


def test_bad_requests_fail_clearly():
  rngs = nnx.Rngs(params=jax.random.key(0))
  with pytest.raises(ValueError, match="unknown target weights"):
    add_lora(_model(), rank=2, alpha=1.0, targets=("w_q",), rngs=rngs)
  with pytest.raises(ValueError, match="rank must be an integer >= 1"):
    add_lora(_model(), rank=0, alpha=1.0, rngs=rngs)
  mamba = ModelConfig(vocab_size=64, d_model=64, n_layers=1, n_heads=2, mixers=("mamba2",),
                      mlp=False)
  with pytest.raises(ValueError, match="has none of the target weights"):
    add_lora(_model(cfg=mamba), rank=2, alpha=1.0, rngs=rngs)
  narrow = ModelConfig(vocab_size=64, d_model=48, n_layers=1, n_heads=2)
  with pytest.raises(ValueError, match="not a multiple of the NF4 block size 64"):
    add_lora(_model(cfg=narrow), rank=2, alpha=1.0, quantize_base=True, rngs=rngs)
