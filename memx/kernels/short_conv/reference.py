"""Short causal depthwise convolution over time (Mamba's conv1d): the sequential oracle.

y_t = act(bias + Σ_{k<W} w[k] ⊙ x_{t-W+1+k}), per channel, where inputs before the sequence
come from `history` (the W-1 inputs before it) or are zero, and, with packed segment ids, inputs
from another segment than token t's count as zero. The oracle walks the sequence one token at
a time with the decode form's window of the last W inputs, a different algorithm from the
shifted-slice (xla) and tiled (pallas_gpu) implementations.
"""

import jax
import jax.numpy as jnp
from jax import lax

from memx.typing import Array, Float, Int

ACTIVATIONS = (None, "silu")


def activate(pre: Float[Array, "..."], activation: str | None) -> Float[Array, "..."]:
  """The activation fused after the convolution (float32 in, float32 out)."""
  return jax.nn.silu(pre) if activation == "silu" else pre


def segment_runs(segment_ids, history_segment_ids, has_history: bool):
  """Renumbers packed segments as runs 0, 1, 2, ... over [history, sequence] per row, so an id
  that recurs later (ids [0, 0, 1, 0]) still starts a new segment, as in the SSD beside the
  conv; the implementations then compare ids for equality. Returns (segment ids, history
  segment ids or None)."""
  if segment_ids is None:
    return None, None
  seg = segment_ids.astype(jnp.int32)
  keep = 0
  if has_history and history_segment_ids is not None:
    keep = history_segment_ids.shape[1]
    seg = jnp.concatenate([history_segment_ids.astype(jnp.int32), seg], axis=1)
  starts = jnp.concatenate([jnp.zeros((seg.shape[0], 1), jnp.int32),
                            (seg[:, 1:] != seg[:, :-1]).astype(jnp.int32)], axis=1)
  runs = jnp.cumsum(starts, axis=1)
  return runs[:, keep:], (runs[:, :keep] if keep else None)


def history_segments(segment_ids, history_segment_ids, batch: int, keep: int):
  """Segment ids of the W-1 history rows: as given, or the first token's segment."""
  if history_segment_ids is not None:
    return history_segment_ids.astype(segment_ids.dtype)
  return jnp.broadcast_to(segment_ids[:, :1], (batch, keep))


def causal_conv_reference(
    x: Float[Array, "B T ..."],
    w: Float[Array, "W ..."],
    bias: Float[Array, "..."],
    segment_ids: Int[Array, "B T"] | None = None,
    history: Float[Array, "B Wm1 ..."] | None = None,
    history_segment_ids: Int[Array, "B Wm1"] | None = None,
    *,
    activation: str | None = None,
) -> Float[Array, "B T ..."]:
  """One output per step from the window of the last W inputs (`lax.scan` over T).

  Float32 arithmetic, output in x.dtype. History rows belong to `history_segment_ids` (default:
  token 0's segment); without history the window starts as zeros.
  """
  bsz, t = x.shape[:2]
  width, keep = w.shape[0], w.shape[0] - 1
  xf = x.astype(jnp.float32).reshape(bsz, t, -1)
  c = xf.shape[-1]
  wf, bf = w.astype(jnp.float32).reshape(width, c), bias.astype(jnp.float32).reshape(c)
  seg = (jnp.zeros((bsz, t), jnp.int32) if segment_ids is None
         else segment_ids.astype(jnp.int32))
  if history is None:
    window = jnp.zeros((bsz, keep, c), jnp.float32)
    window_seg = jnp.broadcast_to(seg[:, :1], (bsz, keep))
  else:
    window = history.astype(jnp.float32).reshape(bsz, keep, c)
    window_seg = history_segments(seg, history_segment_ids, bsz, keep)

  def step(carry, inputs):
    window, window_seg = carry
    x_t, seg_t = inputs
    full = jnp.concatenate([window, x_t[:, None]], axis=1)            # [B, W, C]
    full_seg = jnp.concatenate([window_seg, seg_t[:, None]], axis=1)  # [B, W]
    same = (full_seg == seg_t[:, None])[..., None]
    y = bf[None] + jnp.sum(jnp.where(same, full, 0.0) * wf[None], axis=1)
    return (full[:, 1:], full_seg[:, 1:]), y

  _, y = lax.scan(step, (window, window_seg), (jnp.moveaxis(xf, 1, 0), seg.T))
  y = activate(jnp.moveaxis(y, 0, 1), activation)
  return y.reshape(x.shape).astype(x.dtype)
