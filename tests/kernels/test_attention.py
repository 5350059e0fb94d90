"""Attention implementations vs the reference: values and gradients, dispatch, bad input."""

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memx.kernels import _testing
from memx.kernels.attention import (
    CAUSAL,
    BlockSizes,
    BlockSparse,
    Mask,
    attention,
    attention_reference,
    cudnn,
)
from memx.kernels.attention import api as attention_api

BS16 = BlockSizes(block_q=16, block_k=16, block_q_dkv=16, block_k_dkv=16, block_q_dq=16,
                  block_k_dq=16)
# Different tiles per pass, so forward, dK/dV and dQ schedules all differ.
BS_MIX = BlockSizes(block_q=32, block_k=16, block_q_dkv=16, block_k_dkv=32, block_q_dq=16,
                    block_k_dq=32)


def _packed(b, t, lengths):
  """Segment ids [b, t] for documents of the given lengths (per batch row, padded by the last)."""
  rows = []
  for row in lengths:
    ids = np.concatenate([np.full(n, i) for i, n in enumerate(row)])
    rows.append(np.pad(ids, (0, t - len(ids)), mode="edge")[:t])
  return jnp.asarray(np.stack(rows), jnp.int32)


def _layout(h, nq, nk, seed, empty_row=None):
  layout = np.random.RandomState(seed).rand(h, nq, nk) > 0.4
  if empty_row is not None:
    layout[:, empty_row] = False  # whole query blocks with no key: fully masked rows
  return layout


# name: (B, T, S, Hq, Hkv, D), mask, segment ids (or None), block sizes
CASES = {
    "causal": ((2, 48, 48, 4, 4, 32), CAUSAL, None, BS_MIX),
    "dense_gqa_t_ne_s": ((1, 40, 56, 4, 2, 32), Mask(causal=False), None, BS16),
    "window": ((1, 64, 64, 2, 1, 32), Mask(window_left=9), None, BS_MIX),
    "window_both_sides_sinks": ((1, 50, 50, 2, 2, 32),
                                Mask(causal=False, window_left=5, window_right=3, n_sink=4),
                                None, BS16),
    "sinks_head_dim_24": ((1, 40, 40, 2, 1, 24), Mask(window_left=6, n_sink=3), None, BS16),
    "per_head_causal": ((1, 48, 48, 4, 2, 32),
                        Mask(window_left=(4, None, 15, 0), n_sink=(0, 2, 0, 5)), None, BS_MIX),
    "per_head_bidirectional": ((1, 40, 40, 4, 4, 16),
                               Mask(causal=False, window_left=(3, None, 9, 0),
                                    window_right=(0, 2, None, 1), n_sink=(0, 2, 1, 5)),
                               None, BS16),
    "block_sparse": ((1, 64, 64, 4, 2, 32),
                     Mask(block_sparse=BlockSparse(_layout(4, 2, 2, 0), block_q=32,
                                                   block_k=32)), None, BS_MIX),
    "block_sparse_empty_rows": ((1, 64, 48, 2, 1, 32),
                                Mask(causal=False, block_sparse=BlockSparse(
                                    _layout(1, 4, 3, 1, empty_row=2), block_q=16, block_k=16)),
                                None, BS16),
    "segments_causal": ((2, 64, 64, 2, 1, 32), CAUSAL,
                        _packed(2, 64, [[20, 30, 14], [64]]), BS16),
    "segments_pair_masked_rows": ((2, 24, 40, 2, 1, 32), Mask(causal=False),
                                  (jnp.asarray([[9] * 8 + [1] * 16, [0] * 12 + [1] * 12]),
                                   jnp.asarray([[1] * 40, [0] * 30 + [1] * 10])), BS16),
    "decode_offset_window": ((1, 16, 64, 4, 1, 32), Mask(q_offset=48, window_left=20), None,
                             BS16),
    # A document split by another: its rows' FULL tiles skip the other's blocks, so the
    # kernels walk them partly as first + j and partly from the table (`_walk`).
    "segments_gap": ((1, 96, 96, 2, 1, 16), CAUSAL,
                     jnp.asarray([[0] * 32 + [1] * 16 + [0] * 48], jnp.int32), BS16),
    # A FULL sink tile, a gap, then the window's FULL tiles: the static schedule's table loop.
    "window_full_sink_tile": ((1, 96, 96, 2, 1, 16), Mask(window_left=40, n_sink=16), None,
                              BS16),
    # Unsorted ids: tile ranges overlap everywhere, so nothing may be skipped wrongly.
    "segments_interleaved": ((1, 48, 48, 2, 1, 16), Mask(window_left=24),
                             jnp.asarray(np.random.RandomState(2).randint(0, 3, (1, 48))), BS16),
}
# bf16 runs on a subset that still covers every feature once (the mask logic is dtype-blind;
# bf16 exercises the casts around the matmuls), to keep the CPU suite fast.
BF16_CASES = ("causal", "dense_gqa_t_ne_s", "window_both_sides_sinks", "per_head_causal",
              "block_sparse_empty_rows", "segments_causal", "decode_offset_window")
# Cases cuDNN can express (bf16, T == S, causal / left window, no sinks/per-head/segments).
CUDNN_CASES = ("causal", "window")


def _inputs(shape, dtype, seed=0):
  b, t, s, h, g, d = shape
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(ks[0], (b, t, h, d), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (b, s, g, d), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (b, s, g, d), jnp.float32).astype(dtype)
  do = jax.random.normal(ks[3], (b, t, h, d), jnp.float32).astype(dtype)
  return q, k, v, do


def _value_and_grads(fn, q, k, v, do):
  def run(q, k, v, do):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(do))
  return _testing.jit_for_test(run)(q, k, v, do)


@functools.cache
def _reference_result(case_name, dtype_name):
  """fp32 oracle for a case on the case's (rounded) inputs; shared by every implementation."""
  shape, mask, segment_ids, _ = CASES[case_name]
  f32 = [x.astype(jnp.float32) for x in _inputs(shape, jnp.dtype(dtype_name))]
  # Full fp32 matmuls: on GPUs XLA's default fp32 precision may use TF32 (~1e-3 error).
  with jax.default_matmul_precision("highest"):
    return _value_and_grads(
        lambda q, k, v: attention_reference(q, k, v, mask=mask, segment_ids=segment_ids), *f32)


class _AttentionBase:
  IMPL: str = ""
  INTERPRET: bool = False
  BLOCK_OPTIONS: dict = {}  # replaces fields of each case's BlockSizes
  CASE_NAMES: tuple[str, ...] = tuple(CASES)
  DTYPES = (jnp.float32, jnp.bfloat16)

  @pytest.fixture(params=DTYPES, ids=lambda d: jnp.dtype(d).name)
  def dtype(self, request):
    if request.param not in self.DTYPES:
      pytest.skip(f"{self.IMPL} does not take {jnp.dtype(request.param).name}")
    return request.param

  @pytest.fixture(params=tuple(CASES))
  def case(self, request):
    if request.param not in self.CASE_NAMES:
      pytest.skip(f"{self.IMPL} does not cover {request.param}")
    return request.param

  def test_values_and_grads_match_reference(self, case, dtype):
    if dtype == jnp.bfloat16 and case not in BF16_CASES:
      pytest.skip("bf16 runs on BF16_CASES only")
    shape, mask, segment_ids, blocks = CASES[case]
    q, k, v, do = _inputs(shape, dtype)
    kwargs = dict(mask=mask, segment_ids=segment_ids)
    blocks = dataclasses.replace(blocks, **self.BLOCK_OPTIONS)
    got = _value_and_grads(
        lambda q, k, v: attention(q, k, v, implementation=self.IMPL, interpret=self.INTERPRET,
                                  block_sizes=blocks if self.IMPL != "cudnn" else None,
                                  **kwargs), q, k, v, do)
    # The oracle runs in fp32 on the same (already rounded) inputs: low-precision runs are then
    # judged against the exact answer, not against the reference's own rounding.
    want = _reference_result(case, jnp.dtype(dtype).name)
    assert got[0].dtype == q.dtype and got[0].shape == q.shape
    for x in got:
      assert not bool(jnp.isnan(x.astype(jnp.float32)).any()), "NaN in output or gradient"
    # Rows that see no key are exactly zero in the reference, and must be here too.
    empty_rows = np.asarray((want[0] == 0).all(-1))
    np.testing.assert_array_equal(np.asarray(got[0], np.float32)[empty_rows], 0.0)
    _testing.assert_allclose(got[0], want[0], dtype=dtype, name="out")
    _testing.assert_tree_allclose(got[1:], want[1:], dtype=dtype, grad=True,
                                  names=("dq", "dk", "dv"))


class TestXla(_AttentionBase):
  IMPL = "xla"


class TestPallasGpuInterpret(_AttentionBase):
  IMPL, INTERPRET = "pallas_gpu", True


@pytest.mark.gpu
@pytest.mark.skipif(not cudnn.gpu_backend(), reason="needs an NVIDIA GPU backend")
class TestPallasGpu(_AttentionBase):
  IMPL = "pallas_gpu"
  CASE_NAMES = BF16_CASES  # every feature once; keeps the compiled-kernel run short


class TestPallasGpuInterpretAtomicDq(_AttentionBase):
  """dQ summed by atomic adds in the dK/dV pass: GQA sums, sparse and segmented schedules."""
  IMPL, INTERPRET = "pallas_gpu", True
  BLOCK_OPTIONS = {"dq_atomic": True}
  CASE_NAMES = ("causal", "dense_gqa_t_ne_s", "per_head_causal", "block_sparse_empty_rows",
                "segments_causal", "segments_gap", "decode_offset_window")


@pytest.mark.gpu
@pytest.mark.skipif(not cudnn.gpu_backend(), reason="needs an NVIDIA GPU backend")
class TestPallasGpuAtomicDq(_AttentionBase):
  IMPL = "pallas_gpu"
  BLOCK_OPTIONS = {"dq_atomic": True}
  CASE_NAMES = BF16_CASES


@pytest.mark.gpu
@pytest.mark.skipif(not cudnn.gpu_backend(), reason="needs an NVIDIA GPU backend")
class TestPallasGpuExp2Ftz(_AttentionBase):
  """Every exponential as inline ex2.approx.ftz.f32 (compiled only: the interpreter runs
  jnp.exp2), fully masked rows included."""
  IMPL = "pallas_gpu"
  BLOCK_OPTIONS = {"exp2_ftz": True}
  CASE_NAMES = BF16_CASES


@pytest.mark.gpu
@pytest.mark.skipif(not cudnn.gpu_backend(), reason="needs an NVIDIA GPU backend")
class TestCudnn(_AttentionBase):
  IMPL = "cudnn"
  CASE_NAMES = CUDNN_CASES
  DTYPES = (jnp.bfloat16,)


@pytest.mark.parametrize("impl, kwargs", [("xla", {}), ("pallas_gpu", {"interpret": True})])
def test_empty_tiles_are_skipped_not_masked(impl, kwargs):
  """Keys in a layout column nobody visits hold NaN: computing-then-masking would leak them
  (0 * NaN = NaN in the PV and dP products); skipping the tiles keeps everything finite."""
  layout = np.ones((1, 2, 3), bool)
  layout[:, :, 1] = False  # keys 32..63 are never visited
  mask = Mask(causal=False, block_sparse=BlockSparse(layout, block_q=32, block_k=32))
  q, k, v, do = _inputs((1, 64, 96, 2, 1, 16), jnp.float32)
  poison = jnp.zeros((96,)).at[32:64].set(jnp.nan)[None, :, None, None]
  f = lambda q, k, v: attention(q, k, v, mask=mask, implementation=impl, block_sizes=BS16,
                                **kwargs)
  got = _value_and_grads(f, q, k + poison, v + poison, do)
  want = _value_and_grads(lambda q, k, v: attention_reference(q, k, v, mask=mask), q, k, v, do)
  _testing.assert_allclose(got[0], want[0], name="out")
  np.testing.assert_array_equal(np.asarray(got[2][:, 32:64]), 0.0)  # never-visited keys
  _testing.assert_tree_allclose((got[1], got[2][:, :32], got[3][:, 64:]),
                                (want[1], want[2][:, :32], want[3][:, 64:]), grad=True,
                                names=("dq", "dk", "dv"))


@pytest.mark.parametrize("scale", [0.3, -0.3])
def test_pallas_explicit_scale_of_either_sign(scale):
  """The forward folds a positive scale into one multiply-add after the row max and a negative
  one (max(s)·c ≠ max(s·c)) into the tile before it: both match the reference."""
  q, k, v, do = _inputs((1, 48, 48, 2, 1, 16), jnp.float32)
  f = lambda q, k, v: attention(q, k, v, mask=CAUSAL, scale=scale,  # noqa: E731
                                implementation="pallas_gpu", interpret=True, block_sizes=BS16)
  got = _value_and_grads(f, q, k, v, do)
  want = _value_and_grads(
      lambda q, k, v: attention_reference(q, k, v, mask=CAUSAL, scale=scale), q, k, v, do)
  _testing.assert_tree_allclose(got, want, grad=True, names=("out", "dq", "dk", "dv"))


def test_reference_fully_masked_rows_are_zero():
  q, k, v, _ = _inputs((1, 8, 8, 1, 1, 16), jnp.float32)
  seg = (jnp.asarray([[3] * 4 + [0] * 4]), jnp.zeros((1, 8), jnp.int32))
  out = jax.jit(lambda q, k, v: attention_reference(q, k, v, mask=Mask(causal=False),
                                                    segment_ids=seg))(q, k, v)
  assert int((out[0] == 0).all(-1).sum()) == 4  # the parity tests rely on exact zeros
  np.testing.assert_array_equal(np.asarray(out[0, :4]), 0.0)
  assert not np.isnan(np.asarray(out)).any()


# --- dispatch ----------------------------------------------------------------------------------


def test_default_dispatch_on_cpu_is_xla_without_warnings():
  q, k, v, _ = _inputs((1, 32, 32, 2, 1, 16), jnp.float32)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    out = attention(q, k, v)
  want = attention(q, k, v, implementation="xla")
  np.testing.assert_array_equal(np.asarray(out), np.asarray(want))
  assert attention_api.default_order() == ("xla",)


@pytest.mark.parametrize("impl, match", [("pallas_gpu", "interpret=True"), ("cudnn", "cuDNN")])
def test_explicit_choice_that_cannot_run_fails_fast(impl, match):
  q, k, v, _ = _inputs((1, 16, 16, 1, 1, 16), jnp.float32)
  with pytest.raises(NotImplementedError, match=match):
    attention(q, k, v, implementation=impl)


def test_unknown_implementation_raises():
  q, k, v, _ = _inputs((1, 16, 16, 1, 1, 16), jnp.float32)
  with pytest.raises(NotImplementedError, match="unknown implementation"):
    attention(q, k, v, implementation="flash9000")


def test_sequence_falls_back_with_warning():
  q, k, v, _ = _inputs((1, 16, 16, 1, 1, 16), jnp.float32)
  with pytest.warns(UserWarning, match="skipping pallas_gpu"):
    out = attention(q, k, v, implementation=("pallas_gpu", "xla"))
  np.testing.assert_array_equal(np.asarray(out),
                                np.asarray(attention(q, k, v, implementation="xla")))


def test_sequence_with_nothing_usable_raises():
  q, k, v, _ = _inputs((1, 16, 16, 1, 1, 16), jnp.float32)
  with pytest.warns(UserWarning), pytest.raises(NotImplementedError, match="no usable"):
    attention(q, k, v, implementation=("cudnn", "pallas_gpu"))


def test_gpu_dispatch_order_and_cudnn_coverage(monkeypatch):
  """On a (pretend) CUDA backend: cuDNN first, and only for the masks it can express."""
  monkeypatch.setattr(cudnn, "gpu_backend", lambda: True)
  assert attention_api.default_order() == ("cudnn", "pallas_gpu", "xla")
  q, k, _, _ = _inputs((1, 32, 32, 4, 2, 64), jnp.bfloat16)
  reason = lambda m, seg=None, q=q, k=k: cudnn.unsupported_reason(q, k, m, seg)
  assert reason(CAUSAL) is None
  assert reason(Mask(causal=False)) is None
  assert reason(Mask(window_left=16)) is None
  assert reason(Mask(causal=False, window_left=16, window_right=0)) is None
  assert "sinks" in reason(Mask(window_left=16, n_sink=4))
  assert "per-head" in reason(Mask(window_left=(1, 2, 3, 4)))
  assert "block-sparse" in reason(Mask(block_sparse=BlockSparse(np.ones((2, 2), bool),
                                                                block_q=16, block_k=16)))
  assert "q_offset" in reason(Mask(q_offset=4))
  assert "segment" in reason(CAUSAL, jnp.zeros((1, 32), jnp.int32))
  assert "left window only" in reason(Mask(causal=False, window_left=4, window_right=4))
  assert "bf16" in reason(CAUSAL, q=q.astype(jnp.float32))
  assert "T == S" in reason(CAUSAL, k=k[:, :16])


@pytest.mark.gpu
@pytest.mark.skipif(not cudnn.gpu_backend(), reason="needs an NVIDIA GPU backend")
@pytest.mark.parametrize("mask, expect", [(CAUSAL, "cudnn"), (Mask(window_left=8, n_sink=2),
                                                               "pallas_gpu")])
def test_gpu_default_dispatch(mask, expect):
  """On a GPU, implementation=None serves cuDNN's masks by cuDNN and the rest by Pallas."""
  q, k, v, _ = _inputs((1, 128, 128, 4, 2, 64), jnp.bfloat16)
  with warnings.catch_warnings():
    warnings.simplefilter("error", UserWarning)  # a fallback would warn; JAX deprecations may not
    got = attention(q, k, v, mask=mask)
  want = attention(q, k, v, mask=mask, implementation=expect)
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@pytest.mark.gpu
@pytest.mark.skipif(not cudnn.gpu_backend(), reason="needs an NVIDIA GPU backend")
@pytest.mark.parametrize("dq_atomic", [False, True])
def test_gpu_default_tiles_head_dim_128(dq_atomic):
  """The compiled kernels at their default tiles (bf16, head dim 128: 128-key forward tiles),
  the shapes the benchmarks time, against the fp32 reference; with and without atomic dQ."""
  shape, mask = (2, 640, 640, 8, 2, 128), Mask(window_left=300, n_sink=4)
  q, k, v, do = _inputs(shape, jnp.bfloat16)
  blocks = BlockSizes.get_default("pallas_gpu", itemsize=2, head_dim=128)
  blocks = dataclasses.replace(blocks, dq_atomic=dq_atomic)
  assert blocks.block_k == 128
  got = _value_and_grads(lambda q, k, v: attention(q, k, v, mask=mask, implementation="pallas_gpu",
                                                   block_sizes=blocks), q, k, v, do)
  f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
  with jax.default_matmul_precision("highest"):
    want = _value_and_grads(lambda q, k, v: attention_reference(q, k, v, mask=mask), *f32)
  _testing.assert_allclose(got[0], want[0], dtype=jnp.bfloat16, name="out")
  _testing.assert_tree_allclose(got[1:], want[1:], dtype=jnp.bfloat16, grad=True,
                                names=("dq", "dk", "dv"))


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("q_shape, k_shape, v_shape, dtypes, match", [
    ((1, 8, 4, 16), (1, 8, 2, 16), (1, 8, 2, 8), None, "same shape"),
    ((1, 8, 4, 16), (2, 8, 2, 16), (2, 8, 2, 16), None, "batch"),
    ((1, 8, 4, 16), (1, 8, 2, 32), (1, 8, 2, 32), None, "head dims"),
    ((1, 8, 3, 16), (1, 8, 2, 16), (1, 8, 2, 16), None, "multiple of kv heads"),
    ((1, 8, 4), (1, 8, 2, 16), (1, 8, 2, 16), None, r"\[B, T\|S, H, D\]"),
    ((1, 8, 4, 16), (1, 8, 2, 16), (1, 8, 2, 16), ("float32", "bfloat16", "float32"), "dtypes"),
    ((1, 8, 4, 16), (1, 8, 2, 16), (1, 8, 2, 16), ("int32",) * 3, "not supported"),
])
def test_malformed_inputs_raise_value_error(q_shape, k_shape, v_shape, dtypes, match):
  dtypes = dtypes or ("float32",) * 3
  q, k, v = (jnp.zeros(s, d) for s, d in zip((q_shape, k_shape, v_shape), dtypes, strict=True))
  with pytest.raises(ValueError, match=match):
    attention(q, k, v)


@pytest.mark.parametrize("mask, segment_ids, blocks, match", [
    (Mask(n_sink=17), None, None, "out of range"),
    (Mask(window_left=(1, 2, 3)), None, None, "3 heads"),
    (Mask(block_sparse=BlockSparse(np.ones((2, 3), bool), block_q=16, block_k=16)), None, None,
     "needs"),
    (Mask(block_sparse=BlockSparse(np.ones((1, 1), bool), block_q=16, block_k=16)), None,
     BlockSizes(block_q=32), "does not fit"),
    (CAUSAL, jnp.zeros((1, 8), jnp.int32), None, "shape"),
    (CAUSAL, jnp.zeros((1, 16), jnp.float32), None, "integers"),
    (CAUSAL, (jnp.zeros((1, 16), jnp.int32),), None, "pair"),
])
def test_bad_mask_segments_or_blocks_raise_before_tracing(monkeypatch, mask, segment_ids, blocks,
                                                          match):
  def never(*args, **kwargs):
    raise AssertionError("an implementation ran before validation")
  monkeypatch.setattr(attention_api, "_run", never)
  q, k, v, _ = _inputs((1, 16, 16, 4, 2, 16), jnp.float32)
  with pytest.raises(ValueError, match=match):
    attention(q, k, v, mask=mask, segment_ids=segment_ids, block_sizes=blocks)


def test_bad_scales_raise_before_tracing(monkeypatch):
  # 'abc' gave a bare numpy ValueError, nan silently NaN outputs, a traced scale a
  # TracerArrayConversionError.
  def never(*args, **kwargs):
    raise AssertionError("an implementation ran before validation")
  monkeypatch.setattr(attention_api, "_run", never)
  q, k, v, _ = _inputs((1, 16, 16, 4, 2, 16), jnp.float32)
  for scale, match in (("abc", "must be a number"), (float("nan"), "must be finite"),
                       (True, "known when tracing")):
    with pytest.raises(ValueError, match=match):
      attention(q, k, v, scale=scale)
  with pytest.raises(ValueError, match="known when tracing"):
    jax.jit(lambda s: attention(q, k, v, scale=s))(0.5)


def test_mask_construction_errors():
  with pytest.raises(ValueError, match="window_left"):
    Mask(window_left=-1)
  with pytest.raises(ValueError, match="window_right"):
    Mask(window_right=(1, -2))
  with pytest.raises(ValueError, match="n_sink"):
    Mask(n_sink=-3)
  with pytest.raises(ValueError, match="q_offset"):
    Mask(q_offset=-1)
  with pytest.raises(ValueError, match="disagree"):
    Mask(window_left=(1, 2), n_sink=(0, 0, 0))
  with pytest.raises(ValueError, match="multiple of 16"):
    BlockSparse(np.ones((2, 2), bool), block_q=8, block_k=16)
  with pytest.raises(ValueError, match="power of two"):
    BlockSizes(block_q=48)
  with pytest.raises(ValueError, match="exp2_ftz"):
    BlockSizes(exp2_ftz=1)


# --- the compiled GPU path, checked on CPU -------------------------------------------------------



@pytest.mark.parametrize("mask, segments", [
    (CAUSAL, False),
    (Mask(window_left=(64, 128, None, 32), n_sink=(4, 0, 0, 4)), True),
])
def test_pallas_kernels_lower_to_triton_for_h100(mask, segments):
  """Lowers forward + backward for CUDA (Triton IR), with the real default tiles, on CPU."""
  from memx.kernels.attention.pallas_gpu import attention_pallas_gpu
  b, t, h, g, d = 1, 256, 4, 2, 128
  q = jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((b, t, g, d), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((b, t), jnp.int32) if segments else None

  def loss(q, k, v, seg):
    o = attention_pallas_gpu(q, k, v, mask=mask, segment_ids=seg)
    return o.astype(jnp.float32).sum()

  with jax.sharding.use_abstract_mesh(_testing.abstract_h100_mesh()):
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv, seg).lower(
        lowering_platforms=("cuda",))
  text = lowered.as_text()
  assert text.count("__gpu$xla.gpu.triton") == 3  # forward, dK/dV, dQ
  for name in ("memx_attention_fwd", "memx_attention_dkv", "memx_attention_dq"):
    assert name in text
  assert "ex2.approx.ftz" not in text


def test_exp2_ftz_lowers_to_inline_ptx():
  """BlockSizes(exp2_ftz=True): the kernels' exponentials become inline ex2.approx.ftz.f32."""
  from memx.kernels.attention.pallas_gpu import attention_pallas_gpu
  q = jax.ShapeDtypeStruct((1, 256, 4, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16)

  def loss(q, k, v):
    o = attention_pallas_gpu(q, k, v, mask=CAUSAL, block_sizes=BlockSizes(exp2_ftz=True))
    return o.astype(jnp.float32).sum()

  with jax.sharding.use_abstract_mesh(_testing.abstract_h100_mesh()):
    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv).lower(
        lowering_platforms=("cuda",)).as_text()
  assert text.count("__gpu$xla.gpu.triton") == 3
  assert "ex2.approx.ftz.f32" in text
