"""Speculative decoding: a small draft model proposes k tokens, the target model checks all of
them in one parallel pass, and a rejection rule keeps the target's distribution exactly
(Leviathan et al. 2023, Chen et al. 2023; the seed catalog's §2.13).

Each round, with both models' caches holding the sequence up to its last token x:
1. the draft feeds x and samples d_1..d_k, one decode step each (then feeds d_k, so that its
   cache can be rewound to any of the k + 1 tokens);
2. the target feeds [x, d_1..d_k] at once (`TransformerLM.extend`): its distributions p_1..p_k+1
   at every drafted position, for the cost of reading its weights once;
3. d_i is accepted with probability min(1, p_i(d_i) / q_i(d_i)) (greedy: when it is the
   target's argmax), up to the first rejection; the rejected position gets a sample of
   norm(max(0, p_i - q_i)) instead (greedy: the target's argmax), and a round that accepts all
   k adds a sample of p_k+1. So every round emits between 1 and k + 1 tokens, each distributed
   exactly as the target alone would sample it: greedy output equals `generate`'s (exactly in
   float32; in bfloat16 the parallel check and the one-token steps round differently, so a
   near-tie between two tokens can go either way).
4. Both caches are rewound to the kept tokens (`TransformerLM.rewind`).

Rows of a batch share one cache position, so a round keeps the fewest tokens any row accepted
(each row's kept tokens are still a prefix of its own exact speculative output: lossless, but
the larger the batch, the fewer tokens per round). The draft can be any model over the same
vocabulary: a smaller Transformer, or a Mamba/hybrid student distilled from the target
(memx.distill). Attention layers keep dense KV caches here (a sparse plan's ring caches, a
quantized or an evicting cache cannot be rewound); recurrent layers step through the k + 1
checked tokens one by one to keep each state (`Block.extend_steps`).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from memx.models.decode import check_prompt, sample
from memx.models.transformer import TransformerLM
from memx.typing import Array, Int

__all__ = ["SpeculativeStats", "speculative_generate"]


@dataclasses.dataclass(frozen=True)
class SpeculativeStats:
  """What a `speculative_generate` call did.

  rounds: target passes after the prompt (one per round); accepted: drafted tokens kept,
  summed over rounds (with several rows, the batch's minimum per round: what every row kept);
  drafted: tokens the draft proposed (rounds · k). new_tokens: tokens
  generated (the first one comes from the prompt's pass, as in `generate`).
  """

  rounds: int
  accepted: int
  drafted: int
  new_tokens: int

  @property
  def acceptance(self) -> float:
    """The fraction of drafted tokens kept."""
    return self.accepted / self.drafted if self.drafted else 0.0

  @property
  def tokens_per_round(self) -> float:
    """Tokens emitted per target pass (plain decoding: 1)."""
    return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0


def speculative_generate(target: TransformerLM, draft: TransformerLM,
                         prompt: Int[Array, "B T"], max_new_tokens: int, *, draft_len: int = 4,
                         temperature: float = 0.0, rng: jax.Array | None = None,
                         max_len: int | None = None, prefill_chunk: int | None = None
                         ) -> tuple[Int[Array, "B S"], SpeculativeStats]:
  """Prompt [B, T] → (prompt followed by max_new_tokens tokens [B, T + max_new_tokens], stats).

  The tokens are distributed as `generate(target, ...)`'s (equal to them at temperature 0, up
  to near-ties that bfloat16 rounding decides);
  the draft only decides how many target passes it takes. draft_len: tokens drafted per round
  (k). temperature, rng: as `generate` (both models' logits are divided by the temperature).
  max_len (default T + max_new_tokens + k - 1, what the last round can reach) sizes both
  models' KV caches and is the length N at which a sparse plan takes its spans (pass
  generate's max_len to compare with it). prefill_chunk: both models prefill the prompt that
  many tokens at a time (`generate`'s; the same tokens).
  """
  if not isinstance(target, TransformerLM) or not isinstance(draft, TransformerLM):
    raise ValueError(f"speculative_generate: target and draft must be TransformerLM models, got "
                     f"{type(target).__name__} and {type(draft).__name__}")
  if draft.cfg.vocab_size != target.cfg.vocab_size:
    raise ValueError(f"speculative_generate: the draft's vocabulary ({draft.cfg.vocab_size}) "
                     f"must be the target's ({target.cfg.vocab_size})")
  if not (isinstance(draft_len, int) and not isinstance(draft_len, bool) and draft_len >= 1):
    raise ValueError(f"speculative_generate: draft_len must be an int >= 1, got {draft_len!r}")
  temperature = check_prompt("speculative_generate", target, prompt, max_new_tokens,
                             temperature, rng)
  t = prompt.shape[1]
  need = t + max_new_tokens + draft_len - 1
  max_len = need if max_len is None else max_len
  if not (isinstance(max_len, int) and max_len >= need):
    raise ValueError(f"speculative_generate: max_len must be >= prompt {t} + new tokens "
                     f"{max_new_tokens} + draft_len {draft_len} - 1 = {need} (the last round "
                     f"checks draft_len tokens past the end), got {max_len!r}")
  rng = jax.random.key(0) if rng is None else rng
  tgraph, tstate = nnx.split(target)
  dgraph, dstate = nnx.split(draft)
  tokens, rounds, accepted = _speculative(
      tgraph, tstate, dgraph, dstate, prompt, rng, max_new_tokens=max_new_tokens, k=draft_len,
      temperature=temperature, max_len=max_len, prefill_chunk=prefill_chunk)
  rounds, accepted = int(rounds), int(accepted)
  return tokens, SpeculativeStats(rounds=rounds, accepted=accepted, drafted=rounds * draft_len,
                                  new_tokens=max_new_tokens)


def _recurrent_states(model: TransformerLM, cache: dict) -> list:
  """A cache's recurrent-layer states (None for attention layers: they rewind by position)."""
  return [None if block.kind == "attention" else layer_cache
          for block, layer_cache in zip(model.blocks, cache["layers"], strict=True)]


def _probs(logits, temperature: float):
  return jax.nn.softmax(logits / temperature, axis=-1)


def _judge(p_logits, q_logits, drafts, key, temperature: float):
  """The acceptance rule for one round, per row.

  p_logits [B, k+1, V]: the target's at the k + 1 checked positions; q_logits [B, k, V]: the
  draft's for d_1..d_k; drafts [B, k]. → (ok [B, k]: d_i accepted given d_<i were, and
  fix [B, k+1]: the token each position gets when it is the first rejected one (index k: the
  bonus token after k accepted)).
  """
  b, k = drafts.shape
  if temperature == 0.0:
    best = jnp.argmax(p_logits, axis=-1).astype(jnp.int32)          # [B, k+1]
    return drafts == best[:, :k], best
  k_accept, k_fix = jax.random.split(key)
  p, q = _probs(p_logits, temperature), _probs(q_logits, temperature)
  p_d = jnp.take_along_axis(p[:, :k], drafts[..., None], axis=-1)[..., 0]
  q_d = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
  # u < p/q, as u·q < p (q_d > 0: d was drawn from q).
  ok = jax.random.uniform(k_accept, (b, k)) * q_d < p_d
  # A rejected position samples the residual max(0, p - q) (normalised); position k (all
  # accepted) samples p itself. Where p = q exactly there is no residual, and no rejection.
  residual = jnp.maximum(p[:, :k] - q, 0.0)
  residual = jnp.where(jnp.sum(residual, -1, keepdims=True) > 0, residual, p[:, :k])
  fix_dist = jnp.concatenate([residual, p[:, k:]], axis=1)            # [B, k+1, V]
  fix = jax.random.categorical(k_fix, jnp.log(fix_dist), axis=-1).astype(jnp.int32)
  return ok, fix


@functools.partial(jax.jit, static_argnames=("tgraph", "dgraph", "max_new_tokens", "k",
                                             "temperature", "max_len", "prefill_chunk"))
def _speculative(tgraph, tstate, dgraph, dstate, prompt, rng, *, max_new_tokens: int, k: int,
                 temperature: float, max_len: int, prefill_chunk: int | None = None):
  target, draft = nnx.merge(tgraph, tstate), nnx.merge(dgraph, dstate)
  b, t = prompt.shape
  total = t + max_new_tokens
  first_key, rng = jax.random.split(rng)
  logits, tcache = target.prefill(prompt, max_len, full_cache=True, last_logits=True,
                                  chunk_size=prefill_chunk)
  _, dcache = draft.prefill(prompt, max_len, full_cache=True, last_logits=True,
                            chunk_size=prefill_chunk)
  first = sample(logits, first_key, temperature)
  # Room for a whole last round past the end; what lies beyond `total` is cut off.
  out = jnp.zeros((b, total + k + 1), jnp.int32)
  out = jax.lax.dynamic_update_slice_in_dim(out, prompt.astype(jnp.int32), 0, axis=1)
  out = out.at[:, t].set(first)

  def draft_round(dcache, last, keys):
    """k + 1 draft steps from `last` → (drafts [B, k], their logits [B, k, V], cache, states)."""
    def body(carry, key):
      tok, cache = carry
      logits, cache = draft.decode_step(tok, cache)
      return (sample(logits, key, temperature), cache), (tok, logits,
                                                        _recurrent_states(draft, cache))

    (_, dcache), (fed, logits, states) = jax.lax.scan(body, (last, dcache), keys)
    drafts = jnp.swapaxes(fed[1:], 0, 1)                               # [B, k]
    return drafts, jnp.swapaxes(logits[:k], 0, 1), dcache, states

  def cond(carry):
    return carry[0] < total

  def body(carry):
    n, out, tcache, dcache, rounds, accepted = carry
    key = jax.random.fold_in(rng, rounds)
    k_draft, k_judge = jax.random.split(key)
    start = n - 1                                   # both caches hold positions < n - 1
    last = jax.lax.dynamic_index_in_dim(out, start, axis=1, keepdims=False)
    drafts, q_logits, dcache, dstates = draft_round(dcache, last, jax.random.split(k_draft, k + 1))
    p_logits, tcache, tstates = target.extend(jnp.concatenate([last[:, None], drafts], 1), tcache)
    ok, fix = _judge(p_logits, q_logits, drafts, k_judge, temperature)
    run = jnp.sum(jnp.cumprod(ok, axis=1), axis=1)                     # each row's accepted
    j = jnp.min(run)                                                    # the batch keeps j
    slot = jnp.arange(k + 1)
    # Position j: the row's own draft where it accepted it, else its fix.
    took = jnp.concatenate([ok, jnp.zeros((b, 1), bool)], axis=1)[:, j]
    tok_j = jnp.where(took, jnp.concatenate([drafts, fix[:, k:]], 1)[:, j], fix[:, j])
    cand = jnp.where(slot[None] == j, tok_j[:, None],
                     jnp.concatenate([drafts, jnp.zeros((b, 1), jnp.int32)], axis=1))
    out = jax.lax.dynamic_update_slice_in_dim(out, cand, n, axis=1)
    tcache = target.rewind(tcache, tstates, j + 1, start)
    dcache = draft.rewind(dcache, dstates, j + 1, start)
    return n + j + 1, out, tcache, dcache, rounds + 1, accepted + j

  zero = jnp.zeros((), jnp.int32)
  n, out, *_, rounds, accepted = jax.lax.while_loop(
      cond, body, (jnp.int32(t + 1), out, tcache, dcache, zero, zero))
  del n
  return out[:, :total], rounds, accepted

