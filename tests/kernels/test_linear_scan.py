"""linear_scan implementations vs the sequential reference: values, gradients, packing, dispatch."""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memx.kernels import _testing
from memx.kernels.linear_scan import (
    BlockSizes,
    linear_scan,
    linear_scan_associative,
    linear_scan_reference,
)

BS8 = BlockSizes(chunk=8, block_d=16)

# name: (B, T, D), segment lengths per row (or None), with h0, block sizes
CASES = {
    "ragged_t_and_d": ((2, 37, 20), None, True, BS8),
    "one_chunk_short": ((1, 5, 16), None, False, BS8),
    "packed": ((2, 40, 24), [[11, 20, 9], [40]], True, BS8),
    "default_blocks": ((1, 70, 33), [[30, 40]], False, None),
}


def _segments(t, lengths):
  if lengths is None:
    return None
  rows = [np.concatenate([np.full(n, i) for i, n in enumerate(row)]) for row in lengths]
  return jnp.asarray(np.stack(rows), jnp.int32)


def _inputs(shape, dtype, seed=0):
  b, t, d = shape
  ks = jax.random.split(jax.random.key(seed), 5)
  # Gates in (0, 1) as the models make them (sigmoid / exp of a negative), a few near 0 and 1.
  a = jax.nn.sigmoid(3.0 * jax.random.normal(ks[0], (b, t, d))).astype(dtype)
  x = jax.random.normal(ks[1], (b, t, d)).astype(dtype)
  h0 = jax.random.normal(ks[2], (b, d))
  dh = jax.random.normal(ks[3], (b, t, d)).astype(dtype)
  dh_last = jax.random.normal(ks[4], (b, d))
  return a, x, h0, dh, dh_last


def _value_and_grads(fn, a, x, h0, dh, dh_last):
  def run(a, x, h0, dh, dh_last):
    out, vjp = jax.vjp(fn, a, x, h0)
    return (*out, *vjp((dh, dh_last)))
  return _testing.jit_for_test(run)(a, x, h0, dh, dh_last)


@functools.cache
def _reference_result(case_name, dtype_name):
  shape, lengths, with_h0, _ = CASES[case_name]
  a, x, h0, dh, dh_last = _inputs(shape, jnp.dtype(dtype_name))
  seg = _segments(shape[1], lengths)
  f32 = [v.astype(jnp.float32) for v in (a, x, dh)]
  return _value_and_grads(
      lambda a, x, h0: linear_scan_reference(a, x, h0 if with_h0 else None, segment_ids=seg),
      f32[0], f32[1], h0, f32[2], dh_last)


class _LinearScanBase:
  IMPL: str = ""
  INTERPRET: bool = False

  @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
  @pytest.mark.parametrize("case", tuple(CASES))
  def test_values_and_grads_match_reference(self, case, dtype):
    shape, lengths, with_h0, blocks = CASES[case]
    a, x, h0, dh, dh_last = _inputs(shape, dtype)
    seg = _segments(shape[1], lengths)

    def fn(a, x, h0):
      return linear_scan(a, x, h0 if with_h0 else None, segment_ids=seg,
                         implementation=self.IMPL, block_sizes=blocks, interpret=self.INTERPRET)

    got = _value_and_grads(fn, a, x, h0, dh, dh_last)
    want = _reference_result(case, jnp.dtype(dtype).name)
    names = ("h", "h_last", "da", "db", "dh0")
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
      assert g.shape == w.shape, names[i]
      _testing.assert_allclose(g, w, dtype=dtype, grad=i >= 2, name=f"{self.IMPL} {names[i]}")
    assert got[0].dtype == dtype and got[1].dtype == jnp.float32
    assert got[2].dtype == dtype and got[3].dtype == dtype


class TestXla(_LinearScanBase):
  IMPL = "xla"


class TestPallasGpuInterpret(_LinearScanBase):
  IMPL, INTERPRET = "pallas_gpu", True


@pytest.mark.gpu
class TestPallasGpu(_LinearScanBase):
  IMPL = "pallas_gpu"


@pytest.mark.parametrize("impl, kw", [("reference", {}), ("xla", {}),
                                      ("pallas_gpu", {"interpret": True})])
def test_packed_equals_separate_and_continuation_equals_concatenation(impl, kw):
  a, x, h0, _, _ = _inputs((1, 29, 16), jnp.float32, seed=3)
  run = functools.partial(linear_scan, implementation=impl, block_sizes=BS8, **kw)
  seg = jnp.asarray([[0] * 12 + [1] * 17], jnp.int32)
  packed, _ = run(a, x, h0, segment_ids=seg)
  first, _ = run(a[:, :12], x[:, :12], h0)
  second, last = run(a[:, 12:], x[:, 12:])
  _testing.assert_allclose(packed, jnp.concatenate([first, second], 1), name="packed")
  # Continuing from the returned state equals one run over the whole sequence.
  whole, whole_last = run(a, x, h0)
  head, state = run(a[:, :12], x[:, :12], h0)
  tail, tail_last = run(a[:, 12:], x[:, 12:], state)
  _testing.assert_allclose(jnp.concatenate([head, tail], 1), whole, name="continued")
  _testing.assert_allclose(tail_last, whole_last, name="continued last")
  del last


def test_associative_baseline_matches_reference():
  a, x, h0, _, _ = _inputs((2, 33, 8), jnp.float32)
  got, got_last = linear_scan_associative(a, x, h0)
  want, want_last = linear_scan_reference(a, x, h0)
  _testing.assert_allclose(got, want, name="h")
  _testing.assert_allclose(got_last, want_last, name="h_last")


def test_default_dispatch_on_cpu_is_xla_without_warnings():
  a, x, _, _, _ = _inputs((1, 9, 4), jnp.float32)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    got, _ = linear_scan(a, x)
  _testing.assert_allclose(got, linear_scan_reference(a, x)[0])


def test_explicit_pallas_without_gpu_fails_fast_and_sequences_fall_back():
  a, x, _, _, _ = _inputs((1, 9, 4), jnp.float32)
  with pytest.raises(NotImplementedError, match="interpret=True"):
    linear_scan(a, x, implementation="pallas_gpu")
  with pytest.warns(UserWarning, match="skipping pallas_gpu"):
    linear_scan(a, x, implementation=("pallas_gpu", "xla"))
  with pytest.raises(NotImplementedError, match="unknown implementation"):
    linear_scan(a, x, implementation="cuda")


@pytest.mark.parametrize("args, kwargs, match", [
    (((1, 4, 3), (1, 4, 2)), {}, "same shape"),
    (((4, 3), (4, 3)), {}, r"\[B, T, D\]"),
    (((1, 4, 3), (1, 4, 3)), {"h0": (1, 4)}, "initial state"),
    (((1, 4, 3), (1, 4, 3)), {"segment_ids": (1, 5)}, "segment_ids"),
    (((1, 0, 3), (1, 0, 3)), {}, "empty"),
])
def test_bad_input_raises_value_error(args, kwargs, match):
  a, x = (jnp.ones(s) for s in args)
  kw = {}
  if "h0" in kwargs:
    kw["h0"] = jnp.zeros(kwargs["h0"])
  if "segment_ids" in kwargs:
    kw["segment_ids"] = jnp.zeros(kwargs["segment_ids"], jnp.int32)
  with pytest.raises(ValueError, match=match):
    linear_scan(a, x, **kw)
  with pytest.raises(ValueError, match="dtype"):
    linear_scan(jnp.ones((1, 2, 3), jnp.int32), jnp.ones((1, 2, 3), jnp.int32))
  with pytest.raises(ValueError, match="power of two"):
    BlockSizes(chunk=24)



def test_pallas_kernels_lower_to_triton_for_h100():
  """Lowers forward + backward for CUDA (Triton IR), with the default tiles, on CPU."""
  from memx.kernels.linear_scan import linear_scan_pallas_gpu
  x = jax.ShapeDtypeStruct((2, 300, 1536), jnp.bfloat16)
  h0 = jax.ShapeDtypeStruct((2, 1536), jnp.float32)
  seg = jax.ShapeDtypeStruct((2, 300), jnp.int32)

  def loss(a, b, h0, seg):
    h, last = linear_scan_pallas_gpu(a, b, h0, segment_ids=seg)
    return h.astype(jnp.float32).sum() + last.sum()

  with jax.sharding.use_abstract_mesh(_testing.abstract_h100_mesh()):
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(x, x, h0, seg).lower(
        lowering_platforms=("cuda",))
  text = lowered.as_text()
  assert text.count("__gpu$xla.gpu.triton") == 6  # summary, carry, apply; each fwd and bwd
  for name in ("summary", "carry", "apply", "apply_bwd"):
    assert f"memx_linear_scan_{name}" in text


@pytest.mark.parametrize("impl, kw", [("xla", {}), ("pallas_gpu", {"interpret": True})])
def test_saved_residuals(impl, kw):
  """What the VJP keeps (as the xla module docstring says): with T a multiple of the chunk and
  no segments, only h (the output) and h0; ragged T adds the padded copies of a and h."""
  from memx.train.memory import saved_activation_bytes

  def saved(t):
    a = jax.random.uniform(jax.random.key(0), (2, t, 16))
    return saved_activation_bytes(lambda a, b: jnp.sum(linear_scan(
        a, b, implementation=impl, block_sizes=BS8, **kw)[0]), a, jnp.ones_like(a))

  h, h0 = 2 * 64 * 16 * 4, 2 * 16 * 4
  assert saved(64) == h + h0
  assert saved(60) <= 2 * h + h0 + 16   # padded to 64: a and h (and a scalar or two)
