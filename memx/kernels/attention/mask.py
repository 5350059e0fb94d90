"""Mask: a small frozen description of which (query, key) pairs attention visits."""

import dataclasses

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True, kw_only=True)
class Mask:
  """Which key positions each query position may attend to.

  Query i sits at absolute position `q_offset + i`; key j at position j. A pair is visited when
  every enabled rule allows it:
    causal:        k <= q
    window_left:   q - k <= window_left   (None = unbounded)
    window_right:  k - q <= window_right  (None = unbounded)
    n_sink:        keys k < n_sink are visible regardless of the window (still causal)
  """

  causal: bool = True
  window_left: int | None = None
  window_right: int | None = None
  n_sink: int = 0
  q_offset: int = 0

  def __post_init__(self):
    for name in ("window_left", "window_right"):
      w = getattr(self, name)
      if w is not None and w < 0:
        raise ValueError(f"Mask.{name} = {w} is not allowed: must be None or >= 0.")
    if self.n_sink < 0:
      raise ValueError(f"Mask.n_sink = {self.n_sink} is not allowed: must be >= 0.")
    if self.q_offset < 0:
      raise ValueError(f"Mask.q_offset = {self.q_offset} is not allowed: must be >= 0.")

  def dense(self, t: int, s: int) -> jnp.ndarray:
    """The [T, S] boolean matrix of visited pairs (reference and tests only)."""
    q = jnp.arange(t)[:, None] + self.q_offset
    k = jnp.arange(s)[None, :]
    ok = jnp.ones((t, s), bool)
    if self.causal:
      ok &= k <= q
    windowed = jnp.ones((t, s), bool)
    if self.window_left is not None:
      windowed &= q - k <= self.window_left
    if self.window_right is not None:
      windowed &= k - q <= self.window_right
    if self.n_sink:
      windowed |= k < self.n_sink
    return ok & windowed


CAUSAL = Mask()
