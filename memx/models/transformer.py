"""Decoder-only LM: embed → L × (RMSNorm → token mixer, RMSNorm → SwiGLU) → logits.

The token mixer of each layer comes from `ModelConfig.mixers`: GQA attention (the Transformer),
Mamba-2, or (gated) linear attention; all-attention is the default, a list mixing them is a
hybrid (e.g. attention every 4th layer, as mmMamba-hybrid). Every mixer also has a recurrent
step form, which `init_cache` / `prefill` / `decode_step` use for generation: SSM and
linear-attention layers carry a fixed-size state, attention layers a KV cache.

The MatMul-free LM (`config.matmulfree_config`) is this model with "mlgru" mixers and "bitglu"
MLPs: ternary BitLinear projections everywhere but the embeddings, plus a model-level [L, D]
parameter (`lower_bounds`) from which every MLGRU layer takes its forget-gate lower bound.
`pack_bitlinears(model)` turns it into the packed 2-bit inference form (memx.models.packed).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from memx.kernels import save_kernel_results
from memx.kernels.kv_quant import KVQuant, QuantCache
from memx.models.config import ModelConfig
from memx.nn import attention_decode
from memx.nn._params import DTYPES, param
from memx.nn.attention import Attention
from memx.nn.glu import BitGLU
from memx.nn.kv_evict import H2O, EvictCache
from memx.nn.linear_attention import LinearAttention
from memx.nn.mamba2 import Mamba2
from memx.nn.mlgru import MLGRU, lower_bounds
from memx.nn.mlp import SwiGLU
from memx.nn.norms import RMSNorm
from memx.parallel.axes import BATCH, EMBED, LAYERS, MLP, SEQ, VOCAB
from memx.parallel.constrain import constrain
from memx.typing import Array, Float, Int

_OFFLOAD_DOTS = jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host")


def _offload_dots(prim, *args, **params):
  """remat "offload": "dots", but the matmul outputs wait for the backward pass in pinned host
  memory (copied out in the forward pass, back in the backward; XLA overlaps the copies with
  compute on GPUs and TPUs) instead of device memory. The kernels' results stay on device.
  On CPU, whose host memory is its device memory, the copies compile away: "dots" there."""
  if save_kernel_results(prim, *args, **params):
    return True
  return _OFFLOAD_DOTS(prim, *args, **params)


# Which intermediates a rematerialised block keeps for the backward pass.
REMAT_POLICIES = {
    "full": None,  # save only the block input; recompute everything
    # matmul outputs, and the attention / SSD kernels' forward results (their custom backward
    # passes need them; without them the kernels' whole forward pass would run again)
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable, save_kernel_results),
    "offload": _offload_dots,
}
SSM_MIXERS = {"mamba2": Mamba2, "linear_attention": LinearAttention, "mlgru": MLGRU}
MLPS = {"swiglu": SwiGLU, "bitglu": BitGLU}


class Block(nnx.Module):
  """Pre-norm residual block. Attention layers keep the names attn_norm/attn (checkpoints of
  attention-only models are unchanged); other mixers live in mixer_norm/mixer."""

  def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
    self.kind = cfg.mixer(layer)
    if self.kind == "attention":
      self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=cfg.param_dtype)
      self.attn = Attention(cfg, layer, rngs=rngs)
    else:
      self.mixer_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=cfg.param_dtype)
      self.mixer = SSM_MIXERS[self.kind](cfg, layer, rngs=rngs)
    if cfg.mlp:
      self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=cfg.param_dtype)
      self.mlp = MLPS[cfg.mlp_kind](cfg, rngs=rngs)
    else:
      self.mlp = None

  def _mlp(self, x):
    return x if self.mlp is None else x + self.mlp(self.mlp_norm(x))

  def _lb(self, lower_bound):
    """Keyword arguments for the mixer: only MLGRU layers take a forget-gate lower bound."""
    return {"lower_bound": lower_bound} if self.kind == "mlgru" else {}

  def __call__(self, x, positions, segment_ids=None, lower_bound=None, score_bias=None):
    if self.kind == "attention":
      x = x + self.attn(self.attn_norm(x), positions, segment_ids, score_bias)
    else:
      x = x + self.mixer(self.mixer_norm(x), segment_ids, **self._lb(lower_bound))
    return self._mlp(x)

  # --- decoding -------------------------------------------------------------------------------

  def init_cache(self, batch: int, max_len: int, full_cache: bool = False, kv_quant=None,
                 kv_evict=None):
    if self.kind == "attention":
      return attention_decode.init_cache(self.attn, batch, max_len, full=full_cache,
                                         kv_quant=kv_quant, kv_evict=kv_evict)
    return self.mixer.init_cache(batch)

  def extend(self, x, start, cache, lower_bound=None):
    """x [B, C, D] at positions start..start+C-1 (an int, or traced inside a scan), continuing
    from `cache` (the state after positions 0..start-1; an empty one for start 0) → (block
    output, the state after them)."""
    if self.kind == "attention":
      y, cache = attention_decode.extend(self.attn, self.attn_norm(x), start, cache)
    else:
      y, cache = self.mixer(self.mixer_norm(x), return_state=True, state=cache,
                            **self._lb(lower_bound))
    return self._mlp(x + y), cache

  def extend_steps(self, x, start, cache, lower_bound=None):
    """`extend` that can be undone back to any of its C tokens (speculative decoding checks C
    drafted tokens at once, then keeps a prefix) → (output, state after all C, states after
    each token [C, ...], or None for attention).

    An attention layer runs the parallel extend: its dense KV cache rolls back by the position
    alone (slots past it are masked, then overwritten). A recurrent mixer's state cannot be
    undone, so it keeps the state after each token (`steps`: the projections run on the C
    tokens at once, only the recurrence token by token)."""
    if self.kind == "attention":
      y, cache = self.extend(x, start, cache)
      return y, cache, None
    y, states = self.mixer.steps(self.mixer_norm(x), cache, **self._lb(lower_bound))
    return self._mlp(x + y), jax.tree.map(lambda s: s[-1], states), states

  def step(self, x_t, pos, cache, lower_bound=None):
    if self.kind == "attention":
      y, cache = attention_decode.step(self.attn, self.attn_norm(x_t), pos, cache)
    else:
      y, cache = self.mixer.step(self.mixer_norm(x_t), cache, **self._lb(lower_bound))
    return self._mlp(x_t + y), cache


def _run_block(block: Block, x, positions, segment_ids, lower_bound=None):
  return block(x, positions, segment_ids, lower_bound)


class TransformerLM(nnx.Module):
  """Token ids [B, T] → next-token logits [B, T, vocab] (float32)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), (VOCAB, EMBED), std=cfg.init_std,
                       dtype=cfg.param_dtype)
    self.blocks = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.n_layers)])
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=cfg.param_dtype)
    if cfg.mixers is not None and "mlgru" in cfg.mixers:
      # Zeros: a uniform softmax, so bounds start at 0, 1/L, ..., (L-1)/L (HGRNBitModel's init).
      self.lower_bounds = nnx.Param(jnp.zeros((cfg.n_layers, cfg.d_model), jnp.float32),
                                    axes=(LAYERS, MLP))
    if not cfg.tie_embeddings:
      self.unembed = param(rngs, (cfg.d_model, cfg.vocab_size), (EMBED, VOCAB),
                           std=cfg.d_model ** -0.5, dtype=cfg.param_dtype)
    run = _run_block
    if cfg.remat != "none":
      run = nnx.remat(_run_block, policy=REMAT_POLICIES[cfg.remat])
    self._run_block = run

  def _layer_bounds(self) -> list:
    """Each layer's MLGRU forget-gate lower bound [D] (None for models without MLGRU)."""
    if not hasattr(self, "lower_bounds"):
      return [None] * self.cfg.n_layers
    lb = lower_bounds(self.lower_bounds[...])
    return [lb[i] for i in range(self.cfg.n_layers)]

  def _embed(self, tokens):
    return jnp.take(self.embed[...], tokens, axis=0).astype(DTYPES[self.cfg.compute_dtype])

  def _logits(self, x):
    return self.project(self.final_norm(x))

  def project(self, xn):
    """Final-normed hidden states → logits [..., V] float32."""
    dt = DTYPES[self.cfg.compute_dtype]
    if self.cfg.tie_embeddings:
      return jnp.einsum("...d,vd->...v", xn, self.embed[...].astype(dt),
                        preferred_element_type=jnp.float32)
    return jnp.einsum("...d,dv->...v", xn, self.unembed[...].astype(dt),
                      preferred_element_type=jnp.float32)

  def head_weight(self) -> tuple[Array, str]:
    """The output projection and its layout for `memx.kernels.cross_entropy`: the [V, D]
    embedding table itself ("vd") when tied (a transpose would be a copy the loss's backward
    keeps), else the [D, V] unembedding ("dv")."""
    if self.cfg.tie_embeddings:
      return self.embed[...], "vd"
    return self.unembed[...], "dv"

  def __call__(self, tokens: Int[Array, "B T"], *, positions: Int[Array, "B T"] | None = None,
               segment_ids: Int[Array, "B T"] | None = None,
               score_biases: dict[int, Array] | None = None) -> Float[Array, "B T V"]:
    """score_biases: {attention layer: [B, H, T, T] logit bias}, for attention profiling
    (memx.sparse.profile); those layers run explicit dense attention without remat."""
    xn = self.features(tokens, positions=positions, segment_ids=segment_ids,
                       score_biases=score_biases)
    return constrain(self.project(xn), (BATCH, SEQ, VOCAB))

  def features(self, tokens: Int[Array, "B T"], *, positions: Int[Array, "B T"] | None = None,
               segment_ids: Int[Array, "B T"] | None = None,
               score_biases: dict[int, Array] | None = None) -> Float[Array, "B T D"]:
    """The final-normed hidden states: logits = features · head_weight(). A loss that never
    materialises the logits (memx.kernels.cross_entropy) starts from here."""
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    x = self.embed_tokens(tokens)
    if score_biases is None:
      return self.final_norm(self.run_layers(x, range(self.cfg.n_layers), positions, segment_ids))
    for i, (block, lb) in enumerate(zip(self.blocks, self._layer_bounds(), strict=True)):
      if i in score_biases:
        x = block(x, positions, segment_ids, lb, score_biases[i])
      else:
        x = self._run_block(block, x, positions, segment_ids, lb)
      x = constrain(x, (BATCH, SEQ, EMBED))
    return self.final_norm(x)

  def embed_tokens(self, tokens: Int[Array, "B T"]) -> Float[Array, "B T D"]:
    # Activation shardings by logical name (no-ops without a mesh and rules).
    return constrain(self._embed(tokens), (BATCH, SEQ, EMBED))

  def run_layers(self, x: Float[Array, "B T D"], layers: range, positions: Int[Array, "B T"],
                 segment_ids: Int[Array, "B T"] | None = None) -> Float[Array, "B T D"]:
    """Hidden states x through the blocks `layers` (consecutive layer indices), each under the
    model's remat policy: the model between embedding and final norm when layers is all of
    them, one gradient-isolated group of local learning (memx.train.local) otherwise."""
    bounds = self._layer_bounds()
    for i in layers:
      x = self._run_block(self.blocks[i], x, positions, segment_ids, bounds[i])
      x = constrain(x, (BATCH, SEQ, EMBED))
    return x

  # --- decoding -------------------------------------------------------------------------------

  def init_cache(self, batch: int, max_len: int, *, full_cache: bool = False,
                 kv_quant: KVQuant | None = None, kv_evict: H2O | None = None) -> dict:
    """Empty decode state for `batch` sequences of up to `max_len` tokens.

    {"pos": int32 scalar (tokens seen), "layers": one entry per layer}. SSM and linear-attention
    entries have a fixed size; attention layers hold [B, max_len, G, K] keys and values, except
    layers of a sparse plan (cfg.attn_plan), which keep per-KV-head sink + ring buffers sized
    to their heads' spans at N = max_len (`memx.nn.attention_decode.PlanCache`). full_cache=True
    gives plan layers the dense cache too (same results, for comparisons). kv_quant stores the
    dense caches' keys and values in b-bit codes (`memx.kernels.kv_quant`, KIVI); plan layers'
    rings are not quantized (an error unless full_cache). kv_evict gives the plain causal
    layers H2O caches of heavy + recent tokens per KV head (`memx.nn.kv_evict`; windowed,
    sink and plan layers keep theirs). Bytes of keys and values:
    `memx.nn.attention_decode.kv_cache_bytes(cfg, max_len, batch, kv_quant=..., kv_evict=...)`.
    """
    if kv_quant is not None and any(block.kind == "attention" for block in self.blocks):
      kv_quant.check(self.cfg.head_dim)
    return {"pos": jnp.zeros((), jnp.int32),
            "layers": [block.init_cache(batch, max_len, full_cache, kv_quant, kv_evict)
                       for block in self.blocks]}

  def prefill(self, tokens: Int[Array, "B T"], max_len: int, *, full_cache: bool = False,
              chunk_size: int | None = None, last_logits: bool = False, unroll: bool = False,
              kv_quant: KVQuant | None = None, kv_evict: H2O | None = None):
    """Parallel forward over a prompt that also returns the decode state after it.

    Returns (logits [B, T, V] float32, or [B, V] for the last token with last_logits, cache).
    All rows share one position (equal-length prompts); max_len bounds prompt + generated
    tokens for the attention caches, and is the length N at which sparse-plan layers take their
    spans, in the prompt as in every later step (so the logits are those of `self(tokens)` on a
    max_len-token sequence, not of a T-token one, unless the plan's spans do not depend on N).
    full_cache, kv_quant: see init_cache. With kv_quant the prompt attends to itself at full
    precision (a chunk reads earlier chunks from the quantized cache, as stored), and what the
    cache keeps for decoding is quantized. With kv_evict the prompt attends to itself exactly
    and its attention scores choose the tokens the H2O caches keep; with chunk_size each chunk
    attends to what the earlier ones left and the cache never exceeds the budget (Locret's
    setting; the observation window and pooling need the whole prompt).

    chunk_size: prefill the prompt C tokens at a time, each chunk continuing from the state the
    previous one left (`Block.extend`): the same logits and state as whole, with activations
    that scale with C instead of T. What stays is the decode state itself: constant for SSM and
    linear-attention layers, a KV cache of max_len tokens per attention layer (per-head rings
    under a sparse plan). The whole chunks run in one `lax.scan` (one compiled chunk, however
    long the prompt): attention layers then read their cache with `chunk_attention`, which
    takes the chunk's offset at run time and visits only the cache blocks the chunk can see (a
    Pallas kernel on GPUs, an XLA online softmax elsewhere). unroll=True (and any sparse-plan
    ring cache, whose layout depends on the offset) unrolls them instead: static offsets, the
    `attention` kernels (cuDNN where it applies), and a compile time that grows with the number
    of chunks.
    """
    if getattr(tokens, "ndim", None) != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"prefill: tokens must be integer ids [B, T]; got "
                       f"{getattr(tokens, 'dtype', type(tokens).__name__)} of shape "
                       f"{getattr(tokens, 'shape', None)}")
    b, t = tokens.shape
    if t < 1:
      raise ValueError("prefill: the prompt is empty (T = 0); give at least one token")
    if t > max_len:
      raise ValueError(f"prefill: prompt length {t} exceeds max_len {max_len}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool)
                                   or chunk_size < 1):
      raise ValueError(f"prefill: chunk_size must be a positive int or None, got {chunk_size!r}")
    chunk = t if chunk_size is None else min(chunk_size, t)
    if kv_evict is not None and chunk < t and (kv_evict.observe or kv_evict.pool > 1):
      raise ValueError(f"prefill: {kv_evict.name}'s observation window and pooling score the "
                       f"whole prompt; prefill it at once (chunk_size {chunk_size} < prompt "
                       f"length {t}) or chunk it with H2O(heavy, recent) alone")
    caches = self.init_cache(b, max_len, full_cache=full_cache, kv_quant=kv_quant,
                             kv_evict=kv_evict)["layers"]
    bounds = self._layer_bounds()

    def run(ids, start, caches):
      x, caches = self._embed(ids), list(caches)
      for i, block in enumerate(self.blocks):
        x, caches[i] = block.extend(x, start, caches[i], bounds[i])
      return x, caches

    logits, scanned = [], 0
    rings = any(isinstance(cache, attention_decode.PlanCache) for cache in caches)
    # A quantized cache scans only chunks of whole key groups (each starts on a group boundary).
    misaligned = kv_quant is not None and chunk % kv_quant.group != 0
    n_scan = 0 if unroll or rings or misaligned else t // chunk
    if n_scan > 1:
      # Every whole chunk runs the same program with a traced offset, so one scan compiles it
      # once, however long the prompt.
      def body(carry, ids):
        caches, _, start = carry
        x, caches = run(ids, start, caches)
        return (caches, x[:, -1], start + chunk), None if last_logits else self._logits(x)

      ids = jnp.swapaxes(tokens[:, :n_scan * chunk].reshape(b, n_scan, chunk), 0, 1)
      x_last = jnp.zeros((b, self.cfg.d_model), DTYPES[self.cfg.compute_dtype])
      (caches, x_last, _), ys = jax.lax.scan(body, (caches, x_last, jnp.int32(0)), ids)
      scanned = n_scan * chunk
      if last_logits and scanned == t:
        logits.append(self._logits(x_last))
      elif not last_logits:
        logits.append(jnp.swapaxes(ys, 0, 1).reshape(b, scanned, -1))
    for start in range(scanned, t, chunk):  # the remainder, or every chunk when unrolled
      ids = tokens[:, start:start + chunk]
      if start:
        # Nothing of this chunk may start before the previous one is done: otherwise XLA is
        # free to hoist what needs only the tokens (every chunk's embeddings and first-layer
        # projections) and keep it all alive, giving back the memory chunking saves.
        ids, caches = jax.lax.optimization_barrier((ids, caches))
      x, caches = run(ids, start, caches)
      if not last_logits or start + chunk >= t:
        logits.append(self._logits(x[:, -1] if last_logits else x))
    logits = logits[0] if len(logits) == 1 else jnp.concatenate(logits, axis=1)
    return logits, {"pos": jnp.asarray(t, jnp.int32), "layers": caches}

  def extend(self, tokens: Int[Array, "B C"], cache: dict):
    """Feeds C more tokens per row at positions cache["pos"]... (traced: one compiled program
    for any position) → (logits [B, C, V] float32, the cache after them, each layer's states
    after every one of the C tokens: [C, ...] for recurrent mixers, None for attention).

    Attention layers need dense caches (init_cache with full_cache=True and neither kv_quant
    nor kv_evict): a position inside a ring, quantized or evicting cache cannot be returned
    to. With the per-token states, `rewind` returns the cache to any of the C tokens
    (speculative decoding: memx.models.speculative)."""
    b, c = tokens.shape
    batch, max_len = self._cache_extent(cache)
    if b != batch:
      raise ValueError(f"extend: tokens have {b} rows, the cache {batch}")
    for i, layer_cache in enumerate(cache["layers"]):
      if self.blocks[i].kind == "attention" and not isinstance(layer_cache, dict):
        raise ValueError(f"extend: layer {i} keeps a {type(layer_cache).__name__}; extend "
                         f"needs dense KV caches (init_cache(..., full_cache=True), no "
                         f"kv_quant or kv_evict)")
    pos = cache["pos"]
    if max_len is not None and not isinstance(pos, jax.core.Tracer) and int(pos) + c > max_len:
      raise ValueError(f"extend: positions {int(pos)}..{int(pos) + c - 1} do not fit the "
                       f"cache's max_len {max_len}")
    x, layers, states = self._embed(tokens), [], []
    for block, layer_cache, lb in zip(self.blocks, cache["layers"], self._layer_bounds(),
                                      strict=True):
      x, layer_cache, trail = block.extend_steps(x, pos, layer_cache, lb)
      layers.append(layer_cache)
      states.append(trail)
    return self._logits(x), {"pos": pos + c, "layers": layers}, states

  def rewind(self, cache: dict, states: list, keep: Int[Array, ""], start: Int[Array, ""]):
    """The cache `extend` left, returned to just after `keep` (1..C) of the tokens it fed from
    position `start`: recurrent layers take their state after token keep, attention layers keep
    their KV cache (what lies past the position is masked, and overwritten later)."""
    layers = [layer_cache if trail is None else jax.tree.map(lambda s: s[keep - 1], trail)
              for layer_cache, trail in zip(cache["layers"], states, strict=True)]
    return {"pos": start + keep, "layers": layers}

  def decode_step(self, tokens: Int[Array, " B"], cache: dict):
    """One token per row at position cache["pos"] → (logits [B, V] float32, next cache).

    The cache holds positions up to its max_len (`init_cache`): a step past it raises when the
    position is known (eagerly), and under jit returns NaN logits, never silently wrong ones.
    """
    batch, max_len = self._cache_extent(cache)
    if getattr(tokens, "ndim", None) != 1 or tokens.shape[0] != batch:
      raise ValueError(f"decode_step: tokens must be [B] with B = {batch} (the cache's batch), "
                       f"one token per sequence; got shape {getattr(tokens, 'shape', None)}")
    pos = cache["pos"]
    if max_len is not None and not isinstance(pos, jax.core.Tracer) and int(pos) >= max_len:
      raise ValueError(f"decode_step: position {int(pos)} is past the cache's max_len "
                       f"{max_len}; make the cache (init_cache / prefill / generate) longer")
    x = self._embed(tokens)
    new = []
    for block, layer_cache, lb in zip(self.blocks, cache["layers"], self._layer_bounds(),
                                      strict=True):
      x, layer_cache = block.step(x, pos, layer_cache, lb)
      new.append(layer_cache)
    logits = self._logits(x)
    if max_len is not None:
      logits = jnp.where(pos < max_len, logits, jnp.nan)  # traced past the end: visibly wrong
    return logits, {"pos": pos + 1, "layers": new}

  def _cache_extent(self, cache: dict) -> tuple[int, int | None]:
    """(batch, max_len) of a decode cache; max_len None when no layer has a bounded cache
    (SSM and linear-attention states take any number of steps)."""
    batch, lengths = None, []
    for block, layer_cache in zip(self.blocks, cache["layers"], strict=True):
      if isinstance(layer_cache, attention_decode.PlanCache):
        lead = layer_cache.k
        lengths.append(layer_cache.max_len)
      elif isinstance(layer_cache, QuantCache):
        lead = layer_cache.k_codes
        lengths.append(layer_cache.max_len)
      elif isinstance(layer_cache, EvictCache):
        lead = layer_cache.k
        lengths.append(layer_cache.max_len)
      elif block.kind == "attention":                     # dense {"k", "v": [B, max_len, ...]}
        lead = layer_cache["k"]
        lengths.append(lead.shape[1])
      else:                                               # recurrent state, batch first
        lead = jax.tree.leaves(layer_cache)[0]
      batch = lead.shape[0] if batch is None else batch
    return batch, min(lengths, default=None)


def count_params(model: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
