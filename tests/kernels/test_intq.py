"""Group-wise affine integer weights (GPTQ / RTN): group parameters, round-to-nearest, packing,
storage cost and the matmul on packed codes (reference, xla, Pallas interpret; a CUDA lowering
check)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memx.kernels import _testing
from memx.kernels.intq import (
  BITS,
  BlockSizes,
  bits_per_weight,
  codes_per_byte,
  dequantize,
  group_params,
  intq_matmul,
  intq_matmul_xla,
  pack,
  quantize_rtn,
  quantize_with,
  unpack,
)
from memx.kernels.intq.pallas_gpu import k_step, min_k_step, n_tile
from memx.kernels.intq.xla import chunk_rows

SMALL = BlockSizes(block_m=16, block_n=16, block_k=64)
WIDE = BlockSizes(block_m=32, block_n=32, block_k=128)


def _w(shape, seed=0, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


# --- round-to-nearest against a float64 NumPy transcription ---------------------------------


def _numpy_params(w, bits, group_size):
  """The rule of memx.kernels.intq.reference, in float64: range widened to hold 0, a constant
  group c gets scale |c| (1 for c = 0)."""
  qmax = 2 ** bits - 1
  k, n = w.shape
  g = w.astype(np.float64).reshape(k // group_size, group_size, n)
  wmin, wmax = g.min(axis=1), g.max(axis=1)
  lo, hi = np.minimum(wmin, 0), np.maximum(wmax, 0)
  scale = np.where(wmin == wmax, np.where(wmin != 0, np.abs(wmin), 1.0), (hi - lo) / qmax)
  zero = np.clip(np.round(-lo / scale), 0, qmax)
  return scale, zero


def _near_tie(v, tol=1e-5):
  """Where round(v) may go either way between float32 and float64 arithmetic."""
  return np.abs(np.abs(v - np.floor(v)) - 0.5) < tol


def _special_weight(k=128, n=12, group_size=32, seed=0):
  """Random columns, plus constant groups (c > 0, c < 0), all-zero groups, groups of one sign
  and a group holding exact zeros."""
  w = np.array(_w((k, n), seed=seed))
  w[0:group_size, 0] = 0.75
  w[group_size:2 * group_size, 1] = -1.25
  w[0:group_size, 2] = 0.0
  w[:, 3] = 0.0
  w[0:group_size, 4] = np.abs(w[0:group_size, 4]) + 3.0   # all positive, far from 0
  w[0:group_size, 5] = -np.abs(w[0:group_size, 5]) - 2.0  # all negative
  w[3:9, 6] = 0.0
  w[0:group_size, 7] = 1e-30                              # constant, tiny
  return w


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", [32, 8])
def test_rtn_matches_numpy_transcription(bits, group_size):
  w = _special_weight(group_size=group_size, seed=bits)
  codes, scales, zeros = quantize_rtn(jnp.asarray(w), bits, group_size)
  k, n = w.shape
  assert codes.dtype == jnp.uint8 and codes.shape == (k, n)
  assert scales.dtype == jnp.float32 and scales.shape == (k // group_size, n)
  assert zeros.dtype == jnp.float32 and zeros.shape == (k // group_size, n)
  want_s, want_z = _numpy_params(w, bits, group_size)
  np.testing.assert_allclose(scales, want_s, rtol=1e-6)
  np.testing.assert_array_equal(zeros, want_z)
  assert np.all(np.asarray(scales) > 0) and np.all(np.isfinite(np.asarray(scales)))
  # codes: the float64 rule on the returned (float32) parameters
  s = np.repeat(np.asarray(scales, np.float64), group_size, axis=0)
  z = np.repeat(np.asarray(zeros, np.float64), group_size, axis=0)
  v = w.astype(np.float64) / s
  want = np.clip(np.round(v) + z, 0, 2 ** bits - 1)
  got = np.asarray(codes).astype(np.float64)
  differ = got != want
  assert not (differ & ~_near_tie(v)).any()
  assert (np.abs(got - want) <= 1).all()
  assert got.max() <= 2 ** bits - 1


@pytest.mark.parametrize("bits", BITS)
def test_constant_and_zero_groups_dequantize_exactly(bits):
  w = _special_weight(seed=1)
  codes, scales, zeros = quantize_rtn(jnp.asarray(w), bits, 32)
  back = np.asarray(dequantize(codes, scales, zeros, 32))
  assert np.isfinite(back).all()
  np.testing.assert_array_equal(back[0:32, 0], 0.75)
  np.testing.assert_array_equal(back[32:64, 1], -1.25)
  np.testing.assert_array_equal(back[0:32, 7], np.float32(1e-30))
  np.testing.assert_array_equal(back[w == 0], 0.0)  # 0 is always on the grid
  codes, scales, zeros = quantize_rtn(jnp.zeros((16, 3)), bits, 8)
  np.testing.assert_array_equal(scales, 1.0)
  np.testing.assert_array_equal(dequantize(codes, scales, zeros, 8), 0.0)


def test_group_params_plain_min_max_when_the_group_holds_both_signs():
  """The brief's rule (s = (max − min) / (2^bits − 1), z = round(−min / s)) for a group that
  straddles 0; no NaN anywhere."""
  wmin = jnp.array([-1.0, -0.2, 0.0, 0.5, -3.0, 0.0])
  wmax = jnp.array([2.0, 0.1, 0.0, 0.5, -3.0, 4.0])
  s, z = group_params(wmin, wmax, 4)
  np.testing.assert_allclose(s[:2], (np.array([2.0, 0.1]) - [-1.0, -0.2]) / 15, rtol=1e-6)
  np.testing.assert_array_equal(z[:2], np.round(np.array([1.0, 0.2]) / np.asarray(s[:2])))
  np.testing.assert_array_equal(s[2:5], [1.0, 0.5, 3.0])  # constant groups
  np.testing.assert_array_equal(z[2:5], [0.0, 0.0, 1.0])
  np.testing.assert_allclose(s[5], 4.0 / 15, rtol=1e-6)
  assert z[5] == 0


@pytest.mark.parametrize("bits", BITS)
def test_quantize_with_equals_rtn_given_its_params(bits):
  w = jnp.asarray(_special_weight(seed=2))
  codes, scales, zeros = quantize_rtn(w, bits, 32)
  np.testing.assert_array_equal(quantize_with(w, scales, zeros, bits), codes)
  np.testing.assert_array_equal(jax.jit(quantize_with, static_argnums=3)(w, scales, zeros, bits),
                                codes)
  # GPTQ's use: one row at a time with its group's parameters ([1, N] each)
  rows = [quantize_with(w[r][None], scales[r // 32][None], zeros[r // 32][None], bits)
          for r in (0, 33, 127)]
  np.testing.assert_array_equal(jnp.concatenate(rows), codes[jnp.array([0, 33, 127])])


def test_quantize_under_jit_matches_eager():
  w = _w((128, 8), seed=3)
  f = jax.jit(quantize_rtn, static_argnums=(1, 2))
  for got, want in zip(f(w, 3, 32), quantize_rtn(w, 3, 32), strict=True):
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("bits", BITS)
def test_round_trip_error_is_at_most_half_a_step(bits):
  w = jnp.asarray(_special_weight(seed=4)) * 0.02
  w = w.at[:, 8].add(0.5)  # whole columns of one sign
  codes, scales, zeros = quantize_rtn(w, bits, 32)
  back = dequantize(codes, scales, zeros, 32)
  assert back.dtype == jnp.float32 and back.shape == w.shape
  half = np.repeat(np.asarray(scales, np.float64), 32, axis=0) / 2
  err = np.abs(np.asarray(back, np.float64) - np.asarray(w, np.float64))
  assert (err <= half * (1 + 1e-5) + 1e-12).all(), float((err / half).max())


# --- packing and storage --------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
def test_pack_unpack_are_inverse_and_byte_layout(bits):
  rng = np.random.default_rng(bits)
  per = codes_per_byte(bits)
  container = 8 // per
  c = rng.integers(0, 2 ** bits, size=(8 * per, 5)).astype(np.uint8)
  packed = pack(c, bits)
  assert packed.dtype == jnp.uint8 and packed.shape == (8 * per * container // 8, 5)
  want = np.zeros((8, 5), np.uint8)
  for i in range(per):  # row per·j + i at bits [i·container, (i+1)·container)
    want |= (c[i::per] << (i * container)).astype(np.uint8)
  np.testing.assert_array_equal(packed, want)
  np.testing.assert_array_equal(unpack(packed, bits, 8 * per), c)
  np.testing.assert_array_equal(jax.jit(pack, static_argnums=1)(c, bits), packed)  # traced
  # every byte a valid packing of codes round-trips too
  b = rng.integers(0, 256, size=(6, 3)).astype(np.uint8)
  if bits == 3:
    b &= 0x77  # 3-bit codes in 4-bit containers: the top bit of each nibble is 0
  np.testing.assert_array_equal(pack(unpack(b, bits, 6 * per), bits), b)


@pytest.mark.parametrize("k,n,bits,group_size", [(128, 48, 4, 128), (256, 10, 3, 64),
                                                 (64, 3, 2, 4), (96, 7, 8, 32), (64, 5, 2, 64)])
def test_bits_per_weight_matches_the_arrays(k, n, bits, group_size):
  codes, scales, zeros = quantize_rtn(_w((k, n), seed=5), bits, group_size)
  stored = (pack(codes, bits), scales, zeros)
  total = 8 * sum(a.nbytes for a in stored)
  assert bits_per_weight(k, n, bits, group_size) == pytest.approx(total / (k * n), rel=1e-12)


def test_bits_per_weight_figures():
  assert bits_per_weight(4096, 4096, 4, 128) == 4.5
  assert bits_per_weight(4096, 4096, 3, 128) == 4.5  # stored in 4-bit containers
  assert bits_per_weight(4096, 4096, 2, 64) == 3.0
  assert bits_per_weight(4096, 4096, 8, 4096) == 8 + 64 / 4096


# --- matmul ---------------------------------------------------------------------------------

IMPLS = [("xla", {}), ("pallas_gpu", {"interpret": True, "block_sizes": SMALL}),
         ("pallas_gpu_wide", {"interpret": True, "block_sizes": WIDE})]
IDS = [i for i, _ in IMPLS]


def _impl(name):
  return "pallas_gpu" if name.startswith("pallas_gpu") else name


def _weight(k, n, bits, group_size, seed=0):
  codes, scales, zeros = quantize_rtn(_w((k, n), seed=seed) * 0.05, bits, group_size)
  return pack(codes, bits), scales, zeros


# (lead, K, N, bits, group_size): K steps of 64 rows (SMALL) / 128 (WIDE) cover several groups
# (4-bit, 8-bit), exactly one (3-bit), or lie inside one (2-bit, groups of 128); M = 5, 18 are
# not multiples of the 16/32-row tiles and N = 24 not of the 16/32-column ones.
CASES = [((5,), 128, 24, 4, 32), ((2, 9), 256, 32, 2, 128), ((3,), 192, 16, 3, 64),
         ((16,), 64, 16, 8, 16)]
CASE_IDS = ["m5_k128_n24_b4_g32", "m18_k256_n32_b2_g128", "m3_k192_n16_b3_g64",
            "m16_k64_n16_b8_g16"]


@pytest.mark.parametrize("impl,kw", IMPLS, ids=IDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("lead,k,n,bits,group_size", CASES, ids=CASE_IDS)
def test_matmul_matches_reference(impl, kw, dtype, lead, k, n, bits, group_size):
  packed, scales, zeros = _weight(k, n, bits, group_size)
  x = _w((*lead, k), seed=6, dtype=dtype)
  call = functools.partial(intq_matmul, bits=bits, group_size=group_size)
  want = call(x, packed, scales, zeros, implementation="reference")
  assert want.dtype == dtype and want.shape == (*lead, n)
  w = dequantize(unpack(packed, bits, k), scales, zeros, group_size)
  w32 = w.astype(dtype).astype(jnp.float32)
  _testing.assert_allclose(want, jnp.dot(x.astype(jnp.float32), w32,
                                         precision=jax.lax.Precision.HIGHEST).astype(dtype),
                           dtype=dtype, reduction_size=k, name="reference")
  got = call(x, packed, scales, zeros, implementation=_impl(impl), **kw)
  assert got.dtype == dtype and got.shape == (*lead, n)
  _testing.assert_allclose(got, want, dtype=dtype, reduction_size=k, name=impl)


@pytest.mark.parametrize("impl,kw", IMPLS, ids=IDS)
def test_matmul_float16_and_one_group_per_column(impl, kw):
  """float16 x; group_size = K (GPTQ's "no groups"): every K step (and xla chunk) lies inside
  the one group."""
  x = _w((3, 512), seed=7, dtype=jnp.float16)
  for bits in (4, 2):
    packed, scales, zeros = _weight(512, 16, bits, 512, seed=bits)
    call = functools.partial(intq_matmul, bits=bits, group_size=512)
    want = call(x, packed, scales, zeros, implementation="reference")
    got = call(x, packed, scales, zeros, implementation=_impl(impl), **kw)
    assert got.dtype == jnp.float16
    _testing.assert_allclose(got, want, dtype=jnp.float16, reduction_size=512,
                             name=f"{impl} bits {bits}")


@pytest.mark.parametrize("impl,kw", IMPLS, ids=IDS)
@pytest.mark.parametrize("bits,group_size,dtype", [(3, 32, jnp.float32), (3, 32, jnp.bfloat16),
                                                   (2, 64, jnp.float32), (8, 128, jnp.bfloat16)],
                         ids=["b3_g32_f32", "b3_g32_bf16", "b2_g64_f32", "b8_g128_bf16"])
def test_gradients_match_reference(impl, kw, bits, group_size, dtype):
  k, n = 128, 40
  packed, scales, zeros = _weight(k, n, bits, group_size, seed=8)
  x = _w((2, 5, k), seed=9, dtype=dtype)
  g = _w((2, 5, n), seed=10, dtype=dtype)

  def loss(name, kwargs):
    return lambda x, s, z: jnp.sum(intq_matmul(
        x, packed, s, z, bits=bits, group_size=group_size, implementation=name,
        **kwargs).astype(jnp.float32) * g)

  dx_ref, ds_ref, dz_ref = jax.grad(loss("reference", {}), argnums=(0, 1, 2))(x, scales, zeros)
  dx, ds, dz = jax.grad(loss(_impl(impl), kw), argnums=(0, 1, 2))(x, scales, zeros)
  assert dx.dtype == dtype and dx.shape == x.shape
  _testing.assert_allclose(dx, dx_ref, dtype=dtype, grad=True, reduction_size=n, name="dx")
  for d in (ds, dz, ds_ref, dz_ref):  # the base is frozen
    np.testing.assert_array_equal(d, 0.0)


@pytest.mark.parametrize("impl,kw", IMPLS, ids=IDS)
def test_jit_and_empty_rows(impl, kw):
  packed, scales, zeros = _weight(64, 16, 4, 32)
  x = _w((4, 64), seed=11)
  call = functools.partial(intq_matmul, bits=4, group_size=32)
  f = jax.jit(functools.partial(call, implementation=_impl(impl), **kw))
  _testing.assert_allclose(f(x, packed, scales, zeros),
                           call(x, packed, scales, zeros, implementation="reference"),
                           dtype=jnp.float32, reduction_size=64, name=f"jit {impl}")
  y = call(jnp.zeros((0, 64)), packed, scales, zeros, implementation=_impl(impl), **kw)
  assert y.shape == (0, 16)


def _avals(jaxpr):
  """Every abstract value in a closed jaxpr, inner loop bodies included."""
  for eqn in jaxpr.eqns:
    yield from (v.aval for v in eqn.outvars)
    for param in eqn.params.values():
      for sub in param if isinstance(param, tuple | list) else (param,):
        inner = getattr(sub, "jaxpr", None)
        if inner is not None:
          yield from _avals(inner if hasattr(inner, "eqns") else inner.jaxpr)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_xla_never_forms_the_full_weight(bits):
  """Forward and backward of the xla form hold at most one [chunk, N] slice of the weight
  (chunk = 256 of K = 2048 rows): nothing float of a quarter of the weight's size or more,
  nothing at all of its size (not even unpacked codes)."""
  k, n, m = 2048, 32, 4
  packed, scales, zeros = _weight(k, n, bits, 128)
  x = _w((m, k), seed=12)
  fn = lambda x: jnp.sum(intq_matmul_xla(x, packed, scales, zeros, bits=bits,
                                         group_size=128) ** 2)
  jaxpr = jax.make_jaxpr(jax.value_and_grad(fn))(x)
  avals = [a for a in _avals(jaxpr.jaxpr) if hasattr(a, "shape")]
  big = [(a.dtype, a.shape) for a in avals
         if a.size >= k * n or (jnp.issubdtype(a.dtype, jnp.floating) and a.size >= k * n // 4)]
  assert not big, big


def test_tile_choice():
  """K steps fill a dot (16·per rows), divide K and cover whole groups or lie inside one; N
  tiles divide N when they can; xla chunks likewise."""
  assert [min_k_step(b) for b in (2, 3, 4, 8)] == [64, 32, 32, 16]
  assert k_step(4096, 128, 4, 128) == 128 and k_step(192, 64, 4, 128) == 64
  assert k_step(4096, 4096, 2, 128) == 128 and k_step(96, 32, 8, 128) == 32
  assert k_step(96, 32, 2, 128) is None and k_step(96, 48, 4, 128) is None
  assert k_step(64, 16, 2, 32) is None and k_step(48, 16, 8, 128) == 16
  assert n_tile(11008, 64) == 64 and n_tile(96, 64) == 32 and n_tile(40, 64) == 64
  assert chunk_rows(2048, 128, 4) == 256 and chunk_rows(4096, 4096, 2) == 256
  assert chunk_rows(192, 64, 4) == 192 and chunk_rows(96, 48, 2) == 96
  assert chunk_rows(1000, 1000, 8) == 250 and chunk_rows(12, 12, 2) == 12


# --- input checks and dispatch --------------------------------------------------------------


def test_bad_inputs_raise_value_errors():
  packed, scales, zeros = _weight(128, 16, 4, 32)
  codes = unpack(packed, 4, 128)
  x = jnp.ones((2, 128))
  mm = functools.partial(intq_matmul, bits=4, group_size=32)
  bad_calls = [
      (lambda: quantize_rtn(jnp.ones((100, 4)), 4, 32),
       r"K = 100 is not a multiple of group_size = 32.*pad"),
      (lambda: quantize_rtn(jnp.ones((64, 4)), 5, 32), r"bits = 5 .*one of 2, 3, 4, 8"),
      (lambda: quantize_rtn(jnp.ones((64, 4)), True, 32), r"bits = True"),
      (lambda: quantize_rtn(jnp.ones((64, 4)), 4, 0), r"group_size = 0 .*int >= 1"),
      (lambda: quantize_rtn(jnp.ones(64), 4, 32), r"\[K, N\]"),
      (lambda: quantize_rtn(jnp.ones((64, 4), jnp.int32), 4, 32), "floating point"),
      (lambda: quantize_rtn(jnp.ones((64, 4)).at[5, 1].set(jnp.inf), 4, 32),
       r"finite.*\(5, 1\)"),
      (lambda: group_params(jnp.zeros(3), jnp.zeros(4), 4), "one shape"),
      (lambda: group_params(jnp.zeros(3), jnp.zeros(3), 6), "bits = 6"),
      (lambda: quantize_with(jnp.ones((64, 4)), jnp.ones((3, 4)), jnp.zeros((3, 4)), 4),
       r"G groups dividing K = 64"),
      (lambda: quantize_with(jnp.ones((64, 4)), jnp.ones((2, 4)), jnp.zeros((2, 3)), 4),
       r"zeros of shape \[K/group_size, N\] = \[2, 4\]; got \[2, 3\]"),
      (lambda: quantize_with(jnp.ones((64, 4)), jnp.zeros((2, 4)), jnp.zeros((2, 4)), 4),
       r"scales must be positive and finite.*\(0, 0\)"),
      (lambda: quantize_with(jnp.ones((64, 4)), jnp.ones((2, 4), jnp.bfloat16),
                             jnp.zeros((2, 4)), 4), "scales must be float32"),
      (lambda: pack(jnp.array([[16], [0]]), 4), r"\[0, 16\).*16.*\(0, 0\)"),
      (lambda: pack(jnp.array([[8], [0]]), 3), r"\[0, 8\) for bits = 3.*\(0, 0\)"),
      (lambda: pack(jnp.zeros((6, 2), jnp.uint8), 2), "multiple of 4"),
      (lambda: pack(jnp.zeros((2, 2)), 4), "integers"),
      (lambda: unpack(jnp.zeros((2, 2), jnp.int8), 4, 4), "uint8"),
      (lambda: unpack(jnp.zeros((2, 2), jnp.uint8), 2, 4), r"k must be 8"),
      (lambda: dequantize(codes, scales[:1], zeros, 32),
       r"scales of shape \[K/group_size, N\] = \[4, 16\]"),
      (lambda: dequantize(codes.astype(jnp.int8), scales, zeros, 32), "codes must be uint8"),
      (lambda: dequantize(packed, scales, zeros, 32),  # packed, not unpacked: K = 64
       r"K = 64 rows .*scales of shape \[K/group_size, N\] = \[2, 16\]; got \[4, 16\]"),
      (lambda: dequantize(codes, scales, zeros.astype(jnp.int32), 32), "zeros must be float32"),
      (lambda: bits_per_weight(100, 4, 4, 32), "K = 100 is not a multiple"),
      (lambda: bits_per_weight(64, 0, 4, 32), "n = 0"),
      (lambda: bits_per_weight(64, 4, 2, 6), r"group_size = 6 .*multiple of 4"),
      (lambda: mm(x.astype(jnp.int8), packed, scales, zeros), "x dtype int8 is not supported"),
      (lambda: mm(jnp.ones(()), packed, scales, zeros), r"x must be \[\.\.\., K\]"),
      (lambda: mm(jnp.ones((2, 64)), packed, scales, zeros), r"x has K = 64 .* K = 128 rows"),
      (lambda: mm(x, packed.astype(jnp.int32), scales, zeros), "packed must be uint8"),
      (lambda: mm(x, packed[None], scales, zeros), r"packed must be \[K·4/8, N\]"),
      (lambda: mm(x, packed, scales.astype(jnp.bfloat16), zeros), "scales must be float32"),
      (lambda: mm(x, packed, scales, zeros[:, :8]), r"zeros of shape .*\[4, 16\]; got \[4, 8\]"),
      (lambda: mm(x, packed, scales[0], zeros), r"scales must be \[K/group_size, N\]"),
      (lambda: intq_matmul(x, packed, scales, zeros, bits=4, group_size=48),
       r"K = 128 is not a multiple of group_size = 48"),
      (lambda: intq_matmul(x, packed, scales, zeros, bits=4, group_size=7),
       r"group_size = 7 is not allowed for bits = 4: it must be a multiple of 2"),
      (lambda: intq_matmul(x, packed, scales, zeros, bits=5, group_size=32), "bits = 5"),
      (lambda: mm(x, packed, scales, zeros, block_sizes=(16, 16, 64)),
       "block_sizes must be a memx.kernels.intq.BlockSizes"),
      (lambda: BlockSizes(block_k=8), "block_k"),
      (lambda: BlockSizes(block_n=24), "block_n"),
      (lambda: intq_matmul_xla(x, packed, scales, zeros, bits=4, group_size=32, chunk=96),
       "chunk = 96"),
  ]
  for call, match in bad_calls:
    with pytest.raises(ValueError, match=match):
      call()


def test_dispatch():
  packed, scales, zeros = _weight(128, 16, 4, 32)
  x = _w((2, 128), seed=13)
  call = functools.partial(intq_matmul, bits=4, group_size=32)
  want = call(x, packed, scales, zeros, implementation="reference")
  if jax.default_backend() == "cpu":
    with pytest.raises(NotImplementedError, match="pallas_gpu"):
      call(x, packed, scales, zeros, implementation="pallas_gpu")
    with pytest.warns(UserWarning, match="skipping pallas_gpu"):
      y = call(x, packed, scales, zeros, implementation=("pallas_gpu", "xla"))
    _testing.assert_allclose(y, want, dtype=jnp.float32, name="fallback")
  _testing.assert_allclose(call(x, packed, scales, zeros), want, dtype=jnp.float32,
                           name="default")
  with pytest.raises(NotImplementedError, match="unknown implementation"):
    call(x, packed, scales, zeros, implementation="cuda")
  # 2-bit, K = 96 in groups of 32: a step must be >= 64 rows and divide 96; xla serves it.
  packed, scales, zeros = _weight(96, 16, 2, 32)
  x = _w((2, 96), seed=14)
  call = functools.partial(intq_matmul, bits=2, group_size=32)
  with pytest.raises(NotImplementedError,
                     match="K = 96 with group_size = 32 at bits = 2 has no K step"):
    call(x, packed, scales, zeros, implementation="pallas_gpu", interpret=True)
  with pytest.warns(UserWarning, match="skipping pallas_gpu"):
    y = call(x, packed, scales, zeros, implementation=("pallas_gpu", "xla"), interpret=True)
  _testing.assert_allclose(y, call(x, packed, scales, zeros, implementation="reference"),
                           dtype=jnp.float32, reduction_size=96, name="2-bit K 96")


# --- CUDA lowering (no GPU needed) and the compiled kernels (GPU only) ----------------------


def test_pallas_lowers_to_triton_for_h100(monkeypatch):
  """Forward and dx kernels go through the real Pallas→Triton lowering (answered as an H100)
  and verify: catches what the interpreter cannot (shapes Triton rejects, TF32 fp32 dots)."""
  registration = pytest.importorskip("jax._src.pallas.triton.pallas_call_registration")
  gpu_info = pytest.importorskip("jax._src.pallas.triton.gpu_info")
  if not hasattr(gpu_info, "GpuInfo") or not hasattr(registration, "lowering"):
    pytest.skip("this JAX's Pallas-Triton lowering has another layout")
  from memx.kernels.intq import api
  h100 = gpu_info.GpuInfo(gpu_version=None, arch_name="9.0", compute_capability=90)
  monkeypatch.setattr(registration.gpu_info_lib, "get_gpu_info", lambda: h100)
  monkeypatch.setattr(api, "gpu_backend", lambda: True)
  modules = []
  lower = registration.lowering.lower_jaxpr_to_triton_module

  def capture(*args, **kwargs):
    result = lower(*args, **kwargs)
    assert result.module.operation.verify()
    modules.append(result.module.operation.get_asm())
    return result

  monkeypatch.setattr(registration.lowering, "lower_jaxpr_to_triton_module", capture)
  # (M, K, N, bits, group_size, dtype, tiles): steps over several groups, one group, inside a
  # group; every bits value; N = 48 (a padded dx width that is not a power of two).
  cases = [(5, 256, 40, 4, 32, jnp.float32, None), (33, 512, 128, 2, 128, jnp.bfloat16, None),
           (3, 384, 48, 3, 128, jnp.float16, None), (1, 256, 64, 8, 256, jnp.bfloat16, None),
           (7, 128, 16, 4, 16, jnp.bfloat16, SMALL)]
  for m, k, n, bits, group_size, dtype, blocks in cases:
    packed, scales, zeros = _weight(k, n, bits, group_size)
    x = jnp.ones((m, k), dtype)
    fn = lambda x, p, s, z, bits=bits, gs=group_size, blocks=blocks: jax.value_and_grad(
        lambda x: intq_matmul(x, p, s, z, bits=bits, group_size=gs, implementation="pallas_gpu",
                              block_sizes=blocks).astype(jnp.float32).sum())(x)
    with jax.sharding.use_abstract_mesh(_testing.abstract_h100_mesh()):
      jax.jit(fn).trace(x, packed, scales, zeros).lower(lowering_platforms=("cuda",))
  assert len(modules) == 2 * len(cases)  # forward and dx per case
  dots = [line for mod in modules for line in mod.splitlines() if "tt.dot " in line]
  assert dots
  fp32 = [d for d in dots if "xf32> * tensor" in d and "inputPrecision = tf32" in d]
  assert not fp32, fp32[0]


@pytest.mark.gpu
@pytest.mark.parametrize("m,k,n,bits,group_size", [(1, 4096, 4096, 4, 128),
                                                   (37, 1024, 300, 3, 128),
                                                   (512, 2048, 1024, 2, 64),
                                                   (64, 4096, 512, 8, 4096)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_pallas_gpu_compiled(m, k, n, bits, group_size, dtype):
  packed, scales, zeros = _weight(k, n, bits, group_size)
  x = _w((m, k), seed=15, dtype=dtype)
  g = _w((m, n), seed=16, dtype=dtype)
  call = functools.partial(intq_matmul, bits=bits, group_size=group_size)
  want, vjp_ref = jax.vjp(lambda x: call(x, packed, scales, zeros, implementation="reference"), x)
  got, vjp = jax.vjp(lambda x: call(x, packed, scales, zeros, implementation="pallas_gpu"), x)
  _testing.assert_allclose(got, want, dtype=dtype, reduction_size=k, name="forward")
  _testing.assert_allclose(vjp(g)[0], vjp_ref(g)[0], dtype=dtype, grad=True, reduction_size=n,
                           name="dx")
