"""causal_conv implementations vs the token-by-token reference (and a float64 numpy loop):
values and gradients in x, w, bias and history; packing, history, dispatch, bad input."""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memx.kernels import _testing
from memx.kernels.short_conv import (
    BlockSizes,
    causal_conv,
    causal_conv_reference,
)

BS16 = BlockSizes(block_t=16, block_c=16)
FUSED = BlockSizes(block_t=16, block_c=16, backward="fused")

# name: (B, T, channel shape, W), segment lengths per row (or None), history, history segments,
# block sizes
CASES = {
    "ragged_t_and_c": ((2, 37, (20,), 4), None, False, False, BS16),
    "heads_trailing": ((1, 19, (3, 8), 4), None, True, False, BS16),
    "packed_history": ((2, 40, (24,), 4), [[11, 2, 27], [40]], True, True, BS16),
    "packed_default_history_segment": ((2, 21, (16,), 3), [[5, 16], [21]], True, False, BS16),
    "shorter_than_history": ((2, 2, (16,), 4), [[1, 1], [2]], True, True, BS16),
    "width_one": ((1, 9, (5,), 1), None, False, False, BS16),
    "default_blocks": ((1, 70, (33,), 4), [[30, 40]], False, False, None),
    "fused_backward": ((2, 40, (24,), 4), [[11, 2, 27], [40]], True, True, FUSED),
    "fused_plain": ((1, 37, (20,), 3), None, False, False, FUSED),
    # Several backward programs along T (partial dw / dbias sums added across them).
    "many_backward_programs": ((2, 45, (16,), 4), [[20, 25], [45]], True, False,
                               BlockSizes(block_t=8, block_c=16, block_t_bwd=8, rows_bwd=16)),
}


def _segments(lengths):
  if lengths is None:
    return None
  rows = [np.concatenate([np.full(n, i) for i, n in enumerate(row)]) for row in lengths]
  return jnp.asarray(np.stack(rows), jnp.int32)


def _inputs(case, dtype, seed=0):
  (b, t, chan, width), lengths, with_hist, with_hseg, _ = CASES[case]
  ks = jax.random.split(jax.random.key(seed), 5)
  x = jax.random.normal(ks[0], (b, t, *chan)).astype(dtype)
  w = (0.5 * jax.random.normal(ks[1], (width, *chan))).astype(dtype)
  bias = (0.5 * jax.random.normal(ks[2], chan)).astype(dtype)
  hist = jax.random.normal(ks[3], (b, width - 1, *chan)).astype(dtype) if with_hist else None
  dy = jax.random.normal(ks[4], (b, t, *chan)).astype(dtype)
  seg = _segments(lengths)
  hseg = None
  if with_hseg:  # row 0: all in token 0's segment; other rows: the oldest one from another
    first = np.asarray(seg[:, 0])
    hseg = np.repeat(first[:, None], width - 1, axis=1)
    hseg[1:, 0] -= 1
    hseg = jnp.asarray(hseg, jnp.int32)
  return x, w, bias, hist, dy, seg, hseg


def _value_and_grads(fn, x, w, bias, hist, dy):
  def run(x, w, bias, hist, dy):
    y, vjp = jax.vjp(fn, x, w, bias, hist)
    return (y, *vjp(dy))
  return _testing.jit_for_test(run)(x, w, bias, hist, dy)


@functools.cache
def _reference_result(case, dtype_name, activation):
  x, w, bias, hist, dy, seg, hseg = _inputs(case, jnp.dtype(dtype_name))
  f32 = lambda a: None if a is None else a.astype(jnp.float32)  # noqa: E731
  return _value_and_grads(
      lambda x, w, bias, hist: causal_conv_reference(x, w, bias, seg, hist, hseg,
                                                     activation=activation),
      f32(x), f32(w), f32(bias), f32(hist), f32(dy))


class _ConvBase:
  IMPL: str = ""
  INTERPRET: bool = False

  @pytest.mark.parametrize("activation", [None, "silu"])
  @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
  @pytest.mark.parametrize("case", tuple(CASES))
  def test_values_and_grads_match_reference(self, case, dtype, activation):
    x, w, bias, hist, dy, seg, hseg = _inputs(case, dtype)
    blocks = CASES[case][-1]

    def fn(x, w, bias, hist):
      return causal_conv(x, w, bias, seg, hist, hseg, activation=activation,
                         implementation=self.IMPL, block_sizes=blocks, interpret=self.INTERPRET)

    got = _value_and_grads(fn, x, w, bias, hist, dy)
    want = _reference_result(case, jnp.dtype(dtype).name, activation)
    names = ("y", "dx", "dw", "dbias", "dhistory")
    for i, (g, r) in enumerate(zip(got, want, strict=True)):
      if r is None:
        assert g is None, names[i]
        continue
      assert g.shape == r.shape, names[i]
      # dw and dbias sum over all B·T tokens: widen by the reduction length (Tokamax's rule).
      n = x.shape[0] * x.shape[1] if names[i] in ("dw", "dbias") else None
      _testing.assert_allclose(g, r, dtype=dtype, grad=i >= 1, reduction_size=n,
                               name=f"{self.IMPL} {case} {names[i]}")
    assert got[0].dtype == dtype and got[2].dtype == dtype and got[3].dtype == dtype


class TestXla(_ConvBase):
  IMPL = "xla"


class TestPallasGpuInterpret(_ConvBase):
  IMPL, INTERPRET = "pallas_gpu", True


@pytest.mark.gpu
class TestPallasGpu(_ConvBase):
  IMPL = "pallas_gpu"


def _conv_loop(x, w, bias, seg, hist, hist_seg, silu):
  """The definition in float64, one output and one tap at a time."""
  x, w, bias, hist = (np.asarray(a, np.float64) for a in (x, w, bias, hist))
  width, (b, t) = w.shape[0], x.shape[:2]
  ext, ext_seg = np.concatenate([hist, x], 1), np.concatenate([hist_seg, seg], 1)
  y = np.broadcast_to(bias, x.shape).copy()
  for i in range(b):
    for j in range(t):
      for k in range(width):
        if ext_seg[i, j + k] == seg[i, j]:           # x_j sits at ext row j + W - 1
          y[i, j] += w[k] * ext[i, j + k]
  return y * (1 / (1 + np.exp(-y))) if silu else y


@pytest.mark.parametrize("silu", [False, True])
def test_reference_matches_float64_loop(silu):
  x, w, bias, hist, _, seg, hseg = _inputs("packed_history", jnp.float32)
  got = causal_conv_reference(x, w, bias, seg, hist, hseg, activation="silu" if silu else None)
  want = _conv_loop(x, w, bias, np.asarray(seg), hist, np.asarray(hseg), silu)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl, kw", [("reference", {}), ("xla", {}),
                                      ("pallas_gpu", {"interpret": True, "block_sizes": BS16})])
def test_packed_equals_separate_and_history_continues(impl, kw):
  x, w, bias, _, _, _, _ = _inputs("ragged_t_and_c", jnp.float32, seed=3)
  run = functools.partial(causal_conv, implementation=impl, activation="silu", **kw)
  seg = jnp.asarray([[0] * 12 + [1] * 25] * 2, jnp.int32)
  packed = run(x, w, bias, seg)
  separate = jnp.concatenate([run(x[:, :12], w, bias), run(x[:, 12:], w, bias)], 1)
  _testing.assert_allclose(packed, separate, name="packed")
  # The last W-1 inputs of a head, passed as history, continue it exactly.
  head = run(x[:, :12], w, bias)
  tail = run(x[:, 12:], w, bias, None, x[:, 9:12])
  _testing.assert_allclose(jnp.concatenate([head, tail], 1), run(x, w, bias), name="continued")


@pytest.mark.parametrize("impl, kw", [("reference", {}), ("xla", {}),
                                      ("pallas_gpu", {"interpret": True, "block_sizes": BS16})])
def test_a_reused_segment_id_starts_a_new_segment(impl, kw):
  """Ids [0]*12 + [1]*3 + [0]*22: the third run reuses id 0 within W-1 tokens of the first, and
  must not see it (a segment is a run of equal ids, as in the SSD beside the conv)."""
  x, w, bias, *_ = _inputs("ragged_t_and_c", jnp.float32, seed=5)
  hist = jax.random.normal(jax.random.key(6), (2, 3, 20))
  run = functools.partial(causal_conv, implementation=impl, activation="silu", **kw)
  seg = jnp.asarray([[0] * 12 + [1] * 3 + [0] * 22] * 2, jnp.int32)
  parts = [run(x[:, :12], w, bias, None, hist), run(x[:, 12:15], w, bias),
           run(x[:, 15:], w, bias)]
  _testing.assert_allclose(run(x, w, bias, seg, hist), jnp.concatenate(parts, 1),
                           name="reused id")
  # History rows keep their own runs too: an id that matches token 0's only after another run.
  hseg = jnp.asarray([[0, 1, 0]] * 2, jnp.int32)
  want = jnp.concatenate([run(x[:, :12], w, bias, None, hist.at[:, :2].set(0)), parts[1],
                          parts[2]], 1)
  _testing.assert_allclose(run(x, w, bias, seg, hist, hseg), want, name="history runs")


def test_default_dispatch_on_cpu_is_xla_without_warnings():
  x, w, bias, *_ = _inputs("ragged_t_and_c", jnp.float32)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    got = causal_conv(x, w, bias, activation="silu")
  _testing.assert_allclose(got, causal_conv_reference(x, w, bias, activation="silu"))


def test_explicit_pallas_without_gpu_fails_fast_and_sequences_fall_back():
  x, w, bias, *_ = _inputs("ragged_t_and_c", jnp.float32)
  with pytest.raises(NotImplementedError, match="interpret=True"):
    causal_conv(x, w, bias, implementation="pallas_gpu")
  with pytest.warns(UserWarning, match="skipping pallas_gpu"):
    causal_conv(x, w, bias, implementation=("pallas_gpu", "xla"))
  with pytest.raises(NotImplementedError, match="unknown implementation"):
    causal_conv(x, w, bias, implementation="cuda")


@pytest.mark.parametrize("change, match", [
    ({"x": (4, 3)}, "rank >= 3"),
    ({"x": (1, 0, 3)}, "empty"),
    ({"w": (4, 2)}, r"w must be \[W, \*channels\]"),
    ({"w": (0, 3)}, "W >= 1"),
    ({"bias": (2,)}, "bias must have the channel shape"),
    ({"segment_ids": (1, 5)}, "segment_ids must have shape"),
    ({"history": (1, 2, 3)}, "W-1 = 3 inputs"),
    ({"history": (1, 3, 3), "history_segment_ids": (1, 2), "segment_ids": (1, 6)},
     "history_segment_ids must have shape"),
    ({"history_segment_ids": (1, 3)}, "needs both history and segment_ids"),
    ({"activation": "gelu"}, "activation 'gelu' is not supported"),
])
def test_bad_input_raises_value_error(change, match):
  shapes = {"x": (1, 6, 3), "w": (4, 3), "bias": (3,)} | change
  kw = {k: jnp.zeros(shapes[k], jnp.int32) for k in ("segment_ids", "history_segment_ids")
        if k in shapes}
  if "history" in shapes:
    kw["history"] = jnp.zeros(shapes["history"])
  with pytest.raises(ValueError, match=match):
    causal_conv(jnp.ones(shapes["x"]), jnp.ones(shapes["w"]), jnp.ones(shapes["bias"]),
                activation=change.get("activation"), **kw)
  with pytest.raises(ValueError, match="dtype"):
    causal_conv(jnp.ones((1, 2, 3), jnp.int32), jnp.ones((4, 3)), jnp.ones(3))
  with pytest.raises(ValueError, match="power of two"):
    BlockSizes(block_t=24)
  with pytest.raises(ValueError, match="'fused' or 'two_pass'"):
    BlockSizes(backward="split")
