"""Pallas (Triton) GPU linear scan: three chunked passes, forward and backward.

h_t = a_t ⊙ h_{t-1} + b_t is element-wise, so each channel is an independent scalar recurrence;
the GPU work is moving a, b and h through memory once or twice. With D channels split into
tiles of `block_d` and T into chunks of C steps:
  1. summary, grid (B, T/C, D/block_d): one program walks its chunk step by step, a row of
     block_d channels per step (fp32 in registers), and writes the chunk's product of gates and
     its local state from zero: two [B, T/C, D] arrays, tiny next to a and b.
  2. carry, grid (B, D/block_d): a sequential walk over the T/C chunk summaries gives the state
     entering each chunk (and the final state).
  3. apply, grid (B, T/C, D/block_d): each chunk reruns its steps from its entering state and
     writes h.
Memory traffic is a and b read twice and h written once (5 passes vs the 3-pass floor); every
pass but the short carry walk runs B·T/C·D/block_d programs in parallel. The per-step loads do
not depend on the carried state, so Triton's software pipelining (`num_stages`) prefetches
them.

Backward: the cotangent g_t = dh_t + a_{t+1} g_{t+1} is the same recurrence backwards in time
with shifted gates; the passes run with `reverse=True`, read a_{t+1} in place of a_t (no
shifted copy) and the apply pass also writes da_t = g_t h_{t-1} from the saved output h.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from memx.kernels.linear_scan.config import BlockSizes
from memx.kernels.linear_scan.reference import segment_resets
from memx.typing import Array, Float, Int


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static description of one call (hashable: the custom_vjp nondiff argument)."""

  t_pad: int
  d_pad: int
  chunk: int
  block_d: int
  num_warps: int
  num_stages: int
  interpret: bool

  @property
  def n_chunks(self) -> int:
    return self.t_pad // self.chunk

  @property
  def n_d(self) -> int:
    return self.d_pad // self.block_d

  def params(self):
    return plgpu.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)


def _row(plan: _Plan, c, i, reverse: bool):
  """Absolute time index of the i-th step a chunk-c program takes (backwards when reverse)."""
  return c * plan.chunk + (plan.chunk - 1 - i if reverse else i)


def _gate(a_ref, t, plan: _Plan, shifted: bool):
  """a_t, or a_{t+1} (1 past the end) for the backward's shifted gates; fp32 [block_d]."""
  if not shifted:
    return a_ref[t, :].astype(jnp.float32)
  nxt = jnp.minimum(t + 1, plan.t_pad - 1)
  a = a_ref[nxt, :].astype(jnp.float32)
  return jnp.where(t + 1 < plan.t_pad, a, 1.0)


def _summary_kernel(a_ref, b_ref, prod_ref, local_ref, *, plan: _Plan, reverse: bool):
  c = pl.program_id(1)

  def step(i, carry):
    prod, local = carry
    t = _row(plan, c, i, reverse)
    a = _gate(a_ref, t, plan, shifted=reverse)
    return a * prod, a * local + b_ref[t, :].astype(jnp.float32)

  init = (jnp.ones((plan.block_d,), jnp.float32), jnp.zeros((plan.block_d,), jnp.float32))
  prod, local = lax.fori_loop(0, plan.chunk, step, init)
  prod_ref[...] = prod
  local_ref[...] = local


def _carry_kernel(prod_ref, local_ref, h0_ref, h_in_ref, h_last_ref, *, plan: _Plan,
                  reverse: bool):
  n = plan.n_chunks

  def step(j, h):
    c = n - 1 - j if reverse else j
    h_in_ref[c, :] = h
    return prod_ref[c, :] * h + local_ref[c, :]

  h_last_ref[...] = lax.fori_loop(0, n, step, h0_ref[...].astype(jnp.float32))


def _apply_kernel(*refs, plan: _Plan, reverse: bool):
  if reverse:
    a_ref, b_ref, h_in_ref, hsave_ref, h0_ref, out_ref, da_ref = refs
  else:
    a_ref, b_ref, h_in_ref, out_ref = refs
  c = pl.program_id(1)

  def step(i, h):
    t = _row(plan, c, i, reverse)
    local_t = plan.chunk - 1 - i if reverse else i
    h = _gate(a_ref, t, plan, shifted=reverse) * h + b_ref[t, :].astype(jnp.float32)
    out_ref[local_t, :] = h.astype(out_ref.dtype)
    if reverse:
      # da_t = g_t h_{t-1}: h_{t-1} is the saved forward output, or h0 at t = 0.
      prev = hsave_ref[jnp.maximum(t - 1, 0), :].astype(jnp.float32)
      prev = jnp.where(t == 0, h0_ref[...].astype(jnp.float32), prev)
      da_ref[local_t, :] = (h * prev).astype(da_ref.dtype)
    return h

  lax.fori_loop(0, plan.chunk, step, h_in_ref[...])


def _passes(plan: _Plan, a, b, h_init, *, reverse: bool, h_saved=None, h0_fwd=None):
  """summary → carry → apply. Returns ([out] or [out, da], last state).

  Forward (reverse=False): out = h. Backward (reverse=True): b is dh, h_init is d(last state),
  out = g (= db) and da_t = g_t h_{t-1} from the saved output h_saved and initial state h0_fwd.
  """
  bsz = a.shape[0]
  bd, q, nc, nd = plan.block_d, plan.chunk, plan.n_chunks, plan.n_d
  full_t = pl.BlockSpec((None, plan.t_pad, bd), lambda i, c, d: (i, 0, d))
  per_chunk = pl.BlockSpec((None, None, bd), lambda i, c, d: (i, c, d))
  summary_shape = jax.ShapeDtypeStruct((bsz, nc, plan.d_pad), jnp.float32)
  prod, local = pl.pallas_call(
      functools.partial(_summary_kernel, plan=plan, reverse=reverse),
      grid=(bsz, nc, nd), in_specs=[full_t, full_t], out_specs=[per_chunk, per_chunk],
      out_shape=[summary_shape, summary_shape], compiler_params=plan.params(),
      interpret=plan.interpret, name="memx_linear_scan_summary",
  )(a, b)

  all_chunks = pl.BlockSpec((None, nc, bd), lambda i, d: (i, 0, d))
  row = pl.BlockSpec((None, bd), lambda i, d: (i, d))
  h_in, h_last = pl.pallas_call(
      functools.partial(_carry_kernel, plan=plan, reverse=reverse),
      grid=(bsz, nd), in_specs=[all_chunks, all_chunks, row], out_specs=[all_chunks, row],
      out_shape=[summary_shape, jax.ShapeDtypeStruct((bsz, plan.d_pad), jnp.float32)],
      compiler_params=plan.params(), interpret=plan.interpret, name="memx_linear_scan_carry",
  )(prod, local, h_init)

  chunk_out = pl.BlockSpec((None, q, bd), lambda i, c, d: (i, c, d))
  big = jax.ShapeDtypeStruct((bsz, plan.t_pad, plan.d_pad), b.dtype)
  args, in_specs, out_shape, out_specs = [a, b, h_in], [full_t, full_t, per_chunk], [big], [
      chunk_out]
  if reverse:
    args += [h_saved, h0_fwd]
    in_specs += [full_t, pl.BlockSpec((None, bd), lambda i, c, d: (i, d))]
    out_shape.append(jax.ShapeDtypeStruct(big.shape, a.dtype))
    out_specs.append(chunk_out)
  bytes_io = sum(x.size * x.dtype.itemsize for x in args) + sum(
      s.size * jnp.dtype(s.dtype).itemsize for s in out_shape)
  outs = pl.pallas_call(
      functools.partial(_apply_kernel, plan=plan, reverse=reverse),
      grid=(bsz, nc, nd), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=plan.params(), interpret=plan.interpret,
      cost_estimate=pl.CostEstimate(flops=2 * a.size, transcendentals=0,
                                    bytes_accessed=int(bytes_io)),
      name="memx_linear_scan_apply_bwd" if reverse else "memx_linear_scan_apply",
  )(*args)
  return outs, h_last


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan(plan: _Plan, a, b, h0):
  (h,), h_last = _passes(plan, a, b, h0, reverse=False)
  return h, h_last


def _scan_fwd(plan, a, b, h0):
  h, h_last = _scan(plan, a, b, h0)
  return (h, h_last), (a, h, h0)


def _scan_bwd(plan, res, cts):
  a, h, h0 = res
  dh, dh_last = cts
  (g, da), g0 = _passes(plan, a, dh.astype(h.dtype), dh_last.astype(jnp.float32), reverse=True,
                        h_saved=h, h0_fwd=h0)
  # dh0 = a_0 g_0: the only place h0 enters is a_0 h0.
  return da, g, a[:, 0].astype(jnp.float32) * g0


_scan.defvjp(_scan_fwd, _scan_bwd)


def make_plan(t: int, d: int, block_sizes: BlockSizes | None, interpret: bool) -> _Plan:
  """Fixes chunk, channel tile and padding (no tracing)."""
  blocks = block_sizes or BlockSizes.get_default()
  chunk = min(blocks.chunk, max(8, 1 << (t - 1).bit_length()))
  block_d = min(blocks.block_d, max(16, 1 << (d - 1).bit_length()))
  return _Plan(t_pad=-(-t // chunk) * chunk, d_pad=-(-d // block_d) * block_d, chunk=chunk,
               block_d=block_d, num_warps=blocks.num_warps, num_stages=blocks.num_stages,
               interpret=interpret)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def linear_scan_pallas_gpu(
    a: Float[Array, "B T D"],
    b: Float[Array, "B T D"],
    h0: Float[Array, "B D"] | None = None,
    *,
    segment_ids: Int[Array, "B T"] | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> tuple[Float[Array, "B T D"], Float[Array, "B D"]]:
  """Chunked scan in Pallas/Triton; same contract as `linear_scan_reference`.

  fp32 recurrence in registers; h in b.dtype; final state float32. Differentiable through the
  reversed passes (hand-written backward, no autodiff through the kernels).
  """
  bsz, t, d = b.shape
  plan = make_plan(t, d, block_sizes, interpret)
  resets = segment_resets(segment_ids, b.shape)
  if resets is not None:
    a = jnp.where(resets[:, :, None], jnp.zeros((), a.dtype), a)
  h0 = jnp.zeros((bsz, d), jnp.float32) if h0 is None else h0.astype(jnp.float32)
  pad_t, pad_d = plan.t_pad - t, plan.d_pad - d
  # Padded steps are the identity map (a = 1, b = 0); padded channels stay zero.
  if pad_t or pad_d:  # (a zero-width pad would still be a copy, which the VJP would keep)
    a = jnp.pad(a, ((0, 0), (0, pad_t), (0, pad_d)), constant_values=1)
    b = jnp.pad(b, ((0, 0), (0, pad_t), (0, pad_d)))
    h0 = jnp.pad(h0, ((0, 0), (0, pad_d)))
  h, h_last = _scan(plan, a, b, h0)
  if pad_t or pad_d:
    h, h_last = h[:, :t, :d], h_last[:, :d]
  return h, h_last
