"""bitlinear(): RMSNorm → 8-bit activations → ternary weights → matmul, as one differentiable op.

    y = Q8(RMSNorm(x) · g) @ Q3(W)       Q8: per-token absmax int8,  Q3: absmean ternary

with straight-through gradients through both quantizers (BitNet b1.58 / MatMul-free LM §3.1).

Implementations:
  reference  the composition in plain jnp, differentiated by autodiff. Autodiff keeps every
             intermediate for the backward pass: the normalised input, the quantized input
             (both [..., K] float32) and the quantized weight (a full [K, N] copy).
  xla        the same forward with a custom VJP that saves only its inputs (x, g, W: x is the
             only activation) and recomputes the norm and both quantizers in the backward pass.
             This is the memory half of the MatMul-free LM's fused BitLinear kernel: the paper
             (§4, "fused BitLinear") reports 61% less training memory from it. The forward is
             bit-identical to `reference`; gradients agree to rounding.

Backward (STE: dL/dx̃ = dL/dxn, dL/dW̃ = dL/dW): dW = x̃ᵀ dy, d(xn) = dy W̃ᵀ, then the RMSNorm
backward from x alone (`memx.kernels.norms.rms_norm_vjp`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp

from memx.kernels._dispatch import choose, known_only
from memx.kernels.norms import rms_norm_reference, rms_norm_vjp
from memx.kernels.ternary.reference import int8_fake_quant, ternary_fake_quant
from memx.typing import Array

Implementation = Literal["reference", "xla"]
BITLINEAR_IMPLEMENTATIONS: tuple[str, ...] = ("reference", "xla")
_FLOATS = (jnp.float32, jnp.bfloat16, jnp.float16)


def _operands(x, g, w, eps: float, quantize: bool):
  """(x̃ float32 [..., K], W̃ float32 [K, N]): the matmul's operands."""
  xn = rms_norm_reference(x.astype(jnp.float32), g, eps)
  w32 = w.astype(jnp.float32)
  if quantize:
    return int8_fake_quant(xn), ternary_fake_quant(w32)
  return xn, w32


def _matmul(a, b, dt):
  return jnp.dot(a.astype(dt), b.astype(dt), preferred_element_type=jnp.float32)


def bitlinear_reference(x: Array, g: Array, w: Array, *, eps: float = 1e-6,
                        quantize: bool = True, compute_dtype=jnp.float32) -> Array:
  """The oracle: plain autodiff through the straight-through quantizers."""
  xq, wq = _operands(x, g, w, eps, quantize)
  return _matmul(xq, wq, compute_dtype).astype(compute_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _bitlinear_fused(x, g, w, eps, quantize, compute_dtype):
  return bitlinear_reference(x, g, w, eps=eps, quantize=quantize, compute_dtype=compute_dtype)


def _fused_fwd(x, g, w, eps, quantize, compute_dtype):
  y = bitlinear_reference(x, g, w, eps=eps, quantize=quantize, compute_dtype=compute_dtype)
  return y, (x, g, w)  # residuals are the inputs: nothing [..., K] beyond x itself is kept


def _fused_bwd(eps, quantize, compute_dtype, res, dy):
  # Recompute after dy exists and never merge with the forward (CSE would keep the forward's
  # normalised and quantized activations alive, undoing the saving): as jax.checkpoint does.
  x, g, w, dy = jax.lax.optimization_barrier(res + (dy,))
  xq, wq = _operands(x, g, w, eps, quantize)
  dt = compute_dtype
  # Contract over all leading (token) axes at once: a reshape to [tokens, K] would merge a
  # sharded sequence axis with the batch and make the SPMD partitioner all-gather it.
  lead = tuple(range(x.ndim - 1))
  dw = jax.lax.dot_general(xq.astype(dt), dy.astype(dt), ((lead, lead), ((), ())),
                           preferred_element_type=jnp.float32)
  dxn = jax.lax.dot_general(dy.astype(dt), wq.astype(dt), (((dy.ndim - 1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32)  # STE: d(x̃) is d(xn)
  dx, dg = rms_norm_vjp(x, g, eps, dxn)
  return dx.astype(x.dtype), dg.astype(g.dtype), dw.astype(w.dtype)


_bitlinear_fused.defvjp(_fused_fwd, _fused_bwd)


def bitlinear_xla(x: Array, g: Array, w: Array, *, eps: float = 1e-6, quantize: bool = True,
                  compute_dtype=jnp.float32) -> Array:
  """Recompute-in-backward form: saves only x (and the parameters)."""
  return _bitlinear_fused(x, g, w, eps, quantize, jnp.dtype(compute_dtype))


def _check(x, g, w, compute_dtype) -> None:
  if getattr(w, "ndim", None) != 2:
    raise ValueError(f"bitlinear: weight must be [K, N]; got shape {getattr(w, 'shape', None)}")
  k = w.shape[0]
  if getattr(x, "ndim", 0) < 1 or x.shape[-1] != k:
    raise ValueError(f"bitlinear: x must be [..., K] with K = {k} (the weight's rows); got "
                     f"shape {getattr(x, 'shape', None)}")
  if getattr(g, "shape", None) != (k,):
    raise ValueError(f"bitlinear: norm scale must be [K] = ({k},); got shape "
                     f"{getattr(g, 'shape', None)}")
  for name, a in (("x", x), ("norm scale", g), ("weight", w)):
    if a.dtype not in _FLOATS:
      raise ValueError(f"bitlinear: {name} dtype {a.dtype} is not float32/bfloat16/float16")
  try:
    ok = jnp.dtype(compute_dtype) in _FLOATS
  except TypeError:
    ok = False
  if not ok:
    raise ValueError(f"bitlinear: compute_dtype = {compute_dtype!r} is not allowed: the matmul "
                     "operands must be float32, bfloat16 or float16 (an integer type would "
                     "truncate the quantized values)")


def bitlinear(
    x: Array,
    g: Array,
    w: Array,
    *,
    eps: float = 1e-6,
    quantize: bool = True,
    compute_dtype=jnp.float32,
    implementation: Implementation | Sequence[Implementation] | None = None,
) -> Array:
  """y = Q8(RMSNorm(x)·g) @ Q3(W) with straight-through gradients.

  Args:
    x: activations [..., K]. g: the RMSNorm scale [K]. w: latent full-precision weight [K, N].
    eps: RMSNorm epsilon. quantize: False keeps norm + matmul in full precision (the ablation).
    compute_dtype: dtype of the matmul operands and of the result (accumulation is float32).
    implementation: None → "xla" (recompute in the backward pass) on every backend;
      "reference" keeps autodiff's residuals.

  Returns:
    [..., N] in compute_dtype.
  """
  _check(x, g, w, compute_dtype)
  name = choose("bitlinear", implementation, ("xla", "reference"),
                known_only("bitlinear", BITLINEAR_IMPLEMENTATIONS))
  fn = bitlinear_xla if name == "xla" else bitlinear_reference
  return fn(x, g, w, eps=eps, quantize=quantize, compute_dtype=compute_dtype)
