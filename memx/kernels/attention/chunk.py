"""chunk_attention: a query chunk at a run-time offset over a key/value cache (forward only).

Chunked prefill runs a prompt C tokens at a time; each chunk's queries, at positions
start..start+C-1, attend to the cache that holds positions 0..start+C-1 (earlier chunks and
this one). Inside a `lax.scan` over chunks `start` is traced, so the `attention` API, whose
mask offset is static, cannot serve it without compiling one program per chunk. Here the offset
is an int32 read at run time:

- `reference`: dense scores over the whole cache, masked, fp32 softmax (the oracle);
- `xla`: online softmax (fp32) over key blocks, visiting only the blocks a chunk can see (the
  sink blocks, then from the oldest block a window reaches to the block of the chunk's last
  query), with trip counts that depend on `start`. Every score block goes through memory, so
  on GPUs it is far slower than a fused kernel (1.8 s against 83 ms for a 64k prefill, H100);
  it is the CPU default.
- `pallas_gpu`: the FlashAttention forward kernel of `pallas_gpu.py` with the offset read in
  the kernel and the tile schedule built in XLA from it; the GPU default.

Masks: causal (so keys past the chunk's last query are never seen: the cache may hold anything
finite there, zeros in a fresh cache; NaN or inf would still reach the output through
0 · value), with windows and sinks, uniform or per head; no block-sparse layout and
q_offset 0 (the offset is `start`). Not differentiable: it serves inference.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from memx.kernels._dispatch import choose
from memx.kernels.attention import api as attention_api
from memx.kernels.attention import cudnn as cudnn_impl
from memx.kernels.attention.config import BlockSizes
from memx.kernels.attention.mask import Mask
from memx.kernels.attention.pallas_gpu import chunk_attention_pallas_gpu
from memx.kernels.attention.reference import MASK_VALUE
from memx.typing import Array, Float

IMPLEMENTATIONS: tuple[str, ...] = ("reference", "xla", "pallas_gpu")
# "No window" in the integer visibility tests: larger than any position difference.
UNBOUNDED = 1 << 30


def head_rules(mask: Mask, num_heads: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per query head (window_left, window_right, n_sink) as int32 [H, 1] (windows unbounded →
  UNBOUNDED), for causal decode masks (no block-sparse layout, no q_offset)."""
  if mask.block_sparse is not None or mask.q_offset:
    raise NotImplementedError(f"attention decode: block-sparse or offset masks are not "
                              f"supported by KV-cache attention (got {mask}); use causal masks "
                              f"with windows and sinks, uniform or per head")
  heads = mask.heads(num_heads)
  col = lambda xs: np.asarray(xs, np.int32)[:, None]
  unb = lambda w: UNBOUNDED if w is None else w
  return (col([unb(m.window_left) for m in heads]), col([unb(m.window_right) for m in heads]),
          col([m.n_sink for m in heads]))


def visible(mask: Mask, num_heads: int, q_pos, k_pos):
  """Which keys at positions k_pos [S] each query head at positions q_pos (a scalar, or [C])
  sees: bool [H, S], or [H, C, S]."""
  left, right, sink = (jnp.asarray(a).reshape((num_heads,) + (1,) * jnp.ndim(q_pos) + (1,))
                       for a in head_rules(mask, num_heads))
  q = jnp.asarray(q_pos)[None, ..., None]
  k = jnp.asarray(k_pos).reshape((1,) * (q.ndim - 1) + (-1,))
  ok = k <= q if mask.causal else jnp.ones((), bool)
  in_window = ((q - k <= left) & (k - q <= right)) | (k < sink)
  return ok & in_window


def chunk_attention_reference(q, k, v, start, *, mask: Mask, scale: float | None = None):
  """Dense oracle: every cache key scored, invisible ones masked, fp32 softmax."""
  b, c, h, d = q.shape
  s, g = k.shape[1:3]
  scale = d ** -0.5 if scale is None else scale
  qg = q.reshape(b, c, g, h // g, d)
  scores = jnp.einsum("bcgrd,bsgd->bgrcs", qg, k, preferred_element_type=jnp.float32) * scale
  vis = visible(mask, h, start + jnp.arange(c), jnp.arange(s)).reshape(g, h // g, c, s)
  scores = jnp.where(vis[None], scores, MASK_VALUE)
  probs = jnp.where(vis[None], jax.nn.softmax(scores, axis=-1), 0.0)   # rows seeing no key: 0
  out = jnp.einsum("bgrcs,bsgd->bcgrd", probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return out.reshape(b, c, h, d).astype(q.dtype)


def chunk_attention_xla(q, k, v, start, *, mask: Mask, scale: float | None = None,
                        block: int = 512):
  """Online softmax over the key blocks of `block` keys that the chunk can see (see module)."""
  b, c, h, d = q.shape
  s, g = k.shape[1:3]
  r = h // g
  scale = d ** -0.5 if scale is None else scale
  bk = min(block, s)
  left, _, sink = head_rules(mask, h)
  q_pos = start + jnp.arange(c)
  qg = q.reshape(b, c, g, r, d)
  stats = (jnp.full((b, g, r, c), MASK_VALUE, jnp.float32), jnp.zeros((b, g, r, c), jnp.float32),
           jnp.zeros((b, g, r, c, d), jnp.float32))

  def visit(j, carry):
    m, denom, acc = carry
    k0 = jnp.minimum(j * bk, s - bk)                   # the last block is clamped to fit,
    kb = jax.lax.dynamic_slice_in_dim(k, k0, bk, axis=1)
    vb = jax.lax.dynamic_slice_in_dim(v, k0, bk, axis=1)
    k_pos = k0 + jnp.arange(bk)                        # keys before j·bk were visited already
    vis = visible(mask, h, q_pos, k_pos) & (k_pos >= j * bk)[None, None]   # [H, C, bk]
    vis = vis.reshape(g, r, c, bk)[None]
    scores = jnp.einsum("bcgrd,bsgd->bgrcs", qg, kb, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(vis, scores, MASK_VALUE)
    m_new = jnp.maximum(m, scores.max(-1))
    p = jnp.where(vis, jnp.exp(scores - m_new[..., None]), 0.0)
    corr = jnp.exp(m - m_new)
    acc = acc * corr[..., None] + jnp.einsum("bgrcs,bsgd->bgrcd", p.astype(vb.dtype), vb,
                                             preferred_element_type=jnp.float32)
    return m_new, denom * corr + p.sum(-1), acc

  last = (start + c - 1) // bk + 1                                  # blocks [0, last) hold keys
  sink_blocks = -(-int(sink.max()) // bk)
  widest = int(left.max())
  first = 0 if widest >= UNBOUNDED else jnp.maximum((start - widest) // bk, 0)
  stats = jax.lax.fori_loop(0, jnp.minimum(sink_blocks, last), visit, stats)
  stats = jax.lax.fori_loop(jnp.maximum(first, sink_blocks), last, visit, stats)
  _, denom, acc = stats
  out = jnp.where(denom[..., None] > 0, acc / jnp.maximum(denom, 1e-30)[..., None], 0.0)
  return jnp.moveaxis(out, 3, 1).reshape(b, c, h, d).astype(q.dtype)


def default_order() -> tuple[str, ...]:
  return ("pallas_gpu", "xla") if cudnn_impl.gpu_backend() else ("xla",)


def _check_inputs(q, k, v, start, mask: Mask) -> None:
  for name, x in (("q", q), ("k", k), ("v", v)):
    if getattr(x, "ndim", None) != 4:
      raise ValueError(f"chunk_attention: {name} must be [B, C|S, H, D]; got shape "
                       f"{getattr(x, 'shape', None)}")
  if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
    raise ValueError(f"chunk_attention: q {q.shape}, k {k.shape}, v {v.shape} do not match "
                     f"(want q [B, C, H, D], k and v [B, S, G, D])")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"chunk_attention: query heads ({q.shape[2]}) must be a multiple of kv "
                     f"heads ({k.shape[2]})")
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f"chunk_attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
  if not jnp.issubdtype(q.dtype, jnp.floating):
    raise ValueError(f"chunk_attention: q, k, v must be float arrays; got {q.dtype}")
  if q.shape[1] > k.shape[1]:
    raise ValueError(f"chunk_attention: a chunk of {q.shape[1]} queries does not fit a cache of "
                     f"{k.shape[1]} keys")
  if not isinstance(mask, Mask) or not mask.causal or mask.block_sparse is not None \
      or mask.q_offset:
    raise ValueError(f"chunk_attention: mask must be a causal memx Mask (windows and sinks, "
                     f"uniform or per head) without block-sparse layout or q_offset; got {mask}")
  mask.check_heads(q.shape[2])
  if jnp.ndim(start) != 0 or not jnp.issubdtype(jnp.result_type(start), jnp.integer):
    raise ValueError(f"chunk_attention: start must be an integer scalar, got {start!r}")
  if not isinstance(start, jax.core.Tracer):  # a traced start is the caller's to keep in range
    c, s = q.shape[1], k.shape[1]
    if not 0 <= int(start) <= s - c:
      raise ValueError(f"chunk_attention: start = {int(start)} puts the chunk's positions "
                       f"{int(start)}..{int(start) + c - 1} outside the cache's 0..{s - 1}: "
                       f"need 0 <= start <= S - C = {s - c}")


def chunk_attention(
    q: Float[Array, "B C H K"],
    k: Float[Array, "B S G K"],
    v: Float[Array, "B S G K"],
    start,
    *,
    mask: Mask,
    scale: float | None = None,
    implementation: str | Sequence[str] | None = None,
    interpret: bool = False,
    block_sizes: BlockSizes | None = None,
) -> Float[Array, "B C H K"]:
  """Attention of queries at positions start..start+C-1 over a cache of S keys at 0..S-1.

  Args:
    q: [B, C, H, D]; k, v: [B, S, G, D], the cache (positions past start + C - 1 are masked
      out; they must hold finite values, as a zero-initialised cache does).
    start: int scalar, may be traced (one compiled program for every chunk of a prefill).
    mask: the causal mask of the whole sequence (windows, sinks, per head); row p of it is the
      query at position p.
    implementation: None dispatches (pallas_gpu on NVIDIA GPUs, else xla); a name forces one.
    interpret / block_sizes: as for `attention` (pallas_gpu).

  Returns [B, C, H, D] in q.dtype; rows that see no key are zeros. Forward only.
  """
  _check_inputs(q, k, v, start, mask)

  def reason(name):
    if name not in IMPLEMENTATIONS:
      raise NotImplementedError(f"chunk_attention: unknown implementation {name!r}; available: "
                                f"{IMPLEMENTATIONS}")
    if name == "pallas_gpu":  # the same kernel constraints as attention()'s pallas_gpu
      return attention_api.unsupported_reason(name, q, k, mask, None, interpret)
    return None

  name = choose("chunk_attention", implementation, default_order(), reason)
  if name == "reference":
    return chunk_attention_reference(q, k, v, start, mask=mask, scale=scale)
  if name == "xla":
    return chunk_attention_xla(q, k, v, start, mask=mask, scale=scale)
  return chunk_attention_pallas_gpu(q, k, v, start, mask=mask, scale=scale,
                                    block_sizes=block_sizes, interpret=interpret)
