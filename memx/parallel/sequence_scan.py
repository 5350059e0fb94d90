"""Sequence-parallel recurrences: `linear_scan`, SSD and linear attention over a split sequence.

A linear recurrence h_t = A_t h_{t-1} + u_t is linear in its state, so a device that holds a
run of tokens can scan them from a zero state first and fix the result up afterwards:

1. Local pass: the memx kernel scans the device's tokens from h = 0. That gives the local
   outputs, the local final state h_loc and, from the gates alone, the decay from the run's
   start to every token, D_t = Π_{s<=t} A_s: for `linear_scan` the same kernel over the gates
   from h = 1 with zero input (a second element-wise pass), for SSD exp(cumsum(Δ·A)) per head.
2. Exchange: the per-device summaries (A_loc = D_last, h_loc) compose like the pairs of a
   parallel prefix scan, (A1, h1) ∘ (A2, h2) = (A1·A2, A2·h1 + h2). A log-depth
   Hillis-Steele scan over the devices (ceil(log2 n) `lax.ppermute` rounds, after one shift that
   makes it exclusive) gives every device h_in, the true state before its first token. What
   moves is one state and one decay per device and round: [B, D] for `linear_scan`,
   [B, H, P, N] + [B, H] for SSD, whatever the sequence length. The initial state h0 enters as
   the first device's predecessor.
3. Correction: h_t += D_t · h_in for `linear_scan`; y_t += D_t · (h_in C_t) per head for SSD
   (the D skip is local and unaffected). The global final state is the composition through the
   last device, broadcast with one psum (only when asked for).

Packed sequences: where the segment id changes, including between the last token of the
previous device and the first of this one (a one-token halo), the decay product becomes 0, so
the incoming state stops at the boundary exactly as in the unsharded kernels.

Layouts (see memx.parallel.sequence): "contiguous" holds one run of T/n tokens per device, in
device order. "zigzag" holds two runs, chunks d and 2n-1-d of 2n; the chain of chunks then
runs up the devices and back down, so the exchange is two such scans (ascending over the first
runs, then descending over the second ones, started from the first scan's total on the last
device) and every local run is scanned independently (folded into the batch). "striped" puts
neighbouring tokens on different devices: a scan would need a state per token from other
devices, so it is refused (`memx.parallel.validate.validate_for_model` says so before compiling).

Short convolutions (Mamba-2's causal conv) need the W-1 tokens before each run: `with_history`
fetches them with one `lax.ppermute` per run (the first device gets zeros).

Three levels, as in sequence.py:
* per-shard functions for use inside `jax.shard_map` over the sequence axis:
  `sharded_linear_scan`, `sharded_ssd`, `sharded_linear_attention`, and `SeqShard`, which also
  offers `with_history` and `last_tokens`;
* global entry points: `sequence_parallel_linear_scan`, `sequence_parallel_ssd`,
  `sequence_parallel_linear_attention` (mesh and axis explicit);
* for layers: `sequence_map(fn, *args, in_axes=..., out_axes=...)` runs fn(shard, *local_args)
  under shard_map when the active rules split SEQ (specs from the logical names, like every
  other activation), and fn(UNSHARDED, *args), exactly the kernels, otherwise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

from memx.kernels.linear_scan import linear_scan
from memx.kernels.ssd import linear_attention, ssd
from memx.parallel.axes import BATCH, HEADS, KV_HEADS, SEQ
from memx.parallel.constrain import active_mesh, active_rules, sequence_options
from memx.parallel.rules import logical_to_spec
from memx.parallel.sequence import _active_seq_axis  # the one SEQ-split detection
from memx.typing import Array, Float, Int

# Layouts a scan can run on: every device holds whole runs of consecutive tokens.
SCAN_LAYOUTS: tuple[str, ...] = ("contiguous", "zigzag")
_F32 = jnp.float32


def _check_layout(layout: str, local_len: int, who: str) -> int:
  """Runs per device for `layout`; ValueError for layouts a scan cannot use or odd lengths."""
  if layout == "striped":
    raise ValueError(f"{who}: sequence layout 'striped' puts neighbouring tokens on different "
                     f"devices, so a recurrence (Mamba-2, linear attention, MLGRU) would need a "
                     f"state per token from other devices; use one of {SCAN_LAYOUTS} "
                     f"(parallel.sequence_layout)")
  if layout not in SCAN_LAYOUTS:
    raise ValueError(f"{who}: sequence layout {layout!r} is not one of {SCAN_LAYOUTS}")
  runs = 2 if layout == "zigzag" else 1
  if local_len % runs:
    raise ValueError(f"{who}: {local_len} local tokens do not split into the {runs} runs of "
                     f"layout {layout!r}")
  return runs


@dataclasses.dataclass(frozen=True)
class SeqShard:
  """Where this device's tokens sit in the sequence, and the operations that need to know.

  `UNSHARDED` (axis_name None) is the whole sequence on one device: its methods are exactly the
  memx kernels. Inside `jax.shard_map` over `axis_name` (n = axis_size devices, tokens in
  `layout` order) they are the sequence-parallel versions. Layers get one from `sequence_map`.
  """

  axis_name: str | None = None
  axis_size: int = 1
  layout: str = "contiguous"

  @property
  def sharded(self) -> bool:
    return self.axis_name is not None and self.axis_size > 1

  # --- geometry -------------------------------------------------------------------------------

  def _runs(self, local_len: int, who: str) -> int:
    return _check_layout(self.layout, local_len, who)

  def _ascending(self, runs: int) -> tuple[bool, ...]:
    """Per local run: does the chain of runs visit the devices upwards (else downwards)?"""
    return (True, False)[:runs]

  def _index(self):
    return lax.axis_index(self.axis_name)

  def _first(self, ascending: bool):
    return self._index() == (0 if ascending else self.axis_size - 1)

  def _last(self, ascending: bool):
    return self._first(not ascending)

  def _fold(self, x, runs: int):
    """[B, runs·L, ...] → [runs·B, L, ...] (run-major): each run scans as its own row."""
    if x is None or runs == 1:
      return x
    b, t = x.shape[:2]
    x = x.reshape(b, runs, t // runs, *x.shape[2:])
    return jnp.swapaxes(x, 0, 1).reshape(runs * b, t // runs, *x.shape[3:])

  def _unfold(self, x, runs: int):
    if runs == 1:
      return x
    rb, length = x.shape[:2]
    x = x.reshape(runs, rb // runs, length, *x.shape[2:])
    return jnp.swapaxes(x, 0, 1).reshape(rb // runs, runs * length, *x.shape[3:])

  def _shift(self, tree, k: int, ascending: bool):
    """Every device receives the tree of the device k steps before it along the chain
    (zeros where there is none)."""
    n = self.axis_size
    perm = ([(d, d + k) for d in range(n - k)] if ascending else
            [(d, d - k) for d in range(k, n)])
    return jax.tree.map(lambda x: lax.ppermute(x, self.axis_name, perm), tree)

  # --- halos ----------------------------------------------------------------------------------

  def _previous(self, x, k: int, runs: int):
    """Folded [runs·B, L, ...] → [runs·B, k, ...]: the k tokens before each run (zeros before
    the sequence). One ppermute per run; a run that starts a downward chain continues the same
    device's upward run."""
    length = x.shape[1]
    if length < k:
      raise ValueError(f"sequence parallelism: each device's run of {length} tokens is shorter "
                       f"than the {k} tokens of history a layer needs (e.g. Mamba-2's "
                       f"conv_width - 1); use fewer devices on the sequence axis or longer "
                       f"sequences")
    tails = x[:, length - k:].reshape(runs, -1, k, *x.shape[2:])
    out = []
    for j, up in enumerate(self._ascending(runs)):
      got = self._shift(tails[j], 1, up)
      if j:
        got = jnp.where(self._first(up), tails[j - 1], got)
      out.append(got)
    return jnp.stack(out).reshape(x.shape[0], k, *x.shape[2:])

  def _starts(self, segment_ids, runs: int):
    """Folded bool [runs·B, L]: where the state restarts (a new segment), including a run's
    first token when the token before it, on another device, has another id; or None."""
    if segment_ids is None:
      return None
    seg = self._fold(segment_ids, runs)
    prev = self._previous(seg, 1, runs)[:, 0]
    b = segment_ids.shape[0]
    # The sequence's very first token has no predecessor: h0 belongs to its segment.
    very_first = jnp.repeat(jnp.stack([self._index() == 0] + [jnp.array(False)] * (runs - 1)),
                            b)
    first = (seg[:, 0] != prev) & ~very_first
    return jnp.concatenate([first[:, None], seg[:, 1:] != seg[:, :-1]], axis=1)

  def with_history(self, fn: Callable, x, width: int, segment_ids=None, history=None):
    """fn(x, seg, hist, hist_seg) on each run, where hist [B, width, ...] holds the `width`
    tokens before the run (hist_seg their segment ids, or None for the first token's segment):
    the previous device's tail, or `history` / None (zeros) before the sequence. For causal
    windows such as `causal_conv` (width = W-1), the result equals fn on the whole sequence.

    history [B, width, ...] (the same on every device): the tokens before the sequence, where a
    sequence continues an earlier one (chunked prefill), instead of zeros. They count as part
    of the first token's segment.
    """
    if history is not None and tuple(history.shape) != (x.shape[0], width, *x.shape[2:]):
      raise ValueError(f"with_history: history must have shape {(x.shape[0], width)} + "
                       f"{tuple(x.shape[2:])}, got {tuple(history.shape)}")
    if width == 0 or not self.sharded:
      return fn(x, segment_ids, None if width == 0 else history, None)
    runs = self._runs(x.shape[1], "with_history")
    xf, sf = self._fold(x, runs), self._fold(segment_ids, runs)
    prev = self._previous(xf, width, runs)
    sprev = None if sf is None else self._previous(sf, width, runs)
    if history is not None:  # the chain's first run starts on device 0 (ascending)
      b = x.shape[0]
      very_first = jnp.repeat(jnp.stack([self._index() == 0] + [jnp.array(False)] * (runs - 1)),
                              b)
      pick = lambda a, v: jnp.where(very_first.reshape((-1,) + (1,) * (a.ndim - 1)), v, a)  # noqa: E731
      prev = pick(prev, jnp.concatenate([history.astype(x.dtype)] * runs, axis=0))
      if sprev is not None:
        sprev = pick(sprev, jnp.repeat(sf[:, :1], width, axis=1))
    return self._unfold(fn(xf, sf, prev, sprev), runs)

  def last_tokens(self, x, k: int):
    """[B, k, ...]: the last k tokens of the whole sequence (zeros in front if it is shorter),
    the same on every device (one psum)."""
    if k == 0:
      return x[:, :0]
    if not self.sharded:
      pad = ((0, 0), (max(0, k - x.shape[1]), 0)) + ((0, 0),) * (x.ndim - 2)
      return jnp.pad(x, pad)[:, -k:]
    runs = self._runs(x.shape[1], "last_tokens")
    xf = self._fold(x, runs)
    if xf.shape[1] < k:
      raise ValueError(f"last_tokens: runs of {xf.shape[1]} tokens hold fewer than {k}")
    tail = xf[:, xf.shape[1] - k:].reshape(runs, -1, k, *x.shape[2:])[-1]
    mine = self._last(self._ascending(runs)[-1])
    return lax.psum(jnp.where(mine, tail, jnp.zeros_like(tail)), self.axis_name)

  # --- the state exchange ---------------------------------------------------------------------

  def _exchange(self, decay, h_loc, h0, runs: int, bcast: Callable, final_state: bool):
    """Per-run summaries (decay [runs·B, ...], local final state h_loc [runs·B, ...]) → (the
    true state entering each run [runs·B, ...], the global final state or None). fp32."""
    decay = decay.astype(_F32).reshape(runs, -1, *decay.shape[1:])
    h_loc = h_loc.astype(_F32).reshape(runs, -1, *h_loc.shape[1:])
    carry = jnp.zeros_like(h_loc[0]) if h0 is None else h0.astype(_F32)
    h_in = []
    for j, up in enumerate(self._ascending(runs)):
      # Exclusive scan: shift by one, the chain's first device gets (1, carry): h0, or the
      # total of the previous chain, which ends on this very device.
      first = self._first(up)
      a, h = self._shift((decay[j], h_loc[j]), 1, up)
      a, h = jnp.where(first, jnp.ones_like(a), a), jnp.where(first, carry, h)
      pos = self._index() if up else self.axis_size - 1 - self._index()
      k = 1
      while k < self.axis_size:  # Hillis-Steele: ceil(log2 n) rounds
        ra, rh = self._shift((a, h), k, up)
        keep = pos >= k
        a, h = jnp.where(keep, ra * a, a), jnp.where(keep, bcast(a) * rh + h, h)
        k *= 2
      h_in.append(h)
      carry = bcast(decay[j]) * h + h_loc[j]  # state after this run (the total on the last)
    final = None
    if final_state:
      mine = self._last(self._ascending(runs)[-1])
      final = lax.psum(jnp.where(mine, carry, jnp.zeros_like(carry)), self.axis_name)
    return jnp.stack(h_in).reshape(-1, *h_in[0].shape[1:]), final

  # --- the recurrences ------------------------------------------------------------------------

  def linear_scan(self, a, b, h0=None, *, segment_ids=None, implementation=None,
                  block_sizes=None, interpret: bool = False, final_state: bool = True):
    """`memx.kernels.linear_scan.linear_scan` on this shard (see `sharded_linear_scan`)."""
    if not self.sharded:
      return linear_scan(a, b, h0, segment_ids=segment_ids, implementation=implementation,
                         block_sizes=block_sizes, interpret=interpret)
    who = "sharded_linear_scan"
    _check_state(who, h0, (b.shape[0], b.shape[2]))
    runs = self._runs(b.shape[1], who)
    af = self._fold(a, runs)
    starts = self._starts(segment_ids, runs)
    if starts is not None:  # a reset is a zero gate (the kernels' own rule)
      af = jnp.where(starts[..., None], jnp.zeros((), af.dtype), af)
    kw = {"implementation": implementation, "block_sizes": block_sizes, "interpret": interpret}
    h, h_loc = linear_scan(af, self._fold(b, runs), **kw)
    # D_t = Π_{s<=t} a_s, as the same recurrence from h = 1 with no input: its backward is the
    # kernel's, exact at zero gates. (Autodiff of jnp.cumprod goes through an associative scan,
    # whose transpose inside shard_map crashes jaxlib 0.11.2's Shardy partitioner.)
    af32 = af.astype(_F32)
    decay, _ = linear_scan(af32, jnp.zeros_like(af32), jnp.ones_like(af32[:, 0]), **kw)
    h_in, final = self._exchange(decay[:, -1], h_loc, h0, runs, lambda x: x, final_state)
    h = (h.astype(_F32) + decay * h_in[:, None, :]).astype(h.dtype)
    return self._unfold(h, runs), final

  def _ssd_finish(self, y, h_loc, log_a, c, segment_ids, h0, runs, final_state):
    """Correction of a local SSD pass: y_t += exp(Σ_{s<=t} log_a_s) (h_in C_t) per head."""
    starts = self._starts(segment_ids, runs)
    decay = jnp.exp(jnp.cumsum(log_a.astype(_F32), axis=1))             # [rB, L, H]
    if starts is not None:  # past a segment start the incoming state is gone
      first_run = jnp.cumsum(starts.astype(jnp.int32), axis=1) == 0
      decay = jnp.where(first_run[..., None], decay, 0.0)
    h_in, final = self._exchange(decay[:, -1], h_loc, h0, runs,
                                 lambda x: x[:, :, None, None], final_state)
    rb, length, h = decay.shape
    g = c.shape[2]
    hin = h_in.reshape(rb, g, h // g, *h_in.shape[2:])                   # head h → group h // R
    read = jnp.einsum("bgrpn,btgn->btgrp", hin, c.astype(_F32),
                      precision=lax.Precision.HIGHEST).reshape(rb, length, h, -1)
    y = (y.astype(_F32) + decay[..., None] * read).astype(y.dtype)
    return self._unfold(y, runs), final

  def ssd(self, x, dt, a, b, c, *, d=None, initial_state=None, segment_ids=None,
          implementation=None, block_sizes=None, interpret: bool = False,
          final_state: bool = True):
    """`memx.kernels.ssd.ssd` on this shard (see `sharded_ssd`)."""
    kw = {"implementation": implementation, "block_sizes": block_sizes, "interpret": interpret}
    if not self.sharded:
      return ssd(x, dt, a, b, c, d=d, initial_state=initial_state, segment_ids=segment_ids, **kw)
    who = "sharded_ssd"
    _check_state(who, initial_state, (x.shape[0], x.shape[2], x.shape[3], b.shape[3]))
    runs = self._runs(x.shape[1], who)
    fold = lambda v: self._fold(v, runs)  # noqa: E731
    y, h_loc = ssd(fold(x), fold(dt), a, fold(b), fold(c), d=d, segment_ids=fold(segment_ids),
                   **kw)
    log_a = fold(dt).astype(_F32) * a.astype(_F32)[None, None, :]
    return self._ssd_finish(y, h_loc, log_a, fold(c), segment_ids, initial_state, runs,
                            final_state)

  def linear_attention(self, q, k, v, *, log_gate=None, scale: float = 1.0, initial_state=None,
                       segment_ids=None, implementation=None, block_sizes=None,
                       interpret: bool = False, final_state: bool = True):
    """`memx.kernels.ssd.linear_attention` on this shard (see `sharded_linear_attention`)."""
    kw = {"implementation": implementation, "block_sizes": block_sizes, "interpret": interpret}
    if not self.sharded:
      return linear_attention(q, k, v, log_gate=log_gate, scale=scale,
                              initial_state=initial_state, segment_ids=segment_ids, **kw)
    who = "sharded_linear_attention"
    _check_state(who, initial_state, (q.shape[0], q.shape[2], v.shape[3], q.shape[3]))
    runs = self._runs(q.shape[1], who)
    fold = lambda x: self._fold(x, runs)  # noqa: E731
    o, h_loc = linear_attention(fold(q), fold(k), fold(v), log_gate=fold(log_gate), scale=scale,
                                segment_ids=fold(segment_ids), **kw)
    qf = fold(q)
    log_a = (jnp.zeros(qf.shape[:3], _F32) if log_gate is None else fold(log_gate))
    if scale != 1.0:  # the readout uses the kernel's C: q scaled and rounded to q.dtype
      qf = (qf.astype(_F32) * scale).astype(qf.dtype)
    return self._ssd_finish(o, h_loc, log_a, qf, segment_ids, initial_state, runs, final_state)


UNSHARDED = SeqShard()


def _check_state(who: str, h0, shape: tuple[int, ...]) -> None:
  if h0 is not None and tuple(getattr(h0, "shape", ())) != shape:
    raise ValueError(f"{who}: the initial state must have shape {shape} (the local batch), got "
                     f"{getattr(h0, 'shape', None)}")


# --- per-shard functions ------------------------------------------------------------------------

def sharded_linear_scan(
    a: Float[Array, "B T D"],
    b: Float[Array, "B T D"],
    h0: Float[Array, "B D"] | None = None,
    *,
    axis_name: str,
    axis_size: int,
    layout: str = "contiguous",
    segment_ids: Int[Array, "B T"] | None = None,
    implementation=None,
    block_sizes=None,
    interpret: bool = False,
    final_state: bool = True,
) -> tuple[Float[Array, "B T D"], Float[Array, "B D"] | None]:
  """h_t = a_t ⊙ h_{t-1} + b_t on this device's shard; call inside shard_map over `axis_name`.

  Args:
    a, b: the local shards [B, T/n, D] of a sequence laid out by `layout` ("contiguous" or
      "zigzag") over the n = axis_size devices.
    h0: the state before the sequence's first token [B, D] (the same on every device).
    segment_ids: local [B, T/n] packed-sequence ids (a change of id restarts the state).
    implementation, block_sizes, interpret: the local `linear_scan` kernel's.
    final_state: also return the global final state (costs one psum of [B, D]).

  Returns:
    (h [B, T/n, D] in b.dtype, final state [B, D] float32 on every device, or None): the
    local part of `linear_scan` on the whole sequence. Differentiable (lax collectives only).
  """
  return SeqShard(axis_name, axis_size, layout).linear_scan(
      a, b, h0, segment_ids=segment_ids, implementation=implementation,
      block_sizes=block_sizes, interpret=interpret, final_state=final_state)


def sharded_ssd(
    x: Float[Array, "B T H P"],
    dt: Float[Array, "B T H"],
    a: Float[Array, " H"],
    b: Float[Array, "B T G N"],
    c: Float[Array, "B T G N"],
    *,
    axis_name: str,
    axis_size: int,
    layout: str = "contiguous",
    d: Float[Array, " H"] | None = None,
    initial_state: Float[Array, "B H P N"] | None = None,
    segment_ids: Int[Array, "B T"] | None = None,
    implementation=None,
    block_sizes=None,
    interpret: bool = False,
    final_state: bool = True,
) -> tuple[Float[Array, "B T H P"], Float[Array, "B H P N"] | None]:
  """Mamba-2 SSD (`memx.kernels.ssd.ssd`) on this device's shard; call inside shard_map.

  Local arrays [B, T/n, ...] as in `sharded_linear_scan`; a, d [H] and initial_state
  [B, H, P, N] are whole. Returns (y [B, T/n, H, P] in x.dtype, final state [B, H, P, N]
  float32 on every device, or None). One state [B, H, P, N] and one decay [B, H] per device
  move per round of the exchange.
  """
  return SeqShard(axis_name, axis_size, layout).ssd(
      x, dt, a, b, c, d=d, initial_state=initial_state, segment_ids=segment_ids,
      implementation=implementation, block_sizes=block_sizes, interpret=interpret,
      final_state=final_state)


def sharded_linear_attention(
    q: Float[Array, "B T H K"],
    k: Float[Array, "B T G K"],
    v: Float[Array, "B T H V"],
    *,
    axis_name: str,
    axis_size: int,
    layout: str = "contiguous",
    log_gate: Float[Array, "B T H"] | None = None,
    scale: float = 1.0,
    initial_state: Float[Array, "B H V K"] | None = None,
    segment_ids: Int[Array, "B T"] | None = None,
    implementation=None,
    block_sizes=None,
    interpret: bool = False,
    final_state: bool = True,
) -> tuple[Float[Array, "B T H V"], Float[Array, "B H V K"] | None]:
  """(Gated) linear attention (`memx.kernels.ssd.linear_attention`) on this device's shard."""
  return SeqShard(axis_name, axis_size, layout).linear_attention(
      q, k, v, log_gate=log_gate, scale=scale, initial_state=initial_state,
      segment_ids=segment_ids, implementation=implementation, block_sizes=block_sizes,
      interpret=interpret, final_state=final_state)


# --- shard_map by logical names -----------------------------------------------------------------

def _is_axes(x) -> bool:
  return isinstance(x, tuple) and all(e is None or isinstance(e, str) for e in x)


def _specs(axes_tree, args, axis: str, mesh):
  """PartitionSpecs from logical names: SEQ on `axis`, the rest from the active rules."""
  rules = ((SEQ, axis),) + tuple(r for r in active_rules() if r[0] != SEQ)
  shape = dict(mesh.shape)

  def one(axes, arg=True):
    if arg is None:
      return None
    return PartitionSpec() if axes is None else logical_to_spec(axes, rules, shape)

  if args is None:
    return jax.tree.map(lambda ax: None if ax is None else one(ax), axes_tree,
                        is_leaf=lambda x: x is None or _is_axes(x))
  return tuple(one(ax, arg) for ax, arg in zip(axes_tree, args, strict=True))


def sequence_map(fn: Callable, *args, in_axes: Sequence, out_axes, mesh=None,
                 axis: str | None = None, layout: str | None = None):
  """fn(shard, *args) on each device's part of the sequence, or on the whole of it.

  With `mesh`/`axis` unset: when the active rules split SEQ over a mesh axis of size > 1
  (the test `sharded_attention` uses), fn runs under `jax.shard_map` on local shards with a
  `SeqShard` for that axis and the context's `sequence_options().layout`; otherwise
  fn(UNSHARDED, *args) runs on the global arrays (exactly the kernels).

  Args:
    fn: fn(shard: SeqShard, *local_args) → a pytree of arrays.
    args: arrays (or None).
    in_axes: one tuple of logical axis names per argument (None for an argument that is None
      or replicated); the SEQ dim is split over the sequence axis, the others as the active
      rules split those names, so the map fits the surrounding shardings (heads over "tensor",
      batch over "data"/"fsdp"). Parameters pass through here too, with their logical axes.
    out_axes: the output pytree's logical axes (tuples at the leaves).
    mesh, axis, layout: explicit sequence-parallel setting (the global entry points).
  """
  if axis is None:
    seq = _active_seq_axis()
    if seq is None:
      return fn(UNSHARDED, *args)
    axis, mesh = seq[0], active_mesh()
  mesh = active_mesh() if mesh is None else mesh
  if mesh is None:
    raise ValueError("sequence_map: no mesh; pass mesh= or enter jax.set_mesh")
  if axis not in mesh.shape:
    raise ValueError(f"sequence_map: mesh axes {tuple(mesh.shape)} lack {axis!r}")
  n = mesh.shape[axis]
  if n == 1:
    return fn(UNSHARDED, *args)
  layout = sequence_options().layout if layout is None else layout
  if len(in_axes) != len(args):
    raise ValueError(f"sequence_map: {len(in_axes)} in_axes for {len(args)} arguments")
  shard = SeqShard(axis, n, layout)
  seq_dims = [a.shape[ax.index(SEQ)] for a, ax in zip(args, in_axes, strict=True)
              if a is not None and ax is not None and SEQ in ax]
  for t in seq_dims:
    if t % n:
      raise ValueError(f"sequence_map: sequence length {t} is not a multiple of the {n} devices "
                       f"of {axis!r}")
    _check_layout(layout, t // n, "sequence parallelism")
  # check_vma=False as in sequence.py: the kernels' custom VJPs and the exchange's collectives
  # carry no replication types; replicated inputs' gradients are summed by shard_map itself.
  mapped = jax.shard_map(lambda *xs: fn(shard, *xs), mesh=mesh,
                         in_specs=_specs(tuple(in_axes), args, axis, mesh),
                         out_specs=_specs(out_axes, None, axis, mesh), check_vma=False)
  return mapped(*args)


# --- global entry points ------------------------------------------------------------------------

def sequence_parallel_linear_scan(
    a: Float[Array, "B T D"],
    b: Float[Array, "B T D"],
    h0: Float[Array, "B D"] | None = None,
    *,
    mesh=None,
    axis: str = "seq",
    layout: str = "contiguous",
    segment_ids: Int[Array, "B T"] | None = None,
    channel_axis: str | None = None,
    implementation=None,
    block_sizes=None,
    interpret: bool = False,
) -> tuple[Float[Array, "B T D"], Float[Array, "B D"]]:
  """`linear_scan` over a sequence split along mesh axis `axis`, on global arrays.

  a, b, segment_ids: global [B, T, ...] in `layout` order (`permute_sequence`). The batch is
  split as the active rules split BATCH and D as they split `channel_axis` (a logical name,
  e.g. MLP; None: whole). Returns (h [B, T, D], final state [B, D]) like `linear_scan`.
  """
  seq = (BATCH, SEQ, channel_axis)

  def local(shard, a, b, h0, seg):
    return shard.linear_scan(a, b, h0, segment_ids=seg, implementation=implementation,
                             block_sizes=block_sizes, interpret=interpret)

  return sequence_map(local, a, b, h0, segment_ids,
                      in_axes=(seq, seq, (BATCH, channel_axis), (BATCH, SEQ)),
                      out_axes=(seq, (BATCH, channel_axis)), mesh=mesh, axis=axis,
                      layout=layout)


def sequence_parallel_ssd(
    x: Float[Array, "B T H P"],
    dt: Float[Array, "B T H"],
    a: Float[Array, " H"],
    b: Float[Array, "B T G N"],
    c: Float[Array, "B T G N"],
    *,
    d: Float[Array, " H"] | None = None,
    initial_state: Float[Array, "B H P N"] | None = None,
    segment_ids: Int[Array, "B T"] | None = None,
    mesh=None,
    axis: str = "seq",
    layout: str = "contiguous",
    implementation=None,
    block_sizes=None,
    interpret: bool = False,
) -> tuple[Float[Array, "B T H P"], Float[Array, "B H P N"]]:
  """`ssd` over a sequence split along mesh axis `axis`, on global arrays (heads and groups
  split as the active rules split HEADS / KV_HEADS, the batch as BATCH)."""
  xs, gs, ts = (BATCH, SEQ, HEADS, None), (BATCH, SEQ, KV_HEADS, None), (BATCH, SEQ, HEADS)

  def local(shard, x, dt, a, b, c, d, h0, seg):
    return shard.ssd(x, dt, a, b, c, d=d, initial_state=h0, segment_ids=seg,
                     implementation=implementation, block_sizes=block_sizes,
                     interpret=interpret)

  return sequence_map(local, x, dt, a, b, c, d, initial_state, segment_ids,
                      in_axes=(xs, ts, (HEADS,), gs, gs, (HEADS,), (BATCH, HEADS, None, None),
                               (BATCH, SEQ)),
                      out_axes=(xs, (BATCH, HEADS, None, None)), mesh=mesh, axis=axis,
                      layout=layout)


def sequence_parallel_linear_attention(
    q: Float[Array, "B T H K"],
    k: Float[Array, "B T G K"],
    v: Float[Array, "B T H V"],
    *,
    log_gate: Float[Array, "B T H"] | None = None,
    scale: float = 1.0,
    initial_state: Float[Array, "B H V K"] | None = None,
    segment_ids: Int[Array, "B T"] | None = None,
    mesh=None,
    axis: str = "seq",
    layout: str = "contiguous",
    implementation=None,
    block_sizes=None,
    interpret: bool = False,
) -> tuple[Float[Array, "B T H V"], Float[Array, "B H V K"]]:
  """`linear_attention` over a sequence split along mesh axis `axis`, on global arrays."""
  qs, ks = (BATCH, SEQ, HEADS, None), (BATCH, SEQ, KV_HEADS, None)
  vs = qs if v.shape[2] == q.shape[2] else ks

  def local(shard, q, k, v, g, h0, seg):
    return shard.linear_attention(q, k, v, log_gate=g, scale=scale, initial_state=h0,
                                  segment_ids=seg, implementation=implementation,
                                  block_sizes=block_sizes, interpret=interpret)

  return sequence_map(local, q, k, v, log_gate, initial_state, segment_ids,
                      in_axes=(qs, ks, vs, (BATCH, SEQ, HEADS), (BATCH, HEADS, None, None),
                               (BATCH, SEQ)),
                      out_axes=(qs, (BATCH, HEADS, None, None)), mesh=mesh, axis=axis,
                      layout=layout)


__all__ = [
    "SCAN_LAYOUTS",
    "UNSHARDED",
    "SeqShard",
    "sequence_map",
    "sequence_parallel_linear_attention",
    "sequence_parallel_linear_scan",
    "sequence_parallel_ssd",
    "sharded_linear_attention",
    "sharded_linear_scan",
    "sharded_ssd",
]
