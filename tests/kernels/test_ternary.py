"""Ternary quantizers, 2-bit packing and the packed matmul (reference, xla, Pallas interpret)."""

import functools

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from memx.kernels import _testing
from memx.kernels.ternary import (
  BlockSizes,
  absmax_quantize,
  absmean_quantize,
  from_words,
  int8_fake_quant,
  pack_ternary,
  packed_matmul,
  packed_rows,
  ternary_fake_quant,
  to_words,
  unpack_ternary,
)

SMALL = BlockSizes(block_m=16, block_n=16, block_k=64)


def _w(shape, seed=0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


# --- quantizers -----------------------------------------------------------------------------


def test_absmean_codes_are_ternary_and_scale_is_mean_abs():
  w = _w((64, 48))
  codes, scale = absmean_quantize(w)
  assert codes.dtype == jnp.int8
  assert set(np.unique(np.asarray(codes)).tolist()) <= {-1, 0, 1}
  np.testing.assert_allclose(scale, jnp.mean(jnp.abs(w)), rtol=1e-6)
  q = ternary_fake_quant(w)
  vals = np.unique(np.asarray(q))
  np.testing.assert_allclose(np.sort(np.abs(vals))[-1], scale, rtol=1e-6)
  assert len(vals) <= 3


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_fake_quant_values_are_exactly_on_the_grid(dtype):
  """Forward values are exactly codes · scale (and codes / scale) in the input dtype: the
  straight-through form must not round twice."""
  w = jax.random.normal(jax.random.PRNGKey(3), (256, 256), jnp.float32).astype(dtype) * 0.02
  codes, scale = absmean_quantize(w)
  want = (codes.astype(jnp.float32) * scale).astype(dtype)
  np.testing.assert_array_equal(np.asarray(ternary_fake_quant(w), np.float32),
                                np.asarray(want, np.float32))
  codes, scale = absmax_quantize(w)
  want = (codes.astype(jnp.float32) / scale).astype(dtype)
  np.testing.assert_array_equal(np.asarray(int8_fake_quant(w), np.float32),
                                np.asarray(want, np.float32))


def test_quantizers_idempotent():
  w = _w((32, 16))
  codes, _ = absmean_quantize(w)
  # Codes are a fixed point (the scale of {-1,0,1} is the fraction of nonzeros, which maps every
  # nonzero code back to ±1 and keeps zeros at 0).
  codes2, _ = absmean_quantize(ternary_fake_quant(w))
  np.testing.assert_array_equal(codes2, codes)
  x = _w((4, 7, 33), seed=1) * 5
  x1 = int8_fake_quant(x)
  c1, s1 = absmax_quantize(x)
  c2, s2 = absmax_quantize(x1)
  np.testing.assert_array_equal(c2, c1)
  np.testing.assert_allclose(s2, s1, rtol=1e-6)
  np.testing.assert_allclose(int8_fake_quant(x1), x1, rtol=1e-6, atol=1e-7)


def test_absmax_codes_in_int8_range_and_max_maps_to_127():
  x = _w((3, 5, 40)) * 100
  codes, scale = absmax_quantize(x)
  assert codes.dtype == jnp.int8 and scale.shape == (3, 5, 1)
  assert int(jnp.max(jnp.abs(codes.astype(jnp.int32)))) == 127
  np.testing.assert_array_equal(jnp.max(jnp.abs(codes.astype(jnp.int32)), -1), 127)
  np.testing.assert_allclose(codes / scale, x, atol=float(jnp.max(1 / scale)) * 0.5 + 1e-5)


def test_all_zero_inputs_stay_finite():
  codes, scale = absmean_quantize(jnp.zeros((8, 8)))
  assert np.isfinite(scale) and not codes.any()
  assert np.isfinite(np.asarray(int8_fake_quant(jnp.zeros((2, 8))))).all()


def test_straight_through_gradients_are_identity():
  w, x = _w((16, 8)), _w((4, 16), seed=2)
  g = jax.random.normal(jax.random.key(3), (16, 8))
  gw = jax.grad(lambda w: jnp.sum(ternary_fake_quant(w) * g))(w)
  np.testing.assert_array_equal(gw, g)
  gx = jax.grad(lambda x: jnp.sum(int8_fake_quant(x) ** 2))(x)
  np.testing.assert_allclose(gx, 2 * int8_fake_quant(x), rtol=1e-6)


# --- packing --------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1,), (4,), (7,), (37, 24), (64, 5), (3, 1)])
def test_pack_unpack_roundtrip_and_byte_count(shape):
  codes, _ = absmean_quantize(_w(shape))
  packed = pack_ternary(codes)
  assert packed.dtype == jnp.uint8
  n = int(np.prod(shape))
  cols = n // shape[0]
  assert packed.size == packed_rows(shape[0]) * cols
  if len(shape) == 1:
    assert packed.nbytes == -(-n // 4)  # exactly ceil(n/4) bytes (+ the fp32 scale: 4 bytes)
  np.testing.assert_array_equal(unpack_ternary(packed, shape[0]), codes)


def test_pack_rejects_non_ternary_and_bad_shapes():
  with pytest.raises(ValueError, match=r"\{-1, 0, 1\}.*index \(1, 0\)"):
    pack_ternary(jnp.array([[1, 0], [2, -1]]))
  with pytest.raises(ValueError, match="codes must be"):
    pack_ternary(jnp.array([0.5, 1.0]))
  with pytest.raises(ValueError, match=r"\[K\] or \[K, N\]"):
    pack_ternary(jnp.zeros((2, 2, 2), jnp.int8))
  with pytest.raises(ValueError, match="uint8"):
    unpack_ternary(jnp.zeros((2, 2), jnp.int8), 8)
  with pytest.raises(ValueError, match="does not hold K = 9"):
    unpack_ternary(jnp.zeros((2, 2), jnp.uint8), 9)


def test_pack_inside_jit_skips_value_check():
  codes, _ = absmean_quantize(_w((12, 4)))
  np.testing.assert_array_equal(jax.jit(pack_ternary)(codes), pack_ternary(codes))


# --- packed matmul --------------------------------------------------------------------------

SPLIT = BlockSizes(block_m=16, block_n=16, block_k=64, split_k=4)
VECTOR = BlockSizes(block_n=16, block_k=64, split_k=2, vector=True)
IMPLS = [("xla", {}), ("pallas_gpu", {"interpret": True, "block_sizes": SMALL}),
         ("pallas_gpu_split_k", {"interpret": True, "block_sizes": SPLIT}),
         ("pallas_gpu_vector", {"interpret": True, "block_sizes": VECTOR})]


def _impl(name):
  return "pallas_gpu" if name.startswith("pallas_gpu") else name


LAYOUTS = pytest.mark.parametrize("layout", ["bytes", "words"])


def _layout(packed, layout):
  return to_words(packed) if layout == "words" else packed


def test_words_hold_the_bytes_little_endian():
  codes, _ = absmean_quantize(_w((37, 24)))
  packed = pack_ternary(codes)
  words = to_words(packed)
  assert words.dtype == jnp.int32 and words.shape == (10, 6) and words.nbytes == packed.nbytes
  b = np.asarray(packed).astype(np.uint64)
  want = sum(b[:, lane::4] << (8 * lane) for lane in range(4)).astype(np.uint32).view(np.int32)
  np.testing.assert_array_equal(words, want)
  np.testing.assert_array_equal(words, np.ascontiguousarray(packed).view("<i4"))
  np.testing.assert_array_equal(from_words(words), packed)
  with pytest.raises(ValueError, match="not a multiple of 4"):
    to_words(pack_ternary(codes[:, :6]))
  with pytest.raises(ValueError, match="uint8"):
    to_words(words)
  with pytest.raises(ValueError, match="need ceil"):  # words keep the K check
    packed_matmul(jnp.ones((1, 60), jnp.int8), words)


@LAYOUTS
@pytest.mark.parametrize("impl,kw", IMPLS, ids=[i for i, _ in IMPLS])
@pytest.mark.parametrize("m,k,n", [(5, 37, 24), (16, 64, 16), (33, 130, 40)])
def test_packed_matmul_integer_exact(impl, kw, m, k, n, layout):
  codes, _ = absmean_quantize(_w((k, n)))
  packed = pack_ternary(codes)
  x = jax.random.randint(jax.random.key(1), (m, k), -128, 128).astype(jnp.int8)
  want = packed_matmul(x, packed, implementation="reference")
  np.testing.assert_array_equal(want, jnp.dot(x.astype(jnp.int32), codes.astype(jnp.int32)))
  got = packed_matmul(x, _layout(packed, layout), implementation=_impl(impl), **kw)
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(got, want)  # atol = 0


@LAYOUTS
@pytest.mark.parametrize("impl,kw", IMPLS, ids=[i for i, _ in IMPLS])
def test_packed_matmul_of_no_rows_is_empty(impl, kw, layout):
  packed = pack_ternary(absmean_quantize(_w((37, 24)))[0])
  for x in (jnp.zeros((0, 37), jnp.int8), jnp.zeros((2, 0, 37), jnp.float32)):
    got = packed_matmul(x, _layout(packed, layout), implementation=_impl(impl), **kw)
    assert got.shape == (*x.shape[:-1], 24) and got.size == 0


@pytest.mark.parametrize("m, k", [(1, 600), (1, 1024), (3, 1024), (6, 1024), (12, 600),
                                  (40, 600)])
def test_packed_matmul_default_tiles_by_rows_exact(m, k):
  """The row-dependent default tiles (vector up to 4 rows, K split in up to 8: the 3 K steps of
  K = 600 in 3 slices, the 4 of K = 1024 in 4; 16x64 split 8 at 6 rows, 16x64 at 12, 64x64 at
  40) compute the exact integer product (interpreter; the compiled run is gpu-marked)."""
  n = 72
  codes, _ = absmean_quantize(_w((k, n)))
  packed = pack_ternary(codes)
  x = jax.random.randint(jax.random.key(2), (m, k), -128, 128).astype(jnp.int8)
  got = packed_matmul(x, packed, implementation="pallas_gpu", interpret=True)
  np.testing.assert_array_equal(got, jnp.dot(x.astype(jnp.int32), codes.astype(jnp.int32)))


@LAYOUTS
@pytest.mark.parametrize("impl,kw", IMPLS, ids=[i for i, _ in IMPLS])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_packed_matmul_rescaled_matches_fake_quant(impl, kw, dtype, layout):
  """(x̃ @ W̃) · s_w / s_x equals the fake-quantized float matmul within the dtype tolerance."""
  w, x = _w((72, 20)), _w((2, 3, 72), seed=4)
  codes, s_w = absmean_quantize(w)
  xq, s_x = absmax_quantize(x)
  packed = _layout(pack_ternary(codes), layout)
  y = packed_matmul(xq, packed, implementation=_impl(impl), **kw) * (s_w / s_x)
  want = jnp.dot(int8_fake_quant(x), ternary_fake_quant(w))
  _testing.assert_allclose(y, want, dtype=jnp.float32, reduction_size=72, name="rescaled")
  # float activations straight on the packed weights
  xf = x.astype(dtype)
  yf = packed_matmul(xf, packed, implementation=_impl(impl), **kw)
  ref = packed_matmul(xf, pack_ternary(codes), implementation="reference")
  assert yf.dtype == jnp.float32 and yf.shape == (2, 3, 20)
  _testing.assert_allclose(yf, ref, dtype=dtype, reduction_size=72, name=f"float {impl}")


def test_dispatch():
  codes, _ = absmean_quantize(_w((8, 4)))
  packed, x = pack_ternary(codes), jnp.ones((2, 8), jnp.int8)
  if jax.default_backend() == "cpu":
    with pytest.raises(NotImplementedError, match="pallas_gpu"):
      packed_matmul(x, packed, implementation="pallas_gpu")
    with pytest.warns(UserWarning, match="skipping pallas_gpu"):
      y = packed_matmul(x, packed, implementation=("pallas_gpu", "xla"))
    np.testing.assert_array_equal(y, packed_matmul(x, packed, implementation="reference"))
  np.testing.assert_array_equal(packed_matmul(x, packed),
                                packed_matmul(x, packed, implementation="reference"))
  with pytest.raises(NotImplementedError, match="unknown implementation"):
    packed_matmul(x, packed, implementation="cuda")
  with pytest.raises(ValueError, match="need ceil"):
    packed_matmul(jnp.ones((2, 12), jnp.int8), packed)
  with pytest.raises(ValueError, match="uint8"):
    packed_matmul(x, codes)
  with pytest.raises(ValueError, match="int8"):
    packed_matmul(x.astype(jnp.int32), packed)
  with pytest.raises(ValueError, match="block_k"):
    BlockSizes(block_k=32)
  with pytest.raises(ValueError, match="split_k"):
    BlockSizes(split_k=3)
  with pytest.raises(ValueError, match="vector"):
    BlockSizes(vector=1)


@LAYOUTS
@pytest.mark.parametrize("split_k", [1, 4])
def test_vector_int_lanes_exact_at_the_extremes(split_k, layout):
  """The int8 vector path adds two columns per 32-bit multiply in 16-bit lanes: x = -128 with
  every code (and +127 with every code) exercises the lane borrow and the largest lane sums."""
  k, n = 512, 48
  codes = jnp.tile(jnp.array([[-1, 0, 1], [1, 1, -1], [-1, -1, -1], [1, 1, 1]], jnp.int8),
                   (k // 4, n // 3))
  packed = _layout(pack_ternary(codes), layout)
  bs = BlockSizes(block_n=16, block_k=64, split_k=split_k, vector=True)
  for fill in (-128, 127):
    x = jnp.full((2, k), fill, jnp.int8).at[1, ::3].set(-fill - 1)
    got = packed_matmul(x, packed, implementation="pallas_gpu", interpret=True, block_sizes=bs)
    np.testing.assert_array_equal(got, jnp.dot(x.astype(jnp.int32), codes.astype(jnp.int32)))


@LAYOUTS
@pytest.mark.parametrize("split_k", [2, 4, 8, 16])
def test_vector_uneven_k_slices_exact(split_k, layout):
  """11 K steps (K = 704 at block_k 64) do not divide into 2, 4, 8 or 16 slices: the vector form
  walks ranges of 6/5, 3/3/3/2, 2x5/1 and 1 step(s) instead of padding the weight."""
  codes, _ = absmean_quantize(_w((704, 40)))
  packed = _layout(pack_ternary(codes), layout)
  x = jax.random.randint(jax.random.key(3), (2, 704), -128, 128).astype(jnp.int8)
  bs = BlockSizes(block_n=16, block_k=64, split_k=split_k, vector=True)
  got = packed_matmul(x, packed, implementation="pallas_gpu", interpret=True, block_sizes=bs)
  np.testing.assert_array_equal(got, jnp.dot(x.astype(jnp.int32), codes.astype(jnp.int32)))
  xf = jax.random.normal(jax.random.key(4), (1, 704), jnp.float32)
  _testing.assert_allclose(
      packed_matmul(xf, packed, implementation="pallas_gpu", interpret=True, block_sizes=bs),
      packed_matmul(xf, packed, implementation="reference"), dtype=jnp.float32,
      reduction_size=704, name="float uneven")


def test_vector_form_reads_x_in_place():
  """At tile-aligned shapes the vector form passes x and the packed weight to the kernel as
  free bitcasts: no pad, no permutation (the dot form permutes x into planes every call)."""
  from memx.kernels.ternary import packed_matmul_pallas_gpu
  x = jax.ShapeDtypeStruct((1, 1024), jnp.int8)
  w = jax.ShapeDtypeStruct((256, 512), jnp.uint8)
  bs = BlockSizes(block_n=64, block_k=256, split_k=1, vector=True)
  jaxpr = jax.make_jaxpr(functools.partial(packed_matmul_pallas_gpu, block_sizes=bs,
                                           interpret=True))(x, w)
  prims = {e.primitive.name for e in jaxpr.jaxpr.eqns}
  assert "transpose" not in prims and "reduce_sum" not in prims, prims
  # Words go to the kernel as they are: no split back into bytes around it.
  words = jax.ShapeDtypeStruct((256, 128), jnp.int32)
  jaxpr = jax.make_jaxpr(functools.partial(packed_matmul_pallas_gpu, block_sizes=bs,
                                           interpret=True))(x, words)
  prims = {e.primitive.name for e in jaxpr.jaxpr.eqns}
  assert not prims & {"transpose", "reduce_sum", "shift_right_logical", "concatenate"}, prims
  dot_form = jax.make_jaxpr(functools.partial(
      packed_matmul_pallas_gpu, block_sizes=BlockSizes(block_m=16, block_n=64, block_k=256),
      interpret=True))(x, w)
  assert "transpose" in {e.primitive.name for e in dot_form.jaxpr.eqns}


@settings(max_examples=15, deadline=None)
@given(k=st.integers(1, 9), n=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_pack_unpack_roundtrip_property(k, n, seed):
  codes = np.random.default_rng(seed).integers(-1, 2, size=(k, n)).astype(np.int8)
  packed = pack_ternary(codes)
  assert packed.shape == (-(-k // 4), n)
  np.testing.assert_array_equal(unpack_ternary(packed, k), codes)


@pytest.mark.gpu
@pytest.mark.parametrize("m,k,n", [(1, 4096, 4096), (16, 4096, 11008), (128, 1000, 300),
                                   (2048, 512, 256)])  # one shape per default-tile row range
def test_packed_matmul_pallas_gpu_compiled(m, k, n):
  codes, _ = absmean_quantize(_w((k, n)))
  packed = pack_ternary(codes)
  x = jax.random.randint(jax.random.key(1), (m, k), -128, 128).astype(jnp.int8)
  np.testing.assert_array_equal(packed_matmul(x, packed, implementation="pallas_gpu"),
                                packed_matmul(x, packed, implementation="reference"))
  xb = jax.random.normal(jax.random.key(2), (m, k), jnp.bfloat16)
  _testing.assert_allclose(packed_matmul(xb, packed, implementation="pallas_gpu"),
                           packed_matmul(xb, packed, implementation="reference"),
                           dtype=jnp.bfloat16, reduction_size=k, name="bf16")



@pytest.mark.parametrize("split_k,vector,x_dtype", [(2, False, jnp.int8), (8, False, jnp.int8),
                                                    (4, True, jnp.int8), (4, True, jnp.bfloat16)])
def test_split_k_lowers_to_triton_for_h100(split_k, vector, x_dtype):
  """The split-K grid (K slices of one output tile) and the vector form (strided loads and
  stores, int32 word lanes) lower for CUDA at the decode shape."""
  from memx.kernels.ternary import packed_matmul_pallas_gpu
  x = jax.ShapeDtypeStruct((1, 4096), x_dtype)
  w = jax.ShapeDtypeStruct((packed_rows(4096), 4096), jnp.uint8)
  bs = BlockSizes(block_m=16, block_n=64, block_k=256, split_k=split_k, vector=vector)
  with jax.sharding.use_abstract_mesh(_testing.abstract_h100_mesh()):
    lowered = jax.jit(functools.partial(packed_matmul_pallas_gpu, block_sizes=bs)).trace(
        x, w).lower(lowering_platforms=("cuda",))
  assert "ternary_packed_matmul" in lowered.as_text()


@pytest.mark.gpu
@pytest.mark.parametrize("m,k,n,split_k", [(1, 4096, 4096, 1), (1, 4096, 11008, 4),
                                           (3, 1000, 300, 8), (1, 11008, 4096, 2)])
def test_vector_compiled(m, k, n, split_k):
  codes, _ = absmean_quantize(_w((k, n)))
  packed = pack_ternary(codes)
  bs = BlockSizes(block_n=64, block_k=256, split_k=split_k, vector=True)
  x = jax.random.randint(jax.random.key(1), (m, k), -128, 128).astype(jnp.int8)
  xb = jax.random.normal(jax.random.key(2), (m, k), jnp.bfloat16)
  for layout in ("bytes", "words"):
    w = _layout(packed, layout)
    np.testing.assert_array_equal(
        packed_matmul(x, w, implementation="pallas_gpu", block_sizes=bs),
        packed_matmul(x, packed, implementation="reference"))
    _testing.assert_allclose(packed_matmul(xb, w, implementation="pallas_gpu", block_sizes=bs),
                             packed_matmul(xb, packed, implementation="reference"),
                             dtype=jnp.bfloat16, reduction_size=k, name=f"bf16 vector {layout}")


@pytest.mark.gpu
@pytest.mark.parametrize("split_k", [4, 16])
def test_split_k_compiled_exact(split_k):
  codes, _ = absmean_quantize(_w((4096, 512)))
  packed = pack_ternary(codes)
  x = jax.random.randint(jax.random.key(1), (1, 4096), -128, 128).astype(jnp.int8)
  bs = BlockSizes(block_m=16, block_n=64, block_k=256, split_k=split_k)
  np.testing.assert_array_equal(
      packed_matmul(x, packed, implementation="pallas_gpu", block_sizes=bs),
      packed_matmul(x, packed, implementation="reference"))


@pytest.mark.parametrize("x_dtype", [jnp.int8, jnp.bfloat16])
@pytest.mark.parametrize("m", [1, 16, 300])
def test_pallas_kernel_lowers_to_triton_for_h100(m, x_dtype):
  """Lowers the packed matmul for CUDA (Triton IR) at the benchmark's decode and prefill shapes
  with the default tiles, on CPU: catches lowering errors before a GPU session."""
  from memx.kernels.ternary import packed_matmul_pallas_gpu
  x = jax.ShapeDtypeStruct((m, 4096), x_dtype)
  for w in (jax.ShapeDtypeStruct((packed_rows(4096), 11008), jnp.uint8),
            jax.ShapeDtypeStruct((packed_rows(4096), 11008 // 4), jnp.int32)):
    with jax.sharding.use_abstract_mesh(_testing.abstract_h100_mesh()):
      lowered = jax.jit(packed_matmul_pallas_gpu).trace(x, w).lower(
          lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1
    assert "ternary_packed_matmul" in text


@pytest.mark.parametrize("m,k,n", [(1, 4096, 4096), (16, 4096, 11008)])
def test_pallas_gpu_passes_the_packed_weight_uncopied(monkeypatch, m, k, n):
  """At tile-aligned K and N the padding of the packed weight is a no-op that XLA drops: the
  kernel reads the caller's buffer, not a fresh copy each call (a decode matmul is memory-bound,
  a copy would double its traffic). On CPU, with an opaque pure_callback in the kernel's place
  (an H100 compile showed the same: the weight parameter feeds the Triton custom call)."""
  import memx.kernels.ternary.pallas_gpu as pallas_gpu  # noqa: PLC0415

  def stand_in(kernel, *, out_shape, **_):
    return lambda *ops: jax.pure_callback(lambda *a: np.zeros(out_shape.shape, out_shape.dtype),
                                          out_shape, *ops)

  monkeypatch.setattr(pallas_gpu.pl, "pallas_call", stand_in)
  x = jax.ShapeDtypeStruct((m, k), jnp.int8)
  w = jax.ShapeDtypeStruct((packed_rows(k), n), jnp.uint8)
  text = jax.jit(pallas_gpu.packed_matmul_pallas_gpu).lower(x, w).compile().as_text()
  call = next(line for line in text.splitlines() if "custom-call(" in line)
  weight = next(line.split("=")[0].strip() for line in text.splitlines()
                if "parameter(1)" in line and "= u8[" in line and "ENTRY" not in line)
  assert f", {weight})" in call, call


def test_absmean_codes_against_numpy_and_by_hand():
  # Round to nearest, not towards zero: the other ternary tests check the quantizer only
  # against itself (in range, idempotent), which truncation also passes.
  w = np.array([[0.2, -0.6], [1.0, -1.4], [0.0, 2.0]], np.float32)  # mean|w| = 0.8667
  assert np.asarray(absmean_quantize(jnp.asarray(w))[0]).tolist() == [[0, -1], [1, -1], [0, 1]]
  w = np.random.default_rng(0).standard_normal((64, 48)).astype(np.float32)
  want = np.clip(np.rint(w / np.float32(np.abs(w).mean())), -1, 1)
  np.testing.assert_array_equal(np.asarray(absmean_quantize(jnp.asarray(w))[0]), want)


def test_packed_byte_format_is_pinned():
  # The export format, fixed by value: four codes per byte, the first in the low bits, each
  # stored as code + 1 (so a byte of zeros is 0x55). Pack and unpack sharing a changed bit
  # order would otherwise pass every round trip.
  codes = jnp.array([[-1], [0], [1], [1]], jnp.int8)
  assert np.asarray(pack_ternary(codes)).ravel().tolist() == [0b10_10_01_00]
  assert np.asarray(pack_ternary(jnp.zeros((4, 1), jnp.int8))).ravel().tolist() == [0x55]
