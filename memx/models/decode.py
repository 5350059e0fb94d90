"""Autoregressive generation with the models' recurrent forms (O(1) state per SSM layer).

`generate` runs the prompt through the parallel forward once (`prefill`, which also returns
each layer's decode state; with prefill_chunk, a chunk at a time), then one `decode_step` per
new token inside a `lax.scan`. SSM and linear-attention layers carry fixed-size states, so
their memory per sequence does not grow with the length; attention layers keep a KV cache of
max_len tokens, or, in layers of a sparse plan (ModelConfig.attn_plan), per-head sink + ring
buffers sized to each head's span at N = max_len (memx.nn.attention_decode).
`kv_cache_bytes(cfg, max_len, batch)` is the exact size of the keys and values; per token of
context, divide by max_len.
"""

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from memx.kernels.kv_quant import KVQuant
from memx.models.transformer import TransformerLM
from memx.nn.attention_decode import kv_cache_bytes
from memx.nn.kv_evict import H2O
from memx.typing import Array, Float, Int

__all__ = ["cache_bytes", "check_prompt", "decode_logits", "decode_nll", "generate",
           "kv_cache_bytes", "sample"]


def cache_bytes(cache) -> int:
  """Bytes held by a decode cache (every array, including the position counter)."""
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache)))


def sample(logits, key, temperature: float):
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)


def check_prompt(fn: str, model: TransformerLM, prompt, max_new_tokens, temperature, rng
                 ) -> float:
  """The checks every generation entry point makes before compiling (fn names it in the
  errors) → the temperature as a float."""
  if max_new_tokens < 1:
    raise ValueError(f"{fn}: max_new_tokens must be >= 1, got {max_new_tokens}")
  try:
    temperature = float(temperature)
  except (TypeError, jax.errors.ConcretizationTypeError):
    raise ValueError(f"{fn}: temperature must be a number (it is compiled in), got "
                     f"{temperature!r}") from None
  if not (math.isfinite(temperature) and temperature >= 0):
    raise ValueError(f"{fn}: temperature must be finite and >= 0, got {temperature}")
  if temperature > 0 and rng is None:
    raise ValueError(f"{fn}: sampling with temperature > 0 needs an rng key")
  if getattr(prompt, "ndim", None) != 2 or not jnp.issubdtype(prompt.dtype, jnp.integer) \
      or prompt.shape[1] < 1:
    raise ValueError(f"{fn}: prompt must be integer token ids [B, T] with T >= 1; got "
                     f"{getattr(prompt, 'dtype', type(prompt).__name__)} of shape "
                     f"{getattr(prompt, 'shape', None)}")
  if not isinstance(prompt, jax.core.Tracer):
    lo, hi = int(jnp.min(prompt)), int(jnp.max(prompt))
    if lo < 0 or hi >= model.cfg.vocab_size:
      raise ValueError(f"{fn}: prompt token ids must lie in [0, {model.cfg.vocab_size}) "
                       f"(the vocabulary); got ids from {lo} to {hi}")
  return temperature


def generate(model: TransformerLM, prompt: Int[Array, "B T"], max_new_tokens: int, *,
             temperature: float = 0.0, rng: jax.Array | None = None,
             max_len: int | None = None, prefill_chunk: int | None = None,
             kv_quant: KVQuant | None = None, kv_evict: H2O | None = None
             ) -> Int[Array, "B S"]:
  """Prompt [B, T] → prompt followed by max_new_tokens sampled tokens [B, T + max_new_tokens].

  temperature 0 is greedy decoding (no rng needed); otherwise rng is required. max_len (default
  T + max_new_tokens) sizes the attention layers' KV caches and is the length N at which a
  sparse plan's spans are taken. prefill_chunk: prefill the prompt that many tokens at a time
  (same tokens; the prefill's activations scale with the chunk, not the prompt). kv_quant:
  keep the attention layers' keys and values in b-bit codes (`memx.kernels.kv_quant`).
  kv_evict: keep only H2O's heavy-hitter and recent tokens in the causal attention layers
  (`memx.nn.kv_evict`; the prompt is then prefilled whole).
  """
  temperature = check_prompt("generate", model, prompt, max_new_tokens, temperature, rng)
  t = prompt.shape[1]
  max_len = t + max_new_tokens if max_len is None else max_len
  if max_len < t + max_new_tokens:
    raise ValueError(f"generate: max_len {max_len} < prompt {t} + new tokens {max_new_tokens}")
  keys = jax.random.split(jax.random.key(0) if rng is None else rng, max_new_tokens)
  graphdef, state = nnx.split(model)
  return _generate(graphdef, state, prompt, keys, max_len=max_len, temperature=temperature,
                   prefill_chunk=prefill_chunk, kv_quant=kv_quant, kv_evict=kv_evict)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_len", "temperature",
                                             "prefill_chunk", "kv_quant", "kv_evict"))
def _generate(graphdef, state, prompt, keys, *, max_len: int, temperature: float,
              prefill_chunk: int | None, kv_quant: KVQuant | None, kv_evict: H2O | None):
  """Compiled once per (model structure, shapes, max_len, temperature, prefill chunk, quant)."""
  model = nnx.merge(graphdef, state)
  logits, cache = model.prefill(prompt, max_len, chunk_size=prefill_chunk, last_logits=True,
                                kv_quant=kv_quant, kv_evict=kv_evict)
  first = sample(logits, keys[0], temperature)

  def body(carry, key):
    tok, cache = carry
    logits, cache = model.decode_step(tok, cache)
    return (sample(logits, key, temperature), cache), tok

  (last, _), toks = jax.lax.scan(body, (first, cache), keys[1:])
  return jnp.concatenate([prompt, jnp.swapaxes(toks, 0, 1), last[:, None]], axis=1)


def _check_decode_input(fn: str, tokens, prompt_len) -> None:
  if getattr(tokens, "ndim", None) != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"{fn}: tokens must be integer ids [B, T]; got "
                     f"{getattr(tokens, 'dtype', type(tokens).__name__)} of shape "
                     f"{getattr(tokens, 'shape', None)}")
  t = tokens.shape[1]
  if not (isinstance(prompt_len, int) and not isinstance(prompt_len, bool)
          and 1 <= prompt_len < t):
    raise ValueError(f"{fn}: prompt_len must be an int in [1, {t - 1}] (at least one token "
                     f"to prefill and one to predict), got {prompt_len!r}")


def decode_nll(model: TransformerLM, tokens: Int[Array, "B T"], prompt_len: int, *,
               kv_quant: KVQuant | None = None, kv_evict: H2O | None = None,
               full_cache: bool = False) -> Float[Array, "B P"]:
  """Per-token negative log-likelihood [B, T - prompt_len] of tokens[:, prompt_len:] as the
  decode path predicts them: the first prompt_len tokens prefilled, then one `decode_step` per
  token (teacher forcing), each reading the cache the earlier steps left.

  This is what a cache's compression costs: with kv_quant, kv_evict (or a sparse plan's ring
  caches) every
  step reads the stored keys and values, so the loss moves with what the cache lost; with
  neither, it equals the parallel forward's loss at those positions (a test checks it). The
  cache is made for max_len = T.
  """
  _check_decode_input("decode_nll", tokens, prompt_len)
  graphdef, state = nnx.split(model)
  return _decode_path(graphdef, state, tokens, prompt_len=prompt_len, kv_quant=kv_quant,
                      kv_evict=kv_evict, full_cache=full_cache, logits=False)


def decode_logits(model: TransformerLM, tokens: Int[Array, "B T"], prompt_len: int, *,
                  kv_quant: KVQuant | None = None, kv_evict: H2O | None = None,
                  full_cache: bool = False) -> Float[Array, "B T V"]:
  """Logits [B, T, V] float32 of every position of tokens: the prefill's for positions below
  prompt_len, then those of one teacher-forced `decode_step` per position (as `decode_nll`).
  Evaluations that score answers (retrieval) through the decode cache use it."""
  _check_decode_input("decode_logits", tokens, prompt_len)
  graphdef, state = nnx.split(model)
  return _decode_path(graphdef, state, tokens, prompt_len=prompt_len, kv_quant=kv_quant,
                      kv_evict=kv_evict, full_cache=full_cache, logits=True)


@functools.partial(jax.jit, static_argnames=("graphdef", "prompt_len", "kv_quant",
                                             "kv_evict", "full_cache", "logits"))
def _decode_path(graphdef, state, tokens, *, prompt_len: int, kv_quant: KVQuant | None,
                 kv_evict: H2O | None, full_cache: bool, logits: bool):
  """The decode path over tokens: logits=True → every position's logits [B, T, V]; False →
  the NLL of tokens[:, prompt_len:] [B, T - prompt_len] (no [.., V] array kept per step)."""
  model = nnx.merge(graphdef, state)
  t = tokens.shape[1]
  first, cache = model.prefill(tokens[:, :prompt_len], t, last_logits=not logits,
                               kv_quant=kv_quant, kv_evict=kv_evict, full_cache=full_cache)

  def nll(out, target):
    logp = jax.nn.log_softmax(out.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, target[:, None], axis=-1)[:, 0]

  def body(cache, inputs):
    tok, target = inputs
    out, cache = model.decode_step(tok, cache)
    return cache, (out if logits else nll(out, target))

  if logits:  # steps feed tokens prompt_len .. T-1, each giving its own position's logits
    fed = tokens[:, prompt_len:]
    targets = fed                    # unused
    head = first
  else:       # the prefill predicts token prompt_len; steps feed prompt_len .. T-2
    fed, targets = tokens[:, prompt_len:t - 1], tokens[:, prompt_len + 1:]
    head = nll(first, tokens[:, prompt_len])[:, None]
  if fed.shape[1] == 0:
    return head
  _, rest = jax.lax.scan(body, cache, (jnp.swapaxes(fed, 0, 1), jnp.swapaxes(targets, 0, 1)))
  return jnp.concatenate([head, jnp.swapaxes(rest, 0, 1)], axis=1)
