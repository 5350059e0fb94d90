"""Sequence-parallel attention (ring, all-to-all) vs the unsharded kernel: values, gradients,
load balance, collectives in the compiled HLO, and per-device memory."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from memx.kernels import _testing
from memx.kernels.attention import CAUSAL, BlockSizes, Mask, attention, attention_reference
from memx.parallel import sequence
from memx.parallel.constrain import sharding_context
from memx.parallel.sequence import (
    layout_positions,
    permute_sequence,
    ring_schedule,
    sequence_parallel_attention,
    sharded_attention,
    unpermute_sequence,
)

pytestmark = pytest.mark.multidevice


def _mesh(n: int) -> Mesh:
  if jax.device_count() < n:
    pytest.skip(f"needs {n} devices")
  return Mesh(np.asarray(jax.devices()[:n]), ("seq",))


def _packed(b: int, t: int, lengths) -> jax.Array:
  ids = np.concatenate([np.full(n, i) for i, n in enumerate(lengths)])
  return jnp.asarray(np.broadcast_to(np.pad(ids, (0, t - len(ids)), mode="edge"), (b, t)),
                     jnp.int32)


def _inputs(b, t, h, g, d, dtype, seed=0):
  kq, kk, kv, kd = jax.random.split(jax.random.key(seed), 4)
  return (jax.random.normal(kq, (b, t, h, d), dtype), jax.random.normal(kk, (b, t, g, d), dtype),
          jax.random.normal(kv, (b, t, g, d), dtype), jax.random.normal(kd, (b, t, h, d), dtype))


# name: devices, method, layout, (B, T, H, G, D), mask, segment lengths or None, dtype
CASES = {
    "ring_causal_contiguous": (8, "ring", "contiguous", (2, 64, 2, 2, 16), CAUSAL, None,
                               "float32"),
    "ring_causal_zigzag_gqa": (8, "ring", "zigzag", (1, 64, 4, 2, 16), CAUSAL, None, "float32"),
    "ring_causal_striped_mqa": (8, "ring", "striped", (1, 64, 4, 1, 16), CAUSAL, None,
                                "float32"),
    # Window + sinks on contiguous shards: hops (0, 1, 2) only, as a lax.scan of one-step shifts.
    "ring_window_sinks_contiguous": (8, "ring", "contiguous", (1, 64, 2, 1, 16),
                                     Mask(window_left=10, n_sink=3), None, "float32"),
    # ... on zigzag shards: hops (0, 1, 7), an unrolled walk with a two-step shift.
    "ring_window_sinks_zigzag_gqa": (8, "ring", "zigzag", (1, 64, 4, 2, 16),
                                     Mask(window_left=3, n_sink=2), None, "float32"),
    "ring_segments_zigzag": (8, "ring", "zigzag", (2, 64, 2, 2, 16), CAUSAL, (20, 30, 14),
                             "float32"),
    "ring_bidirectional_window": (4, "ring", "contiguous", (1, 32, 2, 2, 16),
                                  Mask(causal=False, window_left=5, window_right=9), None,
                                  "float32"),
    "ring_causal_zigzag_segments_4dev": (4, "ring", "zigzag", (1, 64, 4, 2, 16), CAUSAL,
                                         (7, 40, 17), "float32"),
    "ring_bf16_zigzag": (8, "ring", "zigzag", (1, 64, 4, 2, 16), CAUSAL, None, "bfloat16"),
    "a2a_causal_zigzag_gqa_repeat": (8, "all_to_all", "zigzag", (1, 64, 8, 2, 16), CAUSAL, None,
                                     "float32"),
    "a2a_window_segments_4dev": (4, "all_to_all", "contiguous", (2, 32, 4, 4, 16),
                                 Mask(window_left=6, n_sink=2), (10, 22), "float32"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_unsharded_reference(name):
  n, method, layout, (b, t, h, g, d), mask, lengths, dtype = CASES[name]
  mesh = _mesh(n)
  q, k, v, do = _inputs(b, t, h, g, d, jnp.dtype(dtype))
  seg = None if lengths is None else _packed(b, t, lengths)

  def sharded(q, k, v):
    # Natural order in and out: the layout permutation is part of what is tested.
    pq, pk, pv = (permute_sequence(x, n, layout) for x in (q, k, v))
    ps = None if seg is None else permute_sequence(seg, n, layout)
    o = sequence_parallel_attention(pq, pk, pv, mesh=mesh, method=method, layout=layout,
                                    mask=mask, segment_ids=ps,
                                    block_sizes=BlockSizes(block_q=16, block_k=16))
    return unpermute_sequence(o, n, layout)

  def fwd_bwd(fn):
    def run(q, k, v, do):
      o, vjp = jax.vjp(fn, q, k, v)
      return o, vjp(do)
    return run

  o, grads = _testing.jit_for_test(fwd_bwd(sharded))(q, k, v, do)
  o_ref, grads_ref = jax.jit(fwd_bwd(
      lambda q, k, v: attention_reference(q, k, v, mask=mask, segment_ids=seg)))(q, k, v, do)
  _testing.assert_allclose(o, o_ref, dtype=dtype, name=f"{name} out")
  _testing.assert_tree_allclose(grads, grads_ref, dtype=dtype, grad=True,
                                names=("dq", "dk", "dv"))


def test_layouts_are_permutations():
  for layout in sequence.LAYOUTS:
    pos = layout_positions(32, 4, layout)
    assert sorted(pos.reshape(-1).tolist()) == list(range(32))
  assert layout_positions(16, 2, "zigzag").tolist() == [[0, 1, 2, 3, 12, 13, 14, 15],
                                                        [4, 5, 6, 7, 8, 9, 10, 11]]
  assert layout_positions(8, 2, "striped").tolist() == [[0, 2, 4, 6], [1, 3, 5, 7]]
  x = jnp.arange(2 * 32).reshape(2, 32)
  for layout in sequence.LAYOUTS:
    np.testing.assert_array_equal(unpermute_sequence(permute_sequence(x, 4, layout), 4, layout), x)
  with pytest.raises(ValueError, match="multiple of 8"):
    layout_positions(12, 4, "zigzag")


def test_causal_load_balance_counts_visited_tiles():
  """zigzag and striped give every device the same number of key tiles; contiguous does not."""
  t, n = 1024, 8
  contiguous = ring_schedule(t, n, layout="contiguous", block_q=16, block_k=16).visited_tiles()
  zigzag = ring_schedule(t, n, layout="zigzag", block_q=16, block_k=16)
  striped = ring_schedule(t, n, layout="striped", block_q=16, block_k=16).visited_tiles()
  assert len(set(zigzag.visited_tiles().tolist())) == 1, zigzag.visited_tiles()
  assert len(set(striped.tolist())) == 1, striped
  # Contiguous: device d needs the blocks of devices 0..d, so the last does ~2n-1 x the first.
  assert contiguous[-1] > 10 * contiguous[0], contiguous
  # zigzag also balances every hop, so no device waits at any step of the ring.
  per_hop = zigzag.visited_tiles_per_hop()
  assert (per_hop == per_hop[:1]).all(), per_hop
  # Same causal work in total, up to the diagonal tiles: zigzag visits half the tile grid.
  total = (t // 16) ** 2
  assert abs(int(zigzag.visited_tiles().sum()) - total / 2) <= t // 16, zigzag.visited_tiles()


def test_windows_skip_hops():
  near = ring_schedule(256, 8, mask=Mask(window_left=40), block_q=16, block_k=16)
  assert near.hops == (0, 1, 2)
  sinks = ring_schedule(256, 8, mask=Mask(window_left=40, n_sink=4), block_q=16, block_k=16)
  assert sinks.hops == (0, 1, 2)  # sinks come on the side channel, not the ring
  assert ring_schedule(256, 8, mask=CAUSAL).hops == tuple(range(8))


def test_unsupported_inputs_fail_clearly():
  mesh = _mesh(4)
  q, k, v, _ = _inputs(1, 32, 4, 4, 8, jnp.float32)
  with pytest.raises(NotImplementedError, match="per-head"):
    sequence_parallel_attention(q, k, v, mesh=mesh, mask=Mask(window_left=(1, 2, 3, 4)))
  with pytest.raises(ValueError, match="multiple of 8"):
    sequence_parallel_attention(q[:, :28], k[:, :28], v[:, :28], mesh=mesh, layout="zigzag")
  q6 = jnp.zeros((1, 32, 6, 8))
  with pytest.raises(ValueError, match="6 query heads"):
    sequence_parallel_attention(q6, q6, q6, mesh=mesh, method="all_to_all")


def test_sharded_attention_routes_by_rules():
  _mesh(4)
  q, k, v, _ = _inputs(1, 32, 4, 4, 8, jnp.float32)
  # No mesh or rules: exactly the kernel.
  np.testing.assert_array_equal(sharded_attention(q, k, v, implementation="xla"),
                                attention(q, k, v, implementation="xla"))
  mesh2 = Mesh(np.asarray(jax.devices()[:4]).reshape(1, 4), ("data", "seq"))
  for method, op in (("ring", "collective-permute"), ("all_to_all", "all-to-all")):
    with sharding_context(mesh2, "sp", sequence_method=method):
      text = jax.jit(lambda q, k, v: sharded_attention(q, k, v)).lower(q, k, v).as_text()
    assert op.replace("-", "_") in text or op in text, method
    with sharding_context(mesh2, "dp"):  # SEQ not split: no sequence parallelism
      text = jax.jit(lambda q, k, v: sharded_attention(q, k, v)).lower(q, k, v).as_text()
    assert "collective_permute" not in text and "all_to_all" not in text


def _collectives(text: str) -> dict[str, list[str]]:
  out = {}
  for op in ("collective-permute", "all-gather", "all-to-all", "all-reduce"):
    out[op] = re.findall(rf"= (.*?) {op}(?:-start)?\(", text)  # the result shape(s)
  return out


@pytest.fixture(scope="module")
def long_ring():
  """fwd+bwd compiled (not run) at T = 8192: single device vs 8-way ring and 4-way Ulysses."""
  mesh8 = _mesh(8)
  b, t, h, g, d = 1, 8192, 8, 2, 64
  blocks = BlockSizes(block_q=128, block_k=128, block_q_dkv=128, block_k_dkv=128)

  def fwd_bwd(fn):
    def run(q, k, v, do):
      return jax.vjp(fn, q, k, v)[1](do)
    return run

  def shapes(sharding=None):
    s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)  # noqa: E731
    return s(b, t, h, d), s(b, t, g, d), s(b, t, g, d), s(b, t, h, d)

  single = jax.jit(fwd_bwd(lambda q, k, v: attention(
      q, k, v, implementation="xla", block_sizes=blocks))).lower(*shapes()).compile()
  out = {"single": single}
  for name, n, method in (("ring", 8, "ring"), ("a2a", 4, "all_to_all")):
    mesh = Mesh(np.asarray(jax.devices()[:n]), ("seq",)) if n != 8 else mesh8
    sharding = NamedSharding(mesh, PartitionSpec(None, "seq"))
    out[name] = jax.jit(fwd_bwd(lambda q, k, v, mesh=mesh, method=method:
                                sequence_parallel_attention(
                                    q, k, v, mesh=mesh, method=method, layout="zigzag",
                                    block_sizes=blocks, implementation="xla"))
                        ).lower(*shapes(sharding)).compile()
  return out


def test_ring_hlo_passes_blocks_and_never_gathers_kv(long_ring):
  ops = _collectives(long_ring["ring"].as_text())
  assert ops["collective-permute"], "ring attention compiled without collective-permute"
  assert not ops["all-gather"] and not ops["all-to-all"], ops
  # Every block that moves is one device's K/V (or dK/dV) shard: T/8 tokens, never T.
  for shape in ops["collective-permute"]:
    assert "8192" not in shape, shape
  a2a = _collectives(long_ring["a2a"].as_text())
  assert a2a["all-to-all"] and not a2a["all-gather"] and not a2a["collective-permute"], a2a


def test_ring_memory_per_device(long_ring):
  """8-way ring fwd+bwd at fixed T: per-device temporaries <= 0.2x one device's (GQA 8/2).

  The rest of 1/8 is the ring's double buffers: the K/V block in flight, and the fp32 dK/dV
  that travel with it in the backward (with MHA, G = H, they weigh 4x more: ~0.3x).
  """
  single = long_ring["single"].memory_analysis().temp_size_in_bytes
  ring = long_ring["ring"].memory_analysis().temp_size_in_bytes
  assert ring <= 0.2 * single, (ring, single, ring / single)


def test_one_jitted_function_follows_the_context_it_runs_under():
  """The layout is read while tracing: a function jitted under one sharding context is traced
  again under another (the context is part of jit's cache key), not run with the first's."""
  if jax.device_count() < 4:
    pytest.skip("needs 4 devices")
  mesh = Mesh(np.asarray(jax.devices()[:4]).reshape(1, 4), ("data", "seq"))
  q = np.asarray(jax.random.normal(jax.random.key(0), (1, 32, 4, 8)))
  want = np.asarray(attention_reference(q, q, q, mask=CAUSAL))
  fn = jax.jit(lambda q: sharded_attention(q, q, q, mask=CAUSAL))
  for layout in ("contiguous", "zigzag"):
    with sharding_context(mesh, "sp", sequence_method="ring", sequence_layout=layout):
      got = unpermute_sequence(fn(np.asarray(permute_sequence(q, 4, layout))), 4, layout)
    _testing.assert_allclose(got, want, dtype=jnp.float32, name=layout)
