"""ssd() and linear_attention(): the entry points layers call; validation and dispatch.

Both are the same chunked kernel (`ssd_core`): Mamba-2 passes log-decay Δ·A and input scale Δ;
linear attention passes log-decay 0 (or a per-head log gate) and scale 1, with C = q, B = k,
x = v.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from memx.kernels._dispatch import NEEDS_GPU, choose, gpu_backend
from memx.kernels.ssd import pallas_gpu as pallas_impl
from memx.kernels.ssd import xla as xla_impl
from memx.kernels.ssd.config import BlockSizes
from memx.kernels.ssd.reference import segment_runs, ssd_quadratic_form, ssd_scan
from memx.typing import Array, Float, Int

Implementation = Literal["reference", "quadratic", "xla", "pallas_gpu"]
IMPLEMENTATIONS: tuple[str, ...] = ("reference", "quadratic", "xla", "pallas_gpu")
_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)



def default_order() -> tuple[str, ...]:
  """Dispatch order for implementation=None on the current backend."""
  return ("pallas_gpu", "xla") if gpu_backend() else ("xla",)


def _shape(x):
  return tuple(getattr(x, "shape", ())) if x is not None else None


def _concrete(x) -> bool:
  return x is not None and not isinstance(x, jax.core.Tracer)


def _check_core(op: str, x, dt, log_a, bm, cm, d, h0, seg) -> None:
  """ValueError for bad input to the general form, before anything is traced."""
  for name, v in (("x" if op == "ssd" else "v", x), ("B" if op == "ssd" else "k", bm),
                  ("C" if op == "ssd" else "q", cm)):
    if getattr(v, "ndim", None) != 4:
      raise ValueError(f"{op}: {name} must be rank 4; got shape {_shape(v)}")
    if v.dtype not in _FLOAT_DTYPES:
      raise ValueError(f"{op}: {name} dtype {v.dtype} is not supported; use float32, bfloat16 "
                       f"or float16")
  if not x.dtype == bm.dtype == cm.dtype:
    names = "x, B, C" if op == "ssd" else "v, k, q"
    raise ValueError(f"{op}: {names} dtypes differ ({x.dtype}, {bm.dtype}, {cm.dtype})")
  bsz, t, h, p = x.shape
  if t == 0:
    raise ValueError(f"{op}: the sequence is empty (T = 0)")
  n = bm.shape[-1]
  for name, v in (("B" if op == "ssd" else "k", bm), ("C" if op == "ssd" else "q", cm)):
    if v.shape[:2] != (bsz, t):
      raise ValueError(f"{op}: {name} {v.shape} and x {x.shape} disagree on [B, T]")
    if v.shape[2] == 0 or h % v.shape[2]:
      raise ValueError(f"{op}: {name} has {v.shape[2]} groups/heads, which must divide the "
                       f"{h} heads")
  if cm.shape[-1] != n:
    raise ValueError(f"{op}: state sizes differ: {bm.shape[-1]} vs {cm.shape[-1]}")
  for name, v in (("x" if op == "ssd" else "v", x), ("B" if op == "ssd" else "k", bm)):
    if 0 in v.shape:
      raise ValueError(f"{op}: {name} has an empty dimension (shape {v.shape}); every "
                       "dimension must be >= 1")
  g_lo, g_hi = sorted((bm.shape[2], cm.shape[2]))
  if g_hi % g_lo:
    raise ValueError(f"{op}: group counts {bm.shape[2]} and {cm.shape[2]} must divide one "
                     f"another")
  for name, v in (("dt", dt), ("log-decay", log_a)):
    if _shape(v) != (bsz, t, h):
      raise ValueError(f"{op}: {name} must have shape [B, T, H] = {(bsz, t, h)}, got "
                       f"{_shape(v)}")
  if d is not None and _shape(d) != (h,):
    raise ValueError(f"{op}: D must have shape [H] = {(h,)}, got {_shape(d)}")
  if h0 is not None and _shape(h0) != (bsz, h, p, n):
    raise ValueError(f"{op}: initial_state must have shape [B, H, P, N] = {(bsz, h, p, n)}, got "
                     f"{_shape(h0)} (a state returned by a call on other shapes?)")
  if seg is not None:
    if _shape(seg) != (bsz, t):
      raise ValueError(f"{op}: segment_ids must have shape [B, T] = {(bsz, t)}, got "
                       f"{_shape(seg)}")
    if not jnp.issubdtype(seg.dtype, jnp.integer):
      raise ValueError(f"{op}: segment_ids must be integers, got {seg.dtype}")


def unsupported_reason(name: str, x, bm, block_sizes: BlockSizes | None, interpret: bool
                       ) -> str | None:
  """Why implementation `name` cannot serve these (valid) inputs, or None if it can."""
  if name in ("reference", "quadratic", "xla"):
    return None
  if name == "pallas_gpu":
    if not interpret and not gpu_backend():
      return NEEDS_GPU
    if x.dtype == jnp.float16:
      return ("float16 inputs: the kernels' matmuls run in the input dtype, and the fp32 "
              "chunk states exceed float16's range (65504) on long inputs; use bfloat16 or "
              "float32, or implementation='xla' (fp32 matmuls for float16)")
    return pallas_impl.unsupported_reason(x.shape[-1], bm.shape[-1])
  raise NotImplementedError(f"ssd: unknown implementation {name!r}; available: "
                            f"{IMPLEMENTATIONS}")


@functools.partial(jax.jit, static_argnames=("name", "block_sizes", "interpret"))
def _chunked(name, x, dt, log_a, bm, cm, d, h0, seg, *, block_sizes, interpret):
  """Pads T to whole chunks, forms the chunk-local cumulative log-decay, runs the kernel."""
  bsz, t, h, p = x.shape
  n = bm.shape[-1]
  blocks = block_sizes or BlockSizes.get_default(name)
  q = min(blocks.chunk, max(16, 1 << (t - 1).bit_length()))
  tp = -(-t // q) * q
  pad = lambda v: jnp.pad(v, ((0, 0), (0, tp - t)) + ((0, 0),) * (v.ndim - 2))  # noqa: E731
  # Padding tokens: x = 0 and log-decay 0, so they neither write nor decay the state.
  log_a = pad(log_a.astype(jnp.float32))
  cum = jnp.cumsum(xla_impl.to_chunks(log_a, q), axis=2).reshape(bsz, tp, h)
  d = jnp.zeros((h,), jnp.float32) if d is None else d
  h0 = (jnp.zeros((bsz, h, p, n), jnp.float32) if h0 is None else h0.astype(jnp.float32))
  if seg is not None:
    seg = jnp.pad(seg, ((0, 0), (0, tp - t)), mode="edge")
  plan = xla_impl.Plan(chunk=q, n_chunks=tp // q, segments=seg is not None)
  args = (pad(x), pad(dt), cum, pad(bm), pad(cm), d, h0, seg)
  if name == "xla":
    y, h_last = xla_impl.ssd_chunked(plan, *args)
  else:
    pplan = pallas_impl.make_plan(plan, p, n, blocks, interpret,
                                  batch_heads=x.shape[0] * x.shape[2])
    y, h_last = pallas_impl.ssd_pallas(pplan, *args)
  return y[:, :t], h_last


# exp(-110) = 1.7e-48 rounds to 0 in float32 (whose smallest subnormal is 1.4e-45).
LOG_DECAY_FLOOR = -110.0


def ssd_core(
    x: Float[Array, "B T H P"],
    dt: Float[Array, "B T H"],
    log_a: Float[Array, "B T H"],
    b: Float[Array, "B T G N"],
    c: Float[Array, "B T G N"],
    *,
    d: Float[Array, " H"] | None = None,
    initial_state: Float[Array, "B H P N"] | None = None,
    segment_ids: Int[Array, "B T"] | None = None,
    implementation: Implementation | Sequence[Implementation] | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
    _op: str = "ssd",
) -> tuple[Float[Array, "B T H P"], Float[Array, "B H P N"]]:
  """The general form h_t = exp(log_a_t) h_{t-1} + dt_t x_t ⊗ B_t, y_t = h_t C_t + D x_t.

  B and C may have different group counts (each dividing H, one dividing the other). See
  `ssd` for the arguments; `ssd` and `linear_attention` are thin wrappers.
  """
  _check_core(_op, x, dt, log_a, b, c, d, initial_state, segment_ids)
  if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
    raise ValueError(f"{_op}: block_sizes must be a BlockSizes, got {block_sizes!r}")
  seg = segment_runs(segment_ids)
  name = choose(_op, implementation, default_order(),
                lambda n: unsupported_reason(n, x, b, block_sizes, interpret), stacklevel=4)
  if name == "reference":
    return ssd_scan(x, dt, log_a, b, c, d=d, initial_state=initial_state, segment_ids=seg)
  # The chunked and quadratic forms take differences of cumulative log decays: a zero gate
  # (log a = -inf, a hard reset) would make them -inf - (-inf) = NaN. Any log decay below
  # LOG_DECAY_FLOOR already decays to exactly 0 in float32 (and has zero gradient), so the
  # floor changes no value and keeps those forms finite, as the sequential reference is.
  log_a = jnp.maximum(log_a, LOG_DECAY_FLOOR)
  if name == "quadratic":
    return ssd_quadratic_form(x, dt, log_a, b, c, d=d, initial_state=initial_state,
                              segment_ids=seg)
  return _chunked(name, x, dt, log_a, b, c, d, initial_state, seg, block_sizes=block_sizes,
                  interpret=interpret)


def ssd(
    x: Float[Array, "B T H P"],
    dt: Float[Array, "B T H"],
    a: Float[Array, " H"],
    b: Float[Array, "B T G N"],
    c: Float[Array, "B T G N"],
    *,
    d: Float[Array, " H"] | None = None,
    initial_state: Float[Array, "B H P N"] | None = None,
    segment_ids: Int[Array, "B T"] | None = None,
    implementation: Implementation | Sequence[Implementation] | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> tuple[Float[Array, "B T H P"], Float[Array, "B H P N"]]:
  """Mamba-2 state-space duality: h_t = exp(Δ_t A) h_{t-1} + Δ_t x_t ⊗ B_t, y_t = h_t C_t + D x_t.

  Args:
    x: inputs [B, T, H, P].
    dt: step sizes Δ [B, T, H], after the layer's activation (softplus); must be positive.
    a: per-head decay rate A [H], <= 0 (Mamba-2: A = -exp(A_log)).
    b: input projection B [B, T, G, N]; head h reads group h // (H/G).
    c: output projection C [B, T, G, N] (same shape as b).
    d: optional skip D [H]: y += D_h x.
    initial_state: state before token 0 [B, H, P, N], e.g. the final state of a previous call
      (continuing from it equals running the concatenation).
    segment_ids: packed sequences [B, T]; the state restarts from zero at every change of id,
      so packed segments equal separate runs. initial_state belongs to token 0's segment.
    implementation: None dispatches by backend (pallas_gpu on an NVIDIA GPU, else xla);
      "reference" is the `lax.scan` recurrence, "quadratic" the O(T²) attention form. A single
      name forces that implementation and raises if it cannot serve the inputs; a sequence is
      tried in order, warning on every skip.
    block_sizes: chunk length and Pallas tiles (`BlockSizes`); default per implementation.
    interpret: run pallas_gpu in the Pallas interpreter (CPU tests).

  Returns:
    (y [B, T, H, P] in x.dtype, final state [B, H, P, N] in float32). Decays, states and
    accumulators are float32; xla and pallas_gpu feed matmuls in the input dtype (bf16 inputs
    use bf16 tensor-core matmuls with fp32 accumulation). Differentiable in every argument but
    segment_ids; xla and pallas_gpu save only inputs, the cumulative log decay [B, T, H] and
    chunk-boundary states for the backward (for T not a multiple of the chunk, the inputs as
    padded copies).

  Raises:
    ValueError: malformed inputs (ranks, shapes, groups that do not divide the heads, dtypes, a
      state of the wrong shape) and, for concrete (non-traced) arrays, dt <= 0 or A > 0.
    NotImplementedError: an explicitly requested implementation cannot serve the inputs, or no
      implementation in a requested sequence can.
  """
  for name, v in (("dt", dt), ("A", a)):
    if getattr(v, "dtype", None) not in _FLOAT_DTYPES:
      raise ValueError(f"ssd: {name} must be a float array, got {getattr(v, 'dtype', v)}")
  if getattr(b, "shape", None) != getattr(c, "shape", None):
    raise ValueError(f"ssd: B {_shape(b)} and C {_shape(c)} must have the same shape "
                     f"[B, T, G, N]")
  if getattr(x, "ndim", None) != 4:
    raise ValueError(f"ssd: x must be [B, T, H, P]; got shape {_shape(x)}")
  h = x.shape[2]
  if _shape(a) != (h,):
    raise ValueError(f"ssd: A must have shape [H] = {(h,)}, got {_shape(a)}")
  if _shape(dt) != x.shape[:3]:
    raise ValueError(f"ssd: dt must have shape [B, T, H] = {x.shape[:3]}, got {_shape(dt)}")
  if _concrete(dt) and dt.size and not bool(np.all(np.asarray(dt, np.float32) > 0)):
    raise ValueError("ssd: dt must be positive after the activation (got values <= 0); "
                     "apply softplus to the raw Δ and keep dt_min > 0")
  if _concrete(a) and not bool(np.all(np.asarray(a, np.float32) <= 0)):
    raise ValueError("ssd: A must be <= 0 (A = -exp(A_log)) so every decay exp(Δ A) <= 1")
  log_a = dt.astype(jnp.float32) * a.astype(jnp.float32)[None, None, :]
  return ssd_core(x, dt, log_a, b, c, d=d, initial_state=initial_state,
                  segment_ids=segment_ids, implementation=implementation,
                  block_sizes=block_sizes, interpret=interpret)


def linear_attention(
    q: Float[Array, "B T H K"],
    k: Float[Array, "B T G K"],
    v: Float[Array, "B T H V"],
    *,
    log_gate: Float[Array, "B T H"] | None = None,
    scale: float = 1.0,
    initial_state: Float[Array, "B H V K"] | None = None,
    segment_ids: Int[Array, "B T"] | None = None,
    implementation: Implementation | Sequence[Implementation] | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> tuple[Float[Array, "B T H V"], Float[Array, "B H V K"]]:
  """Causal linear attention o_t = Σ_{s<=t} (Π_{s<j<=t} g_j)(scale · q_t·k_s) v_s (unnormalised).

  SSD with A = 0, Δ = 1 (C = q, B = k, x = v); with `log_gate` it is scalar-gated linear
  attention (one gate per head and token, GLA/RetNet-style decay).

  Args:
    q: queries [B, T, H, K] (feature map already applied).
    k: keys [B, T, G, K]; G divides H (GQA-style shared keys: head h reads key group
      h // (H/G)).
    v: values [B, T, H, V], or [B, T, G, V] shared like the keys (repeated to H heads, since
      each head keeps its own state).
    log_gate: log of the per-head forget gate [B, T, H], <= 0; None means no decay.
    scale: multiplies q (1.0: plain unnormalised linear attention).
    initial_state: [B, H, V, K] (the SSD layout: value rows, key columns).
    segment_ids, implementation, block_sizes, interpret: as in `ssd`.

  Returns:
    (o [B, T, H, V] in v.dtype, final state [B, H, V, K] in float32).

  Raises:
    ValueError: malformed inputs, or (concrete arrays) a positive log gate.
    NotImplementedError: as in `ssd`.
  """
  for name, arr in (("q", q), ("k", k), ("v", v)):
    if getattr(arr, "ndim", None) != 4:
      raise ValueError(f"linear_attention: {name} must be [B, T, heads, dim]; got "
                       f"{_shape(arr)}")
  bsz, t, h = q.shape[:3]
  if v.shape[:2] != (bsz, t) or v.shape[2] not in (h, k.shape[2]):
    raise ValueError(f"linear_attention: v {v.shape} must be [B, T, H, V] with H = {h} query "
                     f"heads or the {k.shape[2]} key groups")
  if v.shape[2] != h:
    if h % v.shape[2]:
      raise ValueError(f"linear_attention: {v.shape[2]} value groups must divide {h} heads")
    v = jnp.repeat(v, h // v.shape[2], axis=2)
  if log_gate is None:
    log_a = jnp.zeros((bsz, t, h), jnp.float32)
  else:
    if _shape(log_gate) != (bsz, t, h):
      raise ValueError(f"linear_attention: log_gate must have shape [B, T, H] = {(bsz, t, h)}, "
                       f"got {_shape(log_gate)}")
    if _concrete(log_gate) and not bool(np.all(np.asarray(log_gate, np.float32) <= 0)):
      raise ValueError("linear_attention: log_gate must be <= 0 (a gate in (0, 1])")
    log_a = log_gate.astype(jnp.float32)
  if not isinstance(scale, jax.core.Tracer):  # a traced scale is the caller's to keep finite
    if (isinstance(scale, bool) or np.ndim(scale) != 0
        or not np.issubdtype(np.asarray(scale).dtype, np.number)):
      raise ValueError(f"linear_attention: scale must be a number; got {scale!r}")
    try:
      ok = math.isfinite(float(np.asarray(scale)))
    except (TypeError, ValueError):
      ok = False
    if not ok:
      raise ValueError(f"linear_attention: scale must be a finite number; got {scale!r}")
  if not (isinstance(scale, int | float) and scale == 1.0):  # a traced scale is applied too
    q = (q.astype(jnp.float32) * scale).astype(q.dtype)
  dt = jnp.ones((bsz, t, h), jnp.float32)
  return ssd_core(v, dt, log_a, k, q, initial_state=initial_state, segment_ids=segment_ids,
                  implementation=implementation, block_sizes=block_sizes, interpret=interpret,
                  _op="linear_attention")
