"""Recurrent decoding ≡ parallel forward for every mixer and the hybrid LM; O(1) SSM state."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memx.kernels import _testing
from memx.models._testing import jit_for_test
from memx.models.config import ModelConfig, SSMConfig
from memx.models.decode import cache_bytes, generate
from memx.models.transformer import TransformerLM

BASE = ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2,
                   attn_window=5, attn_sinks=1,
                   ssm=SSMConfig(d_state=16, head_dim=16, chunk_size=16, gated=True))
MODELS = {
    "attention": BASE,
    "mamba2": dataclasses.replace(BASE, mixers=("mamba2",) * 3, mlp=False),
    "linear_attention": dataclasses.replace(BASE, mixers=("linear_attention",) * 3),
    "hybrid": dataclasses.replace(BASE, mixers=("mamba2", "attention", "linear_attention")),
}


def _tokens(b=2, t=20, seed=0):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, 64)


@pytest.mark.parametrize("name", tuple(MODELS))
def test_decode_steps_equal_parallel_forward(name):
  model = TransformerLM(MODELS[name], rngs=nnx.Rngs(0))
  tokens = _tokens()
  full = jit_for_test(lambda m, t: m(t))(model, tokens)
  step = jit_for_test(lambda m, t, c: m.decode_step(t, c))
  # From an empty cache, one token at a time.
  cache, steps = model.init_cache(2, 24), []
  for t in range(tokens.shape[1]):
    logits, cache = step(model, tokens[:, t], cache)
    steps.append(logits)
  _testing.assert_allclose(jnp.stack(steps, 1), full, name="decode from empty")
  # Prefill a prompt in parallel, then continue step by step.
  logits, cache = jit_for_test(lambda m, t: m.prefill(t, 24))(model, tokens[:, :13])
  _testing.assert_allclose(logits, full[:, :13], name="prefill")
  tail = []
  for t in range(13, tokens.shape[1]):
    logits, cache = step(model, tokens[:, t], cache)
    tail.append(logits)
  _testing.assert_allclose(jnp.stack(tail, 1), full[:, 13:], name="prefill + decode")


def test_greedy_generation_is_consistent_with_the_parallel_forward():
  model = TransformerLM(MODELS["hybrid"], rngs=nnx.Rngs(1))
  prompt = _tokens(t=6, seed=2)
  out = generate(model, prompt, 5)
  assert out.shape == (2, 11)
  np.testing.assert_array_equal(out[:, :6], prompt)
  # Teacher-forced: every generated token is the argmax of the forward pass before it.
  logits = jit_for_test(lambda m, t: m(t))(model, out)
  np.testing.assert_array_equal(jnp.argmax(logits[:, 5:-1], -1), out[:, 6:])
  sampled = generate(model, prompt, 5, temperature=1.0, rng=jax.random.key(3))
  assert sampled.shape == (2, 11) and int(sampled.max()) < 64
  with pytest.raises(ValueError, match="rng"):
    generate(model, prompt, 5, temperature=1.0)
  with pytest.raises(ValueError, match="max_len"):
    generate(model, prompt, 5, max_len=8)


def test_ssm_state_does_not_grow_with_length():
  for name in ("mamba2", "linear_attention"):
    model = TransformerLM(MODELS[name], rngs=nnx.Rngs(0))
    assert cache_bytes(model.init_cache(2, 64)) == cache_bytes(model.init_cache(2, 4096))
  hybrid = TransformerLM(MODELS["hybrid"], rngs=nnx.Rngs(0))
  grow = cache_bytes(hybrid.init_cache(2, 4096)) - cache_bytes(hybrid.init_cache(2, 64))
  # Only the one attention layer grows: keys + values, [B, S, G, K] fp32 each.
  assert grow == 2 * 2 * (4096 - 64) * 2 * 8 * 4
