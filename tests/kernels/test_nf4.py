"""NF4 (QLoRA 4-bit NormalFloat) weights: levels, quantization, packing, double quantization and
the matmul on packed codes (reference, xla, Pallas interpret; a CUDA lowering check)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memx.kernels import _testing
from memx.kernels.nf4 import (
  NF4_LEVELS,
  BlockSizes,
  bits_per_weight,
  dequantize,
  dequantize_absmax,
  nf4_matmul,
  nf4_matmul_xla,
  pack_nibbles,
  quantize,
  quantize_absmax,
  unpack_nibbles,
)
from memx.kernels.nf4.pallas_gpu import k_step, n_tile

SMALL = BlockSizes(block_m=16, block_n=16, block_k=64)   # K steps of whole 32-row blocks
INSIDE = BlockSizes(block_m=16, block_n=32, block_k=32)  # K steps inside one 64-row block
MAX_HALF_GAP = float(np.max(np.diff(NF4_LEVELS.astype(np.float64)))) / 2


def _w(shape, seed=0, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


# --- levels ---------------------------------------------------------------------------------


def test_levels_match_the_qlora_construction():
  """Rebuilt from the paper: 9 quantiles of the positive half and 8 of the negative half of
  N(0, 1) between δ and ½ (both sets end at the median, whose quantile 0 is shared), normalised
  by the largest."""
  norm = pytest.importorskip("scipy.stats").norm
  delta = 0.5 * ((1 - 1 / (2 * 15)) + (1 - 1 / (2 * 16)))
  np.testing.assert_allclose(delta, 0.9677083, atol=1e-7)
  positive = norm.ppf(np.linspace(delta, 0.5, 9))   # 8 levels > 0, then 0
  negative = -norm.ppf(np.linspace(delta, 0.5, 8))  # 7 levels < 0, then 0
  np.testing.assert_allclose([positive[-1], negative[-1]], 0.0, atol=1e-12)
  levels = np.unique(np.concatenate([positive, negative])) / positive[0]
  assert levels.shape == (16,)
  assert NF4_LEVELS.dtype == np.float32 and NF4_LEVELS.shape == (16,)
  np.testing.assert_allclose(NF4_LEVELS, levels, rtol=0, atol=1e-6)
  assert (np.diff(NF4_LEVELS) > 0).all()
  assert NF4_LEVELS[0] == -1 and NF4_LEVELS[7] == 0 and NF4_LEVELS[15] == 1
  assert (NF4_LEVELS < 0).sum() == 7 and (NF4_LEVELS > 0).sum() == 8
  # bitsandbytes' published table, for one more independent check
  np.testing.assert_allclose(NF4_LEVELS[[1, 8, 14]], [-0.6961928, 0.0795803, 0.7229568],
                             atol=1e-6)


# --- quantization ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("block_size", [64, 16])
def test_quantize_picks_the_nearest_level(dtype, block_size):
  w = _w((128, 24), dtype=dtype) * 3
  codes, absmax = quantize(w, block_size=block_size)
  assert codes.dtype == jnp.uint8 and codes.shape == (64, 24)
  assert absmax.dtype == jnp.float32 and absmax.shape == (128 // block_size, 24)
  w64 = np.asarray(w, np.float64)
  blocks = np.abs(w64).reshape(-1, block_size, 24).max(axis=1)
  np.testing.assert_array_equal(absmax, blocks.astype(np.float32))
  v = w64 / np.repeat(blocks, block_size, axis=0)
  dist = np.abs(v[..., None] - NF4_LEVELS.astype(np.float64))  # brute force: all 16 levels
  got = np.asarray(unpack_nibbles(codes)).astype(np.int64)
  chosen = np.take_along_axis(dist, got[..., None], axis=-1)[..., 0]
  # float32 rounding of w / absmax can only matter within an ulp of a midpoint
  assert (chosen <= dist.min(axis=-1) + 1e-6).all()
  assert (got == dist.argmin(axis=-1)).mean() > 0.999


def test_ties_go_to_the_lower_level():
  """A value exactly on the (float32) midpoint of two levels takes the lower code."""
  mids = ((NF4_LEVELS[:-1].astype(np.float64) + NF4_LEVELS[1:]) / 2).astype(np.float32)
  col = np.concatenate([[1.0], mids]).astype(np.float32)  # absmax 1: v = w
  codes, absmax = quantize(jnp.asarray(col)[:, None], block_size=16)
  np.testing.assert_array_equal(absmax, [[1.0]])
  # row 0 is 1.0 (code 15); row i + 1 lies on the midpoint of levels i and i + 1: code i
  np.testing.assert_array_equal(unpack_nibbles(codes)[:, 0], [15, *range(15)])


def test_pack_unpack_are_inverse_and_byte_layout():
  rng = np.random.default_rng(0)
  c = rng.integers(0, 16, size=(10, 6)).astype(np.uint8)
  packed = pack_nibbles(c)
  assert packed.dtype == jnp.uint8 and packed.shape == (5, 6)
  np.testing.assert_array_equal(packed, c[0::2] | (c[1::2] << 4))  # row 2i low, 2i+1 high
  np.testing.assert_array_equal(unpack_nibbles(packed), c)
  b = rng.integers(0, 256, size=(7, 3)).astype(np.uint8)
  np.testing.assert_array_equal(pack_nibbles(unpack_nibbles(b)), b)
  np.testing.assert_array_equal(jax.jit(pack_nibbles)(c), packed)  # traced: no value check


def test_round_trip_error_is_bounded_by_half_the_largest_gap():
  w = _w((256, 40), seed=1) * 0.02
  codes, absmax = quantize(w)
  back = dequantize(codes, absmax)
  assert back.dtype == jnp.float32 and back.shape == w.shape
  bound = MAX_HALF_GAP * np.repeat(np.asarray(absmax), 64, axis=0) * (1 + 1e-6)
  err = np.abs(np.asarray(back) - np.asarray(w))
  assert (err <= bound).all(), float((err / bound).max())


def test_zeros_and_plus_minus_absmax_survive_and_zero_blocks_stay_finite():
  w = np.array(_w((128, 8), seed=2))
  w[3, :], w[70, 1] = 0.0, 0.0
  w[0:64, 2] = 0.0            # an all-zero block
  w[64:128, 3] = 0.0
  w[10, 4] = 5.0              # +absmax
  w[100, 5] = -7.5            # -absmax
  codes, absmax = quantize(jnp.asarray(w))
  back = np.asarray(dequantize(codes, absmax))
  assert np.isfinite(back).all()
  assert absmax[0, 2] == 0 and absmax[1, 3] == 0
  zeros = w == 0
  np.testing.assert_array_equal(back[zeros], 0.0)
  assert back[10, 4] == 5.0 and back[100, 5] == -7.5
  extremes = np.abs(w) == np.repeat(np.asarray(absmax), 64, axis=0)
  np.testing.assert_array_equal(back[extremes & ~zeros], w[extremes & ~zeros])
  codes2, absmax2 = quantize(jnp.zeros((64, 3)))
  np.testing.assert_array_equal(absmax2, 0.0)
  np.testing.assert_array_equal(dequantize(codes2, absmax2), 0.0)


# --- double quantization and storage -------------------------------------------------------


@pytest.mark.parametrize("shape,group_size", [((4, 96), 256), ((3, 7), 4), ((1, 5), 256)])
def test_double_quantization_error_bound(shape, group_size):
  absmax = jnp.abs(_w(shape, seed=3)) * 0.05 + 0.01
  q, scales, offset = quantize_absmax(absmax, group_size=group_size)
  groups = -(-absmax.size // group_size)
  assert q.dtype == jnp.int8 and q.shape == shape
  assert scales.dtype == jnp.float32 and scales.shape == (groups,)
  assert offset.dtype == jnp.float32 and offset.shape == ()
  np.testing.assert_allclose(offset, np.mean(np.asarray(absmax, np.float64)), rtol=1e-6)
  assert int(jnp.max(jnp.abs(q.astype(jnp.int32)))) == 127
  back = dequantize_absmax(q, scales, offset, group_size=group_size)
  assert back.dtype == jnp.float32 and back.shape == shape
  step = np.repeat(np.asarray(scales), group_size)[:absmax.size].reshape(shape)
  err = np.abs(np.asarray(back, np.float64) - np.asarray(absmax, np.float64))
  assert (err <= step / 2 + 1e-7).all()
  # constant absmax: every centred value is 0, the scales are 0, reconstruction is exact
  q, scales, offset = quantize_absmax(jnp.full((2, 3), 0.5), group_size=4)
  np.testing.assert_array_equal(scales, 0.0)
  np.testing.assert_array_equal(dequantize_absmax(q, scales, offset, group_size=4), 0.5)


@pytest.mark.parametrize("k,n,block_size,group_size", [(128, 48, 64, 256), (256, 64, 64, 256),
                                                       (96, 10, 32, 7), (64, 3, 16, None)])
def test_bits_per_weight_matches_the_arrays(k, n, block_size, group_size):
  codes, absmax = quantize(_w((k, n), seed=4), block_size=block_size)
  if group_size is None:
    stored = (codes, absmax)
  else:
    stored = (codes, *quantize_absmax(absmax, group_size=group_size))
  bits = 8 * sum(a.nbytes for a in stored)
  assert bits_per_weight(k, n, block_size, group_size) == pytest.approx(bits / (k * n), rel=1e-12)


def test_bits_per_weight_qlora_figure():
  k = n = 4096
  want = 4 + 8 / 64 + 32 / (64 * 256) + 32 / (k * n)
  assert bits_per_weight(k, n) == pytest.approx(want, rel=1e-12)
  assert round(bits_per_weight(k, n), 3) == 4.127
  assert bits_per_weight(k, n, 64, None) == 4.5


# --- matmul ---------------------------------------------------------------------------------

IMPLS = [("xla", {}), ("pallas_gpu", {"interpret": True, "block_sizes": SMALL}),
         ("pallas_gpu_inside_block", {"interpret": True, "block_sizes": INSIDE})]
IDS = [i for i, _ in IMPLS]


def _impl(name):
  return "pallas_gpu" if name.startswith("pallas_gpu") else name


def _weight(k, n, block_size=64, seed=0):
  return quantize(_w((k, n), seed=seed) * 0.05, block_size=block_size)


@pytest.mark.parametrize("impl,kw", IMPLS, ids=IDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("lead,k,n", [((5,), 128, 24), ((2, 9), 256, 32), ((16,), 64, 16)],
                         ids=["m5_n24", "m18_n32", "m16_n16"])
def test_matmul_matches_reference(impl, kw, dtype, lead, k, n):
  """M not a multiple of the tile (5, 18), N not a multiple of it (24 of 16-wide tiles)."""
  codes, absmax = _weight(k, n)
  x = _w((*lead, k), seed=5, dtype=dtype)
  want = nf4_matmul(x, codes, absmax, implementation="reference")
  assert want.dtype == dtype and want.shape == (*lead, n)
  w32 = dequantize(codes, absmax).astype(dtype).astype(jnp.float32)
  _testing.assert_allclose(want, jnp.dot(x.astype(jnp.float32), w32,
                                         precision=jax.lax.Precision.HIGHEST).astype(dtype),
                           dtype=dtype, reduction_size=k, name="reference")
  got = nf4_matmul(x, codes, absmax, implementation=_impl(impl), **kw)
  assert got.dtype == dtype and got.shape == (*lead, n)
  _testing.assert_allclose(got, want, dtype=dtype, reduction_size=k, name=impl)


@pytest.mark.parametrize("impl,kw", IMPLS, ids=IDS)
def test_matmul_float16_and_other_block_sizes(impl, kw):
  """float16 x; block_size 16 (a K step spans 2+ blocks) and 128 (a step inside one block)."""
  x = _w((3, 256), seed=6, dtype=jnp.float16)
  for block_size in (16, 128):
    codes, absmax = _weight(256, 16, block_size=block_size)
    want = nf4_matmul(x, codes, absmax, block_size=block_size, implementation="reference")
    got = nf4_matmul(x, codes, absmax, block_size=block_size, implementation=_impl(impl), **kw)
    assert got.dtype == jnp.float16
    _testing.assert_allclose(got, want, dtype=jnp.float16, reduction_size=256,
                             name=f"{impl} block {block_size}")


@pytest.mark.parametrize("impl,kw", IMPLS, ids=IDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gradients_match_reference(impl, kw, dtype):
  k, n = 128, 40
  codes, absmax = _weight(k, n, seed=7)
  x = _w((2, 5, k), seed=8, dtype=dtype)
  g = _w((2, 5, n), seed=9, dtype=dtype)

  def loss(name, kwargs):
    return lambda x, a: jnp.sum(
        nf4_matmul(x, codes, a, implementation=name, **kwargs).astype(jnp.float32) * g)

  dx_ref, da_ref = jax.grad(loss("reference", {}), argnums=(0, 1))(x, absmax)
  dx, da = jax.grad(loss(_impl(impl), kw), argnums=(0, 1))(x, absmax)
  assert dx.dtype == dtype and dx.shape == x.shape
  _testing.assert_allclose(dx, dx_ref, dtype=dtype, grad=True, reduction_size=n, name="dx")
  np.testing.assert_array_equal(da, 0.0)  # the base is frozen
  np.testing.assert_array_equal(da_ref, 0.0)


@pytest.mark.parametrize("impl,kw", IMPLS, ids=IDS)
def test_jit_and_empty_rows(impl, kw):
  codes, absmax = _weight(64, 16)
  x = _w((4, 64), seed=10)
  f = jax.jit(functools.partial(nf4_matmul, implementation=_impl(impl), **kw))
  _testing.assert_allclose(f(x, codes, absmax), nf4_matmul(x, codes, absmax,
                                                           implementation="reference"),
                           dtype=jnp.float32, reduction_size=64, name=f"jit {impl}")
  y = nf4_matmul(jnp.zeros((0, 64)), codes, absmax, implementation=_impl(impl), **kw)
  assert y.shape == (0, 16)


def test_quantize_under_jit_matches_eager():
  w = _w((128, 8), seed=11)
  for got, want in zip(jax.jit(quantize)(w), quantize(w), strict=True):
    np.testing.assert_array_equal(got, want)


def _avals(jaxpr):
  """Every abstract value in a closed jaxpr, inner loop bodies included."""
  for eqn in jaxpr.eqns:
    yield from (v.aval for v in eqn.outvars)
    for param in eqn.params.values():
      for sub in param if isinstance(param, tuple | list) else (param,):
        inner = getattr(sub, "jaxpr", None)
        if inner is not None:
          yield from _avals(inner if hasattr(inner, "eqns") else inner.jaxpr)


def test_xla_never_forms_the_full_weight():
  """Forward and backward of the xla form hold at most one [chunk, N] slice of the weight."""
  k, n, m = 2048, 32, 4
  codes, absmax = _weight(k, n)
  x = _w((m, k), seed=12)
  fn = lambda x: jnp.sum(nf4_matmul_xla(x, codes, absmax, block_size=64) ** 2)
  jaxpr = jax.make_jaxpr(jax.value_and_grad(fn))(x)
  big = [a.shape for a in _avals(jaxpr.jaxpr) if hasattr(a, "shape") and a.size >= k * n // 2]
  assert not big, big


def test_tile_choice():
  """K steps cover whole blocks or lie inside one and divide K; N tiles divide N when they can."""
  assert k_step(4096, 64, 128) == 128 and k_step(192, 64, 128) == 64
  assert k_step(512, 256, 128) == 128 and k_step(96, 32, 128) == 32
  assert k_step(96, 48, 128) is None and k_step(48, 16, 128) is None
  assert n_tile(11008, 64) == 64 and n_tile(96, 64) == 32 and n_tile(48, 32) == 16
  assert n_tile(40, 64) == 64 and n_tile(24, 16) == 16 and n_tile(8, 64) == 16


# --- input checks and dispatch --------------------------------------------------------------


def test_bad_inputs_raise_value_errors():
  codes, absmax = _weight(128, 16)
  x = jnp.ones((2, 128))
  bad_calls = [
      (lambda: quantize(jnp.ones((100, 4))), r"K = 100 is not a multiple of block_size = 64.*pad"),
      (lambda: quantize(jnp.ones((96, 4)), block_size=3), r"block_size = 3 .*even"),
      (lambda: quantize(jnp.ones((64, 4)), block_size=0), r"block_size = 0"),
      (lambda: quantize(jnp.ones(64)), r"\[K, N\]"),
      (lambda: quantize(jnp.ones((64, 4), jnp.int32)), "floating point"),
      (lambda: quantize(jnp.ones((64, 4)).at[5, 1].set(jnp.nan)), r"finite.*\(5, 1\)"),
      (lambda: pack_nibbles(jnp.array([[16], [0]])), r"\[0, 16\).*16.*\(0, 0\)"),
      (lambda: pack_nibbles(jnp.zeros((3, 2), jnp.uint8)), "K even"),
      (lambda: pack_nibbles(jnp.zeros((2, 2))), "integers"),
      (lambda: unpack_nibbles(jnp.zeros((2, 2), jnp.int8)), "uint8"),
      (lambda: dequantize(codes, absmax[:1]), r"absmax must be \[K/block_size, N\] = \[2, 16\]"),
      (lambda: dequantize(codes.astype(jnp.int8), absmax), "codes must be uint8"),
      (lambda: quantize_absmax(absmax, group_size=0), "group_size = 0"),
      (lambda: quantize_absmax(jnp.zeros((0, 3))), "empty"),
      (lambda: dequantize_absmax(jnp.zeros(5, jnp.int8), jnp.zeros(3), jnp.float32(0), 4),
       r"groups of 4 need float32 scales of shape \(2,\)"),
      (lambda: dequantize_absmax(jnp.zeros(5, jnp.int8), jnp.zeros(1), jnp.zeros(2), 256),
       "offset must be a float32 scalar"),
      (lambda: dequantize_absmax(jnp.zeros(5), jnp.zeros(1), jnp.float32(0)), "q must be int8"),
      (lambda: bits_per_weight(100, 4), "K = 100 is not a multiple"),
      (lambda: bits_per_weight(64, 0), "n = 0"),
      (lambda: nf4_matmul(x.astype(jnp.int8), codes, absmax), "x dtype int8 is not supported"),
      (lambda: nf4_matmul(jnp.ones(()), codes, absmax), r"x must be \[\.\.\., K\]"),
      (lambda: nf4_matmul(jnp.ones((2, 64)), codes, absmax), r"x has K = 64 .* K = 128 rows"),
      (lambda: nf4_matmul(x, codes.astype(jnp.int32), absmax), "codes must be uint8"),
      (lambda: nf4_matmul(x, codes[None], absmax), r"codes must be \[K/2, N\]"),
      (lambda: nf4_matmul(x, codes, absmax.astype(jnp.bfloat16)), "absmax must be float32"),
      (lambda: nf4_matmul(x, codes, absmax[:, :8]), r"absmax must be .*\[2, 16\].*got \[2, 8\]"),
      (lambda: nf4_matmul(x, codes, absmax[0]), r"absmax must be \[K/block_size, N\]"),
      (lambda: nf4_matmul(x, codes, absmax, block_size=48),
       r"K = 128 is not a multiple of block_size = 48"),
      (lambda: nf4_matmul(x, codes, absmax, block_size=7), r"block_size = 7 .*even"),
      (lambda: nf4_matmul(x, codes, absmax, block_sizes=(16, 16, 64)),
       "block_sizes must be a memx.kernels.nf4.BlockSizes"),
      (lambda: BlockSizes(block_k=16), "block_k"),
      (lambda: BlockSizes(block_n=24), "block_n"),
      (lambda: nf4_matmul_xla(x, codes, absmax, block_size=64, chunk=96), "chunk = 96"),
  ]
  for call, match in bad_calls:
    with pytest.raises(ValueError, match=match):
      call()


def test_dispatch():
  codes, absmax = _weight(128, 16)
  x = _w((2, 128), seed=13)
  want = nf4_matmul(x, codes, absmax, implementation="reference")
  if jax.default_backend() == "cpu":
    with pytest.raises(NotImplementedError, match="pallas_gpu"):
      nf4_matmul(x, codes, absmax, implementation="pallas_gpu")
    with pytest.warns(UserWarning, match="skipping pallas_gpu"):
      y = nf4_matmul(x, codes, absmax, implementation=("pallas_gpu", "xla"))
    _testing.assert_allclose(y, want, dtype=jnp.float32, name="fallback")
  _testing.assert_allclose(nf4_matmul(x, codes, absmax), want, dtype=jnp.float32, name="default")
  with pytest.raises(NotImplementedError, match="unknown implementation"):
    nf4_matmul(x, codes, absmax, implementation="cuda")
  # K = 96 in blocks of 48: no power-of-two K step serves it; xla does.
  codes, absmax = _weight(96, 16, block_size=48)
  x = _w((2, 96), seed=14)
  with pytest.raises(NotImplementedError, match="K = 96 with block_size = 48 has no K step"):
    nf4_matmul(x, codes, absmax, block_size=48, implementation="pallas_gpu", interpret=True)
  with pytest.warns(UserWarning, match="skipping pallas_gpu"):
    y = nf4_matmul(x, codes, absmax, block_size=48, implementation=("pallas_gpu", "xla"),
                   interpret=True)
  _testing.assert_allclose(y, nf4_matmul(x, codes, absmax, block_size=48,
                                         implementation="reference"),
                           dtype=jnp.float32, reduction_size=96, name="block 48")


# --- CUDA lowering (no GPU needed) and the compiled kernels (GPU only) ----------------------


def test_pallas_lowers_to_triton_for_h100(monkeypatch):
  """Forward and dx kernels go through the real Pallas→Triton lowering (answered as an H100)
  and verify: catches what the interpreter cannot (shapes Triton rejects, TF32 fp32 dots)."""
  registration = pytest.importorskip("jax._src.pallas.triton.pallas_call_registration")
  gpu_info = pytest.importorskip("jax._src.pallas.triton.gpu_info")
  if not hasattr(gpu_info, "GpuInfo") or not hasattr(registration, "lowering"):
    pytest.skip("this JAX's Pallas-Triton lowering has another layout")
  from memx.kernels.nf4 import api
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
  cases = [(5, 256, 40, 64, jnp.float32, None), (33, 512, 128, 16, jnp.bfloat16, None),
           (3, 256, 64, 256, jnp.float16, None), (1, 128, 16, 64, jnp.bfloat16, INSIDE)]
  for m, k, n, block_size, dtype, blocks in cases:
    codes, absmax = _weight(k, n, block_size=block_size)
    x = jnp.ones((m, k), dtype)
    fn = lambda x, c, a, bsz=block_size, blocks=blocks: jax.value_and_grad(
        lambda x: nf4_matmul(x, c, a, block_size=bsz, implementation="pallas_gpu",
                             block_sizes=blocks).astype(jnp.float32).sum())(x)
    with jax.sharding.use_abstract_mesh(_testing.abstract_h100_mesh()):
      jax.jit(fn).trace(x, codes, absmax).lower(lowering_platforms=("cuda",))
  assert len(modules) == 2 * len(cases)  # forward and dx per case
  dots = [line for mod in modules for line in mod.splitlines() if "tt.dot " in line]
  assert dots
  fp32 = [d for d in dots if "xf32> * tensor" in d and "inputPrecision = tf32" in d]
  assert not fp32, fp32[0]


@pytest.mark.gpu
@pytest.mark.parametrize("m,k,n", [(1, 4096, 4096), (37, 1024, 300), (512, 2048, 1024)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_pallas_gpu_compiled(m, k, n, dtype):
  codes, absmax = _weight(k, n)
  x = _w((m, k), seed=15, dtype=dtype)
  g = _w((m, n), seed=16, dtype=dtype)
  want, vjp_ref = jax.vjp(lambda x: nf4_matmul(x, codes, absmax, implementation="reference"), x)
  got, vjp = jax.vjp(lambda x: nf4_matmul(x, codes, absmax, implementation="pallas_gpu"), x)
  _testing.assert_allclose(got, want, dtype=dtype, reduction_size=k, name="forward")
  _testing.assert_allclose(vjp(g)[0], vjp_ref(g)[0], dtype=dtype, grad=True, reduction_size=n,
                           name="dx")
