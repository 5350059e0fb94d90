"""KV-cache decoding of the attention layer equals its parallel forward (causal, window, sinks)."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from memx.kernels import _testing
from memx.models._testing import jit_for_test
from memx.models.config import ModelConfig
from memx.nn import attention_decode
from memx.nn.attention import Attention

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2)


# (2, 8): more sinks than the 6-token prompt has keys (prefill clips them to the keys present).
@pytest.mark.parametrize("window, sinks", [(None, 0), (3, 2), (2, 8)])
def test_prefill_and_steps_equal_parallel_forward(window, sinks):
  cfg = dataclasses.replace(CFG, attn_window=window, attn_sinks=sinks)
  attn = Attention(cfg, 0, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 11, 32))
  positions = jnp.broadcast_to(jnp.arange(11), (2, 11))
  full = jit_for_test(lambda m, x, p: m(x, p))(attn, x, positions)
  head, cache = jit_for_test(lambda m, x: attention_decode.prefill(m, x, max_len=16))(
      attn, x[:, :6])
  _testing.assert_allclose(head, full[:, :6], name="prefill")
  # The same prompt in two chunks (4 + 2 tokens), each continuing the cache: same outputs.
  first, chunked = jit_for_test(lambda m, x: attention_decode.prefill(m, x, max_len=16))(
      attn, x[:, :4])
  second, chunked = jit_for_test(lambda m, x, c: attention_decode.extend(m, x, 4, c))(
      attn, x[:, 4:6], chunked)
  _testing.assert_allclose(jnp.concatenate([first, second], 1), full[:, :6], name="chunks")
  _testing.assert_allclose(chunked["k"], cache["k"], name="chunked cache")
  with pytest.raises(ValueError, match=r"positions 14..17 do not fit the cache of max_len 16"):
    attention_decode.extend(attn, x[:, :4], 14, chunked)
  step = jax.jit(lambda x_t, pos, c: attention_decode.step(attn, x_t, pos, c))
  ys = []
  for t in range(6, 11):
    y, cache = step(x[:, t], jnp.int32(t), cache)
    ys.append(y)
  _testing.assert_allclose(jnp.stack(ys, 1), full[:, 6:], name="steps")
  assert cache["k"].shape == (2, 16, 2, 8)
