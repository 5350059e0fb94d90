"""chunk_attention (a query chunk at a run-time offset over a cache) vs dense reference
attention with the offset as a static mask field; its XLA tile schedule vs the mask's exact
block layout; dispatch and bad input."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memx.kernels import _testing
from memx.kernels.attention import BlockSizes, Mask, attention_reference, chunk, cudnn
from memx.kernels.attention import _schedule as sched
from memx.kernels.attention.chunk import chunk_attention
from memx.kernels.attention.mask import FULL, PARTIAL

BS16 = BlockSizes(block_q=16, block_k=16, block_q_dkv=16, block_k_dkv=16, block_q_dq=16,
                  block_k_dq=16)

MASKS = {
    "causal": Mask(causal=True),
    "window_sinks": Mask(causal=True, window_left=13, n_sink=5),
    "per_head": Mask(causal=True, window_left=(2, 20, None, 9), n_sink=(0, 3, 0, 17)),
}
# (B, S, H, G, D, C): the cache (S = 75: its last tile is padding) and chunks of 21 queries
# (never a whole number of 16-tiles), at offsets 0 (first chunk) up to the cache's end.
SHAPE = (2, 75, 4, 2, 32, 21)
STARTS = (0, 5, 21, 37, 54)


def _inputs(dtype=jnp.float32):
  b, s, h, g, d, _ = SHAPE
  rng = np.random.default_rng(0)
  return tuple(jnp.asarray(rng.standard_normal(shape), dtype)
               for shape in ((b, s, h, d), (b, s, g, d), (b, s, g, d)))


def _want(q_all, k, v, mask, start, c):
  """Reference attention of queries start..start+c-1 over the keys 0..start+c-1, the offset
  a static mask field (Mask.dense: independent of chunk.visible), sinks clipped as in decode."""
  end = start + c
  sink = mask.n_sink
  sink = tuple(min(n, end) for n in sink) if isinstance(sink, tuple) else min(sink, end)
  with jax.default_matmul_precision("highest"):
    return attention_reference(q_all[:, start:end], k[:, :end], v[:, :end],
                               mask=dataclasses.replace(mask, q_offset=start, n_sink=sink))


@pytest.mark.parametrize("mask_name", sorted(MASKS))
@pytest.mark.parametrize("impl, kwargs", [
    ("reference", {}), ("xla", {}), ("pallas_gpu", {"interpret": True, "block_sizes": BS16})],
    ids=["reference", "xla", "pallas_interpret"])
def test_chunks_at_traced_offsets_equal_reference(mask_name, impl, kwargs):
  mask = MASKS[mask_name]
  q_all, k, v = _inputs()
  c = SHAPE[-1]
  traces = []

  def fn(q, start):
    traces.append(1)
    with jax.default_matmul_precision("highest"):
      return chunk_attention(q, k, v, start, mask=mask, implementation=impl, **kwargs)

  run = jax.jit(fn)
  for start in STARTS:
    n = min(c, SHAPE[1] - start)
    q = jnp.pad(q_all[:, start:start + n], ((0, 0), (0, c - n), (0, 0), (0, 0)))
    got = run(q, jnp.int32(start))[:, :n]
    _testing.assert_allclose(got, _want(q_all, k, v, mask, start, n), name=f"start {start}")
  # One program for every offset. (The Pallas interpreter's first run changes some global
  # state that makes jit retrace once; it does not depend on the offset.)
  seen = len(traces)
  for start in STARTS:
    run(q_all[:, :c], jnp.int32(start))
  assert len(traces) == seen <= 2


@pytest.mark.parametrize("mask_name", sorted(MASKS))
def test_xla_blocks_skip_and_clamp(mask_name):
  """Blocks of 8 keys: sink blocks, then window blocks (earlier ones skipped), the last block
  clamped to the cache's end (75 = 9 · 8 + 3); values still equal the reference."""
  mask = MASKS[mask_name]
  q_all, k, v = _inputs()
  c = SHAPE[-1]
  run = jax.jit(lambda q, start: chunk.chunk_attention_xla(q, k, v, start, mask=mask, block=8))
  for start in STARTS:
    with jax.default_matmul_precision("highest"):
      got = run(q_all[:, start:start + c], jnp.int32(start))
    _testing.assert_allclose(got, _want(q_all, k, v, mask, start, c), name=f"start {start}")


@pytest.mark.parametrize("impl, kwargs", [
    ("xla", {}), ("pallas_gpu", {"interpret": True, "block_sizes": BS16})],
    ids=["xla", "pallas_interpret"])
def test_bf16_chunk(impl, kwargs):
  mask = MASKS["window_sinks"]
  q_all, k, v = _inputs(jnp.bfloat16)
  start, c = 37, SHAPE[-1]
  got = jax.jit(lambda q, s: chunk_attention(q, k, v, s, mask=mask, implementation=impl,
                                             **kwargs))(q_all[:, start:start + c],
                                                        jnp.int32(start))
  assert got.dtype == jnp.bfloat16
  want = _want(*(x.astype(jnp.float32) for x in (q_all, k, v)), mask, start, c)
  _testing.assert_allclose(got, want, dtype=jnp.bfloat16, name="bf16")


@pytest.mark.parametrize("mask_name", sorted(MASKS))
@pytest.mark.parametrize("start", [0, 7, 16, 33, 64, 90])
def test_dynamic_schedule_is_sound_and_tight(mask_name, start):
  """Every listed FULL tile is all visible, every unlisted tile none (Mask.dense at the static
  offset), and for masks without sinks the schedule equals the mask's exact block layout."""
  mask = MASKS[mask_name]
  h, t, s, bq, bk = 4, 40, 120, 16, 16
  t_pad, s_pad = sched.round_up(t, bq), sched.round_up(s, bk)
  masks = sched.dedupe_heads(mask.heads(h))
  rule = sched.rule_for(masks, s, s_pad)
  table, counts = jax.jit(lambda off: sched.dynamic_schedule(
      masks, rule, off, bq, bk, t_pad, s_pad))(jnp.int32(start))
  table, counts = np.asarray(table), np.asarray(counts)
  static = dataclasses.replace(mask, q_offset=start)
  for i in range(len(masks)):
    dense = np.zeros((t_pad, s_pad), bool)
    # padded query rows (positions past the chunk) may be visited: judge only real rows
    head = static.heads(h)[i]
    dense[:t, :s] = np.asarray(head.dense(t, s))
    exact = head.block_layout(t, s, bq, bk)[0]
    for qb in range(t_pad // bq):
      n_full, n_tot = counts[i, qb]
      listed = set(table[i, qb, :n_tot].tolist())
      tiles = dense[qb * bq:(qb + 1) * bq].reshape(bq, -1, bk)
      for kb in range(s_pad // bk):
        if tiles[:, kb].any():
          assert kb in listed, (i, qb, kb)
      for kb in table[i, qb, :n_full]:
        rows = min(bq, t - qb * bq)
        assert rows <= 0 or tiles[:rows, kb].all(), (i, qb, kb)
      if not sched.rule_for(masks, s, s_pad).sink and (qb + 1) * bq <= t:
        assert n_full == (exact[qb] == FULL).sum()
        assert n_tot - n_full == (exact[qb] == PARTIAL).sum()


def test_default_dispatch_and_bad_input(monkeypatch):
  q_all, k, v = _inputs()
  q = q_all[:, :8]
  mask = MASKS["causal"]
  assert chunk.default_order() == ("xla",)
  monkeypatch.setattr(cudnn, "gpu_backend", lambda: True)
  assert chunk.default_order() == ("pallas_gpu", "xla")
  monkeypatch.undo()
  with pytest.raises(ValueError, match="causal"):
    chunk_attention(q, k, v, 3, mask=Mask(causal=False))
  with pytest.raises(ValueError, match="causal"):
    chunk_attention(q, k, v, 3, mask=Mask(causal=True, q_offset=2))
  with pytest.raises(ValueError, match="integer scalar"):
    chunk_attention(q, k, v, jnp.array([3, 4]), mask=mask)
  with pytest.raises(ValueError, match="integer scalar"):
    chunk_attention(q, k, v, 3.0, mask=mask)
  with pytest.raises(ValueError, match="does not fit"):
    chunk_attention(q_all, k[:, :40], v[:, :40], 0, mask=mask)
  with pytest.raises(ValueError, match="per-head|entries|heads"):
    chunk_attention(q, k, v, 0, mask=Mask(causal=True, window_left=(1, 2, 3)))
  with pytest.raises(NotImplementedError, match="unknown implementation"):
    chunk_attention(q, k, v, 0, mask=mask, implementation="cudnn")
  with pytest.raises(NotImplementedError, match="interpret=True"):
    chunk_attention(q, k, v, 0, mask=mask, implementation="pallas_gpu")


@pytest.mark.gpu
@pytest.mark.skipif(not cudnn.gpu_backend(), reason="needs an NVIDIA GPU backend")
@pytest.mark.parametrize("mask_name", sorted(MASKS))
def test_compiled_pallas_chunks_equal_reference(mask_name):
  mask = MASKS[mask_name]
  q_all, k, v = _inputs(jnp.bfloat16)
  c = SHAPE[-1]
  run = jax.jit(lambda q, s: chunk_attention(q, k, v, s, mask=mask, implementation="pallas_gpu"))
  f32 = [x.astype(jnp.float32) for x in (q_all, k, v)]
  for start in STARTS[:-1]:
    got = run(q_all[:, start:start + c], jnp.int32(start))
    _testing.assert_allclose(got, _want(*f32, mask, start, c), dtype=jnp.bfloat16,
                             name=f"start {start}")
