"""causal_conv(): the one entry point layers call; validates inputs and picks an implementation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import jax.numpy as jnp

from memx.kernels._dispatch import choose, gpu_backend, portable_or_pallas_reason
from memx.kernels.short_conv.config import BlockSizes
from memx.kernels.short_conv.pallas_gpu import causal_conv_pallas_gpu
from memx.kernels.short_conv.reference import (
    ACTIVATIONS,
    causal_conv_reference,
    segment_runs,
)
from memx.kernels.short_conv.xla import causal_conv_xla
from memx.typing import Array, Float, Int

Implementation = Literal["reference", "xla", "pallas_gpu"]
IMPLEMENTATIONS: tuple[str, ...] = ("reference", "xla", "pallas_gpu")
_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def default_order() -> tuple[str, ...]:
  """Dispatch order for implementation=None on the current backend."""
  return ("pallas_gpu", "xla") if gpu_backend() else ("xla",)


def _shape(a):
  return tuple(getattr(a, "shape", ()))


def _check_inputs(x, w, bias, segment_ids, history, history_segment_ids, activation) -> None:
  """ValueError for bad input, before anything is traced."""
  if getattr(x, "ndim", 0) < 3:
    raise ValueError(f"causal_conv: x must be [B, T, *channels] (rank >= 3); got shape "
                     f"{_shape(x)}")
  bsz, t, chan = x.shape[0], x.shape[1], tuple(x.shape[2:])
  if t == 0:
    raise ValueError("causal_conv: the sequence is empty (T = 0)")
  if 0 in x.shape:
    raise ValueError(f"causal_conv: x has an empty dimension (shape {x.shape}); the batch and "
                     "every channel dimension must be >= 1")
  if getattr(w, "ndim", 0) != 1 + len(chan) or tuple(w.shape[1:]) != chan or w.shape[0] < 1:
    raise ValueError(f"causal_conv: w must be [W, *channels] = [W, {', '.join(map(str, chan))}]"
                     f" with W >= 1; got shape {_shape(w)}")
  if _shape(bias) != chan:
    raise ValueError(f"causal_conv: bias must have the channel shape {chan}; got {_shape(bias)}")
  for name, a in (("x", x), ("w", w), ("bias", bias)):
    if a.dtype not in _FLOAT_DTYPES:
      raise ValueError(f"causal_conv: {name} dtype {a.dtype} is not supported; use float32, "
                       f"bfloat16 or float16")
  if activation not in ACTIVATIONS:
    raise ValueError(f"causal_conv: activation {activation!r} is not supported; expected one of "
                     f"{ACTIVATIONS}")
  keep = w.shape[0] - 1
  if segment_ids is not None:
    if _shape(segment_ids) != (bsz, t):
      raise ValueError(f"causal_conv: segment_ids must have shape [B, T] = {(bsz, t)}, got "
                       f"{_shape(segment_ids)}")
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
      raise ValueError(f"causal_conv: segment_ids must be integers, got {segment_ids.dtype}")
  if history is not None:
    if _shape(history) != (bsz, keep, *chan):
      raise ValueError(f"causal_conv: history must hold the W-1 = {keep} inputs before the "
                       f"sequence, shape {(bsz, keep, *chan)}; got {_shape(history)}")
    if history.dtype not in _FLOAT_DTYPES:
      raise ValueError(f"causal_conv: history dtype {history.dtype} is not supported")
  if history_segment_ids is not None:
    if history is None or segment_ids is None:
      raise ValueError("causal_conv: history_segment_ids needs both history and segment_ids")
    if _shape(history_segment_ids) != (bsz, keep):
      raise ValueError(f"causal_conv: history_segment_ids must have shape [B, W-1] = "
                       f"{(bsz, keep)}, got {_shape(history_segment_ids)}")
    if not jnp.issubdtype(history_segment_ids.dtype, jnp.integer):
      raise ValueError(f"causal_conv: history_segment_ids must be integers, got "
                       f"{history_segment_ids.dtype}")


def unsupported_reason(name: str, interpret: bool) -> str | None:
  """Why implementation `name` cannot serve these (valid) inputs, or None if it can."""
  return portable_or_pallas_reason("causal_conv", name, IMPLEMENTATIONS, interpret=interpret,
                                   on_gpu=gpu_backend())


def causal_conv(
    x: Float[Array, "B T ..."],
    w: Float[Array, "W ..."],
    bias: Float[Array, "..."],
    segment_ids: Int[Array, "B T"] | None = None,
    history: Float[Array, "B Wm1 ..."] | None = None,
    history_segment_ids: Int[Array, "B Wm1"] | None = None,
    *,
    activation: Literal["silu"] | None = None,
    implementation: Implementation | Sequence[Implementation] | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> Float[Array, "B T ..."]:
  """Short causal depthwise convolution over time with an optional fused activation.

  y_t = act(bias + Σ_{k<W} w[k] ⊙ x_{t-W+1+k}) per channel (Mamba's conv1d, d_conv = W).

  Args:
    x: inputs [B, T, *channels] (any trailing channel shape, e.g. [B, T, H, P]).
    w: taps [W, *channels]; w[W-1] multiplies the current token.
    bias: [*channels].
    segment_ids: packed sequences [B, T]: a token never sees inputs of another segment, so a
      packed run equals separate runs. A segment is a run of equal ids (an id may recur
      later and still start a new segment, as in `memx.kernels.ssd`).
    history: the W-1 inputs before the sequence [B, W-1, *channels] (a decode state or the
      previous device's tail); default zeros.
    history_segment_ids: segments of the history rows [B, W-1]; default token 0's segment.
    activation: None or "silu", applied in float32 before the output is rounded.
    implementation: None dispatches by backend (pallas_gpu on an NVIDIA GPU, else xla). A single
      name forces that implementation and raises if it cannot serve; a sequence is tried in
      order, warning on every skip.
    block_sizes: pallas_gpu tiles (`BlockSizes`).
    interpret: run pallas_gpu in the Pallas interpreter (CPU tests).

  Returns:
    y with x's shape and dtype (float32 arithmetic in every implementation). Differentiable in
    x, w, bias and history; pallas_gpu's default two-pass backward rounds the intermediate
    g = dy ⊙ act'(pre) to x's dtype between its passes (`BlockSizes.backward`).

  Raises:
    ValueError: malformed inputs (ranks, shapes, dtypes, an unknown activation).
    NotImplementedError: an explicitly requested implementation cannot serve the inputs.
  """
  _check_inputs(x, w, bias, segment_ids, history, history_segment_ids, activation)
  if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
    raise ValueError(f"causal_conv: block_sizes must be a BlockSizes, got {block_sizes!r}")
  name = choose("causal_conv", implementation, default_order(),
                lambda n: unsupported_reason(n, interpret))
  segment_ids, history_segment_ids = segment_runs(segment_ids, history_segment_ids,
                                                 history is not None)
  args = (x, w, bias, segment_ids, history, history_segment_ids)
  if name == "reference":
    return causal_conv_reference(*args, activation=activation)
  if name == "xla":
    return causal_conv_xla(*args, activation=activation)
  return causal_conv_pallas_gpu(*args, activation=activation, block_sizes=block_sizes,
                                interpret=interpret)
