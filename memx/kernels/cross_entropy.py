"""Cross-entropy of a linear head without materialising the [..., V] logits.

    loss[i] = logsumexp_v(h_i · W[:, v]) − h_i · W[:, t_i]

For a language model the logits and their gradient are the largest activations of a training
step once the vocabulary is large ([B, T, V] float32: 8 GB at B·T = 16k tokens and V = 128k),
and they exist only to be reduced to one number per token.

Implementations:
  reference  logits = h W in full, then logsumexp; autodiff keeps [..., V] float32 tensors.
  xla        the vocabulary in blocks of `vocab_block` columns (`lax.scan`): the forward keeps a
             running max, sum of exponentials and the target's logit per token (an online
             logsumexp, as in blockwise attention); a custom VJP keeps h, W, the targets and the
             per-token logsumexp, and the backward recomputes each block's logits to form
             softmax − onehot, accumulating dh and writing that block's dW. Peak extra memory is
             one [..., vocab_block] block instead of several [..., V] tensors (W itself is never
             copied, only viewed: `_Layout`); the matmul FLOPs grow from 3 to 4 (the forward
             logits are computed twice).

Matmuls take h and W in `compute_dtype` with float32 accumulation (as the model's own logits);
the softmax statistics are float32. Blocks run over the vocabulary, never over tokens, so token
axes sharded over devices (batch, sequence) stay where they are; each block takes a run of
columns from each of 16 slices of the vocabulary, so a vocabulary sharded by tensor
parallelism stays sharded too. Target ids must
be in [0, V) (an id outside picks no logit: its loss is the logsumexp alone).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from memx.kernels._dispatch import choose, known_only
from memx.typing import Array

Implementation = Literal["reference", "xla"]
IMPLEMENTATIONS: tuple[str, ...] = ("reference", "xla")
DEFAULT_VOCAB_BLOCK = 4096


def _logits(h, w, dt):
  return jnp.einsum("...d,dv->...v", h.astype(dt), w.astype(dt),
                    preferred_element_type=jnp.float32)


def cross_entropy_reference(h: Array, w: Array, targets: Array, *,
                            compute_dtype=jnp.float32, w_layout: str = "dv") -> Array:
  """The oracle: full logits, fp32 logsumexp; returns the per-token loss [...] float32."""
  logits = _logits(h, w.T if w_layout == "vd" else w, compute_dtype)
  lse = jax.nn.logsumexp(logits, axis=-1)
  v = logits.shape[-1]
  valid = (targets >= 0) & (targets < v)  # as the blocked form: an id outside [0, V) picks nothing
  picked = jnp.take_along_axis(logits, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
  return lse - jnp.where(valid, picked, 0.0)


# Runs of contiguous columns per block: a vocabulary sharded over up to this many devices (or
# any divisor of it) stays sharded inside every block.
_RUNS = 16


@dataclasses.dataclass(frozen=True)
class _Layout:
  """How the vocabulary splits into nb blocks of `runs` × `run` columns, without copying W.

  W [D, V] (zero-padded to V' = nb · runs · run columns when V is not a multiple) is viewed as
  [D, runs, nb, run]: block j is [:, :, j, :], i.e. columns (k · nb + j) · run + i for run k,
  offset i. Each block takes one contiguous run from each of `runs` equal slices of the
  vocabulary, so a vocabulary sharded over devices (tensor parallelism splits V into contiguous
  runs) stays sharded inside every block: each device computes its own columns of each block
  and only per-token statistics cross devices. Runs of `run` contiguous columns keep reads of
  a block dense in memory; picking a block is a slice of the view, so the loss keeps no
  permuted copy of W (nor of dW, which the backward writes block by block into the view).
  A [V, D] table (`vd`, a tied embedding) is viewed as [runs, nb, run, D] the same way, so that
  the table itself, not a transposed copy, is what the backward keeps."""
  v: int
  nb: int
  runs: int
  run: int
  vd: bool = False

  @classmethod
  def of(cls, v: int, vocab_block: int, vd: bool = False) -> _Layout:
    nb = -(-v // vocab_block)
    per = -(-v // nb)  # the narrowest blocks that cover V in nb: padding stays below nb · runs
    runs = min(_RUNS, per)
    return cls(v=v, nb=nb, runs=runs, run=-(-per // runs), vd=vd)

  @property
  def block(self) -> int:
    return self.runs * self.run

  def view(self, w):
    """W → [D, runs, nb, run] ([runs, nb, run, D] if vd): a reshape, and a padded copy only
    when V is not a multiple of the blocks."""
    pad = self.nb * self.block - self.v
    if self.vd:
      wp = w if pad == 0 else jnp.pad(w, ((0, pad), (0, 0)))
      return wp.reshape(self.runs, self.nb, self.run, w.shape[1])
    wp = w if pad == 0 else jnp.pad(w, ((0, 0), (0, pad)))
    return wp.reshape(w.shape[0], self.runs, self.nb, self.run)

  def take(self, w4, j):
    """Block j: its weights [D, block] and its column ids [block]."""
    cols = ((jnp.arange(self.runs)[:, None] * self.nb + j) * self.run
            + jnp.arange(self.run)[None, :])
    if self.vd:
      wb = jax.lax.dynamic_index_in_dim(w4, j, axis=1, keepdims=False)
      return wb.reshape(self.block, w4.shape[-1]).T, cols.reshape(-1)
    wb = jax.lax.dynamic_index_in_dim(w4, j, axis=2, keepdims=False)
    return wb.reshape(w4.shape[0], self.block), cols.reshape(-1)

  def put(self, dw4, dwb, j):
    """Writes block j's gradient dwb [D, block] into the view-shaped dW."""
    if self.vd:
      return jax.lax.dynamic_update_index_in_dim(
          dw4, dwb.T.reshape(self.runs, 1, self.run, dw4.shape[-1]), j, axis=1)
    return jax.lax.dynamic_update_index_in_dim(
        dw4, dwb.reshape(dw4.shape[0], self.runs, 1, self.run), j, axis=2)

  def unview(self, dw4):
    if self.vd:
      return dw4.reshape(-1, dw4.shape[-1])[:self.v]
    return dw4.reshape(dw4.shape[0], -1)[:, :self.v]


def _block_logits(h, wb, cols, v: int, dt):
  """One block's logits [..., block] with padding columns at −inf, and its column ids."""
  cols = cols.reshape((1,) * (h.ndim - 1) + (-1,))
  logits = _logits(h, wb, dt)
  return jnp.where(cols < v, logits, -jnp.inf), cols


def _forward(h, w, targets, layout, dt):
  w4 = layout.view(w)
  shape = h.shape[:-1]

  def body(carry, j):
    m, s, picked = carry
    logits, cols = _block_logits(h, *layout.take(w4, j), layout.v, dt)
    m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
    s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - m_new[..., None]), axis=-1)
    hit = (targets[..., None] == cols) & (cols < layout.v)  # ids outside [0, V) pick nothing
    picked = picked + jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)
    return (m_new, s, picked), None

  init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
          jnp.zeros(shape, jnp.float32))
  (m, s, picked), _ = jax.lax.scan(body, init, jnp.arange(layout.nb))
  lse = m + jnp.log(s)
  return lse - picked, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _blockwise(h, w, targets, layout, dt):
  return _forward(h, w, targets, layout, dt)[0]


def _fwd(h, w, targets, layout, dt):
  loss, lse = _forward(h, w, targets, layout, dt)
  return loss, (h, w, targets, lse)


def _bwd(layout, dt, res, dloss):
  # The barrier keeps the recomputed logits from being CSE'd with the forward's (which would
  # keep them alive) and schedules them after dloss exists.
  h, w, targets, lse, dloss = jax.lax.optimization_barrier(res + (dloss,))
  v = layout.v
  w4 = layout.view(w)
  lead = tuple(range(h.ndim - 1))

  def body(carry, j):
    dh, dw4 = carry
    wb, block_cols = layout.take(w4, j)
    logits, cols = _block_logits(h, wb, block_cols, v, dt)
    p = jnp.exp(logits - lse[..., None])  # padding columns: exp(−inf) = 0
    dlogits = (p - ((targets[..., None] == cols) & (cols < v))) * dloss[..., None]
    dh = dh + jnp.einsum("...v,dv->...d", dlogits.astype(dt), wb.astype(dt),
                         preferred_element_type=jnp.float32)
    dwb = jax.lax.dot_general(h.astype(dt), dlogits.astype(dt), ((lead, lead), ((), ())),
                              preferred_element_type=jnp.float32)  # [D, block]
    return (dh, layout.put(dw4, dwb, j)), None

  init = (jnp.zeros(h.shape, jnp.float32), jnp.zeros(w4.shape, jnp.float32))
  (dh, dw4), _ = jax.lax.scan(body, init, jnp.arange(layout.nb))
  return dh.astype(h.dtype), layout.unview(dw4).astype(w.dtype), None


_blockwise.defvjp(_fwd, _bwd)


def cross_entropy_xla(h: Array, w: Array, targets: Array, *, vocab_block: int = DEFAULT_VOCAB_BLOCK,
                      compute_dtype=jnp.float32, w_layout: str = "dv") -> Array:
  """Vocabulary-blocked form with a recomputing backward; per-token loss [...] float32."""
  vd = w_layout == "vd"
  return _blockwise(h, w, targets, _Layout.of(w.shape[0 if vd else 1], int(vocab_block), vd),
                    jnp.dtype(compute_dtype))


def _check(h, w, targets, vocab_block, w_layout, compute_dtype) -> None:
  if w_layout not in ("dv", "vd"):
    raise ValueError(f"cross_entropy: w_layout must be 'dv' (w is [D, V]) or 'vd' (w is [V, D], "
                     f"a tied embedding table); got {w_layout!r}")
  want = "[V, D]" if w_layout == "vd" else "[D, V]"
  if getattr(w, "ndim", None) != 2:
    raise ValueError(f"cross_entropy: head weight must be {want}; got shape "
                     f"{getattr(w, 'shape', None)}")
  d, v = w.shape[::-1] if w_layout == "vd" else w.shape
  if getattr(h, "ndim", 0) < 1 or h.shape[-1] != d:
    raise ValueError(f"cross_entropy: h must be [..., D] with D = {d} (the head's width); "
                     f"got shape {getattr(h, 'shape', None)}")
  if getattr(targets, "shape", None) != h.shape[:-1]:
    raise ValueError(f"cross_entropy: targets must have h's leading shape {h.shape[:-1]}; got "
                     f"{getattr(targets, 'shape', None)}")
  if not jnp.issubdtype(targets.dtype, jnp.integer):
    raise ValueError(f"cross_entropy: targets must be integer token ids; got {targets.dtype}")
  if v < 1:
    raise ValueError(f"cross_entropy: the head has no vocabulary (w is {want} with V = 0)")
  if not jnp.issubdtype(jnp.dtype(compute_dtype), jnp.floating):
    raise ValueError(f"cross_entropy: compute_dtype must be a floating dtype (the matmul "
                     f"operands' type); got {jnp.dtype(compute_dtype)}")
  # Out-of-range ids would read as a zero target logit (loss = logsumexp), silently. Checked
  # where the values are known, i.e. outside jit (inside it, the data layer's range check).
  if not isinstance(targets, jax.core.Tracer) and targets.size:
    lo, hi = int(np.min(np.asarray(targets))), int(np.max(np.asarray(targets)))
    if lo < 0 or hi >= v:
      raise ValueError(f"cross_entropy: targets must lie in [0, {v}) (the head's vocabulary); "
                       f"got values in [{lo}, {hi}]")
  if vocab_block is not None and (isinstance(vocab_block, bool) or not isinstance(
      vocab_block, int | np.integer) or vocab_block < 1):
    raise ValueError(f"cross_entropy: vocab_block must be a positive int; got {vocab_block!r}")


def cross_entropy(
    h: Array,
    w: Array,
    targets: Array,
    *,
    vocab_block: int | None = None,
    compute_dtype=jnp.float32,
    implementation: Implementation | Sequence[Implementation] | None = None,
    w_layout: Literal["dv", "vd"] = "dv",
) -> Array:
  """Per-token −log softmax(h W)[target] without keeping [..., V] logits.

  Args:
    h: final hidden states [..., D] (after the final norm). w: head weight [D, V], or with
      w_layout="vd" a [V, D] table (a tied embedding: pass the table itself, not its transpose,
      so that the backward keeps the parameter rather than a transposed copy of it).
      targets: token ids [...].
    vocab_block: columns per block for "xla" (default 4096; any V, the last block is padded).
    compute_dtype: matmul operand dtype (accumulation and statistics are float32).
    implementation: None → "xla"; "reference" materialises the logits.

  Returns:
    [...] float32 losses. Differentiable in h and w.
  """
  _check(h, w, targets, vocab_block, w_layout, compute_dtype)
  name = choose("cross_entropy", implementation, ("xla", "reference"),
                known_only("cross_entropy", IMPLEMENTATIONS))
  if name == "reference":
    return cross_entropy_reference(h, w, targets, compute_dtype=compute_dtype,
                                   w_layout=w_layout)
  return cross_entropy_xla(h, w, targets, vocab_block=vocab_block or DEFAULT_VOCAB_BLOCK,
                           compute_dtype=compute_dtype, w_layout=w_layout)
