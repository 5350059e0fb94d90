"""SSD implementations vs the sequential reference: values, gradients, packing, continuation,
linear attention, dispatch and bad input."""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memx.kernels import _testing
from memx.kernels.ssd import (
    BlockSizes,
    linear_attention,
    ssd,
    ssd_reference,
    ssd_step,
)

BS16 = BlockSizes(chunk=16, block_p=16, block_n=16)

# name: (B, T, H, P, G, N), segment lengths per row (or None), with D and h0, block sizes
CASES = {
    "ragged_groups": ((2, 37, 4, 16, 2, 16), None, True, BS16),
    "packed": ((2, 40, 2, 16, 1, 16), [[11, 20, 9], [40]], True, BS16),
    "odd_dims_one_chunk": ((1, 9, 2, 24, 1, 20), None, False, BS16),
    "default_blocks": ((1, 70, 2, 16, 2, 16), [[30, 40]], False, None),
    # 16 chunks walked 4 per load (forward and reverse); a segment starts on a chunk boundary.
    "scan_rows": ((1, 250, 2, 16, 1, 16), [[96, 61, 93]], True,
                  BlockSizes(chunk=16, block_p=16, block_n=16, scan_rows=4, block_scan=64)),
    "sequential_pass": ((2, 37, 4, 16, 2, 16), [[20, 17], [37]], True,
                        BlockSizes(chunk=16, block_p=16, block_n=16, state_pass="sequential")),
    # block_n < block_p: the sequential walk scales B's tile, not x's.
    "sequential_narrow_n": ((1, 70, 2, 32, 1, 32), [[30, 40]], True,
                            BlockSizes(chunk=16, block_p=32, block_n=16,
                                       state_pass="sequential")),
    # The chunk backward loops over P in 16-wide tiles under 32-wide forward tiles.
    "narrow_bwd_p": ((1, 70, 2, 32, 1, 16), None, True,
                     BlockSizes(chunk=16, block_p=32, block_n=16, block_p_bwd=16)),
    # 17 chunks: 4 whole groups of 4 and one chunk walked on its own (first, in reverse).
    "parallel_odd_chunks": ((2, 270, 2, 16, 1, 16), [[100, 170], [270]], True,
                            BlockSizes(chunk=16, block_p=16, block_n=16, scan_rows=4,
                                       block_scan=64, state_pass="parallel")),
    # Chunk states stored in the input dtype (bf16 runs round each S_c once).
    "input_dtype_states": ((1, 130, 2, 16, 1, 16), [[50, 80]], True,
                           BlockSizes(chunk=16, block_p=16, block_n=16, scan_rows=4,
                                      state_pass="parallel", chunk_states_fp32=False)),
}
BF16_CASES = ("ragged_groups", "packed", "scan_rows", "sequential_pass", "input_dtype_states",
              "sequential_narrow_n")


def _segments(lengths):
  if lengths is None:
    return None
  rows = [np.concatenate([np.full(n, i) for i, n in enumerate(row)]) for row in lengths]
  return jnp.asarray(np.stack(rows), jnp.int32)


def _inputs(shape, dtype, seed=0):
  b, t, h, p, g, n = shape
  ks = jax.random.split(jax.random.key(seed), 9)
  x = jax.random.normal(ks[0], (b, t, h, p)).astype(dtype)
  # Δ from softplus around 0.3 and A in [-e^1, -e^-1]: decays from ~0.99 to ~0.4 per token.
  dt = jax.nn.softplus(jax.random.normal(ks[1], (b, t, h)) - 1.0)
  a = -jnp.exp(jax.random.uniform(ks[2], (h,), minval=-1.0, maxval=1.0))
  bm = (jax.random.normal(ks[3], (b, t, g, n)) * n ** -0.5).astype(dtype)
  cm = (jax.random.normal(ks[4], (b, t, g, n)) * n ** -0.5).astype(dtype)
  d = jax.random.normal(ks[5], (h,))
  h0 = jax.random.normal(ks[6], (b, h, p, n))
  dy = jax.random.normal(ks[7], (b, t, h, p)).astype(dtype)
  dh = jax.random.normal(ks[8], (b, h, p, n))
  return x, dt, a, bm, cm, d, h0, dy, dh


def _value_and_grads(fn, args, cts):
  def run(args, cts):
    out, vjp = jax.vjp(fn, *args)
    return (*out, *vjp(cts))
  return _testing.jit_for_test(run)(args, cts)


def _fn(case, **kw):
  _, lengths, with_extras, blocks = CASES[case]
  seg = _segments(lengths)

  def fn(x, dt, a, bm, cm, d, h0):
    return ssd(x, dt, a, bm, cm, d=d if with_extras else None,
               initial_state=h0 if with_extras else None, segment_ids=seg,
               block_sizes=blocks, **kw)
  return fn


@functools.cache
def _reference_result(case, dtype_name):
  x, dt, a, bm, cm, d, h0, dy, dh = _inputs(CASES[case][0], jnp.dtype(dtype_name))
  f32 = lambda v: v.astype(jnp.float32)  # noqa: E731
  # Full fp32 matmuls: on GPUs XLA's default fp32 precision may use TF32 (~1e-3 error).
  with jax.default_matmul_precision("highest"):
    return _value_and_grads(_fn(case, implementation="reference"),
                            (f32(x), dt, a, f32(bm), f32(cm), d, h0), (f32(dy), dh))


NAMES = ("y", "final_state", "dx", "ddt", "dA", "dB", "dC", "dD", "dh0")


class _SsdBase:
  IMPL: str = ""
  INTERPRET: bool = False

  @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
  @pytest.mark.parametrize("case", tuple(CASES))
  def test_values_and_grads_match_reference(self, case, dtype):
    if dtype == jnp.bfloat16 and case not in BF16_CASES:
      pytest.skip("bf16 runs on BF16_CASES only")
    x, dt, a, bm, cm, d, h0, dy, dh = _inputs(CASES[case][0], dtype)
    kw = {"interpret": True} if self.INTERPRET else {}
    got = _value_and_grads(_fn(case, implementation=self.IMPL, **kw), (x, dt, a, bm, cm, d, h0),
                           (dy, dh))
    want = _reference_result(case, jnp.dtype(dtype).name)
    t = CASES[case][0][1]
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
      # dA and dD sum over every token: widen by sqrt(T / 128) as for long reductions.
      red = t * CASES[case][0][3] if NAMES[i] in ("dA", "dD") else None
      _testing.assert_allclose(g, w, dtype=dtype, grad=i >= 2, reduction_size=red,
                               name=f"{self.IMPL} {NAMES[i]}")
    assert got[0].dtype == dtype and got[1].dtype == jnp.float32


class TestQuadratic(_SsdBase):
  IMPL = "quadratic"


class TestXla(_SsdBase):
  IMPL = "xla"


class TestPallasGpuInterpret(_SsdBase):
  IMPL, INTERPRET = "pallas_gpu", True


@pytest.mark.gpu
class TestPallasGpu(_SsdBase):
  IMPL = "pallas_gpu"


IMPLS = [("reference", {}), ("quadratic", {}), ("xla", {}), ("pallas_gpu", {"interpret": True})]


@pytest.mark.parametrize("impl, kw", IMPLS, ids=[i for i, _ in IMPLS])
def test_packed_equals_separate_and_continuation_equals_concatenation(impl, kw):
  x, dt, a, bm, cm, d, h0, _, _ = _inputs((1, 29, 2, 16, 1, 16), jnp.float32, seed=3)
  run = functools.partial(ssd, implementation=impl, block_sizes=BS16, d=d, **kw)
  seg = jnp.asarray([[0] * 12 + [1] * 17], jnp.int32)
  parts = lambda v, sl: v[:, sl]  # noqa: E731
  first, second = slice(0, 12), slice(12, None)
  packed, packed_last = run(x, dt, a, bm, cm, segment_ids=seg, initial_state=h0)
  y1, _ = run(*(parts(v, first) for v in (x, dt)), a, *(parts(v, first) for v in (bm, cm)),
              initial_state=h0)
  y2, last2 = run(*(parts(v, second) for v in (x, dt)), a, *(parts(v, second) for v in (bm, cm)))
  _testing.assert_allclose(packed, jnp.concatenate([y1, y2], 1), name="packed y")
  _testing.assert_allclose(packed_last, last2, name="packed final state")
  # Continuing from a returned state equals one run over the concatenation.
  whole, whole_last = run(x, dt, a, bm, cm, initial_state=h0)
  head, state = run(*(parts(v, first) for v in (x, dt)), a, *(parts(v, first) for v in (bm, cm)),
                    initial_state=h0)
  tail, tail_last = run(*(parts(v, second) for v in (x, dt)), a,
                        *(parts(v, second) for v in (bm, cm)), initial_state=state)
  _testing.assert_allclose(jnp.concatenate([head, tail], 1), whole, name="continued y")
  _testing.assert_allclose(tail_last, whole_last, name="continued final state")


def test_step_form_equals_scan():
  x, dt, a, bm, cm, d, h0, _, _ = _inputs((2, 7, 4, 8, 2, 8), jnp.float32)
  want, want_last = ssd_reference(x, dt, a, bm, cm, d=d, initial_state=h0)
  state, ys = h0, []
  for t in range(x.shape[1]):
    y, state = ssd_step(state, x[:, t], dt[:, t], dt[:, t] * a[None], bm[:, t], cm[:, t], d)
    ys.append(y)
  _testing.assert_allclose(jnp.stack(ys, 1), want, name="y")
  _testing.assert_allclose(state, want_last, name="state")


def _naive_linear_attention(q, k, v, log_gate=None):
  """o_t = Σ_{s<=t} decay(s->t) (q_t·k_s) v_s with explicit [T, T] matrices (keys per group)."""
  h, g = q.shape[2], k.shape[2]
  k = jnp.repeat(k, h // g, axis=2)
  v = jnp.repeat(v, h // v.shape[2], axis=2)
  t = q.shape[1]
  scores = jnp.einsum("bthk,bshk->bhts", q, k)
  mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
  if log_gate is not None:
    cum = jnp.cumsum(jnp.swapaxes(log_gate, 1, 2), -1)                     # [B, H, T]
    decay = jnp.exp(jnp.where(mask, cum[..., :, None] - cum[..., None, :], -jnp.inf))
    scores = scores * decay
  scores = jnp.where(mask, scores, 0.0)
  return jnp.einsum("bhts,bshv->bthv", scores, v)


@pytest.mark.parametrize("impl, kw", IMPLS, ids=[i for i, _ in IMPLS])
def test_ssd_with_zero_decay_is_causal_linear_attention(impl, kw):
  x, _, _, bm, cm, _, _, _, _ = _inputs((2, 21, 4, 8, 2, 16), jnp.float32)
  t = x.shape[1]
  ones = jnp.ones(x.shape[:3])
  y, _ = ssd(x, ones, jnp.zeros((4,)), bm, cm, implementation=impl, block_sizes=BS16, **kw)
  want = _naive_linear_attention(jnp.repeat(cm, 2, 2), bm, x)
  _testing.assert_allclose(y, want, reduction_size=t, name="A=0")
  # The same through the linear-attention entry point, GQA-style: 4 query heads, 2 key/value
  # groups, and through a scalar per-head gate.
  q = jax.random.normal(jax.random.key(7), (2, t, 4, 16))
  o, _ = linear_attention(q, bm, x[:, :, :2], implementation=impl, block_sizes=BS16, **kw)
  _testing.assert_allclose(o, _naive_linear_attention(q, bm, x[:, :, :2]), reduction_size=t,
                           name="linear_attention GQA")
  log_gate = jax.nn.log_sigmoid(jax.random.normal(jax.random.key(8), (2, t, 4)) + 2.0)
  o, _ = linear_attention(q, bm, x, log_gate=log_gate, implementation=impl, block_sizes=BS16,
                          **kw)
  _testing.assert_allclose(o, _naive_linear_attention(q, bm, x, log_gate), reduction_size=t,
                           name="gated linear_attention")


@pytest.mark.parametrize("impl, kw", IMPLS, ids=[i for i, _ in IMPLS])
def test_a_zero_gate_resets_the_state_as_in_the_reference(impl, kw):
  """log_gate = -inf (a gate of exactly 0, a hard reset) and A = -inf: the chunked and
  quadratic forms difference cumulative log decays, which gave NaN; values and gradients must
  equal the sequential reference's."""
  t = 21
  ks = jax.random.split(jax.random.key(3), 4)
  q, k, v = (jax.random.normal(kk, (1, t, 2, 16)) for kk in ks[:3])
  h0 = jax.random.normal(ks[3], (1, 2, 16, 16))
  log_gate = jnp.full((1, t, 2), -0.1).at[:, 5].set(-jnp.inf).at[:, 17, 1].set(-jnp.inf)

  def run(name, **extra):
    def f(q, k, v, h0):
      o, h = linear_attention(q, k, v, log_gate=log_gate, initial_state=h0,
                              implementation=name, **extra)
      return jnp.sum(o * jnp.cos(o)) + jnp.sum(h ** 2), (o, h)
    return jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, h0)

  (_, (o, h)), grads = run(impl, block_sizes=BS16, **kw)
  (_, (ro, rh)), rgrads = run("reference")
  assert bool(jnp.all(jnp.isfinite(o))) and bool(jnp.all(jnp.isfinite(h)))
  _testing.assert_allclose(o, ro, reduction_size=t, name="o")
  _testing.assert_allclose(h, rh, reduction_size=t, name="final state")
  for name, g, rg in zip(("dq", "dk", "dv", "dh0"), grads, rgrads, strict=True):
    _testing.assert_allclose(g, rg, grad=True, reduction_size=t, name=name)
  x, dt, _, bm, cm, _, _, _, _ = _inputs((1, t, 4, 8, 2, 16), jnp.float32)
  a = jnp.array([-1.0, -jnp.inf, -0.5, -jnp.inf])
  y, _ = ssd(x, dt, a, bm, cm, implementation=impl, block_sizes=BS16, **kw)
  _testing.assert_allclose(y, ssd(x, dt, a, bm, cm, implementation="reference")[0],
                           reduction_size=t, name="A = -inf")


def test_bf16_backward_runs_op_by_op_on_cpu():
  """Eager jax.grad runs the custom VJP's einsums one by one; XLA:CPU has no bf16 x bf16 ->
  fp32 dot for some of their layouts (UNIMPLEMENTED at run time): the xla SSD widens them."""
  bf = jnp.bfloat16
  ks = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(ks[0], (2, 33, 2, 16)).astype(bf)
  bm, cm = (jax.random.normal(kk, (2, 33, 1, 16)).astype(bf) for kk in ks[1:3])
  target = jax.random.normal(ks[3], (2, 33, 2, 16))

  def loss(x, bm, cm):
    y, _ = ssd(x, jnp.full((2, 33, 2), 0.5), -jnp.ones((2,)), bm, cm, implementation="xla",
               block_sizes=BlockSizes(chunk=16))
    return jnp.mean((y.astype(jnp.float32) - target) ** 2)

  eager = jax.grad(loss, argnums=(0, 1, 2))(x, bm, cm)
  jitted = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, bm, cm)
  for e, j in zip(eager, jitted, strict=True):
    _testing.assert_allclose(e, j, dtype=bf, grad=True, name="eager vs jit")


def test_linear_attention_takes_a_traced_scale_and_refuses_zero_groups():
  q = jax.random.normal(jax.random.key(0), (1, 9, 2, 8))
  k, v = q[:, :, :1] * 0.5, q * 2.0
  want = linear_attention(q, k, v, scale=0.25)[0]
  got = jax.jit(lambda s: linear_attention(q, k, v, scale=s)[0])(jnp.float32(0.25))
  _testing.assert_allclose(got, want, name="traced scale")
  with pytest.raises(ValueError, match="0 groups/heads"):
    linear_attention(q, k[:, :, :0], v)


def test_default_dispatch_on_cpu_is_xla_without_warnings():
  x, dt, a, bm, cm, *_ = _inputs((1, 9, 2, 8, 1, 8), jnp.float32)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    y, _ = ssd(x, dt, a, bm, cm)
  _testing.assert_allclose(y, ssd_reference(x, dt, a, bm, cm)[0])


def test_explicit_pallas_without_gpu_fails_fast_and_sequences_fall_back():
  x, dt, a, bm, cm, *_ = _inputs((1, 9, 2, 8, 1, 8), jnp.float32)
  with pytest.raises(NotImplementedError, match="interpret=True"):
    ssd(x, dt, a, bm, cm, implementation="pallas_gpu")
  with pytest.warns(UserWarning, match="skipping pallas_gpu"):
    ssd(x, dt, a, bm, cm, implementation=("pallas_gpu", "xla"))
  with pytest.raises(NotImplementedError, match="unknown implementation"):
    ssd(x, dt, a, bm, cm, implementation="cuda")
  big = jnp.ones((1, 9, 1, 512))
  with pytest.raises(NotImplementedError, match="state size"):
    ssd(x, dt, a, big, big, implementation="pallas_gpu", interpret=True)


def _bad(**changes):
  x, dt, a, bm, cm, *_ = _inputs((1, 8, 4, 8, 2, 8), jnp.float32)
  args = {"x": x, "dt": dt, "a": a, "b": bm, "c": cm}
  kw = {}
  for key, value in changes.items():
    (args if key in args else kw)[key] = value
  return lambda: ssd(*args.values(), **kw)


@pytest.mark.parametrize("changes, match", [
    ({"b": jnp.ones((1, 8, 3, 8))}, "same shape"),
    ({"b": jnp.ones((1, 8, 3, 8)), "c": jnp.ones((1, 8, 3, 8))}, "must divide the 4 heads"),
    ({"b": jnp.ones((1, 7, 2, 8)), "c": jnp.ones((1, 7, 2, 8))}, r"disagree on \[B, T\]"),
    ({"dt": jnp.ones((1, 8, 2))}, "dt must have shape"),
    ({"dt": jnp.zeros((1, 8, 4))}, "dt must be positive"),
    ({"a": jnp.ones((4,))}, "A must be <= 0"),
    ({"a": -jnp.ones((3,))}, "A must have shape"),
    ({"x": jnp.ones((1, 8, 4, 8), jnp.bfloat16)}, "dtypes differ"),
    ({"initial_state": jnp.zeros((1, 4, 8, 9))}, "initial_state must have shape"),
    ({"segment_ids": jnp.zeros((1, 9), jnp.int32)}, "segment_ids must have shape"),
    ({"d": jnp.ones((2,))}, "D must have shape"),
])
def test_bad_input_raises_value_error_before_tracing(changes, match):
  with pytest.raises(ValueError, match=match):
    _bad(**changes)()


@pytest.mark.parametrize("kwargs, match", [
    ({"chunk": 48}, "chunk.*power of two"),
    ({"block_p": 8}, "block_p.*power of two"),
    ({"block_scan": 48}, "block_scan.*power of two"),
    ({"scan_rows": 3}, "scan_rows"),
    ({"block_p_bwd": 8}, "block_p_bwd"),
    ({"chunk_states_fp32": 1}, "chunk_states_fp32"),
    ({"state_pass": "fused"}, "'auto', 'parallel' or 'sequential'"),
])
def test_bad_block_sizes_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    BlockSizes(**kwargs)


def test_bad_gates_raise():
  q = jnp.ones((1, 4, 2, 16))
  with pytest.raises(ValueError, match="log_gate must be <= 0"):
    linear_attention(q, q, q, log_gate=jnp.ones((1, 4, 2)))
  with pytest.raises(ValueError, match="query heads"):
    linear_attention(jnp.ones((1, 4, 4, 16)), jnp.ones((1, 4, 1, 16)), jnp.ones((1, 4, 3, 16)))


@pytest.mark.parametrize("shape, want", [((1, 16, 128, 128), "sequential"),
                                         ((1, 16, 64, 64), "parallel"),
                                         ((8, 16, 64, 64), "sequential")])
def test_auto_state_pass_by_sequential_program_count(shape, want):
  """auto: the sequential walk when it has >= 128 programs (B·H·P/64·N/32), else parallel:
  the H100 measurements (bench shape P128 N128 vs the 64k student's P64 N64)."""
  from memx.kernels.ssd import pallas_gpu
  from memx.kernels.ssd.xla import Plan
  b, h, p, n = shape

  def chosen(blocks):
    return pallas_gpu.make_plan(Plan(chunk=64, n_chunks=4, segments=False), p, n, blocks,
                                interpret=True, batch_heads=b * h).state_pass

  assert chosen(BlockSizes()) == want
  assert chosen(BlockSizes(state_pass="parallel")) == "parallel"   # an explicit pass is kept


KERNELS = {"parallel": ("chunk_states", "state_scan", "out_fwd", "chunk_states_bwd",
                        "state_scan_bwd", "chunk_bwd"),
           "sequential": ("state_fwd", "out_fwd", "state_bwd", "chunk_bwd")}


@pytest.mark.parametrize("segments, state_pass, t, fp32_states",
                         [(False, "parallel", 1000, True), (True, "parallel", 1000, True),
                          (True, "sequential", 1000, True), (False, "parallel", 1088, True),
                          (False, "parallel", 1000, False)])
def test_pallas_kernels_lower_to_triton_for_h100(segments, state_pass, t, fp32_states):
  """Lowers forward + backward for CUDA (Triton IR) at the benchmark head shape, on CPU (T =
  1088: 17 chunks, a whole-group walk and a single-chunk tail)."""
  from memx.kernels.ssd import pallas_gpu
  from memx.kernels.ssd.api import _chunked
  b, h, p, g, n = 1, 16, 128, 1, 128
  x = jax.ShapeDtypeStruct((b, t, h, p), jnp.bfloat16)
  row = jax.ShapeDtypeStruct((b, t, h), jnp.float32)
  bc = jax.ShapeDtypeStruct((b, t, g, n), jnp.bfloat16)
  hd = jax.ShapeDtypeStruct((h,), jnp.float32)
  h0 = jax.ShapeDtypeStruct((b, h, p, n), jnp.float32)
  seg = jax.ShapeDtypeStruct((b, t), jnp.int32) if segments else None
  assert pallas_gpu.unsupported_reason(p, n) is None

  def loss(x, dt, log_a, bm, cm, d, h0, seg):
    y, last = _chunked("pallas_gpu", x, dt, log_a, bm, cm, d, h0, seg,
                       block_sizes=BlockSizes(state_pass=state_pass,
                                              chunk_states_fp32=fp32_states),
                       interpret=False)
    return y.astype(jnp.float32).sum() + last.sum()

  with jax.sharding.use_abstract_mesh(_testing.abstract_h100_mesh()):
    lowered = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4, 5, 6))).trace(
        x, row, row, bc, bc, hd, h0, seg).lower(lowering_platforms=("cuda",))
  text = lowered.as_text()
  assert text.count("__gpu$xla.gpu.triton") == len(KERNELS[state_pass])
  for name in KERNELS[state_pass]:
    assert f"memx_ssd_{name}" in text


def test_float16_states_beyond_its_range_stay_finite():
  """The fp32 state of a long fp16 linear attention exceeds 65504: xla runs its matmuls in fp32
  for float16 (the reference's values), and pallas_gpu refuses float16 with the reason."""
  from memx.kernels.ssd import linear_attention

  q = jnp.full((1, 2048, 1, 16), 1e-4, jnp.float16)
  kv = jnp.full((1, 2048, 1, 16), 8.0, jnp.float16)
  want, state = linear_attention(q, kv, kv, implementation="reference")
  got, _ = linear_attention(q, kv, kv, implementation="xla")
  assert float(jnp.max(state)) > 65504 and bool(jnp.isfinite(got).all())
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             rtol=2e-3)
  with pytest.raises(NotImplementedError, match="float16"):
    linear_attention(q, kv, kv, implementation="pallas_gpu", interpret=True)
