"""KV-cache decoding of the attention layer equals its parallel forward (causal, window, sinks)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memx.kernels import _testing
from memx.kernels.attention import Mask, attention_reference
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


@pytest.mark.parametrize("mask", [
    Mask(causal=True),
    Mask(causal=True, window_left=5, n_sink=3),                 # sink blocks + window blocks
    Mask(causal=True, window_left=(2, 9, None, 4), n_sink=(0, 2, 0, 6)),   # per head (MoA)
], ids=["causal", "window_sinks", "per_head"])
def test_dynamic_chunk_attention_equals_the_reference(mask):
  """The scan's chunk attention (traced offset, blocks of 4 keys: clamped last block, skipped
  window blocks) equals dense reference attention on the cached prefix, for every chunk."""
  b, s, h, g, k, c = 2, 23, 4, 2, 8, 6
  rng = np.random.default_rng(0)
  q, kc, vc = (jnp.asarray(rng.standard_normal(shape), jnp.float32)
               for shape in ((b, s, h, k), (b, s, g, k), (b, s, g, k)))
  run = jax.jit(lambda q, start: attention_decode._dynamic_chunk_attention(
      q, kc, vc, start, mask, k ** -0.5, block=4))
  for start in (0, 6, 12, 17):
    n = min(c, s - start)
    got = run(q[:, start:start + n], jnp.int32(start))
    want = attention_reference(q[:, start:start + n], kc[:, :start + n], vc[:, :start + n],
                               mask=dataclasses.replace(mask, q_offset=start))
    _testing.assert_allclose(got, want, name=f"start {start}")
