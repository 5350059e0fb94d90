"""Short causal conv in plain JAX: the W taps are slices of one extended copy, fused in one pass."""

import jax.numpy as jnp

from memx.kernels.short_conv.reference import activate, history_segments
from memx.typing import Array, Float, Int


def causal_conv_xla(
    x: Float[Array, "B T ..."],
    w: Float[Array, "W ..."],
    bias: Float[Array, "..."],
    segment_ids: Int[Array, "B T"] | None = None,
    history: Float[Array, "B Wm1 ..."] | None = None,
    history_segment_ids: Int[Array, "B Wm1"] | None = None,
    *,
    activation: str | None = None,
) -> Float[Array, "B T ..."]:
  """Same contract as `causal_conv_reference`; differentiable by autodiff.

  One extended copy [history, x] is made and the taps are slices of it, which XLA fuses into one
  pass. (Shifting each tap on its own instead made XLA:CPU materialise W-1 shifted copies,
  measured.)
  """
  width, t = w.shape[0], x.shape[1]
  keep = width - 1
  if history is None:
    history = jnp.zeros((x.shape[0], keep) + x.shape[2:], jnp.float32)
    history_segment_ids = None if segment_ids is None else jnp.full((x.shape[0], keep), -1,
                                                                     segment_ids.dtype)
  xp = jnp.concatenate([history.astype(jnp.float32), x.astype(jnp.float32)], axis=1)
  if segment_ids is not None:
    hseg = history_segments(segment_ids, history_segment_ids, x.shape[0], keep)
    seg = jnp.concatenate([hseg, segment_ids], axis=1)
  y = bias.astype(jnp.float32)[None, None]
  for k in range(width):
    xs = xp[:, k:k + t]                                    # x_{t - (W-1-k)}
    if segment_ids is not None and k < keep:
      same = seg[:, k:k + t] == segment_ids
      xs = jnp.where(same.reshape(same.shape + (1,) * (x.ndim - 2)), xs, 0.0)
    y = y + w[k].astype(jnp.float32)[None, None] * xs
  y = activate(jnp.broadcast_to(y, x.shape), activation)
  return y.astype(x.dtype)
