"""Pallas (Triton) GPU short causal conv with the activation fused: forward and backward.

The op is pure memory traffic (W multiply-adds per element), so the kernels aim at reading x
once and writing y once. Grid (T/block_t, B, C/block_c); each program owns a [block_t, block_c]
output tile:
  forward: for each tap k, a gathered load of x at rows t-(W-1)+k (rows are clamped and
    masked, so tiles need no halo copy and the first tile needs no padding: row offsets
    below 0 read `history` instead, or zero). The W loads overlap by all but one row, so after
    the first they hit L1/L2. Segment ids mask taps from another segment. bias + Σ w_k x_k
    goes through the activation in fp32 and is stored once.
  backward, fused (`BlockSizes.backward="fused"`, one kernel): dx_t = Σ_s w[W-1-s] g_{t+s} with
    g = dy ⊙ act'(pre). Rather than writing g to memory and reading it back (two more passes
    of the tensor), the program recomputes pre at the W shifts t+s it needs from x (W² cached
    loads per element). Shift 0
    also yields this tile's share of dw and dbias (Σ over its rows of g ⊙ x_k and g), written
    as per-tile partial sums that XLA adds up; the gradient of `history` comes from the first
    W-1 outputs alone and is taken by autodiff of the xla implementation on those rows.
  backward, two-pass (the default): the first kernel writes g (in x's dtype) with the dw /
    dbias sums, the second reads g back at the W shifts for dx. Two more
    passes of the tensor through memory, against about a third of the fused kernel's
    instructions (one pre-activation and one sigmoid per element instead of W): which wins is
    a GPU measurement (`bench_ssm.py --kinds conv --sweep`).
Channels are the contiguous axis: column offsets stay a plain iota (never clamped), so Triton
sees contiguous, vectorisable loads along them.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from memx.kernels.short_conv.config import BlockSizes
from memx.kernels.short_conv.xla import causal_conv_xla
from memx.typing import Array, Float, Int


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static description of one call (hashable: the custom_vjp nondiff argument)."""

  t: int
  c: int
  width: int
  block_t: int
  block_c: int
  num_warps: int
  block_t_bwd: int
  rows_bwd: int
  num_warps_bwd: int
  two_pass: bool
  segments: bool
  history: bool
  history_segments: bool
  activation: str | None
  interpret: bool

  @property
  def n_t(self) -> int:
    return -(-self.t // self.block_t)

  @property
  def grad_is_dy(self) -> bool:
    """Two-pass without an activation: g = dy, so the first pass only sums dw and dbias."""
    return self.two_pass and self.activation is None

  @property
  def n_t_bwd(self) -> int:
    return -(-self.t // self.rows_bwd)

  @property
  def c_pad(self) -> int:
    return -(-self.c // self.block_c) * self.block_c

  def params(self, backward: bool = False):
    return plgpu.CompilerParams(num_warps=self.num_warps_bwd if backward else self.num_warps,
                                num_stages=1)


def _gather(ref, rows, cols, mask, n_rows: int):
  """ref[rows, cols] as fp32 [len(rows), len(cols)], 0 where mask is False. Rows are clamped
  into range (masked rows must still be valid addresses); cols stay an iota."""
  r = jnp.clip(rows, 0, n_rows - 1)
  v = plgpu.load(ref.at[r[:, None], cols[None, :]], mask=mask, other=0.0)
  return v.astype(jnp.float32)


def _seg_at(seg_ref, rows, n_rows: int):
  """Segment ids at (clamped) rows: [len(rows)] int32."""
  return plgpu.load(seg_ref.at[jnp.clip(rows, 0, n_rows - 1)])


class _Inputs:
  """The refs of one program and the tile it owns."""

  def __init__(self, plan: _Plan, x_ref, seg_ref, hist_ref, hseg_ref, *, block_t: int,
               first_row, col0):
    self.plan, self.x_ref, self.seg_ref = plan, x_ref, seg_ref
    self.hist_ref, self.hseg_ref = hist_ref, hseg_ref
    self.block_t = block_t
    self.rows = first_row + jnp.arange(block_t)
    self.cols = col0 + jnp.arange(plan.block_c)
    self.col_ok = self.cols < plan.c

  def mask(self, row_ok):
    return jnp.broadcast_to(row_ok[:, None] & self.col_ok[None, :],
                            (self.block_t, self.plan.block_c))

  def segments(self, rows):
    return _seg_at(self.seg_ref, rows, self.plan.t) if self.plan.segments else None

  def taps(self, rows, seg):
    """[x_{t-(W-1)+k} for k < W] at output rows t (fp32 tiles): zero before the sequence
    without history, past its end, or in another segment than `seg` (the rows' own)."""
    p = self.plan
    taps = []
    for k in range(p.width):
      src = rows - (p.width - 1) + k
      inside = (src >= 0) & (src < p.t)
      v = _gather(self.x_ref, src, self.cols, self.mask(inside), p.t)
      if p.segments and k < p.width - 1:
        v = jnp.where((_seg_at(self.seg_ref, src, p.t) == seg)[:, None], v, 0.0)
      if p.history and k < p.width - 1:
        # src >= -(W-1) always: row src of the sequence is row src + W-1 of the history.
        before = (src < 0) & (rows < p.t)
        hrow = src + p.width - 1
        h = _gather(self.hist_ref, hrow, self.cols, self.mask(before), p.width - 1)
        if p.segments:
          hseg = (_seg_at(self.hseg_ref, hrow, p.width - 1) if p.history_segments
                  else jnp.full_like(seg, self.seg_ref[0]))
          h = jnp.where((hseg == seg)[:, None], h, 0.0)
        v = v + h                                   # the two masks are disjoint
      taps.append(v)
    return taps


def _pre_activation(w_ref, b_ref, taps):
  pre = b_ref[...].astype(jnp.float32)[None, :]
  for k, v in enumerate(taps):
    pre = pre + w_ref[k, :][None, :] * v
  return pre


def _split_refs(plan: _Plan, refs):
  refs = list(refs)
  x_ref, w_ref, b_ref = refs[:3]
  del refs[:3]
  seg_ref = refs.pop(0) if plan.segments else None
  hist_ref = refs.pop(0) if plan.history else None
  hseg_ref = refs.pop(0) if plan.history_segments else None
  return x_ref, w_ref, b_ref, seg_ref, hist_ref, hseg_ref, refs


def _forward_kernel(*refs, plan: _Plan):
  x_ref, w_ref, b_ref, seg_ref, hist_ref, hseg_ref, (y_ref,) = _split_refs(plan, refs)
  tile = _Inputs(plan, x_ref, seg_ref, hist_ref, hseg_ref, block_t=plan.block_t,
                 first_row=pl.program_id(0) * plan.block_t,
                 col0=pl.program_id(2) * plan.block_c)
  pre = _pre_activation(w_ref, b_ref, tile.taps(tile.rows, tile.segments(tile.rows)))
  y = jax.nn.silu(pre) if plan.activation == "silu" else pre
  y_ref[...] = y.astype(y_ref.dtype)


def _backward_kernel(*refs, plan: _Plan):
  """Fused: dx, and dw / dbias partial sums. Two-pass (plan.two_pass): g = dy ⊙ act'(pre) in
  place of dx (then `_dx_kernel`), and the same partial sums."""
  x_ref, w_ref, b_ref, seg_ref, hist_ref, hseg_ref, rest = _split_refs(plan, refs)
  if plan.grad_is_dy:
    (dy_ref, dw_ref, db_ref), out_ref = rest, None
  else:
    dy_ref, out_ref, dw_ref, db_ref = rest
  bt, bc = plan.block_t_bwd, plan.block_c
  first_row, col0 = pl.program_id(0) * plan.rows_bwd, pl.program_id(2) * bc
  shifts = 1 if plan.two_pass else plan.width

  def sub_tile(i, acc):
    """Rows [t0 + i·bt, +bt): dx (or g); adds this sub-tile's dw and dbias shares to acc."""
    dw, db = acc
    tile = _Inputs(plan, x_ref, seg_ref, hist_ref, hseg_ref, block_t=bt,
                   first_row=first_row + i * bt, col0=col0)
    own_seg = tile.segments(tile.rows)
    dx = jnp.zeros((bt, bc), jnp.float32)
    for s in range(shifts):
      rows = tile.rows + s                        # output t+s, which reads x_t through tap W-1-s
      seg = tile.segments(rows)
      g = _gather(dy_ref, rows, tile.cols, tile.mask(rows < plan.t), plan.t)
      taps = tile.taps(rows, seg) if plan.activation == "silu" or s == 0 else None
      if plan.activation == "silu":
        pre = _pre_activation(w_ref, b_ref, taps)
        sig = jax.nn.sigmoid(pre)
        g = g * sig * (1.0 + pre * (1.0 - sig))   # d silu(p) / dp
      if s == 0:  # element-wise sums here; one reduction over rows after the loop
        dw = tuple(dw_k + g * v for dw_k, v in zip(dw, taps, strict=True))
        db = db + g
        if plan.two_pass:
          dx = g
          break
      contribution = w_ref[plan.width - 1 - s, :][None, :] * g
      if plan.segments and s > 0:
        contribution = jnp.where((seg == own_seg)[:, None], contribution, 0.0)
      dx = dx + contribution
    if out_ref is not None:
      row0 = pl.multiple_of(i * bt, bt)
      out_ref[pl.ds(row0, bt), :] = dx.astype(out_ref.dtype)
    return dw, db

  zeros = jnp.zeros((bt, bc), jnp.float32)
  dw, db = jax.lax.fori_loop(0, plan.rows_bwd // bt, sub_tile,
                             ((zeros,) * plan.width, zeros))
  for k in range(plan.width):
    dw_ref[k, :] = jnp.sum(dw[k], axis=0)
  db_ref[...] = jnp.sum(db, axis=0)


def _dx_kernel(*refs, plan: _Plan):
  """Two-pass backward, second pass: dx_t = Σ_s w[W-1-s] g_{t+s} (same segment), from g."""
  g_ref, w_ref = refs[:2]
  seg_ref = refs[2] if plan.segments else None
  dx_ref = refs[-1]
  tile = _Inputs(plan, g_ref, seg_ref, None, None, block_t=plan.block_t,
                 first_row=pl.program_id(0) * plan.block_t, col0=pl.program_id(2) * plan.block_c)
  own_seg = tile.segments(tile.rows)
  dx = jnp.zeros((plan.block_t, plan.block_c), jnp.float32)
  for s in range(plan.width):
    rows = tile.rows + s
    g = _gather(g_ref, rows, tile.cols, tile.mask(rows < plan.t), plan.t)
    if plan.segments and s > 0:
      g = jnp.where((tile.segments(rows) == own_seg)[:, None], g, 0.0)
    dx = dx + w_ref[plan.width - 1 - s, :][None, :] * g
  dx_ref[...] = dx.astype(dx_ref.dtype)


def _common_specs(plan: _Plan, seg, hist, hseg):
  """(args, in_specs) for x's companions: padded fp32 w and bias, then the optional inputs."""
  bc, keep = plan.block_c, plan.width - 1
  specs = [pl.BlockSpec((None, plan.t, plan.c), lambda i, b, j: (b, 0, 0)),
           pl.BlockSpec((plan.width, bc), lambda i, b, j: (0, j)),
           pl.BlockSpec((bc,), lambda i, b, j: (j,))]
  args = []
  if plan.segments:
    args.append(seg)
    specs.append(pl.BlockSpec((None, plan.t), lambda i, b, j: (b, 0)))
  if plan.history:
    args.append(hist)
    specs.append(pl.BlockSpec((None, keep, plan.c), lambda i, b, j: (b, 0, 0)))
  if plan.history_segments:
    args.append(hseg)
    specs.append(pl.BlockSpec((None, keep), lambda i, b, j: (b, 0)))
  return args, specs


def _padded_taps(plan: _Plan, w):
  return jnp.pad(w.astype(jnp.float32), ((0, 0), (0, plan.c_pad - plan.c)))


def _padded(plan: _Plan, w, bias):
  return _padded_taps(plan, w), jnp.pad(bias.astype(jnp.float32), (0, plan.c_pad - plan.c))


def _forward(plan: _Plan, x, w, bias, seg, hist, hseg):
  bsz = x.shape[0]
  extra, specs = _common_specs(plan, seg, hist, hseg)
  return pl.pallas_call(
      functools.partial(_forward_kernel, plan=plan),
      grid=(plan.n_t, bsz, plan.c_pad // plan.block_c), in_specs=specs,
      out_specs=pl.BlockSpec((None, plan.block_t, plan.block_c), lambda i, b, j: (b, i, j)),
      out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), compiler_params=plan.params(),
      interpret=plan.interpret,
      cost_estimate=pl.CostEstimate(flops=2 * plan.width * x.size, transcendentals=x.size,
                                    bytes_accessed=2 * x.size * x.dtype.itemsize),
      name="memx_causal_conv_fwd",
  )(x, *_padded(plan, w, bias), *extra)


def _backward(plan: _Plan, x, w, bias, seg, hist, hseg, dy):
  bsz, n_c = x.shape[0], plan.c_pad // plan.block_c
  extra, specs = _common_specs(plan, seg, hist, hseg)
  specs.append(pl.BlockSpec((None, plan.t, plan.c), lambda i, b, j: (b, 0, 0)))
  tile = pl.BlockSpec((None, plan.rows_bwd, plan.block_c), lambda i, b, j: (b, i, j))
  dw_spec = pl.BlockSpec((None, None, plan.width, plan.block_c), lambda i, b, j: (i, b, 0, j))
  db_spec = pl.BlockSpec((None, None, plan.block_c), lambda i, b, j: (i, b, j))
  out_specs = [dw_spec, db_spec]
  out_shape = [jax.ShapeDtypeStruct((plan.n_t_bwd, bsz, plan.width, plan.c_pad), jnp.float32),
               jax.ShapeDtypeStruct((plan.n_t_bwd, bsz, plan.c_pad), jnp.float32)]
  if not plan.grad_is_dy:  # with no activation the two-pass g is dy itself: nothing to write
    out_specs.insert(0, tile)
    out_shape.insert(0, jax.ShapeDtypeStruct(x.shape, x.dtype))
  outs = pl.pallas_call(
      functools.partial(_backward_kernel, plan=plan),
      grid=(plan.n_t_bwd, bsz, n_c), in_specs=specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=plan.params(backward=True), interpret=plan.interpret,
      cost_estimate=pl.CostEstimate(flops=2 * plan.width ** 2 * x.size,
                                    transcendentals=plan.width * x.size,
                                    bytes_accessed=3 * x.size * x.dtype.itemsize),
      name="memx_causal_conv_grad" if plan.two_pass else "memx_causal_conv_bwd",
  )(x, *_padded(plan, w, bias), *extra, dy)
  dx, dw_part, db_part = (dy, *outs) if plan.grad_is_dy else outs
  if plan.two_pass:  # dx holds g: the second pass turns it into dx
    dx = _dx_pass(plan, dx, w, seg)
  return dx, dw_part.sum((0, 1))[:, :plan.c], db_part.sum((0, 1))[:plan.c]


def _dx_pass(plan: _Plan, g, w, seg):
  bsz = g.shape[0]
  specs = [pl.BlockSpec((None, plan.t, plan.c), lambda i, b, j: (b, 0, 0)),
           pl.BlockSpec((plan.width, plan.block_c), lambda i, b, j: (0, j))]
  args = [g, _padded_taps(plan, w)]
  if plan.segments:
    args.append(seg)
    specs.append(pl.BlockSpec((None, plan.t), lambda i, b, j: (b, 0)))
  return pl.pallas_call(
      functools.partial(_dx_kernel, plan=plan),
      grid=(plan.n_t, bsz, plan.c_pad // plan.block_c), in_specs=specs,
      out_specs=pl.BlockSpec((None, plan.block_t, plan.block_c), lambda i, b, j: (b, i, j)),
      out_shape=jax.ShapeDtypeStruct(g.shape, g.dtype), compiler_params=plan.params(),
      interpret=plan.interpret,
      cost_estimate=pl.CostEstimate(flops=2 * plan.width * g.size, transcendentals=0,
                                    bytes_accessed=2 * g.size * g.dtype.itemsize),
      name="memx_causal_conv_dx",
  )(*args)





@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _conv(plan: _Plan, x, w, bias, seg, hist, hseg):
  return _forward(plan, x, w, bias, seg, hist, hseg)


def _conv_fwd(plan, x, w, bias, seg, hist, hseg):
  return _conv(plan, x, w, bias, seg, hist, hseg), (x, w, bias, seg, hist, hseg)


def _conv_bwd(plan, res, dy):
  x, w, bias, seg, hist, hseg = res
  dx, dw, db = _backward(plan, x, w, bias, seg, hist, hseg, dy)
  dhist = None
  if hist is not None:
    # Only outputs t < W-1 read the history: differentiate those few rows in plain JAX.
    n = min(plan.width - 1, plan.t)
    head = lambda h: causal_conv_xla(  # noqa: E731
        x[:, :n], w, bias, None if seg is None else seg[:, :n], h, hseg,
        activation=plan.activation)
    _, vjp = jax.vjp(head, hist)
    (dhist,) = vjp(dy[:, :n])
  return dx, dw.astype(w.dtype), db.astype(bias.dtype), None, dhist, None


_conv.defvjp(_conv_fwd, _conv_bwd)


def make_plan(t: int, c: int, width: int, *, segments: bool, history: bool,
              history_segments: bool, activation: str | None, block_sizes: BlockSizes | None,
              interpret: bool) -> _Plan:
  """Fixes the tiles (no tracing): block_t shrinks to the padded T, block_c to the padded C."""
  blocks = block_sizes or BlockSizes.get_default()
  t_pow2 = max(8, 1 << (t - 1).bit_length())
  block_t_bwd = min(blocks.block_t_bwd, t_pow2)
  return _Plan(t=t, c=c, width=width, block_t=min(blocks.block_t, t_pow2),
               block_c=min(blocks.block_c, max(16, 1 << (c - 1).bit_length())),
               num_warps=blocks.num_warps, block_t_bwd=block_t_bwd,
               rows_bwd=min(blocks.rows_bwd, -(-t // block_t_bwd) * block_t_bwd),
               num_warps_bwd=blocks.num_warps_bwd, two_pass=blocks.backward == "two_pass",
               segments=segments, history=history,
               history_segments=history_segments, activation=activation, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("activation", "block_sizes", "interpret"))
def causal_conv_pallas_gpu(
    x: Float[Array, "B T ..."],
    w: Float[Array, "W ..."],
    bias: Float[Array, "..."],
    segment_ids: Int[Array, "B T"] | None = None,
    history: Float[Array, "B Wm1 ..."] | None = None,
    history_segment_ids: Int[Array, "B Wm1"] | None = None,
    *,
    activation: str | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> Float[Array, "B T ..."]:
  """Tiled Pallas/Triton conv; same contract as `causal_conv_reference`.

  fp32 arithmetic in registers, y in x.dtype. Differentiable (hand-written backward kernel) in
  x, w, bias and history.
  """
  bsz, t = x.shape[:2]
  width = w.shape[0]
  x3 = x.reshape(bsz, t, -1)
  c = x3.shape[-1]
  hist = None if history is None or width == 1 else history.reshape(bsz, width - 1, c)
  seg = None if segment_ids is None else segment_ids.astype(jnp.int32)
  hseg = (None if seg is None or hist is None or history_segment_ids is None
          else history_segment_ids.astype(jnp.int32))
  plan = make_plan(t, c, width, segments=seg is not None, history=hist is not None,
                   history_segments=hseg is not None, activation=activation,
                   block_sizes=block_sizes, interpret=interpret)
  y = _conv(plan, x3, w.reshape(width, c), bias.reshape(c), seg, hist, hseg)
  return y.reshape(x.shape)
