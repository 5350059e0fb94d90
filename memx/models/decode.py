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

from memx.models.transformer import TransformerLM
from memx.nn.attention_decode import kv_cache_bytes
from memx.typing import Array, Int

__all__ = ["cache_bytes", "generate", "kv_cache_bytes"]


def cache_bytes(cache) -> int:
  """Bytes held by a decode cache (every array, including the position counter)."""
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache)))


def _sample(logits, key, temperature: float):
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)


def generate(model: TransformerLM, prompt: Int[Array, "B T"], max_new_tokens: int, *,
             temperature: float = 0.0, rng: jax.Array | None = None,
             max_len: int | None = None, prefill_chunk: int | None = None
             ) -> Int[Array, "B S"]:
  """Prompt [B, T] → prompt followed by max_new_tokens sampled tokens [B, T + max_new_tokens].

  temperature 0 is greedy decoding (no rng needed); otherwise rng is required. max_len (default
  T + max_new_tokens) sizes the attention layers' KV caches and is the length N at which a
  sparse plan's spans are taken. prefill_chunk: prefill the prompt that many tokens at a time
  (same tokens; the prefill's activations scale with the chunk, not the prompt).
  """
  if max_new_tokens < 1:
    raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
  try:
    temperature = float(temperature)
  except (TypeError, jax.errors.ConcretizationTypeError):
    raise ValueError(f"generate: temperature must be a number (it is compiled in), got "
                     f"{temperature!r}") from None
  if not (math.isfinite(temperature) and temperature >= 0):
    raise ValueError(f"generate: temperature must be finite and >= 0, got {temperature}")
  if temperature > 0 and rng is None:
    raise ValueError("generate: sampling with temperature > 0 needs an rng key")
  if getattr(prompt, "ndim", None) != 2 or not jnp.issubdtype(prompt.dtype, jnp.integer) \
      or prompt.shape[1] < 1:
    raise ValueError(f"generate: prompt must be integer token ids [B, T] with T >= 1; got "
                     f"{getattr(prompt, 'dtype', type(prompt).__name__)} of shape "
                     f"{getattr(prompt, 'shape', None)}")
  if not isinstance(prompt, jax.core.Tracer):
    lo, hi = int(jnp.min(prompt)), int(jnp.max(prompt))
    if lo < 0 or hi >= model.cfg.vocab_size:
      raise ValueError(f"generate: prompt token ids must lie in [0, {model.cfg.vocab_size}) "
                       f"(the vocabulary); got ids from {lo} to {hi}")
  t = prompt.shape[1]
  max_len = t + max_new_tokens if max_len is None else max_len
  if max_len < t + max_new_tokens:
    raise ValueError(f"generate: max_len {max_len} < prompt {t} + new tokens {max_new_tokens}")
  keys = jax.random.split(jax.random.key(0) if rng is None else rng, max_new_tokens)
  graphdef, state = nnx.split(model)
  return _generate(graphdef, state, prompt, keys, max_len=max_len, temperature=temperature,
                   prefill_chunk=prefill_chunk)


@functools.partial(jax.jit,
                   static_argnames=("graphdef", "max_len", "temperature", "prefill_chunk"))
def _generate(graphdef, state, prompt, keys, *, max_len: int, temperature: float,
              prefill_chunk: int | None):
  """Compiled once per (model structure, shapes, max_len, temperature, prefill chunk)."""
  model = nnx.merge(graphdef, state)
  logits, cache = model.prefill(prompt, max_len, chunk_size=prefill_chunk, last_logits=True)
  first = _sample(logits, keys[0], temperature)

  def body(carry, key):
    tok, cache = carry
    logits, cache = model.decode_step(tok, cache)
    return (_sample(logits, key, temperature), cache), tok

  (last, _), toks = jax.lax.scan(body, (first, cache), keys[1:])
  return jnp.concatenate([prompt, jnp.swapaxes(toks, 0, 1), last[:, None]], axis=1)
