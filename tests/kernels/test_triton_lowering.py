"""Every Pallas GPU kernel lowers to Triton IR for an H100, on a machine without a GPU.

The interpret-mode tests check what the kernels compute; they never build the Triton program,
so a kernel that the Triton lowering rejects (an unsupported op, a non-power-of-two block, a
dot below 16) would pass them and fail only on a GPU. Here JAX's Pallas-Triton lowering runs for
real, with the GPU query answered as an H100 (compute capability 9.0), on the test cases of the
kernels' own test modules, forward and backward. The Triton modules are verified and inspected:
fp32 dots must not run as TF32 (measured on an H200: 5e-4 relative error in fp32 attention).
"""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from . import test_attention as ta
from . import test_chunk_attention as tc
from . import test_kv_quant as tq
from . import test_linear_scan as tl
from . import test_short_conv as tsc
from . import test_ssd as ts

triton_registration = pytest.importorskip("jax._src.pallas.triton.pallas_call_registration")
gpu_info = pytest.importorskip("jax._src.pallas.triton.gpu_info")

from memx.kernels.attention import attention  # noqa: E402
from memx.kernels.attention.chunk import chunk_attention  # noqa: E402
from memx.kernels.kv_quant import KVQuant, decode_attention  # noqa: E402
from memx.kernels.linear_scan import linear_scan  # noqa: E402
from memx.kernels.short_conv import causal_conv  # noqa: E402
from memx.kernels.ternary import absmean_quantize, pack_ternary, packed_matmul, to_words  # noqa: E402


@pytest.fixture
def triton_modules(monkeypatch):
  """Lowers for CUDA as if an H100 were attached; returns the list the Triton modules land in."""
  if not hasattr(gpu_info, "GpuInfo") or not hasattr(triton_registration, "lowering"):
    pytest.skip("this JAX's Pallas-Triton lowering has another layout")
  h100 = gpu_info.GpuInfo(gpu_version=None, arch_name="9.0", compute_capability=90)
  monkeypatch.setattr(triton_registration.gpu_info_lib, "get_gpu_info", lambda: h100)
  modules = []
  lower = triton_registration.lowering.lower_jaxpr_to_triton_module

  def capture(*args, **kwargs):
    result = lower(*args, **kwargs)
    assert result.module.operation.verify()
    modules.append(result.module.operation.get_asm())
    return result

  monkeypatch.setattr(triton_registration.lowering, "lower_jaxpr_to_triton_module", capture)
  # The APIs refuse pallas_gpu without a GPU backend (compiling needs one; lowering does not).
  from memx.kernels.attention import cudnn
  from memx.kernels.kv_quant import api as kv_api
  from memx.kernels.linear_scan import api as scan_api
  from memx.kernels.short_conv import api as conv_api
  from memx.kernels.ssd import api as ssd_api
  from memx.kernels.ternary import api as ternary_api
  monkeypatch.setattr(cudnn, "gpu_backend", lambda: True)
  for api in (scan_api, conv_api, ssd_api, ternary_api, kv_api):
    if hasattr(api, "gpu_backend"):
      monkeypatch.setattr(api, "gpu_backend", lambda: True)
  return modules


def _lower_for_cuda(fn, *args):
  jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


def _dots(modules):
  return [line for m in modules for line in m.splitlines() if "tt.dot " in line]


def _check_fp32_dots(modules, dtype):
  dots = _dots(modules)
  assert dots, "no tt.dot in the lowered kernels"
  if dtype == jnp.float32:
    tf32 = [d for d in dots if "inputPrecision = tf32" in d]
    assert not tf32, f"fp32 dots lowered as TF32: {tf32[0].strip()[:200]}"


DTYPES = pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])


def _lower_attention_case(case, dtype, **block_options):
  """Lowers a test_attention case's forward and backward (values, then the VJP)."""
  shape, mask, segment_ids, blocks = ta.CASES[case]
  blocks = dataclasses.replace(blocks, **block_options)
  q, k, v, do = ta._inputs(shape, dtype)

  def fn(q, k, v, do):
    out, vjp = jax.vjp(lambda q, k, v: attention(
        q, k, v, mask=mask, segment_ids=segment_ids, implementation="pallas_gpu",
        block_sizes=blocks), q, k, v)
    return out, vjp(do)

  _lower_for_cuda(fn, q, k, v, do)


@DTYPES
@pytest.mark.parametrize("case", ["causal", "dense_gqa_t_ne_s", "sinks_head_dim_24",
                                  "per_head_bidirectional", "block_sparse_empty_rows",
                                  "segments_pair_masked_rows", "decode_offset_window"])
def test_attention_lowers(triton_modules, case, dtype):
  _lower_attention_case(case, dtype)
  assert len(triton_modules) == 3  # forward, dK/dV, dQ
  _check_fp32_dots(triton_modules, dtype)


@DTYPES
@pytest.mark.parametrize("case", ["causal", "dense_gqa_t_ne_s", "segments_causal"])
def test_attention_atomic_dq_lowers(triton_modules, case, dtype):
  """dq_atomic: two kernels (forward, dK/dV with dQ atomics), fp32 atomic adds."""
  _lower_attention_case(case, dtype, dq_atomic=True)
  assert len(triton_modules) == 2
  assert "tt.atomic_rmw fadd" in triton_modules[1]
  _check_fp32_dots(triton_modules, dtype)


@DTYPES
@pytest.mark.parametrize("mask_name", sorted(tc.MASKS))
def test_chunk_attention_lowers(triton_modules, mask_name, dtype):
  """The forward kernel with the query offset read at run time (scanned chunked prefill)."""
  q_all, k, v = tc._inputs(dtype)
  _lower_for_cuda(lambda q, start: chunk_attention(
      q, k, v, start, mask=tc.MASKS[mask_name], implementation="pallas_gpu"),
      q_all[:, :tc.SHAPE[-1]], jnp.int32(5))
  assert len(triton_modules) == 1
  _check_fp32_dots(triton_modules, dtype)


@DTYPES
def test_attention_default_tiles_lower(triton_modules, dtype):
  """Head dim 128 at the default tiles (bf16 takes 128-key forward tiles, fp32 64)."""
  q = jnp.zeros((1, 512, 2, 128), dtype)
  f = lambda q, k, v: attention(q, k, v, implementation="pallas_gpu").sum()  # noqa: E731
  _lower_for_cuda(jax.grad(f, argnums=(0, 1, 2)), q, q, q)
  assert len(triton_modules) == 3
  key_tile = 128 if dtype == jnp.bfloat16 else 64
  scores = [d for d in _dots(triton_modules[:1])
            if f"* tensor<128x{key_tile}x" in d and f"-> tensor<128x{key_tile}xf32>" in d]
  assert scores, "the forward's q @ k^T is not [128, D] x [D, key tile]"
  _check_fp32_dots(triton_modules, dtype)


@DTYPES
@pytest.mark.parametrize("case", tuple(ts.CASES))
def test_ssd_lowers(triton_modules, case, dtype):
  x, dt, a, bm, cm, d, h0, dy, dh = ts._inputs(ts.CASES[case][0], dtype)
  fn = ts._fn(case, implementation="pallas_gpu")
  _lower_for_cuda(lambda args, cts: jax.vjp(fn, *args)[1](cts), (x, dt, a, bm, cm, d, h0),
                  (dy, dh))
  assert len(triton_modules) >= 3
  _check_fp32_dots(triton_modules, dtype)


@DTYPES
@pytest.mark.parametrize("case", tuple(tl.CASES))
def test_linear_scan_lowers(triton_modules, case, dtype):
  shape, lengths, with_h0, blocks = tl.CASES[case]
  a, x, h0, dh, dh_last = tl._inputs(shape, dtype)
  seg = tl._segments(shape[1], lengths)

  def fn(a, x, h0, dh, dh_last):
    run = lambda a, x, h0: linear_scan(a, x, h0 if with_h0 else None, segment_ids=seg,  # noqa: E731
                                       implementation="pallas_gpu", block_sizes=blocks)
    return jax.vjp(run, a, x, h0)[1]((dh, dh_last))

  _lower_for_cuda(fn, a, x, h0, dh, dh_last)
  assert len(triton_modules) >= 2


@pytest.mark.parametrize("x_dtype", [jnp.int8, jnp.bfloat16], ids=["int8", "bfloat16"])
# Rows pick the default tiles: <= 4 (vector), <= 8, <= 16, <= 1024, more
# (config.BlockSizes.get_default).
@pytest.mark.parametrize("m,k,n", [(1, 4096, 4096), (6, 1000, 300), (16, 1000, 300),
                                   (300, 512, 1024), (2048, 256, 256)])
@pytest.mark.parametrize("layout", ["bytes", "words"])
def test_packed_matmul_lowers(triton_modules, m, k, n, x_dtype, layout):
  packed = pack_ternary(absmean_quantize(jax.random.normal(jax.random.key(0), (k, n)))[0])
  if layout == "words":
    packed = to_words(packed)
  x = jnp.ones((m, k), x_dtype)
  _lower_for_cuda(lambda x, p: packed_matmul(x, p, implementation="pallas_gpu"), x, packed)
  assert len(triton_modules) == 1
  # The decode-sized default is the CUDA-core vector form: no tensor-core dot at all.
  assert bool(_dots(triton_modules)) == (m > 4)
  if layout == "words" and m <= 4:  # the vector form loads the words themselves
    assert "tensor<64x16xi32>" in triton_modules[0]  # [block_k / 4, block_n / 4] words


@DTYPES
@pytest.mark.parametrize("case", tuple(tsc.CASES))
def test_short_conv_lowers(triton_modules, case, dtype):
  """Forward and backward (two-pass or fused), with SiLU, at every test case's options."""
  x, w, bias, hist, dy, seg, hseg = tsc._inputs(case, dtype)

  def fn(x, w, bias, hist, dy):
    run = lambda x, w, bias, hist: causal_conv(  # noqa: E731
        x, w, bias, seg, hist, hseg, activation="silu", implementation="pallas_gpu",
        block_sizes=tsc.CASES[case][-1])
    y, vjp = jax.vjp(run, x, w, bias, hist)
    return y, vjp(dy)

  _lower_for_cuda(fn, x, w, bias, hist, dy)
  two_pass = (tsc.CASES[case][-1] or tsc.BlockSizes()).backward == "two_pass"
  assert len(triton_modules) == (3 if two_pass else 2)  # forward, backward (g, then dx)


@DTYPES
@pytest.mark.parametrize("case", tq.KERNEL_CASES, ids=lambda c: f"b{c[0]}g{c[1]}d{c[2]}p{c[6]}")
def test_kv_quant_decode_lowers(triton_modules, case, dtype):
  """The quantized decode kernel: uint8 codes unpacked field by field, a traced position."""
  bits, group, d, h, g, mask, pos, splits = case
  cache = tq._filled_cache(KVQuant(bits, group), 2, 128, g, d, pos, dtype)
  q = jnp.zeros((2, h, d), dtype)
  _lower_for_cuda(lambda q, c, p: decode_attention(q, c, p, mask=mask, splits=splits,
                                                   implementation="pallas_gpu"),
                  q, cache, jnp.int32(pos))
  assert len(triton_modules) == 1
  _check_fp32_dots(triton_modules, dtype)
