"""Element-wise gated linear recurrence h_t = a_t ⊙ h_{t-1} + b_t: the sequential oracle.

This is the diagonal recurrence behind HGRN/MLGRU (Qin et al. 2023, eq. 3; Zhu et al. 2024,
MatMul-free LM eq. 5) and, with a_t = exp(Δ_t A), b_t = Δ_t B_t x_t flattened over (D, N),
Mamba-1's selective scan (Gu & Dao 2023, eq. 2a).
"""

import jax.numpy as jnp
from jax import lax

from memx.typing import Array, Bool, Float, Int


def segment_resets(segment_ids: Int[Array, "B T"] | None, shape) -> Bool[Array, "B T"] | None:
  """True where a new packed segment starts after token 0 (the state resets there)."""
  if segment_ids is None:
    return None
  seg = jnp.asarray(segment_ids)
  starts = seg[:, 1:] != seg[:, :-1]
  return jnp.concatenate([jnp.zeros((shape[0], 1), bool), starts], axis=1)


def linear_scan_reference(
    a: Float[Array, "B T D"],
    b: Float[Array, "B T D"],
    h0: Float[Array, "B D"] | None = None,
    *,
    segment_ids: Int[Array, "B T"] | None = None,
) -> tuple[Float[Array, "B T D"], Float[Array, "B D"]]:
  """h_t = a_t ⊙ h_{t-1} + b_t, one step at a time (`lax.scan` over T).

  Args:
    a: gates [B, T, D] (any real values; the models keep them in [0, 1]).
    b: inputs [B, T, D].
    h0: state before token 0 [B, D]; default zeros.
    segment_ids: packed sequences [B, T]; where the id changes, the state restarts from zero
      (h_t = b_t). The initial state belongs to the segment of token 0.

  Returns:
    (h [B, T, D] in b.dtype, final state h_{T-1} [B, D] in float32). The recurrence runs in
    float32 whatever the input dtype.
  """
  bsz, _, d = b.shape
  h = jnp.zeros((bsz, d), jnp.float32) if h0 is None else h0.astype(jnp.float32)
  resets = segment_resets(segment_ids, b.shape)
  if resets is None:
    resets = jnp.zeros(b.shape[:2], bool)

  def step(h, inp):
    a_t, b_t, r_t = inp
    # A reset multiplies the carried state by exactly zero, as if a_t were 0.
    h = jnp.where(r_t[:, None], 0.0, a_t.astype(jnp.float32) * h) + b_t.astype(jnp.float32)
    return h, h

  h_last, hs = lax.scan(step, h, (jnp.swapaxes(a, 0, 1), jnp.swapaxes(b, 0, 1),
                                   jnp.swapaxes(resets, 0, 1)))
  return jnp.swapaxes(hs, 0, 1).astype(b.dtype), h_last


def linear_scan_step(a_t: Float[Array, "B D"], b_t: Float[Array, "B D"],
                     h: Float[Array, "B D"]) -> Float[Array, "B D"]:
  """One recurrent step (decoding): a_t ⊙ h + b_t in float32."""
  return a_t.astype(jnp.float32) * h.astype(jnp.float32) + b_t.astype(jnp.float32)


def linear_scan_associative(
    a: Float[Array, "B T D"], b: Float[Array, "B T D"], h0: Float[Array, "B D"] | None = None
) -> tuple[Float[Array, "B T D"], Float[Array, "B D"]]:
  """The same recurrence through `jax.lax.associative_scan` (a baseline for benchmarks).

  Pairs (a, b) compose as (a1, b1) ∘ (a2, b2) = (a1 a2, a2 b1 + b2) (Blelloch 1990); autodiff
  through it keeps every level's intermediates, which is why memx does not use it.
  """
  a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
  if h0 is not None:
    b32 = b32.at[:, 0].add(a32[:, 0] * h0.astype(jnp.float32))

  def combine(x, y):
    return x[0] * y[0], y[0] * x[1] + y[1]

  _, h = lax.associative_scan(combine, (a32, b32), axis=1)
  return h.astype(b.dtype), h[:, -1]

