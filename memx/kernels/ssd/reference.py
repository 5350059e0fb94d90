"""Mamba-2 state-space duality (SSD): the sequential recurrence and the quadratic attention form.

Dao & Gu 2024 ("Transformers are SSMs"), §3 and eq. (16): per head h with a scalar decay,

    h_t = exp(Δ_t A_h) h_{t-1} + Δ_t x_t B_tᵀ        state h_t: [P, N]
    y_t = h_t C_t + D_h x_t

with x [B, T, H, P], Δ (dt) [B, T, H], A [H] (A <= 0), B and C [B, T, G, N] shared by the H/G
heads of a group (head h reads group h // (H/G)). Unrolled, y = (L ∘ C Bᵀ)(Δ x) + D x with the
1-semiseparable mask L_ts = exp(Σ_{s<j<=t} Δ_j A) for s <= t (§3.2.2): the "attention form".
With A = 0 and Δ = 1 it is causal linear attention y_t = Σ_{s<=t} (q_t·k_s) v_s (Katharopoulos
et al. 2020) with C = q, B = k, x = v; with Δ_t A replaced by a per-head log-gate it is
scalar-gated linear attention (GLA with a head-wise gate, Yang et al. 2024).

The oracles here take the general form: `log_a` [B, T, H] is the log-decay (Δ A for Mamba-2, the
log gate for GLA, 0 for plain linear attention) and `dt` scales the input. B and C may have
different group counts (GQA-style linear attention shares keys but not queries).
Packed sequences: where segment_ids change, the state restarts from zero; an initial state
belongs to token 0's segment.
"""

import jax.numpy as jnp
from jax import lax

from memx.typing import Array, Float, Int


def expand_groups(m: Float[Array, "B T G N"], heads: int) -> Float[Array, "B T H N"]:
  """Group g's rows for every head of the group (head h reads group h // (H/G))."""
  return jnp.repeat(m, heads // m.shape[2], axis=2)


def segment_resets(segment_ids: Int[Array, "B T"] | None, batch: int):
  """[B, T] bool: True where a new segment starts after token 0, or None."""
  if segment_ids is None:
    return None
  seg = jnp.asarray(segment_ids)
  return jnp.concatenate([jnp.zeros((batch, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)


def segment_runs(segment_ids: Int[Array, "B T"] | None) -> Int[Array, "B T"] | None:
  """Renumbers packed segments as 0, 1, 2, ... per row: a segment is a run of equal ids, so two
  runs that reuse an id stay apart when implementations compare ids for equality."""
  if segment_ids is None:
    return None
  resets = segment_resets(segment_ids, segment_ids.shape[0])
  return jnp.cumsum(resets.astype(jnp.int32), axis=1)


def ssd_scan(
    x: Float[Array, "B T H P"],
    dt: Float[Array, "B T H"],
    log_a: Float[Array, "B T H"],
    b: Float[Array, "B T G N"],
    c: Float[Array, "B T G N"],
    *,
    d: Float[Array, " H"] | None = None,
    initial_state: Float[Array, "B H P N"] | None = None,
    segment_ids: Int[Array, "B T"] | None = None,
) -> tuple[Float[Array, "B T H P"], Float[Array, "B H P N"]]:
  """h_t = exp(log_a_t) h_{t-1} + dt_t x_t ⊗ B_t, y_t = h_t C_t + D x_t, one token at a time.

  All math in float32; y in x.dtype, the final state in float32.
  """
  bsz, _, h, p = x.shape
  n = b.shape[-1]
  f32 = jnp.float32
  b_h = expand_groups(b, h).astype(f32)
  c_h = expand_groups(c, h).astype(f32)
  xdt = x.astype(f32) * dt.astype(f32)[..., None]
  resets = segment_resets(segment_ids, bsz)
  if resets is None:
    resets = jnp.zeros(x.shape[:2], bool)
  state = (jnp.zeros((bsz, h, p, n), f32) if initial_state is None
           else initial_state.astype(f32))

  def step(state, inp):
    xdt_t, la_t, b_t, c_t, reset_t = inp
    decay = jnp.where(reset_t[:, None], 0.0, jnp.exp(la_t))           # [B, H]
    state = decay[:, :, None, None] * state + xdt_t[..., None] * b_t[:, :, None, :]
    return state, jnp.einsum("bhpn,bhn->bhp", state, c_t)

  time_major = [jnp.swapaxes(v, 0, 1) for v in (xdt, log_a.astype(f32), b_h, c_h, resets)]
  state, y = lax.scan(step, state, time_major)
  y = jnp.swapaxes(y, 0, 1)
  if d is not None:
    y = y + d.astype(f32)[None, None, :, None] * x.astype(f32)
  return y.astype(x.dtype), state


def _segsum(log_a: Float[Array, "B H T"]) -> Float[Array, "B H T T"]:
  """[..., t, s] = Σ_{s<j<=t} log_a_j for s <= t, -inf above the diagonal.

  Summed from a masked [T, T] matrix, not as cumsum_t - cumsum_s: the difference of two large
  prefix sums loses precision in float32 (ssd_minimal's "stable" segsum).
  """
  t = log_a.shape[-1]
  rep = jnp.broadcast_to(log_a[..., :, None], (*log_a.shape[:-1], t, t))   # [..., t, s]: la_t
  rep = jnp.where(jnp.tril(jnp.ones((t, t), bool), -1), rep, 0.0)          # kept where t > s
  summed = jnp.cumsum(rep, axis=-2)
  return jnp.where(jnp.tril(jnp.ones((t, t), bool)), summed, -jnp.inf)


def ssd_quadratic_form(
    x: Float[Array, "B T H P"],
    dt: Float[Array, "B T H"],
    log_a: Float[Array, "B T H"],
    b: Float[Array, "B T G N"],
    c: Float[Array, "B T G N"],
    *,
    d: Float[Array, " H"] | None = None,
    initial_state: Float[Array, "B H P N"] | None = None,
    segment_ids: Int[Array, "B T"] | None = None,
) -> tuple[Float[Array, "B T H P"], Float[Array, "B H P N"]]:
  """The attention form y = (L ∘ C Bᵀ)(dt x) (+ the initial state's decayed readout), O(T²).

  Same contract as `ssd_scan`; a second oracle, independent of the recurrence.
  """
  bsz, t, h, _ = x.shape
  f32 = jnp.float32
  b_h = expand_groups(b, h).astype(f32)
  c_h = expand_groups(c, h).astype(f32)
  xdt = x.astype(f32) * dt.astype(f32)[..., None]
  la = jnp.swapaxes(log_a.astype(f32), 1, 2)                               # [B, H, T]
  seg = (jnp.zeros((bsz, t), jnp.int32) if segment_ids is None
         else segment_runs(jnp.asarray(segment_ids)))
  same = (seg[:, :, None] == seg[:, None, :])[:, None]                      # [B, 1, T, S]
  decay = jnp.exp(jnp.where(same, _segsum(la), -jnp.inf))                  # [B, H, T, S]
  scores = jnp.einsum("bthn,bshn->bhts", c_h, b_h) * decay
  y = jnp.einsum("bhts,bshp->bthp", scores, xdt)
  # Decay from the start (before token 0) to t, and from s to the end, within token 0's / the
  # last token's segment: Σ_{j<=t} la_j and Σ_{s<j<T} la_j.
  total = jnp.cumsum(la, axis=-1)                                           # [B, H, T]
  first = (seg == seg[:, :1])[:, None]                                      # [B, 1, T]
  last = (seg == seg[:, -1:])[:, None]
  from_start = jnp.where(first, jnp.exp(total), 0.0)
  to_end = jnp.where(last, jnp.exp(total[..., -1:] - total), 0.0)
  state = jnp.einsum("bhs,bshp,bshn->bhpn", to_end, xdt, b_h)
  if initial_state is not None:
    h0 = initial_state.astype(f32)
    y = y + jnp.einsum("bht,bhpn,bthn->bthp", from_start, h0, c_h)
    keep = jnp.where(first[:, :, -1], jnp.exp(total[..., -1]), 0.0)         # [B, H]
    state = state + keep[..., None, None] * h0
  if d is not None:
    y = y + d.astype(f32)[None, None, :, None] * x.astype(f32)
  return y.astype(x.dtype), state


def ssd_reference(
    x: Float[Array, "B T H P"],
    dt: Float[Array, "B T H"],
    a: Float[Array, " H"],
    b: Float[Array, "B T G N"],
    c: Float[Array, "B T G N"],
    *,
    d: Float[Array, " H"] | None = None,
    initial_state: Float[Array, "B H P N"] | None = None,
    segment_ids: Int[Array, "B T"] | None = None,
) -> tuple[Float[Array, "B T H P"], Float[Array, "B H P N"]]:
  """Mamba-2 SSD as its sequential recurrence (`lax.scan` over T): the oracle.

  Args:
    x: inputs [B, T, H, P].
    dt: step sizes Δ [B, T, H], positive (after the layer's softplus).
    a: per-head decay rates A [H], <= 0.
    b, c: input and output projections [B, T, G, N]; H is a multiple of G.
    d: optional skip D [H] (y += D_h x).
    initial_state: state before token 0 [B, H, P, N] (e.g. a returned final state).
    segment_ids: packed sequences [B, T]: the state restarts at every id change.

  Returns:
    (y [B, T, H, P] in x.dtype, final state [B, H, P, N] in float32). Math in float32.
  """
  log_a = dt.astype(jnp.float32) * a.astype(jnp.float32)[None, None, :]
  return ssd_scan(x, dt, log_a, b, c, d=d, initial_state=initial_state,
                  segment_ids=segment_ids)


def ssd_step(
    state: Float[Array, "B H P N"],
    x: Float[Array, "B H P"],
    dt: Float[Array, "B H"],
    log_a: Float[Array, "B H"],
    b: Float[Array, "B G N"],
    c: Float[Array, "B G N"],
    d: Float[Array, " H"] | None = None,
) -> tuple[Float[Array, "B H P"], Float[Array, "B H P N"]]:
  """One recurrent step (decoding) of the general form; returns (y_t in x.dtype, new state).

  For Mamba-2 pass log_a = dt · A; for (gated) linear attention dt = 1 and log_a = the log gate.
  """
  h = x.shape[1]
  f32 = jnp.float32
  b_h = jnp.repeat(b, h // b.shape[1], axis=1).astype(f32)
  c_h = jnp.repeat(c, h // c.shape[1], axis=1).astype(f32)
  xdt = x.astype(f32) * dt.astype(f32)[..., None]
  state = (jnp.exp(log_a.astype(f32))[..., None, None] * state.astype(f32)
           + xdt[..., None] * b_h[:, :, None, :])
  y = jnp.einsum("bhpn,bhn->bhp", state, c_h)
  if d is not None:
    y = y + d.astype(f32)[None, :, None] * x.astype(f32)
  return y.astype(x.dtype), state


def associative_scan_states(
    x: Float[Array, "B T H P"],
    dt: Float[Array, "B T H"],
    log_a: Float[Array, "B T H"],
    b: Float[Array, "B T G N"],
    c: Float[Array, "B T G N"],
) -> Float[Array, "B T H P"]:
  """y through `lax.associative_scan` over materialised [B, T, H, P, N] states (a baseline).

  What a direct JAX port does (axlearn's AssociativeScanMambaRecurrence, many Mamba ports);
  benchmarks and the memory test compare against it.
  """
  h = x.shape[2]
  f32 = jnp.float32
  xdt = x.astype(f32) * dt.astype(f32)[..., None]
  upd = xdt[..., None] * expand_groups(b, h).astype(f32)[:, :, :, None, :]   # [B, T, H, P, N]
  decay = jnp.exp(log_a.astype(f32))[..., None, None]

  def combine(u, v):
    return u[0] * v[0], v[0] * u[1] + v[1]

  _, states = lax.associative_scan(combine, (jnp.broadcast_to(decay, upd.shape), upd), axis=1)
  y = jnp.einsum("bthpn,bthn->bthp", states, expand_groups(c, h).astype(f32))
  return y.astype(x.dtype)

