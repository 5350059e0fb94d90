"""Per-head ring KV caches of sparse-plan attention layers ≡ the full cache ≡ the parallel forward.

The plan's length N is the cache's max_len (memx.nn.attention_decode), so decoding a sequence of
exactly max_len tokens must reproduce the parallel forward on those max_len tokens position by
position (the forward at length max_len uses the same spans). That comparison is exact in
whatever way the spans depend on N, so the plans below mix N-independent (beta = 0) and
N-dependent spans, sinks, and full heads.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memx.kernels import _testing
from memx.kernels.attention import attention_reference, chunk, elastic_mask
from memx.models._testing import jit_for_test
from memx.models.config import ModelConfig
from memx.nn import attention_decode
from memx.nn.attention import Attention

N = 26  # max_len: prompt + generated tokens
# Layer 0 has a full head (its KV group never wraps); layer 1 only short spans, so both of its
# KV groups wrap their rings several times over 26 tokens (spans at N = 26 in the comments).
PLAN = (
    ((3.0, 0.0, 1), (1.0, 0.1, 0), (0.0, 1.0, 0), (2.0, 0.0, 2)),   # 3, 4, 26, 2
    ((4.0, 0.0, 0), (2.0, 0.05, 1), (1.0, 0.0, 3), (3.0, 0.1, 0)),  # 4, 3, 1, 6
)
CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                  attn_plan=PLAN)


def _decode(attn, x, prompt: int, *, full: bool):
  """Prefill x[:, :prompt] (or start from an empty cache), then one step per remaining token."""
  b = x.shape[0]
  step = jit_for_test(lambda m, x_t, pos, c: attention_decode.step(m, x_t, pos, c))
  if prompt:
    y, cache = jit_for_test(lambda m, x: attention_decode.prefill(m, x, N, full=full))(
        attn, x[:, :prompt])
    ys = [y]
  else:
    cache, ys = attention_decode.init_cache(attn, b, N, full=full), []
  for t in range(prompt, x.shape[1]):
    y, cache = step(attn, x[:, t], jnp.int32(t), cache)
    ys.append(y[:, None])
  return jnp.concatenate(ys, 1), cache


@pytest.mark.parametrize("layer, kv_heads", [(0, 2), (1, 2), (1, 4), (1, 1)])
def test_ring_cache_equals_full_cache_and_parallel_forward(layer, kv_heads):
  cfg = dataclasses.replace(CFG, n_kv_heads=kv_heads)
  attn = Attention(cfg, layer, rngs=nnx.Rngs(layer))
  x = jax.random.normal(jax.random.key(1), (2, N, 32))
  positions = jnp.broadcast_to(jnp.arange(N), (2, N))
  parallel = jit_for_test(lambda m, x, p: m(x, p))(attn, x, positions)
  # The full cache with per-head masks, one step at a time from empty (the rings' oracle).
  dense, dense_cache = _decode(attn, x, 0, full=True)
  assert dense_cache["k"].shape == (2, N, kv_heads, 8)
  _testing.assert_allclose(dense, parallel, name="full cache vs parallel forward")
  # Prompt 11 wraps layer 1's rings inside the prefill; prompt 2 < layer 1's 3 sinks (prefill
  # clips them to the keys present); prompt 0 decodes everything from an empty ring cache.
  for prompt in (11, 2, 0):
    ring, cache = _decode(attn, x, prompt, full=False)
    assert isinstance(cache, attention_decode.PlanCache)
    _testing.assert_allclose(ring, dense, name=f"ring vs full cache, prompt {prompt}")
    _testing.assert_allclose(ring, parallel, name=f"ring vs parallel forward, prompt {prompt}")


def test_parallel_forward_is_the_elastic_mask_at_n():
  """The oracle above is what the plan means: per-head elastic masks at N = max_len."""
  attn = Attention(CFG, 1, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(2), (1, N, 32))

  def both(attn, x):
    q, k, v = attn.qkv(x, jnp.arange(N)[None])
    ref = attention_reference(q, k, v, mask=elastic_mask(PLAN[1], N))
    return attn(x, jnp.arange(N)[None]), jnp.einsum("bthk,hkd->btd", ref, attn.wo[...])
  got, ref = jit_for_test(both)(attn, x)
  _testing.assert_allclose(got, ref, name="forward vs reference")


def test_ring_layout_and_slot_positions():
  attn = Attention(CFG, 1, rngs=nnx.Rngs(0))
  # Group 0 = heads 0, 1: sinks max(0, 1), ring max(4, 3); group 1 = heads 2, 3: 3 sinks, ring 6.
  assert attention_decode._plan_layout(attn, N) == ((1, 4), (3, 6))
  assert attention_decode._plan_layout(attn, 5) == ((1, 4), (3, 2))  # clipped to max_len
  for t in (1, 3, 7, 12, N):
    for n_sink, n_ring in ((1, 4), (3, 6)):
      sp = attention_decode._ring_slots(n_sink, n_ring, t)
      want = set(range(min(n_sink, t))) | set(range(max(n_sink, t - n_ring), t))
      assert set(sp[sp >= 0].tolist()) == want and (sp >= 0).sum() == len(want)
      ring = sp[n_sink:]
      held = ring >= 0
      np.testing.assert_array_equal(
          (ring[held] - n_sink) % n_ring, np.arange(n_ring)[held], err_msg=f"t={t}")


@pytest.mark.parametrize("chunks", [(26,), (1,) * 26, (4, 7, 15), (11, 2, 13), (9, 3, 3, 3, 8)])
def test_chunked_prefill_of_ring_caches_equals_whole(chunks):
  """extend chunk by chunk: chunks that start before and after a ring first wraps (layer 1's
  rings hold 4 and 6 positions past 1 and 3 sinks), chunks longer than a ring, one-token
  chunks: the outputs and the whole cache (keys, values, slot positions) equal one prefill."""
  attn = Attention(CFG, 1, rngs=nnx.Rngs(3))
  x = jax.random.normal(jax.random.key(4), (2, N, 32))
  whole, want = jit_for_test(lambda m, x: attention_decode.prefill(m, x, N))(attn, x)
  cache, ys, start = attention_decode.init_cache(attn, 2, N), [], 0
  for c in chunks:
    y, cache = jit_for_test(lambda m, x, cache, s=start: attention_decode.extend(m, x, s, cache))(
        attn, x[:, start:start + c], cache)
    ys.append(y)
    start += c
  _testing.assert_allclose(jnp.concatenate(ys, 1), whole, name=f"chunks {chunks}")
  np.testing.assert_array_equal(cache.slot_pos, want.slot_pos)
  _testing.assert_allclose(cache.k, want.k, name="keys")
  _testing.assert_allclose(cache.v, want.v, name="values")


def test_per_head_visibility_of_the_full_cache_step():
  mask = elastic_mask(PLAN[0], N)
  vis = chunk.visible(mask, 4, jnp.int32(10), jnp.arange(N))
  for h in range(4):
    np.testing.assert_array_equal(vis[h], mask.dense(N, N, head=h)[10])


def test_non_causal_masks_are_refused_by_the_ring_layout():
  from memx.kernels.attention import Mask
  with pytest.raises(NotImplementedError, match="causal"):
    attention_decode.ring_layout(Mask(window_left=2, window_right=1), 4, 2, 16)
