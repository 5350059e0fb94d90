"""Transformer LM properties: causality by gradient, remat ≡ no remat, bf16 ≈ fp32, shapes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memx.models.config import ModelConfig
from memx.models.transformer import TransformerLM, count_params

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2)


def _tokens(b=2, t=12, seed=0):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, CFG.vocab_size)


@pytest.mark.parametrize("cfg", [CFG, dataclasses.replace(CFG, attn_window=3, attn_sinks=1)])
def test_causal_by_gradient(cfg):
  """d logits[t] / d embeddings[s] is zero for every s > t (and non-zero for some s <= t)."""
  model = TransformerLM(cfg, rngs=nnx.Rngs(0))
  tokens = _tokens()
  t_probe = 5

  def probe(model):
    return model(tokens)[:, t_probe].sum()

  # Gradient w.r.t. the input embeddings: perturb the embedding rows used at each position.
  emb = jnp.take(model.embed[...], tokens, axis=0)

  def from_emb(e):
    m = nnx.clone(model)
    m.embed[...] = model.embed[...]  # unused: we bypass the lookup below
    x = e
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    for block in m.blocks:
      x = block(x, positions)
    x = m.final_norm(x)
    return jnp.einsum("btd,vd->btv", x, m.embed[...])[:, t_probe].sum()

  g = jax.grad(from_emb)(emb)
  per_pos = np.abs(np.asarray(g)).sum(axis=(0, 2))
  assert np.all(per_pos[t_probe + 1:] == 0.0), per_pos
  assert per_pos[t_probe] > 0 and per_pos[0] > 0
  # The model's own forward agrees with the bypass used above.
  np.testing.assert_allclose(probe(model), from_emb(emb), rtol=1e-5)


def test_window_limits_receptive_field():
  """With a 1-layer window-2 model and no sinks, position 6 cannot see position 3 or earlier."""
  cfg = dataclasses.replace(CFG, n_layers=1, attn_window=2)
  model = TransformerLM(cfg, rngs=nnx.Rngs(0))
  tokens = _tokens()
  emb = jnp.take(model.embed[...], tokens, axis=0)
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)

  def f(e):
    x = model.blocks[0](e, positions)
    return model.final_norm(x)[:, 6].sum()

  per_pos = np.abs(np.asarray(jax.grad(f)(emb))).sum(axis=(0, 2))
  assert np.all(per_pos[:4] == 0.0) and np.all(per_pos[4:7] > 0), per_pos


@pytest.mark.parametrize("remat", ["full", "dots", "offload"])
def test_remat_matches_no_remat(remat):
  tokens = _tokens()
  base = TransformerLM(CFG, rngs=nnx.Rngs(1))
  rem = TransformerLM(dataclasses.replace(CFG, remat=remat), rngs=nnx.Rngs(1))

  def loss(m):
    return jnp.mean(m(tokens) ** 2)

  l0, g0 = nnx.value_and_grad(loss)(base)
  l1, g1 = nnx.value_and_grad(loss)(rem)
  assert float(l0) == float(l1)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_remat_offload_sends_the_matmul_outputs_to_host_memory():
  """The backward pass's jaxpr moves each saved matmul output to host memory and back (the
  CPU lowering drops the moves: its host memory is its device memory; see bench_remat on GPU
  for the bytes)."""
  tokens = _tokens()

  def moves(remat):
    gd, state = nnx.split(TransformerLM(dataclasses.replace(CFG, remat=remat), rngs=nnx.Rngs(1)))
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda s: jnp.mean(nnx.merge(gd, s)(tokens) ** 2)))(
        state))
    return jaxpr.count("devices=(MemorySpace.Host,)"), jaxpr.count("devices=(MemorySpace.Device,)")
  to_host, back = moves("offload")
  assert to_host >= 4 * CFG.n_layers and back == to_host
  assert moves("dots") == (0, 0)


def test_bf16_close_to_fp32():
  tokens = _tokens()
  f32 = TransformerLM(CFG, rngs=nnx.Rngs(2))
  bf16 = TransformerLM(dataclasses.replace(CFG, compute_dtype="bfloat16"), rngs=nnx.Rngs(2))
  a, b = f32(tokens), bf16(tokens)
  assert b.dtype == jnp.float32  # logits come out in fp32 for the loss
  # bf16 has an 8-bit mantissa: relative error ~ 2^-8 per op, a few ops deep.
  np.testing.assert_allclose(a, b, atol=5e-2, rtol=5e-2)
  assert float(jnp.max(jnp.abs(a - b))) > 0  # bf16 really was used


def test_param_dtype_and_shapes():
  cfg = dataclasses.replace(CFG, param_dtype="bfloat16", tie_embeddings=False)
  model = TransformerLM(cfg, rngs=nnx.Rngs(0))
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert all(p.dtype == jnp.bfloat16 for p in params)
  k = cfg.head_dim
  assert model.blocks[0].attn.wq.shape == (32, 4, k)
  assert model.blocks[0].attn.wk.shape == (32, 2, k)
  assert model.unembed.shape == (32, 64)
  expected = (64 * 32 * 2 + 2 * (32 * 4 * k + 2 * 32 * 2 * k + 4 * k * 32
                                 + 3 * 32 * cfg.ff_dim + 2 * 32) + 32)
  assert count_params(model) == expected
  assert model(_tokens()).shape == (2, 12, 64)


def test_params_carry_logical_axes():
  model = TransformerLM(CFG, rngs=nnx.Rngs(0))
  assert model.blocks[0].mlp.w_gate.get_metadata()["axes"] == ("embed", "mlp")
  assert model.embed.get_metadata()["axes"] == ("vocab", "embed")


def test_jit_matches_eager():
  model = TransformerLM(CFG, rngs=nnx.Rngs(3))
  tokens = _tokens()
  np.testing.assert_allclose(nnx.jit(lambda m, t: m(t))(model, tokens), model(tokens),
                             rtol=1e-5, atol=1e-5)
