"""Chunked linear scan in plain JAX with a memory-light custom VJP (runs on every backend).

Forward: T is split into chunks of C steps. A loop over the C steps of every chunk at once gives
each chunk's product of gates and its local state from zero; a `lax.scan` over the T/C chunk
summaries carries the true state into every chunk; a second loop over the C steps reruns each
chunk from its entering state and writes h in place. Sequential depth is 2C + T/C instead of T
(`lax.scan` over tokens), and nothing is kept per level (`lax.associative_scan`).

Backward: the cotangent g_t = dh_t + a_{t+1} g_{t+1} is the same recurrence run backwards in
time with shifted gates, so it reuses the chunked scan; then db = g and da_t = g_t h_{t-1}. The
VJP saves only a, h and h0. Where T is a multiple of the chunk and there are no segments, a and
h are the caller's own arrays (h is the output, which callers keep anyway); otherwise they are
the padded [B, Tp, D] copies (and segment ids add a masked copy of a and a [B, T, D] mask),
measured by `tests/kernels/test_linear_scan.py::test_saved_residuals`.

Chosen by measurement (`scripts/bench_ssm.py --quick`, CPU with 2 shared cores, jax 0.12,
B=4, T=4096, D=256 fp32, median ms / compiled temporaries): forward 8.1 ms / 1.3 MiB vs 41 ms /
48 MiB for `lax.scan` and 60 ms / 40 MiB for `lax.associative_scan` over T; forward+backward
57 ms / 18 MiB vs 96 ms / 52 MiB and 168 ms / 87 MiB. An associative scan inside the chunks
(tried first) was slower than this sequential one and kept 113 MiB. GPU numbers: pending.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from memx.kernels.linear_scan.config import BlockSizes
from memx.kernels.linear_scan.reference import segment_resets
from memx.typing import Array, Float, Int


def chunked_scan(a, b, h0, chunk: int, reverse: bool):
  """fp32 a, b [B, Tp, D] (Tp % chunk == 0), h0 [B, D] -> (h [B, Tp, D], last state [B, D]).

  reverse=True runs h_t = a_t h_{t+1} + b_t from t = Tp-1 down to 0 (h0 is then the state after
  the end) and returns the state at t = 0 as the last state. Sequential depth is
  2·chunk + Tp/chunk steps, each over all chunks at once.
  """
  bsz, tp, d = a.shape
  nc = tp // chunk
  a4, b4 = a.reshape(bsz, nc, chunk, d), b.reshape(bsz, nc, chunk, d)

  def at(x, j):
    """Step j of every chunk, in scan order: [B, nc, D]."""
    return lax.dynamic_index_in_dim(x, chunk - 1 - j if reverse else j, 2, keepdims=False)

  def summary(j, carry):
    prod, local = carry
    a_j = at(a4, j)
    return prod * a_j, a_j * local + at(b4, j)

  # Pass 1: each chunk's product of gates and its state from zero, all chunks in parallel.
  ones = jnp.ones((bsz, nc, d), jnp.float32)
  prod, local = lax.fori_loop(0, chunk, summary, (ones, jnp.zeros_like(ones)))

  def carry(h, inp):
    prod_c, local_c = inp
    return prod_c * h + local_c, h  # emits the entering state

  # Pass 2: the true state entering every chunk (T/chunk sequential steps).
  h_last, h_in = lax.scan(carry, h0, (jnp.swapaxes(prod, 0, 1), jnp.swapaxes(local, 0, 1)),
                          reverse=reverse)

  def apply(j, carry):
    h, out = carry
    h = at(a4, j) * h + at(b4, j)
    return h, lax.dynamic_update_index_in_dim(out, h, chunk - 1 - j if reverse else j, 2)

  # Pass 3: rerun every chunk from its entering state, writing h in place.
  _, out = lax.fori_loop(0, chunk, apply, (jnp.swapaxes(h_in, 0, 1), jnp.zeros_like(a4)))
  return out.reshape(bsz, tp, d), h_last


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan(chunk: int, a, b, h0):
  h, h_last = chunked_scan(a.astype(jnp.float32), b.astype(jnp.float32), h0, chunk, False)
  return h.astype(b.dtype), h_last


def _scan_fwd(chunk, a, b, h0):
  h, h_last = _scan(chunk, a, b, h0)
  return (h, h_last), (a, h, h0)


def _scan_bwd(chunk, res, cts):
  a, h, h0 = res
  dh, dh_last = cts
  a32 = a.astype(jnp.float32)
  # g_t = dh_t + a_{t+1} g_{t+1}, g after the end = d(last state): a reversed scan whose gate at
  # t is a_{t+1} (1 past the end, where the last-state cotangent enters).
  a_next = jnp.concatenate([a32[:, 1:], jnp.ones_like(a32[:, :1])], axis=1)
  g, g0 = chunked_scan(a_next, dh.astype(jnp.float32), dh_last.astype(jnp.float32), chunk,
                       True)
  h_prev = jnp.concatenate([h0[:, None], h[:, :-1].astype(jnp.float32)], axis=1)
  return (g * h_prev).astype(a.dtype), g.astype(h.dtype), a32[:, 0] * g0


_scan.defvjp(_scan_fwd, _scan_bwd)


@functools.partial(jax.jit, static_argnames=("block_sizes",))
def linear_scan_xla(
    a: Float[Array, "B T D"],
    b: Float[Array, "B T D"],
    h0: Float[Array, "B D"] | None = None,
    *,
    segment_ids: Int[Array, "B T"] | None = None,
    block_sizes: BlockSizes | None = None,
) -> tuple[Float[Array, "B T D"], Float[Array, "B D"]]:
  """Chunked scan; same contract as `linear_scan_reference` (fp32 math, h in b.dtype)."""
  blocks = block_sizes or BlockSizes.get_default("xla")
  bsz, t, d = b.shape
  chunk = min(blocks.chunk, max(8, 1 << (t - 1).bit_length()))
  resets = segment_resets(segment_ids, b.shape)
  if resets is not None:
    a = jnp.where(resets[:, :, None], jnp.zeros((), a.dtype), a)
  h0 = jnp.zeros((bsz, d), jnp.float32) if h0 is None else h0.astype(jnp.float32)
  tp = -(-t // chunk) * chunk
  # Padding steps are the identity map (a = 1, b = 0): the last state is unchanged.
  if tp > t:  # (a zero-width pad would still be a copy, which the VJP would keep)
    a = jnp.pad(a, ((0, 0), (0, tp - t), (0, 0)), constant_values=1)
    b = jnp.pad(b, ((0, 0), (0, tp - t), (0, 0)))
  h, h_last = _scan(chunk, a, b, h0)
  return (h[:, :t] if tp > t else h), h_last
